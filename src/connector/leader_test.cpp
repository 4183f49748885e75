#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>

#include "kvbm/leader.h"

namespace kvbm {
namespace {

KvbmConfig HostOnly() {
  KvbmConfig c;
  c.cpu_cache_num_blocks = 16;
  return c;
}

std::vector<Token> Tokens(size_t n, Token first = 1) {
  std::vector<Token> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

std::vector<uint32_t> Ids(size_t n) {
  std::vector<uint32_t> v(n);
  std::iota(v.begin(), v.end(), 0u);
  return v;
}

// Steps with nothing scheduled, so the pins of earlier stores age out.
void Flush(ConnectorLeader& l) {
  for (int i = 0; i < 4; ++i) l.BuildStepMetadata();
}

// Runs a request through prefill and its stores; returns the match result it got.
MatchResult RunRequest(ConnectorLeader& l, const std::string& id, const std::vector<Token>& tokens, uint32_t bs = 4) {
  l.AddRequest(id, tokens);
  MatchResult m = *l.GetNumNewMatchedTokens(id, 0);
  auto blocks = Ids((tokens.size() + bs - 1) / bs);
  EXPECT_TRUE(l.UpdateStateAfterAlloc(id, blocks, m.external_tokens).has_value());
  l.BuildStepMetadata();
  std::vector<std::string> done = {id};
  l.OnWorkerOutput(done, {}, {});
  EXPECT_TRUE(l.OnScheduled(id, blocks, m.external_tokens, tokens.size() - m.external_tokens).has_value());
  l.BuildStepMetadata();
  EXPECT_FALSE(l.RequestFinished(id));
  return m;
}

// G2 of 8 blocks and G3 of 64, both sized in blocks.
KvbmConfig HostAndDisk() {
  KvbmConfig c;
  c.cpu_cache_num_blocks = 8;
  c.disk_cache_num_blocks = 64;
  return c;
}

// Blocks of 4 tokens, 1000 bytes each.
LeaderOptions Page4() {
  LeaderOptions o;
  o.page_size = 4;
  o.bytes_per_block = 1000;
  return o;
}

// Four requests of 5 blocks each with prefixes of their own: an 8-block G2 evicts what it held.
void FlushHostWithOtherPrefixes(ConnectorLeader& l) {
  // (Names built with fmt-free literals: g++ 12 -O3 warns falsely on "f" + to_string.)
  const char* fillers[] = {"f0", "f1", "f2", "f3"};
  for (int i = 0; i < 4; ++i) RunRequest(l, fillers[i], Tokens(20, 1000 + 100 * i));
}

TEST(Leader, NeverMatchesTheWholePrompt) {
  LeaderOptions o;
  o.page_size = 4;
  o.bytes_per_block = 1000;
  ConnectorLeader l(HostOnly(), o);
  auto t = Tokens(16);  // exactly 4 full blocks
  RunRequest(l, "a", t);
  MatchResult m = RunRequest(l, "b", t);
  EXPECT_EQ(m.external_tokens, 12u);  // 3 of 4 blocks: the last token is computed
  auto longer = Tokens(18);
  m = RunRequest(l, "c", longer);
  EXPECT_EQ(m.external_tokens, 16u);
}

TEST(Leader, MatchStartsAfterTheEnginesOwnHitAndHasNoSideEffects) {
  LeaderOptions o;
  o.page_size = 4;
  o.bytes_per_block = 1000;
  ConnectorLeader l(HostOnly(), o);
  auto t = Tokens(20);
  RunRequest(l, "a", t);
  Flush(l);
  l.AddRequest("b", t);
  for (int i = 0; i < 3; ++i) {
    auto m = l.GetNumNewMatchedTokens("b", 8);  // engine has 2 blocks
    EXPECT_EQ(m->external_tokens, 8u);           // blocks 2 and 3 (block 4 would be the whole prompt)
  }
  EXPECT_EQ(l.host_pool()->stats().active, 0u);
  EXPECT_FALSE(l.GetNumNewMatchedTokens("nope", 0).has_value());
}

TEST(Leader, LoadOpsPinUntilFinishedAndAbortDelaysFree) {
  LeaderOptions o;
  o.page_size = 4;
  o.bytes_per_block = 1000;
  ConnectorLeader l(HostOnly(), o);
  auto t = Tokens(20);
  RunRequest(l, "a", t);
  Flush(l);
  l.AddRequest("b", t);
  auto m = *l.GetNumNewMatchedTokens("b", 0);
  ASSERT_EQ(m.external_tokens, 16u);
  ASSERT_TRUE(l.UpdateStateAfterAlloc("b", Ids(5), m.external_tokens).has_value());
  auto meta = l.BuildStepMetadata();
  ASSERT_EQ(meta.ops.size(), 1u);
  EXPECT_EQ(meta.ops[0].kind, OpKind::kLoadHost);
  EXPECT_EQ(meta.ops[0].blocks.size(), 4u);
  EXPECT_EQ(l.host_pool()->stats().active, 4u);
  EXPECT_TRUE(l.RequestFinished("b"));  // aborted while loading: engine must wait
  meta = l.BuildStepMetadata();
  ASSERT_EQ(meta.finished_while_loading.size(), 1u);
  std::vector<std::string> sent = {"b"};
  l.OnWorkerOutput({}, sent, {});
  // Pins of the store step age out after a few steps; the load's pins were the slot's.
  for (int i = 0; i < 4; ++i) l.BuildStepMetadata();
  EXPECT_EQ(l.host_pool()->stats().active, 0u);
  EXPECT_EQ(l.num_slots(), 0u);
}

TEST(Leader, SmallHostLoadsAreSynchronousWhenAskedAndPinUntilTheWorkerReports) {
  ConnectorLeader l(HostAndDisk(), Page4());
  auto t = Tokens(20);
  RunRequest(l, "a", t);
  Flush(l);
  // Off by default: every load is asynchronous.
  l.AddRequest("b", t);
  auto m = *l.GetNumNewMatchedTokens("b", 0);
  ASSERT_EQ(m.host_blocks, 4u);
  EXPECT_TRUE(m.async);
  // At most 3 blocks synchronous: 4 from G2 stay asynchronous; 4 allowed: synchronous.
  l.SetSyncLoadMaxBlocks(3);
  EXPECT_TRUE(l.GetNumNewMatchedTokens("b", 0)->async);
  EXPECT_FALSE(l.GetNumNewMatchedTokens("b", 4)->async);  // the engine holds one block: 3 left
  l.SetSyncLoadMaxBlocks(4);
  m = *l.GetNumNewMatchedTokens("b", 0);
  EXPECT_FALSE(m.async);
  EXPECT_EQ(m.external_tokens, 16u);
  // The load is emitted and pinned like an asynchronous one, until the worker reports it.
  ASSERT_TRUE(l.UpdateStateAfterAlloc("b", Ids(5), m.external_tokens).has_value());
  auto meta = l.BuildStepMetadata();
  auto load = std::find_if(meta.ops.begin(), meta.ops.end(), [](const TransferOp& op) { return op.kind == OpKind::kLoadHost; });
  ASSERT_NE(load, meta.ops.end());
  EXPECT_EQ(load->request_id, "b");
  EXPECT_EQ(load->blocks.size(), 4u);
  EXPECT_TRUE(l.IsLoading("b"));
  EXPECT_EQ(l.host_pool()->stats().active, 4u);
  std::vector<std::string> done = {"b"};
  l.OnWorkerOutput(done, {}, {});
  EXPECT_FALSE(l.IsLoading("b"));
  Flush(l);
  EXPECT_EQ(l.host_pool()->stats().active, 0u);
  // A run that reaches into G3 stays asynchronous, however short.
  RunRequest(l, "a2", t);  // second sight: admitted to G3
  FlushHostWithOtherPrefixes(l);
  l.AddRequest("d", t);
  m = *l.GetNumNewMatchedTokens("d", 0);
  ASSERT_GT(m.disk_blocks, 0u);
  EXPECT_TRUE(m.async);
}

TEST(Leader, LoadErrorInvalidatesTheSourceBlock) {
  LeaderOptions o;
  o.page_size = 4;
  o.bytes_per_block = 1000;
  ConnectorLeader l(HostOnly(), o);
  auto t = Tokens(20);
  RunRequest(l, "a", t);
  l.AddRequest("b", t);
  auto m = *l.GetNumNewMatchedTokens("b", 0);
  std::vector<uint32_t> dev = {10, 11, 12, 13, 14};
  ASSERT_TRUE(l.UpdateStateAfterAlloc("b", dev, m.external_tokens).has_value());
  l.BuildStepMetadata();
  std::vector<uint32_t> bad = {12};
  std::vector<std::string> done = {"b"};
  l.OnWorkerOutput(done, {}, bad);
  EXPECT_EQ(l.chain().stats().load_errors, 1u);
  l.AddRequest("c", t);
  EXPECT_EQ(l.GetNumNewMatchedTokens("c", 0)->external_tokens, 8u);  // stops before the bad block
}

TEST(Leader, PrefixMinPriorityStopsOffload) {
  KvbmConfig c = HostOnly();
  c.host_offload_prefix_min_priority = 50;
  LeaderOptions o;
  o.page_size = 4;
  o.bytes_per_block = 1000;
  ConnectorLeader l(c, o);
  auto t = Tokens(20);
  l.AddRequest("low", t, std::nullopt, std::nullopt, 10);
  ASSERT_TRUE(l.UpdateStateAfterAlloc("low", Ids(5), 0).has_value());
  ASSERT_TRUE(l.OnScheduled("low", Ids(5), 0, 20).has_value());
  EXPECT_EQ(l.chain().stats().store_host_blocks, 0u);
  l.AddRequest("high", Tokens(20, 100), std::nullopt, std::nullopt, 80);
  ASSERT_TRUE(l.UpdateStateAfterAlloc("high", Ids(5), 0).has_value());
  ASSERT_TRUE(l.OnScheduled("high", Ids(5), 0, 20).has_value());
  EXPECT_EQ(l.chain().stats().store_host_blocks, 5u);
}

TEST(Leader, ChunkedPrefillStoresEachBlockOnceAfterItsForwardPass) {
  LeaderOptions o;
  o.page_size = 4;
  o.bytes_per_block = 1000;
  ConnectorLeader l(HostOnly(), o);
  auto t = Tokens(22);
  l.AddRequest("a", t);
  ASSERT_TRUE(l.UpdateStateAfterAlloc("a", Ids(6), 0).has_value());
  ASSERT_TRUE(l.OnScheduled("a", Ids(3), 0, 10).has_value());  // chunk 1: 2 full blocks
  auto meta = l.BuildStepMetadata();
  ASSERT_EQ(meta.ops.size(), 1u);
  EXPECT_EQ(meta.ops[0].blocks.size(), 2u);
  ASSERT_TRUE(l.OnScheduled("a", Ids(6), 10, 12).has_value());  // chunk 2: blocks 2..4
  meta = l.BuildStepMetadata();
  ASSERT_EQ(meta.ops.size(), 1u);
  EXPECT_EQ(meta.ops[0].blocks.size(), 3u);
  EXPECT_EQ(meta.ops[0].blocks[0].src, 2u);
}

TEST(Leader, SkippedBlocksAreNeverStoredAndTheCursorNeverGoesBack) {
  ConnectorLeader l(HostOnly(), Page4());
  l.AddRequest("a", Tokens(22));
  ASSERT_TRUE(l.UpdateStateAfterAlloc("a", Ids(6), 0).has_value());
  ASSERT_TRUE(l.SkipStores("a", 3).has_value());  // a window group: blocks 0..2 fell out of every hit's window
  ASSERT_TRUE(l.SkipStores("a", 1).has_value());  // no effect: the cursor stays at block 3
  ASSERT_TRUE(l.OnScheduled("a", Ids(6), 0, 22).has_value());
  auto meta = l.BuildStepMetadata();
  ASSERT_EQ(meta.ops.size(), 1u);
  ASSERT_EQ(meta.ops[0].blocks.size(), 2u);  // blocks 3 and 4 (block 5 is partial)
  EXPECT_EQ(meta.ops[0].blocks[0].src, 3u);
  EXPECT_FALSE(l.SkipStores("unknown", 1).has_value());
}

TEST(Leader, DiskAdmissionOnReuseAndDiskContinuation) {
  ConnectorLeader l(HostAndDisk(), Page4());
  auto t = Tokens(20);
  RunRequest(l, "a", t);
  EXPECT_EQ(l.chain().stats().offload_disk_blocks, 0u);  // first sight: filtered
  RunRequest(l, "b", t);  // second sight: the 4 G2 hits and the recomputed last block
  EXPECT_EQ(l.chain().stats().offload_disk_blocks, 5u);
  // Flush G2 with other prefixes; the match then continues from G3.
  FlushHostWithOtherPrefixes(l);
  l.AddRequest("c", t);
  auto m = *l.GetNumNewMatchedTokens("c", 0);
  EXPECT_EQ(m.host_blocks + m.disk_blocks, 4u);
  EXPECT_GT(m.disk_blocks, 0u);
}

TEST(Leader, BadConfigurationIsAnError) {
  LeaderOptions o;
  o.page_size = 4;
  o.bytes_per_block = 1000;
  EXPECT_THROW(ConnectorLeader(KvbmConfig{}, o), ConfigError);
  o.page_size = 0;
  EXPECT_THROW(ConnectorLeader(HostOnly(), o), ConfigError);
}

// A load that spans steps holds a child (the engine had the parent in G1, kvbm loads the
// continuation from G2) while other requests' stores need room. Leaf-first keeps the parent,
// whose child is held, and drops a new store instead; LRU evicts the parent, so its cached
// child can never be matched again and a later request that needs the prefix misses both.
TEST(Leader, AsyncLoadHoldingAChildLeafFirstKeepsItsParentLruDoesNot) {
  for (auto policy : {EvictionPolicy::kLeafFirst, EvictionPolicy::kLru}) {
    SCOPED_TRACE(std::string(EvictionPolicyName(policy)));
    LeaderOptions o;
    o.page_size = 4;
    o.bytes_per_block = 1000;
    o.policy = policy;
    o.host_blocks = 4;
    o.disk_blocks = 0;
    ConnectorLeader l(KvbmConfig{}, o);
    auto x = Tokens(9, 1);    // x0 x1 + 1 token
    auto y = Tokens(13, 100);  // y0 y1 y2 + 1 token
    RunRequest(l, "a", x);
    Flush(l);
    ASSERT_EQ(l.host_pool()->stats().inactive, 2u);

    // B: the engine holds x0 in G1; kvbm loads x1 from G2, and the load is still in flight.
    l.AddRequest("b", x);
    MatchResult m = *l.GetNumNewMatchedTokens("b", 4);
    ASSERT_EQ(m.host_blocks, 1u);
    ASSERT_TRUE(l.UpdateStateAfterAlloc("b", Ids(3), m.external_tokens).has_value());
    l.BuildStepMetadata();
    EXPECT_TRUE(l.IsLoading("b"));

    // C stores three new blocks meanwhile: two free blocks and one eviction are needed.
    RunRequest(l, "c", y);
    Flush(l);
    std::vector<std::string> done = {"b"};
    l.OnWorkerOutput(done, {}, {});
    EXPECT_FALSE(l.RequestFinished("b"));
    Flush(l);

    // D needs the whole x prefix from kvbm.
    l.AddRequest("d", x);
    MatchResult d = *l.GetNumNewMatchedTokens("d", 0);
    if (policy == EvictionPolicy::kLeafFirst) {
      EXPECT_EQ(d.host_blocks, 2u);                      // x0 x1 kept
      EXPECT_EQ(l.chain().stats().dropped_full, 1u);     // y2 had no room
    } else {
      EXPECT_EQ(d.host_blocks, 0u);                      // x0 evicted: x1 is unreachable
      EXPECT_EQ(l.chain().stats().dropped_full, 0u);
    }
    EXPECT_TRUE(l.RequestFinished("d") == false);
  }
}

TEST(Leader, DiskHitsArePromotedToHostWhenAsked) {
  KvbmConfig c;
  c.cpu_cache_num_blocks = 16;
  c.disk_cache_num_blocks = 16;
  c.disable_disk_offload_filter = true;
  c.promote_disk_hits = true;
  LeaderOptions o;
  o.page_size = 4;
  o.bytes_per_block = 1000;
  ConnectorLeader l(c, o);
  auto t = Tokens(21);  // 5 blocks + 1
  RunRequest(l, "a", t);
  Flush(l);
  ASSERT_EQ(l.disk_pool()->stats().registered, 5u);
  ASSERT_TRUE(l.host_pool()->Reset().has_value());  // G2 lost them: only G3 holds the prefix
  l.AddRequest("b", t);
  MatchResult m = *l.GetNumNewMatchedTokens("b", 0);
  EXPECT_EQ(m.disk_blocks, 5u);
  ASSERT_TRUE(l.UpdateStateAfterAlloc("b", Ids(6), m.external_tokens).has_value());
  StepMetadata meta = l.BuildStepMetadata();
  size_t loads = 0, promotions = 0;
  for (const TransferOp& op : meta.ops) {
    if (op.kind == OpKind::kLoadDisk) loads += op.blocks.size();
    if (op.kind == OpKind::kPromoteHost) promotions += op.blocks.size();
  }
  EXPECT_EQ(loads, 5u);
  EXPECT_EQ(promotions, 5u);
  EXPECT_EQ(l.chain().stats().promote_host_blocks, 5u);
  EXPECT_EQ(l.host_pool()->stats().registered, 5u);
}

}  // namespace
}  // namespace kvbm
