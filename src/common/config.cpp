#include "kvbm/config.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <fmt/format.h>
#include <mutex>
#include <set>

#include "kvbm/error.h"
#include "kvbm/log.h"

namespace kvbm {
namespace {

std::string Lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

std::string Trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  size_t e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

[[noreturn]] void Bad(const char* name, const std::string& value, const std::string& why) {
  throw ConfigError(fmt::format("{}=\"{}\": {}", name, value, why));
}

}  // namespace

bool ParseBool(const char* name, const std::string& raw) {
  std::string v = Lower(Trim(raw));
  if (v == "1" || v == "true" || v == "yes" || v == "on") return true;
  if (v == "0" || v == "false" || v == "no" || v == "off" || v.empty()) return false;
  Bad(name, raw, "expected a boolean (true/false/1/0/yes/no/on/off)");
}

uint64_t ParseUnsigned(const char* name, const std::string& raw, uint64_t min, uint64_t max) {
  std::string v = Trim(raw);
  if (v.empty() || !std::all_of(v.begin(), v.end(), [](unsigned char c) { return std::isdigit(c); }))
    Bad(name, raw, "expected a non-negative integer");
  errno = 0;
  unsigned long long parsed = std::strtoull(v.c_str(), nullptr, 10);
  if (errno == ERANGE) Bad(name, raw, "integer overflows 64 bits");
  if (parsed < min || parsed > max)
    Bad(name, raw, fmt::format("out of range [{}, {}]", min, max));
  return parsed;
}

// A decimal number as people write sizes: optional sign, digits with at most one '.', an
// optional exponent. What strtod accepts beyond that (hex floats, inf, nan) is refused.
bool IsDecimalNumber(const std::string& v) {
  size_t i = 0;
  if (i < v.size() && (v[i] == '+' || v[i] == '-')) ++i;
  size_t digits = 0;
  while (i < v.size() && std::isdigit(static_cast<unsigned char>(v[i]))) ++i, ++digits;
  if (i < v.size() && v[i] == '.') {
    ++i;
    while (i < v.size() && std::isdigit(static_cast<unsigned char>(v[i]))) ++i, ++digits;
  }
  if (digits == 0) return false;
  if (i < v.size() && (v[i] == 'e' || v[i] == 'E')) {
    ++i;
    if (i < v.size() && (v[i] == '+' || v[i] == '-')) ++i;
    size_t exp_digits = 0;
    while (i < v.size() && std::isdigit(static_cast<unsigned char>(v[i]))) ++i, ++exp_digits;
    if (exp_digits == 0) return false;
  }
  return i == v.size();
}

double ParseNonNegativeDouble(const char* name, const std::string& raw) {
  std::string v = Trim(raw);
  if (!IsDecimalNumber(v)) Bad(name, raw, "expected a decimal number");
  char* end = nullptr;
  errno = 0;
  double parsed = std::strtod(v.c_str(), &end);
  if (v.empty() || end != v.c_str() + v.size() || errno == ERANGE || !std::isfinite(parsed))
    Bad(name, raw, "expected a number");
  if (parsed < 0) Bad(name, raw, "must not be negative");
  return parsed;
}

namespace {

double ParseCacheGb(const char* name, const std::string& raw) {
  const double gb = ParseNonNegativeDouble(name, raw);
  if (gb > kMaxCacheGb)
    Bad(name, raw, fmt::format("too large: at most {:g} GB (an exabyte)", kMaxCacheGb));
  return gb;
}

}  // namespace

KvbmConfig KvbmConfig::FromMap(const std::map<std::string, std::string>& env) {
  return FromEnvironment([&env](const char* name) -> const char* {
    auto it = env.find(name);
    return it == env.end() ? nullptr : it->second.c_str();
  });
}

KvbmConfig KvbmConfig::FromEnvironment(const std::function<const char*(const char*)>& getenv_fn) {
  auto get = [&](const char* name) -> std::optional<std::string> {
    const char* v = getenv_fn ? getenv_fn(name) : std::getenv(name);
    if (v == nullptr) return std::nullopt;
    return std::string(v);
  };
  KvbmConfig c;
  if (auto v = get("DYN_KVBM_CPU_CACHE_GB")) c.cpu_cache_gb = ParseCacheGb("DYN_KVBM_CPU_CACHE_GB", *v);
  if (auto v = get("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS"))
    c.cpu_cache_num_blocks = ParseUnsigned("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", *v, 0, kMaxCacheBlocks);
  if (auto v = get("DYN_KVBM_DISK_CACHE_GB")) c.disk_cache_gb = ParseCacheGb("DYN_KVBM_DISK_CACHE_GB", *v);
  if (auto v = get("DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS"))
    c.disk_cache_num_blocks = ParseUnsigned("DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS", *v, 0, kMaxCacheBlocks);
  if (auto v = get("DYN_KVBM_DISK_CACHE_DIR")) {
    if (Trim(*v).empty()) Bad("DYN_KVBM_DISK_CACHE_DIR", *v, "must name a directory");
    c.disk_cache_dir = *v;
  }
  if (auto v = get("DYN_KVBM_DISK_ZEROFILL_FALLBACK")) c.disk_zerofill_fallback = ParseBool("DYN_KVBM_DISK_ZEROFILL_FALLBACK", *v);
  if (auto v = get("DYN_KVBM_DISK_DISABLE_O_DIRECT")) c.disk_disable_o_direct = ParseBool("DYN_KVBM_DISK_DISABLE_O_DIRECT", *v);
  if (auto v = get("DYN_KVBM_DISK_PERSISTENT")) c.disk_persistent = ParseBool("DYN_KVBM_DISK_PERSISTENT", *v);
  if (auto v = get("DYN_KVBM_DISK_ALLOCATOR_TYPE")) {
    std::string t = Lower(Trim(*v));
    if (t == "default" || t.empty()) c.disk_allocator = DiskAllocatorType::kDefault;
    else if (t == "open-direct" || t == "open_direct") c.disk_allocator = DiskAllocatorType::kOpenDirect;
    else Bad("DYN_KVBM_DISK_ALLOCATOR_TYPE", *v, "expected 'default' or 'open-direct'");
  }
  if (auto v = get("DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER"))
    c.disable_disk_offload_filter = ParseBool("DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER", *v);
  if (auto v = get("DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY"))
    c.host_offload_prefix_min_priority = ParseUnsigned("DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY", *v, 0, 100);
  if (auto v = get("DYN_KVBM_MAX_CONCURRENT_TRANSFERS"))
    c.max_concurrent_transfers = ParseUnsigned("DYN_KVBM_MAX_CONCURRENT_TRANSFERS", *v, 1, 1024);
  if (auto v = get("DYN_KVBM_MAX_TRANSFER_BATCH_SIZE"))
    c.max_transfer_batch_size = ParseUnsigned("DYN_KVBM_MAX_TRANSFER_BATCH_SIZE", *v, 1, 65536);
  if (auto v = get("DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS"))
    c.leader_worker_init_timeout_secs = ParseUnsigned("DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS", *v, 1, 86400);
  if (auto v = get("DYN_KVBM_LEADER_ZMQ_HOST")) {
    if (Trim(*v).empty()) Bad("DYN_KVBM_LEADER_ZMQ_HOST", *v, "must name a host");
    c.leader_zmq_host = Trim(*v);
  }
  if (auto v = get("DYN_KVBM_LEADER_ZMQ_PUB_PORT"))
    c.leader_zmq_pub_port = ParseUnsigned("DYN_KVBM_LEADER_ZMQ_PUB_PORT", *v, 1, 65535);
  if (auto v = get("DYN_KVBM_LEADER_ZMQ_ACK_PORT"))
    c.leader_zmq_ack_port = ParseUnsigned("DYN_KVBM_LEADER_ZMQ_ACK_PORT", *v, 1, 65535);
  if (c.leader_zmq_pub_port == c.leader_zmq_ack_port)
    Bad("DYN_KVBM_LEADER_ZMQ_ACK_PORT", std::to_string(c.leader_zmq_ack_port),
        "must differ from DYN_KVBM_LEADER_ZMQ_PUB_PORT");
  if (auto v = get("DYN_KVBM_METRICS")) c.metrics = ParseBool("DYN_KVBM_METRICS", *v);
  if (auto v = get("DYN_KVBM_METRICS_PORT"))
    c.metrics_port = ParseUnsigned("DYN_KVBM_METRICS_PORT", *v, 0, 65535);
  if (auto v = get("DYN_KVBM_METRICS_HOST")) {
    if (Trim(*v).empty()) Bad("DYN_KVBM_METRICS_HOST", *v, "must name an address");
    c.metrics_host = Trim(*v);
  }
  if (auto v = get("DYN_KVBM_CACHE_STATS_MAX_REQUESTS"))
    c.cache_stats_max_requests = ParseUnsigned("DYN_KVBM_CACHE_STATS_MAX_REQUESTS", *v, 1, 100000000);
  if (auto v = get("DYN_KVBM_CACHE_STATS_LOG_INTERVAL_SECS"))
    c.cache_stats_log_interval_secs = ParseUnsigned("DYN_KVBM_CACHE_STATS_LOG_INTERVAL_SECS", *v, 1, 86400);
  if (auto v = get("DYN_KVBM_EVENTS_ENDPOINT")) c.events_endpoint = Trim(*v);
  for (const char* name : {"DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS", "DYN_KVBM_LEADER_ZMQ_HOST",
                           "DYN_KVBM_LEADER_ZMQ_PUB_PORT", "DYN_KVBM_LEADER_ZMQ_ACK_PORT"})
    if (auto v = get(name)) c.leader_settings_set.emplace_back(name, *v);

  if (auto v = get("DYN_KVBM_ENABLE_RECORD")) c.enable_record = ParseBool("DYN_KVBM_ENABLE_RECORD", *v);
  if (auto v = get("DYN_KVBM_RECORD_PATH")) {
    if (Trim(*v).empty()) Bad("DYN_KVBM_RECORD_PATH", *v, "must name a file");
    c.record_path = *v;
  }
  if (auto v = get("DYN_KVBM_DISABLE_WRITE_COMBINED"))
    c.disable_write_combined = ParseBool("DYN_KVBM_DISABLE_WRITE_COMBINED", *v);
  if (auto v = get("DYN_KVBM_ENABLE_NUMA")) c.enable_numa = ParseBool("DYN_KVBM_ENABLE_NUMA", *v);
  if (auto v = get("DYN_KVBM_KV_EVENTS_ENABLE_CONSOLIDATOR"))
    c.kv_events_enable_consolidator = ParseBool("DYN_KVBM_KV_EVENTS_ENABLE_CONSOLIDATOR", *v);
  if (auto v = get("DYN_KVBM_KV_EVENTS_CONSOLIDATOR_MODE")) {
    std::string m = Lower(Trim(*v));
    if (m == "dedup") c.kv_events_consolidator_mode = ConsolidatorMode::kDedup;
    else if (m == "passthrough") c.kv_events_consolidator_mode = ConsolidatorMode::kPassthrough;
    else Bad("DYN_KVBM_KV_EVENTS_CONSOLIDATOR_MODE", *v, "expected 'dedup' or 'passthrough'");
  }
  if (auto v = get("DYN_KVBM_NCCL_MLA_MODE")) c.nccl_mla_mode = ParseBool("DYN_KVBM_NCCL_MLA_MODE", *v);
  if (auto v = get("DYN_KVBM_NCCL_MAX_CTAS"))
    c.nccl_max_ctas = static_cast<uint32_t>(ParseUnsigned("DYN_KVBM_NCCL_MAX_CTAS", *v, 1, 1024));
  if (auto v = get("DYN_KVBM_TRTLLM_ZMQ_PORT"))
    c.trtllm_zmq_port = static_cast<uint16_t>(ParseUnsigned("DYN_KVBM_TRTLLM_ZMQ_PORT", *v, 1, 65535));
  if (auto v = get("DYN_KVBM_REMOTE_URL")) c.remote_url = Trim(*v);
  if (auto v = get("DYN_KVBM_REMOTE_NAMESPACE")) {
    std::string t = Trim(*v);
    if (t.empty() || t.size() > 128 || t.find_first_of(" {}:\t\r\n") != std::string::npos)
      Bad("DYN_KVBM_REMOTE_NAMESPACE", *v, "must be 1..128 characters without spaces, ':', '{' or '}'");
    c.remote_namespace = t;
  }
  if (auto v = get("DYN_KVBM_REMOTE_TIMEOUT_MS"))
    c.remote_timeout_ms = ParseUnsigned("DYN_KVBM_REMOTE_TIMEOUT_MS", *v, 1, 600000);
  if (auto v = get("DYN_KVBM_REMOTE_MATCH_BUDGET_MS"))
    c.remote_match_budget_ms = ParseUnsigned("DYN_KVBM_REMOTE_MATCH_BUDGET_MS", *v, 1, 60000);
  if (auto v = get("DYN_KVBM_REMOTE_ADMISSION")) {
    std::string t = Lower(Trim(*v));
    if (t != "store" && t != "reuse" && t != "off")
      Bad("DYN_KVBM_REMOTE_ADMISSION", *v, "expected 'store' (every block G2 stores), 'reuse' (second sight) or 'off'");
    c.remote_admission = t;
  }
  if (auto v = get("DYN_KVBM_REMOTE_REQUIRED")) c.remote_required = ParseBool("DYN_KVBM_REMOTE_REQUIRED", *v);
  if (auto v = get("DYN_KVBM_PROMOTE_DISK_HITS")) c.promote_disk_hits = ParseBool("DYN_KVBM_PROMOTE_DISK_HITS", *v);
  if (auto v = get("DYN_KVBM_SYNC_LOAD_MAX_MB"))
    c.sync_load_max_mb = ParseUnsigned("DYN_KVBM_SYNC_LOAD_MAX_MB", *v, 0, uint64_t{1} << 30);
  for (auto [name, field] : {std::pair{"DYN_KVBM_HOST_EVICTION_POLICY", &c.host_eviction_policy},
                             std::pair{"DYN_KVBM_DISK_EVICTION_POLICY", &c.disk_eviction_policy}}) {
    if (auto v = get(name)) {
      std::string t = Lower(Trim(*v));
      if (t.empty()) Bad(name, *v, "must name an eviction policy (adaptive, reuse, leaf-first, lru)");
      *field = t;  // the name is checked against the policies when the tiers are built
    }
  }
  return c;
}

std::vector<std::string> KvbmConfig::Notices() const {
  std::vector<std::string> out;
  auto note = [&out](const std::string& name, const std::string& value, const char* why) {
    out.push_back(fmt::format("{}={} is accepted but has no effect in kvbm: {}", name, value, why));
  };
  auto b = [](bool v) { return std::string(v ? "true" : "false"); };
  if (disable_write_combined)
    note("DYN_KVBM_DISABLE_WRITE_COMBINED", b(*disable_write_combined),
         "kvbm never allocates write-combined host memory (G2 is mapped with mmap and page-locked with "
         "cuMemHostRegister, which has no write-combined mode), so there is nothing to disable");
  if (kv_events_enable_consolidator)
    note("DYN_KVBM_KV_EVENTS_ENABLE_CONSOLIDATOR", b(*kv_events_enable_consolidator),
         "kvbm has no event consolidator; it publishes its own G2/G3 events on DYN_KVBM_EVENTS_ENDPOINT "
         "and the engine publishes G1's on its own socket");
  if (kv_events_consolidator_mode)
    note("DYN_KVBM_KV_EVENTS_CONSOLIDATOR_MODE",
         *kv_events_consolidator_mode == ConsolidatorMode::kDedup ? "dedup" : "passthrough",
         "kvbm has no event consolidator (see DYN_KVBM_KV_EVENTS_ENABLE_CONSOLIDATOR)");
  if (nccl_mla_mode)
    note("DYN_KVBM_NCCL_MLA_MODE", b(*nccl_mla_mode),
         "kvbm has no NCCL path; every tensor-parallel rank loads its own shard from its own G2/G3");
  if (nccl_max_ctas)
    note("DYN_KVBM_NCCL_MAX_CTAS", std::to_string(*nccl_max_ctas),
         "kvbm has no NCCL path (see DYN_KVBM_NCCL_MLA_MODE)");
  if (trtllm_zmq_port)
    note("DYN_KVBM_TRTLLM_ZMQ_PORT", std::to_string(*trtllm_zmq_port),
         "it is the port of the reference's TensorRT-LLM event consolidator, which kvbm does not have");
  for (const auto& [name, value] : leader_settings_set)
    note(name, value,
         "kvbm has no ZeroMQ leader/worker channel; the leader's operations travel in the engine's own "
         "per-step connector metadata");
  return out;
}

void KvbmConfig::LogNoticesOnce() const {
  static std::mutex mu;
  static std::set<std::string> logged;  // GUARDED_BY(mu)
  for (const std::string& line : Notices()) {
    std::lock_guard lock(mu);
    if (logged.insert(line).second) Log(LogLevel::kWarn, "{}", line);
  }
}

void KvbmConfig::Validate() const {
  bool host = cpu_cache_num_blocks ? *cpu_cache_num_blocks > 0 : cpu_cache_gb > 0;
  bool disk = disk_cache_num_blocks ? *disk_cache_num_blocks > 0 : disk_cache_gb > 0;
  if (!host && !disk)
    throw ConfigError(
        "no cache tier is sized: set DYN_KVBM_CPU_CACHE_GB (or DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS) "
        "and/or DYN_KVBM_DISK_CACHE_GB (or DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS)");
}

// The conversion is range-checked first: a double beyond uint64_t's range (or NaN) converted
// to an integer is undefined behaviour, and a size that large is a mistake to report.
static uint64_t BlocksFor(const char* name, double gb, std::optional<uint64_t> override_blocks,
                          uint64_t bytes_per_block) {
  if (override_blocks) return *override_blocks;
  if (bytes_per_block == 0) return 0;
  const double blocks = std::floor(gb * 1e9 / static_cast<double>(bytes_per_block));
  if (!(blocks >= 0) || blocks > static_cast<double>(kMaxCacheBlocks))
    throw ConfigError(fmt::format(
        "{}=\"{:g}\": too large: {:g} blocks of {} bytes, more than the {} blocks a tier may have",
        name, gb, blocks, bytes_per_block, kMaxCacheBlocks));
  return static_cast<uint64_t>(blocks);
}

uint64_t KvbmConfig::HostBlocks(uint64_t bytes_per_block) const {
  return BlocksFor("DYN_KVBM_CPU_CACHE_GB", cpu_cache_gb, cpu_cache_num_blocks, bytes_per_block);
}
uint64_t KvbmConfig::DiskBlocks(uint64_t bytes_per_block) const {
  return BlocksFor("DYN_KVBM_DISK_CACHE_GB", disk_cache_gb, disk_cache_num_blocks, bytes_per_block);
}

}  // namespace kvbm
