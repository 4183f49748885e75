#include "kvbm/manager.h"

#include "kvbm/log.h"
#include "kvbm/observability.h"

namespace kvbm {

KvBlockManager::KvBlockManager(const KvbmConfig& config, const TierChainOptions& tiers, uint32_t page_size,
                               std::shared_ptr<KvbmMetrics> metrics)
    : metrics_(metrics ? std::move(metrics) : std::make_shared<KvbmMetrics>(config.cache_stats_max_requests)),
      registry_(std::make_shared<BlockRegistry>()),
      chain_(std::make_shared<TierChain>(config, tiers, metrics_, registry_)) {
  if (!config.events_endpoint.empty()) {
    KvEventPublisher::Options o;
    o.endpoint = config.events_endpoint;
    o.block_size = page_size;
    o.metrics = metrics_;
    auto publisher = KvEventPublisher::Create(o);
    if (publisher) {
      events_ = std::move(*publisher);
      events_->Attach(*registry_);
    } else {
      observability_error_ += publisher.error().message() + "; ";
      Log(LogLevel::kError, "kvbm: KV events off: {}", publisher.error().message());
    }
  }
  if (config.metrics) {
    auto o = MetricsServer::OptionsFrom(config);
    std::weak_ptr<BlockPool> host = chain_->host() ? chain_->host()->weak_from_this() : std::weak_ptr<BlockPool>();
    std::weak_ptr<BlockPool> disk = chain_->disk() ? chain_->disk()->weak_from_this() : std::weak_ptr<BlockPool>();
    std::shared_ptr<KvbmMetrics> m = metrics_;
    o.before_scrape = [host, disk, m] {
      if (auto p = host.lock()) m->pool_used[static_cast<size_t>(TierId::kHost)] = p->stats().registered;
      if (auto p = disk.lock()) m->pool_used[static_cast<size_t>(TierId::kDisk)] = p->stats().registered;
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
  // The chain may outlive this manager (a leader shares it); events stop with the publisher.
  chain_.reset();
  events_.reset();
}

uint16_t KvBlockManager::metrics_port() const { return server_ ? server_->port() : 0; }
std::string KvBlockManager::events_endpoint() const { return events_ ? events_->endpoint() : std::string(); }

}  // namespace kvbm
