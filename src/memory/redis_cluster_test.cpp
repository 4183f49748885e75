// The Redis Cluster client against a real 6-node cluster (scripts/redis_cluster.sh) on loopback.
#include "kvbm/redis_cluster.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "memory/redis_cluster_testing.h"

namespace kvbm {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
using testing::ClusterProcess;

TEST(RedisKeySlot, MatchesRedisDefinition) {
  // The reference value of CRC16-XMODEM, and slots Redis documents.
  EXPECT_EQ(RedisKeySlot("123456789"), 0x31C3 & 16383);
  EXPECT_EQ(RedisKeySlot("foo"), 12182);
  EXPECT_EQ(RedisKeySlot("bar"), 5061);
  // Hash tags: only the first non-empty {...} counts.
  EXPECT_EQ(RedisKeySlot("{user1000}.following"), RedisKeySlot("user1000"));
  EXPECT_EQ(RedisKeySlot("{user1000}.followers"), RedisKeySlot("{user1000}.following"));
  EXPECT_EQ(RedisKeySlot("foo{}{bar}"), RedisKeySlot("foo{}{bar}"));
  EXPECT_NE(RedisKeySlot("foo{}{bar}"), RedisKeySlot("bar"));  // an empty first tag: the whole key
  EXPECT_EQ(RedisKeySlot("foo{{bar}}zap"), RedisKeySlot("{bar"));
  EXPECT_EQ(RedisKeySlot("foo{bar}{zap}"), RedisKeySlot("bar"));
}

TEST(ParseRedisSeeds, AcceptsListsAndNamesWhatIsWrong) {
  auto ok = ParseRedisSeeds("redis://127.0.0.1:7000, 127.0.0.1:7001,redis://[::1]:7002/");
  ASSERT_TRUE(ok) << ok.error().ToString();
  ASSERT_EQ(ok->size(), 3u);
  EXPECT_EQ((*ok)[0], (RedisNodeAddress{"127.0.0.1", 7000}));
  EXPECT_EQ((*ok)[1], (RedisNodeAddress{"127.0.0.1", 7001}));
  EXPECT_EQ((*ok)[2], (RedisNodeAddress{"::1", 7002}));
  EXPECT_EQ((*ok)[2].ToString(), "[::1]:7002");

  auto expect_error = [](std::string_view url, std::string_view needle) {
    auto r = ParseRedisSeeds(url);
    ASSERT_FALSE(r) << url;
    EXPECT_EQ(r.error().code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(r.error().message().find(needle), std::string::npos) << r.error().message();
  };
  expect_error("", "empty");
  expect_error("redis://127.0.0.1:7000,", "stray comma");
  expect_error("rediss://127.0.0.1:7000", "TLS");
  expect_error("http://127.0.0.1:7000", "'http://'");
  expect_error("redis://user:pw@127.0.0.1:7000", "password");
  expect_error("redis://127.0.0.1:7000/3", "database");
  expect_error("redis://127.0.0.1", "no port");
  expect_error("redis://127.0.0.1:0", "port '0'");
  expect_error("redis://127.0.0.1:70000", "port '70000'");
  expect_error("redis://127.0.0.1:7x", "port '7x'");
  expect_error("redis://:7000", "no host");
  expect_error("redis://::1:7000", "brackets");
  expect_error("redis://[::1:7000", "never closed");
}

RedisClusterOptions FastOptions(const ClusterProcess& c) {
  RedisClusterOptions o;
  o.seeds = *ParseRedisSeeds(c.SeedUrl());
  o.connect_timeout = milliseconds(300);
  o.command_timeout = milliseconds(500);
  o.call_timeout = milliseconds(1000);
  o.reconnect_backoff = milliseconds(100);
  return o;
}

// A value whose bytes depend on the key and a seed, with lengths from 0 to ~256 KiB.
std::string ValueFor(const std::string& key, uint32_t seed) {
  std::mt19937_64 rng(std::hash<std::string>{}(key) ^ seed);
  const size_t n = (rng() % 16 == 0) ? 200'000 + rng() % 60'000 : rng() % 4096;
  std::string v(n, '\0');
  for (auto& c : v) c = static_cast<char>(rng());
  return v;
}

class RedisClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    cluster_ = std::make_unique<ClusterProcess>();
    ASSERT_TRUE(cluster_->ok()) << "could not start a Redis Cluster: " << cluster_->error();
    auto client = RedisCluster::Connect(FastOptions(*cluster_));
    ASSERT_TRUE(client) << client.error().ToString();
    client_ = std::move(*client);
  }
  void TearDown() override {
    client_.reset();
    cluster_.reset();
  }
  int Port(const RedisNodeAddress& a) const { return a.port; }

