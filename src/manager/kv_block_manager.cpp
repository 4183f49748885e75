#include "kvbm/manager.h"

#include "kvbm/log.h"
#include "kvbm/observability.h"

namespace kvbm {

KvBlockManager::KvBlockManager(const KvbmConfig& config, const LeaderOptions& options,
                               std::shared_ptr<KvbmMetrics> metrics)
    : metrics_(metrics ? std::move(metrics) : std::make_shared<KvbmMetrics>(config.cache_stats_max_requests)) {
  leader_ = std::make_unique<ConnectorLeader>(config, options, metrics_);
  if (!config.events_endpoint.empty()) {
    KvEventPublisher::Options o;
    o.endpoint = config.events_endpoint;
    o.block_size = options.page_size;
    o.metrics = metrics_;
    auto publisher = KvEventPublisher::Create(o);
    if (publisher) {
      events_ = std::move(*publisher);
      events_->Attach(*leader_->registry());
    } else {
      observability_error_ += publisher.error().message() + "; ";
      Log(LogLevel::kError, "kvbm: KV events off: {}", publisher.error().message());
    }
  }
  if (config.metrics) {
    auto o = MetricsServer::OptionsFrom(config);
    ConnectorLeader* leader = leader_.get();
    std::shared_ptr<KvbmMetrics> m = metrics_;
    o.before_scrape = [leader, m] {
      if (leader->host_pool()) m->pool_used[static_cast<size_t>(TierId::kHost)] = leader->host_pool()->stats().registered;
      if (leader->disk_pool()) m->pool_used[static_cast<size_t>(TierId::kDisk)] = leader->disk_pool()->stats().registered;
    };
    server_ = std::make_unique<MetricsServer>(metrics_, o);
    if (auto s = server_->Start(); !s) {
      observability_error_ += s.error().message() + "; ";
      Log(LogLevel::kError, "kvbm: metrics endpoint off: {}", s.error().message());
      server_.reset();
    }
    stats_logger_ = CacheStatsLogger::FromConfig(config, metrics_);
  }
}

KvBlockManager::~KvBlockManager() {
  server_.reset();
  stats_logger_.reset();
  leader_.reset();  // removes nothing from the registry by itself; pools emit removals
  events_.reset();
}

uint16_t KvBlockManager::metrics_port() const { return server_ ? server_->port() : 0; }
std::string KvBlockManager::events_endpoint() const { return events_ ? events_->endpoint() : std::string(); }

}  // namespace kvbm
