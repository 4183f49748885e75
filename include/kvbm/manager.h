// KvBlockManager: the facade an engine integration (or `kvbm replay`) holds on the leader side.
// It owns the connector leader (pools, policy, per-request slots) and the observability that
// the configuration asks for: the Prometheus endpoint (DYN_KVBM_METRICS), the cache-statistics
// log line and KV events (DYN_KVBM_EVENTS_ENDPOINT). An observability part that cannot start
// (port in use, bad address) is logged with the variable that caused it and left off: it never
// fails the engine.
//
// Thread safety: leader() is for the scheduler thread; metrics are safe from any thread.
#pragma once

#include <memory>
#include <string>

#include "kvbm/config.h"
#include "kvbm/leader.h"
#include "kvbm/metrics.h"

namespace kvbm {

class MetricsServer;
class CacheStatsLogger;
class KvEventPublisher;

class KvBlockManager {
 public:
  // Throws ConfigError for a configuration that sizes nothing or does not parse.
  KvBlockManager(const KvbmConfig& config, const LeaderOptions& options,
                 std::shared_ptr<KvbmMetrics> metrics = nullptr);
  ~KvBlockManager();

  ConnectorLeader& leader() { return *leader_; }
  const std::shared_ptr<KvbmMetrics>& metrics() const { return metrics_; }
  uint16_t metrics_port() const;           // 0 when the endpoint is off
  std::string events_endpoint() const;     // empty when events are off
  const std::string& observability_error() const { return observability_error_; }

 private:
  std::shared_ptr<KvbmMetrics> metrics_;
  std::unique_ptr<ConnectorLeader> leader_;
  std::unique_ptr<MetricsServer> server_;
  std::unique_ptr<CacheStatsLogger> stats_logger_;
  std::unique_ptr<KvEventPublisher> events_;
  std::string observability_error_;
};

}  // namespace kvbm