  // Blocks until every master's replicas have acknowledged its whole replication stream.
  void WaitReplicated() {
    const auto deadline = Clock::now() + std::chrono::seconds(10);
    for (int i = 0; i < ClusterProcess::kNodes; ++i) {
      const int port = cluster_->base_port() + i;
      for (;;) {
        auto info = cluster_->Cli(port, "info replication").out;
        if (info.find("role:master") == std::string::npos) break;
        auto off = info.find("master_repl_offset:");
        ASSERT_NE(off, std::string::npos);
        const std::string master_offset = info.substr(off + 19, info.find('\r', off) - off - 19);
        if (info.find("connected_slaves:1") != std::string::npos &&
            info.find(",offset=" + master_offset + ",") != std::string::npos)
          break;
        ASSERT_LT(Clock::now(), deadline) << "replicas of " << port << " never caught up:\n"
                                          << info;
        std::this_thread::sleep_for(milliseconds(20));
      }
    }
  }

  std::unique_ptr<ClusterProcess> cluster_;
  std::unique_ptr<RedisCluster> client_;
};

TEST_F(RedisClusterTest, ManyKeysOverAllSlotsRoundTripByteExact) {
  constexpr int kKeys = 3000;
  std::vector<std::string> keys;
  std::set<uint16_t> slots;
  for (int i = 0; i < kKeys; ++i) {
    keys.push_back(fmt::format("kvbm-test:{}:{}", i, i * 2654435761u));
    slots.insert(RedisKeySlot(keys.back()));
  }
  std::set<std::string> masters;
  for (uint16_t s : slots) masters.insert(client_->MasterOf(s)->ToString());
  EXPECT_EQ(masters.size(), 3u) << "keys should land on all three masters";
  EXPECT_GT(slots.size(), 2500u);

  // Our slot function agrees with the server's for a sample.
  for (int i = 0; i < kKeys; i += 301) {
    auto r = cluster_->Cli(cluster_->base_port(), "cluster keyslot " + keys[i]);
    EXPECT_EQ(std::stoi(r.out), RedisKeySlot(keys[i])) << keys[i];
  }

  std::vector<std::string> values;
  for (const auto& k : keys) values.push_back(ValueFor(k, 1));
  for (int start = 0; start < kKeys; start += 500) {
    std::vector<std::pair<std::string, std::string_view>> items;
    for (int i = start; i < std::min(kKeys, start + 500); ++i)
      items.emplace_back(keys[i], values[i]);
    auto st = client_->Set(items);
    ASSERT_TRUE(st) << st.error().ToString();
  }
  std::vector<std::string> asked = keys;
  for (int i = 0; i < 100; ++i) asked.push_back(fmt::format("kvbm-test:absent:{}", i));
  auto exists = client_->Exists(asked);
  ASSERT_TRUE(exists) << exists.error().ToString();
  auto got = client_->Get(asked);
  ASSERT_TRUE(got) << got.error().ToString();
  size_t wrong = 0;
  for (int i = 0; i < kKeys; ++i) {
    EXPECT_TRUE((*exists)[i]);
    if (!(*got)[i] || *(*got)[i] != values[i]) ++wrong;
  }
  EXPECT_EQ(wrong, 0u);
  for (size_t i = kKeys; i < asked.size(); ++i) {
    EXPECT_FALSE((*exists)[i]);
    EXPECT_FALSE((*got)[i].has_value());
  }
  auto removed = client_->Del(std::span(keys).first(10));
  ASSERT_TRUE(removed);
  EXPECT_EQ(*removed, 10u);
  const auto stats = client_->stats();
  EXPECT_EQ(stats.errors, 0u);
  EXPECT_EQ(stats.moved, 0u);
  masters.insert(
      fmt::format("127.0.0.1:{}", cluster_->base_port()));  // the seed that served the map
  EXPECT_EQ(stats.connects, masters.size()) << "one connection per node, kept across calls";
}

