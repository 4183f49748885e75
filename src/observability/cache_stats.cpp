// The periodic cache-statistics log line (DYN_KVBM_CACHE_STATS_LOG_INTERVAL_SECS).
#include <fmt/format.h>

#include <condition_variable>
#include <mutex>
#include <thread>

#include "kvbm/log.h"
#include "kvbm/observability.h"

namespace kvbm {

struct CacheStatsLogger::Impl {
  std::shared_ptr<KvbmMetrics> metrics;
  std::chrono::milliseconds interval;
  LineSink sink;
  std::mutex mu;
  std::condition_variable cv;
  bool stop = false;  // GUARDED_BY(mu)
  std::thread thread;

  void Run() {
    std::unique_lock lock(mu);
    // wait_until a fixed schedule, so a slow sink does not make the lines drift.
    auto next = std::chrono::steady_clock::now() + interval;
    while (!cv.wait_until(lock, next, [this] { return stop; })) {
      lock.unlock();
      sink(FormatLine(*metrics));
      lock.lock();
      next += interval;
    }
  }
};

CacheStatsLogger::CacheStatsLogger(std::shared_ptr<KvbmMetrics> metrics,
                                   std::chrono::milliseconds interval, LineSink sink)
    : impl_(std::make_unique<Impl>()) {
  Check(metrics != nullptr, "CacheStatsLogger needs a KvbmMetrics");
  Check(interval.count() > 0, "CacheStatsLogger interval must be positive");
  impl_->metrics = std::move(metrics);
  impl_->interval = interval;
  impl_->sink = sink ? std::move(sink)
                     : LineSink([](const std::string& line) { Log(LogLevel::kInfo, "{}", line); });
  impl_->thread = std::thread([impl = impl_.get()] { impl->Run(); });
}

std::unique_ptr<CacheStatsLogger> CacheStatsLogger::FromConfig(
    const KvbmConfig& config, std::shared_ptr<KvbmMetrics> metrics) {
  return std::make_unique<CacheStatsLogger>(
      std::move(metrics), std::chrono::seconds(config.cache_stats_log_interval_secs));
}

CacheStatsLogger::~CacheStatsLogger() { Stop(); }

void CacheStatsLogger::Stop() {
  {
    std::lock_guard lock(impl_->mu);
    impl_->stop = true;
  }
  impl_->cv.notify_all();
  if (impl_->thread.joinable()) impl_->thread.join();
}

std::string CacheStatsLogger::FormatLine(const KvbmMetrics& m) {
  const uint64_t matched = m.matched_tokens.load(std::memory_order_relaxed);
  const uint64_t requested = m.requested_tokens.load(std::memory_order_relaxed);
  const double token_rate =
      requested == 0 ? 0.0 : static_cast<double>(matched) / static_cast<double>(requested);
  return fmt::format(
      "kvbm cache stats: host hit rate {:.2f}%, disk hit rate {:.2f}%, matched tokens {} of "
      "requested {} "
      "({:.2f}%)",
      100.0 * m.host_hit_rate.Rate(), 100.0 * m.disk_hit_rate.Rate(), matched, requested,
      100.0 * token_rate);
}

}  // namespace kvbm
