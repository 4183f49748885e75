#include "kvbm/remote_tier.h"

#include <fmt/format.h>

#include "kvbm/log.h"
#include "kvbm/remote_block.h"

namespace kvbm {

std::optional<RemoteTierOptions> RemoteTierOptions::FromConfig(const KvbmConfig& config, std::string descriptor,
                                                               uint32_t world_size) {
  if (config.remote_url.empty()) return std::nullopt;
  RemoteTierOptions o;
  auto seeds = ParseRedisSeeds(config.remote_url);
  if (!seeds) throw ConfigError(fmt::format("DYN_KVBM_REMOTE_URL=\"{}\": {}", config.remote_url, seeds.error().message()));
  o.seeds = std::move(*seeds);
  if (auto s = ValidateRemoteNamespace(config.remote_namespace); !s)
    throw ConfigError(fmt::format("DYN_KVBM_REMOTE_NAMESPACE=\"{}\": {}", config.remote_namespace, s.error().message()));
  o.name_space = config.remote_namespace;
  if (descriptor.empty()) throw ConfigError("kvbm remote tier: the engine adapter gave no model descriptor");
  o.descriptor = std::move(descriptor);
  o.world_size = std::max<uint32_t>(world_size, 1);
  o.timeout = std::chrono::milliseconds(config.remote_timeout_ms);
  o.match_budget = std::chrono::milliseconds(config.remote_match_budget_ms);
  o.admission = config.remote_admission == "off"     ? RemoteAdmission::kOff
                : config.remote_admission == "reuse" ? RemoteAdmission::kReuse
                                                     : RemoteAdmission::kStore;
  o.required = config.remote_required;
  return o;
}

uint64_t RemoteTierOptions::Fingerprint(uint32_t rank) const {
  return RemoteLayoutFingerprint(fmt::format("{}|tp={}|rank={}", descriptor, world_size, rank));
}

std::string RemoteTierOptions::Key(uint32_t rank, SequenceHash hash) const {
  return RemoteBlockKey(name_space, Fingerprint(rank), hash.value());
}

Result<std::unique_ptr<RemoteIndex>> RemoteIndex::Connect(const RemoteTierOptions& options,
                                                          std::shared_ptr<KvbmMetrics> metrics) {
  RedisClusterOptions ro;
  ro.seeds = options.seeds;
  ro.connect_timeout = options.timeout;
  ro.command_timeout = options.match_budget;
  ro.call_timeout = options.match_budget;
  auto client = RedisCluster::Connect(ro);
  if (!client) return std::unexpected(client.error());
  return std::unique_ptr<RemoteIndex>(new RemoteIndex(options, std::move(*client), std::move(metrics)));
}

size_t RemoteIndex::CountPrefix(std::span<const BlockKey> keys) {
  if (keys.empty()) return 0;
  scratch_.clear();
  for (const BlockKey& k : keys) scratch_.push_back(options_.Key(0, k.sequence_hash));
  auto start = std::chrono::steady_clock::now();
  auto exists = client_->Exists(scratch_);
  if (metrics_)
    metrics_->remote_lookup_latency.Observe(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  if (!exists) {
    if (metrics_) metrics_->remote_errors++;
    Log(LogLevel::kDebug, "kvbm G4 lookup failed (a miss): {}", exists.error().ToString());
    return 0;
  }
  size_t n = 0;
  while (n < exists->size() && (*exists)[n]) ++n;
  if (metrics_) {
    metrics_->remote_hit_blocks += n;
    metrics_->remote_miss_blocks += keys.size() - n;
  }
  return n;
}

}  // namespace kvbm