TEST_F(RedisClusterTest, SetPartsStoresHeadThenTailAndGetEachSeesEveryKey) {
  // Values of 0..~2 MiB sent as two parts (the second one may be empty or large), over all
  // masters in one pipelined call; GetEach visits every key once, with the joined value or
  // nullopt for a key that is not there.
  std::vector<std::string> keys, heads, tails;
  for (int i = 0; i < 60; ++i) {
    keys.push_back(fmt::format("kvbm-parts:{}", i));
    heads.push_back(ValueFor(keys.back(), 7).substr(0, 40));
    std::string tail = ValueFor(keys.back(), 8);
    if (i % 10 == 3) tail.assign(2u << 20, static_cast<char>('a' + i % 26));  // 2 MiB
    if (i % 10 == 5) tail.clear();
    tails.push_back(std::move(tail));
  }
  std::vector<RedisSetItem> items;
  for (size_t i = 0; i < keys.size(); ++i) items.push_back({keys[i], heads[i], tails[i]});
  auto st = client_->SetParts(items);
  ASSERT_TRUE(st) << st.error().ToString();
  std::vector<std::string> asked = keys;
  asked.push_back("kvbm-parts:absent");
  std::vector<int> seen(asked.size(), 0);
  size_t wrong = 0, missing = 0;
  auto got = client_->GetEach(asked, [&](size_t i, std::optional<std::string_view> v) {
    ++seen[i];
    if (!v) {
      ++missing;
      return;
    }
    if (*v != heads[i] + tails[i]) ++wrong;
  });
  ASSERT_TRUE(got) << got.error().ToString();
  EXPECT_EQ(wrong, 0u);
  EXPECT_EQ(missing, 1u);
  EXPECT_EQ(std::count(seen.begin(), seen.end(), 1), static_cast<long>(asked.size()));
  // The plain Get reads the same bytes.
  auto plain = client_->Get(std::span(keys).first(5));
  ASSERT_TRUE(plain);
  for (size_t i = 0; i < 5; ++i) EXPECT_EQ((*plain)[i].value_or(""), heads[i] + tails[i]);
}

