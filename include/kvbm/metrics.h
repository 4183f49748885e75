// Counters, gauges and latency histograms that every layer updates and the observability
// layer exposes (Prometheus text on DYN_KVBM_METRICS_PORT). Names follow the reference's
// (`kvbm_offload_blocks_d2h`, ...) plus kvbm's own, listed in README.md.
//
// Thread safety: every member is atomic or internally synchronised; update from any thread.
// One KvbmMetrics is owned (shared_ptr) by the KvBlockManager; readers hold a shared_ptr.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

namespace kvbm {

// Transfer paths, named as the reference names them.
enum class TransferPath : uint8_t {
  kD2H,  // G1 -> G2 offload (device to host)
  kH2D_Disk,  // G2 -> G3 offload (host to disk): the reference's `offload_blocks_h2d`
  kD2D,  // G1 -> G3 offload (device to disk, bypass)
  kH2Dev,  // G2 -> G1 onboard (host to device): `onboard_blocks_h2d`
  kDisk2Dev,  // G3 -> G1 onboard (disk to device): `onboard_blocks_d2d`
  kDisk2H,  // G3 -> G2 (bounce or promotion)
  kH2Remote,  // G2 -> G4 (remote offload)
  kRemote2H,  // G4 -> G2 (remote onboard, verified)
  kCount,
};
inline constexpr size_t kNumTransferPaths = static_cast<size_t>(TransferPath::kCount);
const char* TransferPathLabel(TransferPath path);  // "d2h", "h2disk", "d2disk", ...

// Exponential-bucket latency histogram in seconds (Prometheus semantics: cumulative buckets).
class LatencyHistogram {
 public:
  static constexpr std::array<double, 14> kBounds = {1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2,
                                                     3e-2, 0.1,  0.3,  1.0,  3.0,  10.0, 30.0};
  void Observe(double seconds);
  struct Snapshot {
    std::array<uint64_t, kBounds.size() + 1> counts{};  // last = +Inf
    uint64_t count = 0;
    double sum = 0;
  };
  Snapshot Read() const;
  // Adds another process's observations (its snapshot, or the difference of two of them), so
  // that a worker's histogram can be folded into the leader's (see src/python/stats_bindings).
  void Add(const Snapshot& other);

 private:
  mutable std::mutex mu_;
  Snapshot data_;  // GUARDED_BY(mu_)
};

// Hit rate over the last N requests: blocks hit / blocks queried.
class WindowedHitRate {
 public:
  explicit WindowedHitRate(size_t max_requests) : max_requests_(max_requests) {}
  void Record(uint64_t queried, uint64_t hit);
  double Rate() const;  // 0 when nothing was queried

 private:
  mutable std::mutex mu_;
  size_t max_requests_;
  std::deque<std::pair<uint64_t, uint64_t>> window_;  // GUARDED_BY(mu_)
  uint64_t queried_ = 0, hit_ = 0;                    // GUARDED_BY(mu_)
};

enum class DropReason : uint8_t { kTargetFull, kFilter, kPriority, kIoError, kQueueFull, kCount };
inline constexpr size_t kNumDropReasons = static_cast<size_t>(DropReason::kCount);
const char* DropReasonLabel(DropReason reason);

// What a worker's persistent G3 (DYN_KVBM_DISK_PERSISTENT) found per slot when it opened: a
// block that verified, a write cut off by a crash, bytes that no longer match their checksum,
// a record of another layout, a second copy of a hash already recovered.
enum class DiskRecoveryResult : uint8_t { kVerified, kTorn, kCorrupt, kOtherLayout, kDuplicate, kCount };
inline constexpr size_t kNumDiskRecoveryResults = static_cast<size_t>(DiskRecoveryResult::kCount);
const char* DiskRecoveryResultLabel(DiskRecoveryResult result);  // "verified", "torn", ...

// Why a request was neither matched nor stored: an input kvbm cannot key (a multimodal item
// without a usable identifier or position, prompt embeddings it cannot read, or an input of the
// engine's it does not know). Such a request is never served from a key that ignores an input.
enum class BypassReason : uint8_t { kMultimodal, kPromptEmbeds, kUnknownInput, kCount };
inline constexpr size_t kNumBypassReasons = static_cast<size_t>(BypassReason::kCount);
const char* BypassReasonLabel(BypassReason reason);  // "multimodal", "prompt_embeds", "unknown_input"
// The label back to its reason; nullopt for a label that names none.
std::optional<BypassReason> BypassReasonFromLabel(std::string_view label);

struct KvbmMetrics {
  explicit KvbmMetrics(size_t hit_rate_window = 1000)
      : host_hit_rate(hit_rate_window), disk_hit_rate(hit_rate_window) {}

  std::array<std::atomic<uint64_t>, kNumTransferPaths> blocks{};  // per path
  std::array<std::atomic<uint64_t>, kNumTransferPaths> bytes{};   // per path
  std::array<LatencyHistogram, kNumTransferPaths> latency;         // per transfer batch
  std::array<std::atomic<uint64_t>, kNumDropReasons> dropped_offloads{};
  std::atomic<uint64_t> matched_tokens{0};
  std::atomic<uint64_t> requested_tokens{0};
  std::atomic<uint64_t> load_errors{0};       // blocks reported to the engine as failed loads
  std::atomic<uint64_t> corrupt_blocks{0};    // blocks whose checksum or hash did not verify
  std::atomic<uint64_t> disk_writes_avoided{0};  // blocks the admission filter kept off disk
  std::atomic<uint64_t> kv_events_published{0};  // KV events sent on the ZeroMQ PUB socket
  std::atomic<uint64_t> kv_events_dropped{0};    // KV events lost (publisher queue overflow, send error)
  // The remote tier (G4). Bytes and blocks moved are in blocks/bytes[kH2Remote / kRemote2H].
  std::atomic<uint64_t> remote_hit_blocks{0};       // blocks the scheduler found in G4
  std::atomic<uint64_t> remote_miss_blocks{0};      // blocks it asked for and G4 did not hold
  std::atomic<uint64_t> remote_verify_failures{0};  // G4 values rejected (gone, other layout, torn, corrupt)
  std::atomic<uint64_t> remote_errors{0};           // G4 calls that failed (unreachable, timeout)
  LatencyHistogram remote_lookup_latency;           // the scheduler's existence checks
  // Warm restart of G3: the workers' recovery (per result, summed over ranks) and the blocks the
  // scheduler side put back into its G3 pool (matchable again).
  std::array<std::atomic<uint64_t>, kNumDiskRecoveryResults> disk_recovery_blocks{};
  std::atomic<uint64_t> disk_restored_blocks{0};
  // Requests kvbm left alone (BypassReason), and requests that must not read cached KV (vLLM's
  // skip_reading_prefix_cache: prompt logprobs, some pooling tasks), stored but never loaded.
  std::array<std::atomic<uint64_t>, kNumBypassReasons> bypassed_requests{};
  std::atomic<uint64_t> read_skipped_requests{0};
  WindowedHitRate host_hit_rate;
  WindowedHitRate disk_hit_rate;
  // Pool occupancy per tier, refreshed by the manager when metrics are read.
  std::array<std::atomic<uint64_t>, 5> pool_capacity{};
  std::array<std::atomic<uint64_t>, 5> pool_used{};
};

}  // namespace kvbm
