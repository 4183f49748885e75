#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <vector>

#include "kvbm/observability.h"

namespace kvbm {
namespace {

using namespace std::chrono_literals;

TEST(CacheStatsLogger, LineCarriesRatesAndTokens) {
  KvbmMetrics m;
  m.host_hit_rate.Record(4, 1);
  m.disk_hit_rate.Record(10, 5);
  m.matched_tokens = 300;
  m.requested_tokens = 1200;
  EXPECT_EQ(CacheStatsLogger::FormatLine(m),
            "kvbm cache stats: host hit rate 25.00%, disk hit rate 50.00%, matched tokens 300 of "
            "requested 1200 "
            "(25.00%)");
  EXPECT_EQ(CacheStatsLogger::FormatLine(KvbmMetrics{}),
            "kvbm cache stats: host hit rate 0.00%, disk hit rate 0.00%, matched tokens 0 of "
            "requested 0 (0.00%)");
}

TEST(CacheStatsLogger, LogsEveryIntervalWithCurrentValues) {
  auto metrics = std::make_shared<KvbmMetrics>();
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::string> lines;
  CacheStatsLogger logger(metrics, 50ms, [&](const std::string& line) {
    std::lock_guard lock(mu);
    lines.push_back(line);
    if (lines.size() == 1) metrics->matched_tokens = 99;  // visible in the next line
    cv.notify_all();
  });
  std::unique_lock lock(mu);
  ASSERT_TRUE(cv.wait_for(lock, 5s, [&] { return lines.size() >= 3; }));
  EXPECT_NE(lines[0].find("matched tokens 0 "), std::string::npos) << lines[0];
  EXPECT_NE(lines[2].find("matched tokens 99 "), std::string::npos) << lines[2];
}

TEST(CacheStatsLogger, StopIsPromptWithLongInterval) {
  int calls = 0;
  CacheStatsLogger logger(std::make_shared<KvbmMetrics>(), std::chrono::hours(1),
                          [&](const std::string&) { ++calls; });
  std::this_thread::sleep_for(20ms);
  const auto t0 = std::chrono::steady_clock::now();
  logger.Stop();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 200ms);
  EXPECT_EQ(calls, 0);
  logger.Stop();  // idempotent
}

TEST(CacheStatsLogger, FromConfigUsesTheIntervalVariable) {
  const KvbmConfig c = KvbmConfig::FromMap(
      {{"DYN_KVBM_CPU_CACHE_GB", "1"}, {"DYN_KVBM_CACHE_STATS_LOG_INTERVAL_SECS", "2"}});
  EXPECT_EQ(c.cache_stats_log_interval_secs, 2u);
  auto logger = CacheStatsLogger::FromConfig(c, std::make_shared<KvbmMetrics>());
  const auto t0 = std::chrono::steady_clock::now();
  logger.reset();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 200ms);
}

}  // namespace
}  // namespace kvbm
