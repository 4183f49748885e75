// KvBlockManager: what an engine integration (or `kvbm replay`) holds on the scheduler side. It
// owns the tier chain (pools and policy, tier_chain.h), the registry of hashes across tiers and
// the observability that the configuration asks for: the Prometheus endpoint
// (DYN_KVBM_METRICS), the cache-statistics log line and KV events (DYN_KVBM_EVENTS_ENDPOINT).
// An observability part that cannot start (port in use, bad address) is logged with the
// variable that caused it and left off: it never fails the engine. The connector leader
// (connector layer, above this one) drives chain().
//
// Thread safety: chain() is for the scheduler thread; metrics are safe from any thread.
#pragma once

#include <memory>
#include <string>

#include "kvbm/config.h"
#include "kvbm/tier_chain.h"
#include "kvbm/metrics.h"

namespace kvbm {

class MetricsServer;
class CacheStatsLogger;
class KvEventPublisher;

class KvBlockManager {
 public:
  // Throws ConfigError for a configuration that sizes nothing or does not parse.
  // `page_size`: tokens per block (KV events carry it).
  KvBlockManager(const KvbmConfig& config, const TierChainOptions& tiers, uint32_t page_size,
                 std::shared_ptr<KvbmMetrics> metrics = nullptr);
  ~KvBlockManager();

  const std::shared_ptr<TierChain>& chain() const { return chain_; }
  const std::shared_ptr<BlockRegistry>& registry() const { return registry_; }
  const std::shared_ptr<KvbmMetrics>& metrics() const { return metrics_; }
  uint16_t metrics_port() const;           // 0 when the endpoint is off
  std::string events_endpoint() const;     // empty when events are off
  const std::string& observability_error() const { return observability_error_; }

 private:
  std::shared_ptr<KvbmMetrics> metrics_;
  std::shared_ptr<BlockRegistry> registry_;
  std::shared_ptr<TierChain> chain_;
  std::unique_ptr<MetricsServer> server_;
  std::unique_ptr<CacheStatsLogger> stats_logger_;
  std::unique_ptr<KvEventPublisher> events_;
  std::string observability_error_;
};

}  // namespace kvbm
