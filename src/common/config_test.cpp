#include <gtest/gtest.h>

#include "kvbm/config.h"
#include "kvbm/error.h"

namespace kvbm {
namespace {

TEST(Config, DefaultsAndParsing) {
  auto c = KvbmConfig::FromMap({{"DYN_KVBM_CPU_CACHE_GB", "4"}, {"DYN_KVBM_DISK_ALLOCATOR_TYPE", "open-direct"},
                                {"DYN_KVBM_METRICS", "true"}});
  EXPECT_DOUBLE_EQ(c.cpu_cache_gb, 4);
  EXPECT_EQ(c.disk_allocator, DiskAllocatorType::kOpenDirect);
  EXPECT_TRUE(c.metrics);
  EXPECT_EQ(c.metrics_port, 6880);
  EXPECT_EQ(c.max_transfer_batch_size, 16u);
  EXPECT_FALSE(c.disk_persistent) << "the reference's unlinked temp file is the default";
  EXPECT_EQ(c.HostBlocks(1'000'000), 4000u);
  EXPECT_TRUE(KvbmConfig::FromMap({{"DYN_KVBM_DISK_PERSISTENT", "true"}}).disk_persistent);
  EXPECT_FALSE(KvbmConfig::FromMap({{"DYN_KVBM_DISK_PERSISTENT", "0"}}).disk_persistent);
  c.Validate();
}

TEST(Config, OverrideWinsOverGb) {
  auto c = KvbmConfig::FromMap({{"DYN_KVBM_CPU_CACHE_GB", "4"}, {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", "7"}});
  EXPECT_EQ(c.HostBlocks(1000), 7u);
}

TEST(Config, ErrorsNameVariableAndValue) {
  auto expect_error = [](std::map<std::string, std::string> env, const std::string& needle) {
    try {
      KvbmConfig::FromMap(env).Validate();
      ADD_FAILURE() << "no error for " << needle;
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error({{"DYN_KVBM_CPU_CACHE_GB", "lots"}}, "DYN_KVBM_CPU_CACHE_GB=\"lots\"");
  expect_error({{"DYN_KVBM_CPU_CACHE_GB", "-1"}}, "DYN_KVBM_CPU_CACHE_GB");
  expect_error({{"DYN_KVBM_METRICS_PORT", "70000"}, {"DYN_KVBM_CPU_CACHE_GB", "1"}}, "DYN_KVBM_METRICS_PORT=\"70000\"");
  expect_error({{"DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY", "101"}}, "DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY");
  expect_error({{"DYN_KVBM_DISK_ALLOCATOR_TYPE", "fast"}}, "DYN_KVBM_DISK_ALLOCATOR_TYPE");
  expect_error({{"DYN_KVBM_METRICS", "maybe"}}, "DYN_KVBM_METRICS");
  expect_error({{"DYN_KVBM_DISK_PERSISTENT", "sometimes"}}, "DYN_KVBM_DISK_PERSISTENT=\"sometimes\"");
  expect_error({{"DYN_KVBM_MAX_CONCURRENT_TRANSFERS", "0"}}, "DYN_KVBM_MAX_CONCURRENT_TRANSFERS");
  expect_error({{"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", "99999999999999999999999"}}, "overflow");
  expect_error({}, "no cache tier is sized");
  expect_error({{"DYN_KVBM_REMOTE_ADMISSION", "sometimes"}}, "DYN_KVBM_REMOTE_ADMISSION=\"sometimes\"");
  expect_error({{"DYN_KVBM_REMOTE_NAMESPACE", "a{b}"}}, "DYN_KVBM_REMOTE_NAMESPACE");
  expect_error({{"DYN_KVBM_REMOTE_TIMEOUT_MS", "0"}}, "DYN_KVBM_REMOTE_TIMEOUT_MS");
  expect_error({{"DYN_KVBM_HOST_EVICTION_POLICY", ""}}, "DYN_KVBM_HOST_EVICTION_POLICY");
  expect_error({{"DYN_KVBM_PROMOTE_DISK_HITS", "often"}}, "DYN_KVBM_PROMOTE_DISK_HITS");
  expect_error({{"DYN_KVBM_SYNC_LOAD_MAX_MB", "-1"}}, "DYN_KVBM_SYNC_LOAD_MAX_MB=\"-1\"");
  expect_error({{"DYN_KVBM_SYNC_LOAD_MAX_MB", "1.5"}}, "DYN_KVBM_SYNC_LOAD_MAX_MB");
}

TEST(Config, TierSettings) {
  auto c = KvbmConfig::FromMap({{"DYN_KVBM_CPU_CACHE_GB", "1"},
                                {"DYN_KVBM_REMOTE_URL", " redis://127.0.0.1:7000 "},
                                {"DYN_KVBM_REMOTE_ADMISSION", "Reuse"},
                                {"DYN_KVBM_PROMOTE_DISK_HITS", "yes"},
                                {"DYN_KVBM_DISK_EVICTION_POLICY", " LRU "}});
  EXPECT_EQ(c.remote_url, "redis://127.0.0.1:7000");
  EXPECT_EQ(c.remote_admission, "reuse");
  EXPECT_EQ(c.remote_namespace, "kvbm");
  EXPECT_TRUE(c.promote_disk_hits);
  EXPECT_EQ(c.disk_eviction_policy, "lru");
  EXPECT_EQ(c.sync_load_max_mb, 256u);  // the default
  EXPECT_EQ(KvbmConfig::FromMap({{"DYN_KVBM_CPU_CACHE_GB", "1"}, {"DYN_KVBM_SYNC_LOAD_MAX_MB", "0"}}).sync_load_max_mb, 0u);
}

TEST(Config, ReferenceOnlySettingsParseAndValidate) {
  auto c = KvbmConfig::FromMap({{"DYN_KVBM_DISABLE_WRITE_COMBINED", "1"},
                                {"DYN_KVBM_ENABLE_NUMA", "true"},
                                {"DYN_KVBM_KV_EVENTS_ENABLE_CONSOLIDATOR", "false"},
                                {"DYN_KVBM_KV_EVENTS_CONSOLIDATOR_MODE", "PassThrough"},
                                {"DYN_KVBM_NCCL_MLA_MODE", "yes"},
                                {"DYN_KVBM_NCCL_MAX_CTAS", "8"},
                                {"DYN_KVBM_TRTLLM_ZMQ_PORT", "20081"},
                                {"DYN_KVBM_ENABLE_RECORD", "on"},
                                {"DYN_KVBM_RECORD_PATH", "/tmp/trace.jsonl"}});
  EXPECT_EQ(c.disable_write_combined, true);
  EXPECT_EQ(c.enable_numa, true);
  EXPECT_EQ(c.kv_events_enable_consolidator, false);
  EXPECT_EQ(c.kv_events_consolidator_mode, ConsolidatorMode::kPassthrough);
  EXPECT_EQ(c.nccl_mla_mode, true);
  EXPECT_EQ(c.nccl_max_ctas, 8u);
  EXPECT_EQ(c.trtllm_zmq_port, 20081);
  EXPECT_TRUE(c.enable_record);
  EXPECT_EQ(c.record_path, "/tmp/trace.jsonl");

  auto expect_error = [](const char* name, const char* value) {
    try {
      KvbmConfig::FromMap({{name, value}});
      ADD_FAILURE() << "no error for " << name << "=" << value;
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find(std::string(name) + "=\"" + value + "\""), std::string::npos) << e.what();
    }
  };
  expect_error("DYN_KVBM_DISABLE_WRITE_COMBINED", "sometimes");
  expect_error("DYN_KVBM_ENABLE_NUMA", "2");
  expect_error("DYN_KVBM_KV_EVENTS_ENABLE_CONSOLIDATOR", "enabled");
  expect_error("DYN_KVBM_KV_EVENTS_CONSOLIDATOR_MODE", "merge");
  expect_error("DYN_KVBM_NCCL_MLA_MODE", "mla");
  expect_error("DYN_KVBM_NCCL_MAX_CTAS", "0");
  expect_error("DYN_KVBM_NCCL_MAX_CTAS", "many");
  expect_error("DYN_KVBM_TRTLLM_ZMQ_PORT", "70000");
  expect_error("DYN_KVBM_ENABLE_RECORD", "please");
  expect_error("DYN_KVBM_RECORD_PATH", " ");
}

TEST(Config, NoticesNameEverySettingWithoutEffect) {
  EXPECT_TRUE(KvbmConfig::FromMap({{"DYN_KVBM_CPU_CACHE_GB", "1"}}).Notices().empty());
  const std::map<std::string, std::string> env = {
      {"DYN_KVBM_DISABLE_WRITE_COMBINED", "1"},
      {"DYN_KVBM_KV_EVENTS_ENABLE_CONSOLIDATOR", "1"}, {"DYN_KVBM_KV_EVENTS_CONSOLIDATOR_MODE", "dedup"},
      {"DYN_KVBM_NCCL_MLA_MODE", "1"}, {"DYN_KVBM_NCCL_MAX_CTAS", "4"}, {"DYN_KVBM_TRTLLM_ZMQ_PORT", "20081"},
      {"DYN_KVBM_LEADER_ZMQ_HOST", "10.0.0.1"}, {"DYN_KVBM_LEADER_ZMQ_PUB_PORT", "5000"},
      {"DYN_KVBM_LEADER_ZMQ_ACK_PORT", "5001"}, {"DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS", "30"}};
  auto notices = KvbmConfig::FromMap(env).Notices();
  ASSERT_EQ(notices.size(), env.size());
  // DYN_KVBM_ENABLE_NUMA has an effect (G2 bound to the GPU's node): no notice.
  EXPECT_TRUE(KvbmConfig::FromMap({{"DYN_KVBM_CPU_CACHE_GB", "1"}, {"DYN_KVBM_ENABLE_NUMA", "1"}}).Notices().empty());
  for (const auto& [name, value] : env) {
    int hits = 0;
    for (const auto& line : notices)
      if (line.rfind(name + "=", 0) == 0) {
        ++hits;
        EXPECT_NE(line.find("has no effect in kvbm: "), std::string::npos) << line;
      }
    EXPECT_EQ(hits, 1) << name;
  }
  // Recording is implemented, so it is no notice.
  EXPECT_TRUE(KvbmConfig::FromMap({{"DYN_KVBM_ENABLE_RECORD", "1"}}).Notices().empty());
}

// Issue 17: huge sizes were accepted, then overflowed a double -> uint64_t conversion and were
// reported as "too small". Now each is refused, naming the variable and saying "too large".
TEST(Config, HugeCacheSizesAreTooLargeNotUndefined) {
  for (const char* var : {"DYN_KVBM_CPU_CACHE_GB", "DYN_KVBM_DISK_CACHE_GB"}) {
    for (const char* value : {"1e30", "1e300", "2000000000"}) {
      try {
        KvbmConfig::FromMap({{var, value}});
        ADD_FAILURE() << var << "=" << value << " accepted";
      } catch (const ConfigError& e) {
        const std::string msg = e.what();
        EXPECT_NE(msg.find(std::string(var) + "=\"" + value + "\""), std::string::npos) << msg;
        EXPECT_NE(msg.find("too large"), std::string::npos) << msg;
      }
    }
  }
  // Within the parser's bound but too many blocks of this size: the conversion is checked.
  const KvbmConfig c =
      KvbmConfig::FromMap({{"DYN_KVBM_CPU_CACHE_GB", "1e9"}, {"DYN_KVBM_DISK_CACHE_GB", "1e9"}});
  for (bool host : {true, false}) {
    try {
      host ? c.HostBlocks(1) : c.DiskBlocks(1);
      ADD_FAILURE() << "1e18 blocks accepted";
    } catch (const ConfigError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(host ? "DYN_KVBM_CPU_CACHE_GB" : "DYN_KVBM_DISK_CACHE_GB"),
                std::string::npos)
          << msg;
      EXPECT_NE(msg.find("too large"), std::string::npos) << msg;
    }
  }
  // Just under the bound converts exactly; just over it is refused.
  EXPECT_EQ(KvbmConfig::FromMap({{"DYN_KVBM_CPU_CACHE_GB", "1000"}}).HostBlocks(1),
            uint64_t{1'000'000'000'000});
  EXPECT_THROW(KvbmConfig::FromMap({{"DYN_KVBM_CPU_CACHE_GB", "1100"}}).HostBlocks(1), ConfigError);
}

TEST(Config, SizesAreDecimalOnly) {
  for (const char* var : {"DYN_KVBM_CPU_CACHE_GB", "DYN_KVBM_DISK_CACHE_GB",
                          "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", "DYN_KVBM_METRICS_PORT"}) {
    for (const char* value : {"0x10", "0X1p4", "inf", "nan", "1e", ".", "1_000", "--1"}) {
      try {
        KvbmConfig::FromMap({{var, value}});
        ADD_FAILURE() << var << "=" << value << " accepted";
      } catch (const ConfigError& e) {
        EXPECT_NE(std::string(e.what()).find(std::string(var) + "=\"" + value + "\""),
                  std::string::npos)
            << e.what();
      }
    }
  }
  EXPECT_DOUBLE_EQ(KvbmConfig::FromMap({{"DYN_KVBM_CPU_CACHE_GB", "0.5"}}).cpu_cache_gb, 0.5);
  EXPECT_DOUBLE_EQ(KvbmConfig::FromMap({{"DYN_KVBM_CPU_CACHE_GB", "2e1"}}).cpu_cache_gb, 20);
  EXPECT_DOUBLE_EQ(KvbmConfig::FromMap({{"DYN_KVBM_CPU_CACHE_GB", " 3. "}}).cpu_cache_gb, 3);
}

}  // namespace
}  // namespace kvbm
