// G4 end to end on a real Redis Cluster: two simulated engines (each its own leader, worker, G2)
// share one cluster; what engine A computed is a G4 hit for engine B, byte for byte, and every
// way a remote value can be wrong or gone costs a recompute, never wrong KV.
#include <gtest/gtest.h>

#include <numeric>

#include "kvbm/redis_cluster.h"
#include "kvbm/remote_block.h"
#include "kvbm/sim_engine.h"
#include "memory/redis_cluster_fixture.h"

namespace kvbm {
namespace {

using testing::SharedClusterTest;

class RemoteTierTest : public SharedClusterTest {
 protected:
  static KvbmConfig Config(const std::string& url) {
    KvbmConfig c;
    c.cpu_cache_num_blocks = 32;
    c.remote_url = url;
    c.remote_timeout_ms = 2000;
    c.remote_match_budget_ms = 500;  // generous on a loaded CI machine; the budget is tested below
    return c;
  }
  static std::vector<Token> Prompt(Token first = 100) {
    std::vector<Token> p(16 * 8 + 1);
    std::iota(p.begin(), p.end(), first);
    return p;
  }
  static RedisCluster& Client() {
    static std::unique_ptr<RedisCluster> client = [] {
      RedisClusterOptions o;
      o.seeds = *ParseRedisSeeds(cluster_->SeedUrl());
      return std::move(*RedisCluster::Connect(o));
    }();
    return *client;
  }
};

TEST_F(RemoteTierTest, WhatOneEngineComputedIsAByteExactHitForAnother) {
  SimEngineOptions o;
  SimulatedEngine a(Config(cluster_->SeedUrl()), o);
  ASSERT_TRUE(a.worker().has_remote());
  auto ra = a.RunRequest("a", Prompt());
  ASSERT_TRUE(ra.has_value());
  a.worker().WaitIdle();
  EXPECT_EQ(a.leader().chain().stats().offload_remote_blocks, 8u);
  EXPECT_EQ(a.worker().metrics()->blocks[static_cast<size_t>(TransferPath::kH2Remote)].load(), 8u);

  SimulatedEngine b(Config(cluster_->SeedUrl()), o);  // an empty G2: only G4 has the prefix
  auto rb = b.RunRequest("b", Prompt());
  ASSERT_TRUE(rb.has_value());
  EXPECT_EQ(rb->remote_blocks, 8u);
  EXPECT_EQ(rb->loaded_tokens, 8u * 16);
  EXPECT_EQ(rb->load_errors, 0u);
  EXPECT_EQ(rb->mismatched_blocks, 0u);
  EXPECT_EQ(b.worker().metrics()->blocks[static_cast<size_t>(TransferPath::kRemote2H)].load(), 8u);
  // Now in B's G2 too: the next request is a local hit.
  auto rb2 = b.RunRequest("b2", Prompt());
  ASSERT_TRUE(rb2.has_value());
  EXPECT_EQ(rb2->host_blocks, 8u);
  EXPECT_EQ(rb2->mismatched_blocks, 0u);
}

TEST_F(RemoteTierTest, AG4MatchIsCappedAtWhatG2CanStage) {
  SimEngineOptions o;
  {
    SimulatedEngine a(Config(cluster_->SeedUrl()), o);
    ASSERT_TRUE(a.RunRequest("a", Prompt()).has_value());
    a.worker().WaitIdle();
  }
  // G4 holds 8 blocks of the prompt, B's G2 only 5: B is promised 5, not 8 with 3 load errors.
  KvbmConfig small = Config(cluster_->SeedUrl());
  small.cpu_cache_num_blocks = 5;
  SimulatedEngine b(small, o);
  auto rb = b.RunRequest("b", Prompt());
  ASSERT_TRUE(rb.has_value());
  EXPECT_EQ(rb->remote_blocks, 5u);
  EXPECT_EQ(rb->loaded_tokens, 5u * 16);
  EXPECT_EQ(rb->load_errors, 0u);
  EXPECT_EQ(rb->mismatched_blocks, 0u);
  EXPECT_EQ(b.leader().chain().stats().onboard_missing_blocks, 0u);
}

TEST_F(RemoteTierTest, CorruptGoneOrForeignValuesAreRecomputedNeverServed) {
  SimEngineOptions o;
  {
    SimulatedEngine a(Config(cluster_->SeedUrl()), o);
    ASSERT_TRUE(a.RunRequest("a", Prompt()).has_value());
    a.worker().WaitIdle();
  }
  auto remote = *RemoteTierOptions::FromConfig(Config(cluster_->SeedUrl()), o.remote_descriptor, 1);
  auto blocks = *HashTokenBlocks(Prompt(), 16, ComputeSaltHash(std::nullopt, std::nullopt));
  // Block 5: one byte flipped in Redis. Block 6: a value of another layout under its key.
  std::vector<std::string> keys = {remote.Key(0, blocks[5].sequence_hash), remote.Key(0, blocks[6].sequence_hash)};
  auto values = Client().Get(keys);
  ASSERT_TRUE(values.has_value());
  ASSERT_TRUE((*values)[0] && (*values)[1]);
  std::string corrupt = *(*values)[0];
  corrupt[corrupt.size() / 2] ^= 0x40;
  std::string foreign = EncodeRemoteBlock(remote.Fingerprint(0) ^ 1, blocks[6].sequence_hash.value(),
                                          std::vector<uint8_t>((*values)[1]->size() - kRemoteBlockHeaderBytes, 7));
  std::vector<std::pair<std::string, std::string_view>> items = {{keys[0], corrupt}, {keys[1], foreign}};
  ASSERT_TRUE(Client().Set(items).has_value());

  SimulatedEngine b(Config(cluster_->SeedUrl()), o);
  auto rb = b.RunRequest("b", Prompt());
  ASSERT_TRUE(rb.has_value());
  EXPECT_EQ(rb->remote_blocks, 8u);
  EXPECT_EQ(rb->load_errors, 2u);  // exactly the two bad blocks
  EXPECT_EQ(rb->mismatched_blocks, 0u);
  EXPECT_EQ(b.worker().metrics()->remote_verify_failures.load(), 2u);

  // The cluster flushed: nothing to match, everything recomputed.
  FlushAll();
  SimulatedEngine c(Config(cluster_->SeedUrl()), o);
  auto rc = c.RunRequest("c", Prompt());
  ASSERT_TRUE(rc.has_value());
  EXPECT_EQ(rc->loaded_tokens, 0u);
  EXPECT_EQ(rc->mismatched_blocks, 0u);
}

TEST_F(RemoteTierTest, AnotherModelSharesNothing) {
  SimEngineOptions o;
  {
    SimulatedEngine a(Config(cluster_->SeedUrl()), o);
    ASSERT_TRUE(a.RunRequest("a", Prompt()).has_value());
    a.worker().WaitIdle();
  }
  SimEngineOptions other = o;
  other.remote_descriptor = "another-model";
  SimulatedEngine b(Config(cluster_->SeedUrl()), other);
  auto rb = b.RunRequest("b", Prompt());
  ASSERT_TRUE(rb.has_value());
  EXPECT_EQ(rb->remote_blocks, 0u);
  EXPECT_EQ(rb->mismatched_blocks, 0u);
}

TEST(RemoteTierStart, UnreachableIsAWarningOrAnErrorAsTheSettingSays) {
  int port = 0;
  for (int p = 39000; p < 39100 && port == 0; ++p)
    if (testing::LoopbackPortFree(p)) port = p;
  ASSERT_NE(port, 0);
  KvbmConfig c;
  c.cpu_cache_num_blocks = 8;
  c.remote_url = "redis://127.0.0.1:" + std::to_string(port);
  c.remote_timeout_ms = 200;
  c.remote_match_budget_ms = 100;
  SimEngineOptions o;
  {
    SimulatedEngine e(c, o);  // runs without G4
    EXPECT_FALSE(e.worker().has_remote());
    EXPECT_EQ(e.leader().chain().remote(), nullptr);
    std::vector<Token> p(16 * 3 + 1, 5);
    auto r = e.RunRequest("r", p);
    ASSERT_TRUE(r.has_value());
    EXPECT_GT(e.worker().metrics()->remote_errors.load(), 0u);
  }
  c.remote_required = true;
  try {
    SimulatedEngine e(c, o);
    ADD_FAILURE() << "an unreachable required G4 must fail the start";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("DYN_KVBM_REMOTE"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace kvbm
