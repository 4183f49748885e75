// Every DYN_KVBM_* setting, parsed and validated in one place.
//
// `KvbmConfig::FromEnvironment()` reads the process environment once; a value that does not
// parse or is out of range throws ConfigError naming the variable and the value.
// `Validate()` checks the cross-field rules (at least one of G2 and G3 sized). Values only;
// thread-compatible.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace kvbm {

// The most blocks one tier may have (the *_OVERRIDE_NUM_BLOCKS bound and the bound of the
// blocks a *_CACHE_GB size converts to).
inline constexpr uint64_t kMaxCacheBlocks = uint64_t{1} << 40;
// The largest *_CACHE_GB accepted: an exabyte. Beyond it the value is a typo, not a size.
inline constexpr double kMaxCacheGb = 1e9;

enum class DiskAllocatorType { kDefault, kOpenDirect };

// DYN_KVBM_KV_EVENTS_CONSOLIDATOR_MODE: how the reference merges the engine's and KVBM's KV
// events (kvbm has no consolidator; the value is validated and reported, see Notices()).
enum class ConsolidatorMode { kDedup, kPassthrough };

struct KvbmConfig {
  double cpu_cache_gb = 0;
  std::optional<uint64_t> cpu_cache_num_blocks;
  double disk_cache_gb = 0;
  std::optional<uint64_t> disk_cache_num_blocks;
  std::string disk_cache_dir = "/tmp/";
  bool disk_zerofill_fallback = false;
  bool disk_disable_o_direct = false;
  bool disk_persistent = false;  // DYN_KVBM_DISK_PERSISTENT: keep G3 across restarts (stable, locked file)
  DiskAllocatorType disk_allocator = DiskAllocatorType::kDefault;
  bool disable_disk_offload_filter = false;
  uint32_t host_offload_prefix_min_priority = 0;
  uint32_t max_concurrent_transfers = 4;
  uint32_t max_transfer_batch_size = 16;
  uint32_t leader_worker_init_timeout_secs = 120;
  std::string leader_zmq_host = "127.0.0.1";
  uint16_t leader_zmq_pub_port = 56001;
  uint16_t leader_zmq_ack_port = 56002;
  bool metrics = false;
  uint16_t metrics_port = 6880;
  std::string metrics_host = "127.0.0.1";
  uint32_t cache_stats_max_requests = 1000;
  uint32_t cache_stats_log_interval_secs = 5;
  std::string events_endpoint;  // DYN_KVBM_EVENTS_ENDPOINT; empty: no KV events published
  bool promote_disk_hits = false;  // DYN_KVBM_PROMOTE_DISK_HITS: copy onboarded G3 blocks up to G2
  // DYN_KVBM_SYNC_LOAD_MAX_MB: a load served wholly from G2 of at most this many MB per rank is
  // synchronous where the engine allows it (the request is scheduled in the step that loads it,
  // and the worker waits for the copy before the forward pass); 0: every load asynchronous.
  uint64_t sync_load_max_mb = 256;
  // DYN_KVBM_HOST_EVICTION_POLICY / DYN_KVBM_DISK_EVICTION_POLICY (lower-cased; checked against
  // the known policies, eviction.h, when the tier chain is built). Empty: the default policy.
  std::string host_eviction_policy, disk_eviction_policy;
  // The remote tier (G4) on a Redis Cluster. Empty url: no G4.
  std::string remote_url;                 // DYN_KVBM_REMOTE_URL, redis://host:port,host:port
  std::string remote_namespace = "kvbm";  // DYN_KVBM_REMOTE_NAMESPACE, first part of every key
  uint32_t remote_timeout_ms = 1000;      // DYN_KVBM_REMOTE_TIMEOUT_MS, a worker's batch call
  uint32_t remote_match_budget_ms = 20;   // DYN_KVBM_REMOTE_MATCH_BUDGET_MS, the scheduler's lookup
  std::string remote_admission = "store"; // DYN_KVBM_REMOTE_ADMISSION: store | reuse | off
  bool remote_required = false;           // DYN_KVBM_REMOTE_REQUIRED: unreachable G4 is an error

  // DYN_KVBM_ENABLE_RECORD: the vLLM adapter writes a Mooncake-format trace of the engine's
  // requests (JSONL, one line per request) to `record_path` (DYN_KVBM_RECORD_PATH; default
  // kvbm-record-<pid>.jsonl in the working directory). `kvbm replay FILE` reads it back.
  bool enable_record = false;
  std::string record_path;  // empty: the default above

  // Settings of the reference that mean nothing here. Each is parsed and validated like the
  // others (a bad value is still an error) and, when set, reported once by Notices(). The
  // reasons are in Notices() and docs/CONFIG.md.
  std::optional<bool> disable_write_combined;            // DYN_KVBM_DISABLE_WRITE_COMBINED
  std::optional<bool> enable_numa;                       // DYN_KVBM_ENABLE_NUMA
  std::optional<bool> kv_events_enable_consolidator;     // DYN_KVBM_KV_EVENTS_ENABLE_CONSOLIDATOR
  std::optional<ConsolidatorMode> kv_events_consolidator_mode;  // DYN_KVBM_KV_EVENTS_CONSOLIDATOR_MODE
  std::optional<bool> nccl_mla_mode;                     // DYN_KVBM_NCCL_MLA_MODE
  std::optional<uint32_t> nccl_max_ctas;                 // DYN_KVBM_NCCL_MAX_CTAS
  std::optional<uint16_t> trtllm_zmq_port;               // DYN_KVBM_TRTLLM_ZMQ_PORT
  // The DYN_KVBM_LEADER_* names that were set: the ZeroMQ leader/worker stack they configured
  // is gone (vLLM carries the leader's operations), so they are accepted and reported.
  std::vector<std::pair<std::string, std::string>> leader_settings_set;  // (name, value)

  // Reads the environment through `getenv` (injectable for tests).
  static KvbmConfig FromEnvironment(
      const std::function<const char*(const char*)>& getenv_fn = nullptr);
  static KvbmConfig FromMap(const std::map<std::string, std::string>& env);

  // Throws ConfigError when no tier below G1 is sized.
  void Validate() const;

  // One line per setting that was set but has no effect in kvbm, naming it and saying why.
  // Empty when none was set. Pure; LogNoticesOnce() logs them.
  std::vector<std::string> Notices() const;
  // Logs each line of Notices() at WARN level, each at most once per process (the leader, the
  // workers and the sizing call all read the configuration). Thread-safe.
  void LogNoticesOnce() const;

  // Blocks for a tier: the override wins; else floor(gb * 1e9 / bytes_per_block). Throws
  // ConfigError naming DYN_KVBM_CPU_CACHE_GB / DYN_KVBM_DISK_CACHE_GB when that is more than
  // kMaxCacheBlocks blocks (checked before the conversion to an integer).
  uint64_t HostBlocks(uint64_t bytes_per_block) const;
  uint64_t DiskBlocks(uint64_t bytes_per_block) const;
};

// Parsers shared by the config and the command line; each throws ConfigError naming `name`.
bool ParseBool(const char* name, const std::string& value);
uint64_t ParseUnsigned(const char* name, const std::string& value, uint64_t min, uint64_t max);
// Decimal only ("12", "0.5", "1e3"): hexadecimal ("0x10"), "inf" and "nan" are refused.
double ParseNonNegativeDouble(const char* name, const std::string& value);

}  // namespace kvbm
