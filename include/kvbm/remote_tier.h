// The remote tier (G4): how kvbm names its blocks in a shared Redis Cluster and how the
// scheduler side asks which of them it holds. The bytes move in the workers (worker.h:
// kFetchRemote, kOffloadRemote); blocks are framed and verified by remote_block.h.
//
// Naming. Every engine instance of the same model, dtype, block size and tensor-parallel layout
// builds the same `descriptor` (the engine adapter makes it from the engine's configuration);
// rank r's blocks live under RemoteBlockKey(namespace, fingerprint(descriptor, r), hash), so
// instances share prefixes and nothing else. kvbm never assumes a stored block is still there:
// Redis may evict it or lose it; a block that is gone or does not verify is a load error and
// the engine recomputes it.
//
// Matching asks G4 only past the local run, in one pipelined EXISTS of rank 0's keys, within
// `match_budget`: a slow or unreachable G4 costs a miss, never a stalled scheduler.
//
// Thread safety: RemoteIndex is used by the scheduler thread only.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kvbm/block_pool.h"
#include "kvbm/config.h"
#include "kvbm/error.h"
#include "kvbm/metrics.h"
#include "kvbm/redis_cluster.h"

namespace kvbm {

enum class RemoteAdmission : uint8_t {
  kStore,  // every block stored in G2 is also put to G4 (what makes a prefix shared at once)
  kReuse,  // a block goes to G4 on its second sight (a repeat store or a G2 hit)
  kOff,    // G4 is only read
};

struct RemoteTierOptions {
  std::vector<RedisNodeAddress> seeds;
  std::string name_space = "kvbm";
  std::string descriptor;  // model, dtype, block size, per-rank bytes, world size (the adapter's)
  uint32_t world_size = 1;
  std::chrono::milliseconds timeout{1000};      // a worker's batch call
  std::chrono::milliseconds match_budget{20};   // the scheduler's existence check
  RemoteAdmission admission = RemoteAdmission::kStore;
  bool required = false;  // unreachable at start: an error (true) or a warning and no G4

  // Nothing when DYN_KVBM_REMOTE_URL is unset; ConfigError naming the setting for a bad URL or
  // namespace.
  static std::optional<RemoteTierOptions> FromConfig(const KvbmConfig& config, std::string descriptor,
                                                     uint32_t world_size);
  // The key fingerprint of `rank`'s blocks.
  uint64_t Fingerprint(uint32_t rank) const;
  std::string Key(uint32_t rank, SequenceHash hash) const;
};

// The scheduler side's view of G4: which blocks it holds.
class RemoteIndex {
 public:
  // kUnavailable / kTimeout when no node answers within the timeouts.
  static Result<std::unique_ptr<RemoteIndex>> Connect(const RemoteTierOptions& options,
                                                      std::shared_ptr<KvbmMetrics> metrics);
  // How many leading `keys` G4 holds (rank 0's keys), asked in one pipelined call within the
  // match budget. An error or a timeout is a miss (0), counted in the metrics.
  size_t CountPrefix(std::span<const BlockKey> keys);
  const RemoteTierOptions& options() const { return options_; }

 private:
  RemoteIndex(RemoteTierOptions options, std::unique_ptr<RedisCluster> client, std::shared_ptr<KvbmMetrics> metrics)
      : options_(std::move(options)), client_(std::move(client)), metrics_(std::move(metrics)) {}
  RemoteTierOptions options_;
  std::unique_ptr<RedisCluster> client_;
  std::shared_ptr<KvbmMetrics> metrics_;
  std::vector<std::string> scratch_;
};

}  // namespace kvbm