TEST_F(RedisClusterTest, FollowsAskDuringMigrationAndMovedAfterIt) {
  // Keys of one slot (hash tag), half written before the migration starts.
  const std::string tag = "{kvbm-migrate}";
  const uint16_t slot = RedisKeySlot(tag);
  const RedisNodeAddress source = *client_->MasterOf(slot);
  RedisNodeAddress target;
  for (uint32_t s = 0; s < kRedisClusterSlots; s += 100)
    if (auto m = client_->MasterOf(static_cast<uint16_t>(s)); m && !(*m == source)) target = *m;
  ASSERT_NE(target.port, 0);
  auto id = [&](const RedisNodeAddress& a) {
    auto r = cluster_->Cli(a.port, "cluster myid");
    return r.out.substr(0, r.out.find('\n'));
  };
  const std::string source_id = id(source), target_id = id(target);

  std::vector<std::string> before, after;
  for (int i = 0; i < 20; ++i) before.push_back(fmt::format("{}:before:{}", tag, i));
  for (int i = 0; i < 20; ++i) after.push_back(fmt::format("{}:after:{}", tag, i));
  std::vector<std::pair<std::string, std::string_view>> items;
  std::vector<std::string> values;
  for (const auto& k : before) values.push_back(ValueFor(k, 2));
  for (size_t i = 0; i < before.size(); ++i) items.emplace_back(before[i], values[i]);
  ASSERT_TRUE(client_->Set(items));

  ASSERT_EQ(
      cluster_->Cli(target.port, fmt::format("cluster setslot {} importing {}", slot, source_id))
          .out,
      "OK\n");
  ASSERT_EQ(
      cluster_->Cli(source.port, fmt::format("cluster setslot {} migrating {}", slot, target_id))
          .out,
      "OK\n");
  // New keys of a migrating slot go to the target through ASK.
  std::vector<std::string> after_values;
  items.clear();
  for (const auto& k : after) after_values.push_back(ValueFor(k, 3));
  for (size_t i = 0; i < after.size(); ++i) items.emplace_back(after[i], after_values[i]);
  auto st = client_->Set(items);
  ASSERT_TRUE(st) << st.error().ToString();
  EXPECT_GE(client_->stats().ask, after.size());

  // Move the old keys, then hand the slot over on every master.
  std::string move = fmt::format("migrate 127.0.0.1 {} \"\" 0 5000 keys", target.port);
  for (const auto& k : before) move += " '" + k + "'";
  ASSERT_EQ(cluster_->Cli(source.port, move).out, "OK\n");
  for (int i = 0; i < ClusterProcess::kNodes; ++i)
    cluster_->Cli(cluster_->base_port() + i,
                  fmt::format("cluster setslot {} node {}", slot, target_id));

  // The client's map still says `source`: the first call meets MOVED, follows it, reloads.
  ASSERT_EQ(client_->MasterOf(slot)->port, source.port);
  std::vector<std::string> all = before;
  all.insert(all.end(), after.begin(), after.end());
  auto got = client_->Get(all);
  ASSERT_TRUE(got) << got.error().ToString();
  for (size_t i = 0; i < before.size(); ++i) EXPECT_EQ((*got)[i], values[i]) << before[i];
  for (size_t i = 0; i < after.size(); ++i)
    EXPECT_EQ((*got)[before.size() + i], after_values[i]) << after[i];
  EXPECT_GE(client_->stats().moved, 1u);
  EXPECT_EQ(client_->MasterOf(slot)->port, target.port) << "the map was not refreshed after MOVED";
  // The target really holds them (not a stale read from the source).
  EXPECT_EQ(cluster_->Cli(target.port, fmt::format("cluster countkeysinslot {}", slot)).out,
            "40\n");
  EXPECT_EQ(client_->stats().errors, 0u);
}

TEST_F(RedisClusterTest, StalledThenKilledMasterCostsBoundedErrorsThenFailsOver) {
  std::vector<std::string> keys;
  std::vector<std::string> values;
  for (int i = 0; i < 300; ++i) keys.push_back(fmt::format("kvbm-failover:{}", i));
  for (const auto& k : keys) values.push_back(ValueFor(k, 4));
  std::vector<std::pair<std::string, std::string_view>> items;
  for (size_t i = 0; i < keys.size(); ++i) items.emplace_back(keys[i], values[i]);
  ASSERT_TRUE(client_->Set(items));
  WaitReplicated();

  const int victim = client_->MasterOf(RedisKeySlot(keys[0]))->port;
  const int pid = cluster_->Pid(victim);
  ASSERT_GT(pid, 0);
  const auto budget = milliseconds(1000) + milliseconds(400);  // call_timeout plus scheduling slack

  // Stalled (SIGSTOP): the socket stays open, nothing answers: a timeout, not a hang.
  ASSERT_EQ(kill(pid, SIGSTOP), 0);
  auto t0 = Clock::now();
  auto stalled = client_->Get(keys);
  EXPECT_LE(Clock::now() - t0, budget);
  ASSERT_FALSE(stalled);
  EXPECT_EQ(stalled.error().code(), ErrorCode::kTimeout) << stalled.error().ToString();
  EXPECT_GE(client_->stats().timeouts, 1u);

  // Killed: errors until a replica is promoted, each call within its budget, then every value.
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  const auto deadline = Clock::now() + std::chrono::seconds(20);
  int failed_calls = 0;
  std::optional<std::vector<std::optional<std::string>>> recovered;
  while (Clock::now() < deadline) {
    t0 = Clock::now();
    auto got = client_->Get(keys);
    EXPECT_LE(Clock::now() - t0, budget) << "a call took longer than its budget";
    if (got) {
      recovered = std::move(*got);
      break;
    }
    ++failed_calls;
    std::this_thread::sleep_for(milliseconds(50));
  }
  ASSERT_TRUE(recovered.has_value()) << "the client did not recover after failover";
  RecordProperty("failed_calls_during_failover", failed_calls);
  size_t wrong = 0, missing = 0;
  for (size_t i = 0; i < keys.size(); ++i) {
    if (!(*recovered)[i])
      ++missing;
    else if (*(*recovered)[i] != values[i])
      ++wrong;
  }
  EXPECT_EQ(wrong, 0u);
  EXPECT_EQ(missing, 0u) << "replicas had acknowledged every write before the kill";
  EXPECT_NE(client_->MasterOf(RedisKeySlot(keys[0]))->port, victim);
  EXPECT_GE(client_->stats().errors, 1u);
  // Writes work again on the promoted master.
  EXPECT_TRUE(client_->Set(items));
}

TEST_F(RedisClusterTest, FlushAllTurnsEveryKeyIntoAMiss) {
  std::vector<std::string> keys;
  std::vector<std::string> values;
  for (int i = 0; i < 200; ++i) keys.push_back(fmt::format("kvbm-flush:{}", i));
  for (const auto& k : keys) values.push_back(ValueFor(k, 5));
  std::vector<std::pair<std::string, std::string_view>> items;
  for (size_t i = 0; i < keys.size(); ++i) items.emplace_back(keys[i], values[i]);
  ASSERT_TRUE(client_->Set(items));
  for (int i = 0; i < ClusterProcess::kNodes; ++i)
    cluster_->Cli(cluster_->base_port() + i, "flushall");
  auto exists = client_->Exists(keys);
  auto got = client_->Get(keys);
  ASSERT_TRUE(exists && got);
  for (size_t i = 0; i < keys.size(); ++i) {
    EXPECT_FALSE((*exists)[i]);
    EXPECT_FALSE((*got)[i].has_value());
  }
}

TEST(RedisClusterConnect, NothingListeningIsAClearErrorWithinTheTimeout) {
  // Two loopback ports with nothing behind them.
  std::vector<int> ports;
  for (int p = 41000 + static_cast<int>(getpid() % 1000) * 7; ports.size() < 2; ++p)
    if (testing::LoopbackPortFree(p)) ports.push_back(p);
  RedisClusterOptions o;
  o.seeds = {{"127.0.0.1", static_cast<uint16_t>(ports[0])},
             {"127.0.0.1", static_cast<uint16_t>(ports[1])}};
  o.connect_timeout = milliseconds(300);
  o.call_timeout = milliseconds(1000);
  const auto t0 = Clock::now();
  auto r = RedisCluster::Connect(o);
  EXPECT_LE(Clock::now() - t0, milliseconds(1500));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), ErrorCode::kUnavailable);
  EXPECT_NE(r.error().message().find(fmt::format("127.0.0.1:{}", ports[0])), std::string::npos)
      << r.error().message();
  EXPECT_NE(r.error().message().find(fmt::format("127.0.0.1:{}", ports[1])), std::string::npos)
      << r.error().message();

  EXPECT_FALSE(RedisCluster::Connect(RedisClusterOptions{}));  // no seeds: InvalidArgument
  EXPECT_EQ(RedisCluster::Connect(RedisClusterOptions{}).error().code(),
            ErrorCode::kInvalidArgument);
}

TEST(RedisClusterConnect, SilentServerTimesOutInsteadOfHanging) {
  // A listening socket that never accepts: connects succeed (the kernel's backlog), no reply.
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  ASSERT_EQ(listen(fd, 16), 0);
  socklen_t len = sizeof(a);
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len), 0);
  RedisClusterOptions o;
  o.seeds = {{"127.0.0.1", ntohs(a.sin_port)}};
  o.command_timeout = milliseconds(300);
  o.call_timeout = milliseconds(1000);
  const auto t0 = Clock::now();
  auto r = RedisCluster::Connect(o);
  EXPECT_LE(Clock::now() - t0, milliseconds(1300));
  close(fd);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), ErrorCode::kTimeout) << r.error().ToString();
}

}  // namespace
}  // namespace kvbm
