#include "kvbm/eviction.h"

#include <gtest/gtest.h>

#include <memory>

#include "kvbm/block_pool.h"

namespace kvbm {
namespace {

EvictionEntry Entry(uint32_t slot, uint64_t hash, uint64_t last_use, uint32_t position = 0, uint32_t priority = 0) {
  EvictionEntry e;
  e.slot = slot;
  e.hash = SequenceHash(hash);
  e.last_use = last_use;
  e.position = position;
  e.priority = priority;
  return e;
}

TEST(Eviction, PolicyNamesRoundTrip) {
  for (auto p : {EvictionPolicy::kLeafFirst, EvictionPolicy::kLru, EvictionPolicy::kReuse}) {
    auto parsed = ParseEvictionPolicy(EvictionPolicyName(p));
    ASSERT_TRUE(parsed.has_value());
    EXPECT_EQ(*parsed, p);
    EXPECT_EQ(MakeEvictor(p, 4)->name(), EvictionPolicyName(p));
  }
  EXPECT_EQ(ParseEvictionPolicy("reuse-interval"), EvictionPolicy::kReuse);
  EXPECT_FALSE(ParseEvictionPolicy("opt").has_value());  // replay only: it needs the future
  EXPECT_FALSE(ParseEvictionPolicy("mru").has_value());
  EXPECT_EQ(kDefaultEvictionPolicy, EvictionPolicy::kLeafFirst);
  EXPECT_TRUE(MakeEvictor(EvictionPolicy::kReuse, 4)->leaf_only());
}

// A block reused at a short interval outlives one reused at a long interval, and both outlive
// a block never reused yet, whatever their recency.
TEST(Eviction, ReuseKeepsTheBlockPredictedSoonest) {
  auto ev = MakeEvictor(EvictionPolicy::kReuse, 8);
  // Slot 0: used at 1 and 3 (interval 2). Slot 1: used at 2 and 12 (interval 10).
  ev->Insert(Entry(0, 100, 1));
  ev->Insert(Entry(1, 101, 2));
  ev->Remove(0);
  ev->Insert(Entry(0, 100, 3));  // returned again without a hit: a use at 3
  ev->Remove(1);
  ev->Insert(Entry(1, 101, 12));
  ev->Insert(Entry(2, 102, 13));  // the newest, never reused
  // now = 13: slot 0 was predicted at 5, overdue by 8 > its interval 2: it stopped being reused.
  EXPECT_EQ(ev->Order(), (std::vector<uint32_t>{0, 2, 1}));
  EXPECT_EQ(ev->PopVictim(), 0u);
  EXPECT_EQ(ev->PopVictim(), 2u);
  EXPECT_EQ(ev->PopVictim(), 1u);
  EXPECT_EQ(ev->size(), 0u);
}

TEST(Eviction, ReuseOrdersByPredictionThenAgeThenDepth) {
  auto ev = MakeEvictor(EvictionPolicy::kReuse, 8);
  ev->Insert(Entry(0, 10, 1));
  ev->Insert(Entry(1, 11, 2));
  ev->Remove(0);
  ev->Remove(1);
  ev->Insert(Entry(0, 10, 5));  // interval 4: next at 9
  ev->Insert(Entry(1, 11, 6));  // interval 4: next at 10 (farther)
  ev->Insert(Entry(2, 12, 7, 1));  // never reused
  ev->Insert(Entry(3, 13, 7, 3));  // never reused, same age, deeper
  ev->Insert(Entry(4, 14, 8, 9));  // never reused, newer
  EXPECT_EQ(ev->Order(), (std::vector<uint32_t>{3, 2, 4, 1, 0}));
}

// A hit counts one use per episode; the interval survives an eviction (ghost entry).
TEST(Eviction, ReuseRemembersIntervalsAcrossEvictions) {
  auto ev = MakeEvictor(EvictionPolicy::kReuse, 4);
  ev->Insert(Entry(0, 50, 1));
  ev->Insert(Entry(1, 51, 2));
  ev->Insert(Entry(2, 52, 3));
  // 50 is hit at time 3 (interval 2): Remove, hit, returned at 4.
  ev->Remove(0);
  ev->OnHit(0, SequenceHash(50));
  ev->OnHit(0, SequenceHash(50));  // the same episode: no interval of 0
  ev->Insert(Entry(0, 50, 4));
  // 51 and 52 never reused: they go first.
  EXPECT_EQ(ev->PopVictim(), 1u);
  ev->OnEvicted(SequenceHash(51));
  EXPECT_EQ(ev->PopVictim(), 2u);
  ev->OnEvicted(SequenceHash(52));
  EXPECT_EQ(ev->PopVictim(), 0u);
  ev->OnEvicted(SequenceHash(50));
  // 50 comes back (stored again at 6): it has an interval (6 - 4 = 2); a new block does not.
  ev->Insert(Entry(3, 53, 5));
  ev->Insert(Entry(0, 50, 6));
  EXPECT_EQ(ev->PopVictim(), 3u);
}

TEST(Eviction, ReuseLowestPriorityFirst) {
  auto ev = MakeEvictor(EvictionPolicy::kReuse, 4);
  ev->Insert(Entry(0, 1, 1, 0, 5));
  ev->Insert(Entry(1, 2, 2, 0, 1));
  ev->Insert(Entry(2, 3, 3, 0, 5));
  EXPECT_EQ(ev->PopVictim(), 1u);
  EXPECT_EQ(ev->size(), 2u);
}

TEST(Eviction, OptEvictsFarthestNextUseAndRefreshesPassedUses) {
  auto oracle = std::make_shared<NextUseOracle>();
  // Hash 1 is used by requests 0, 2, 9; hash 2 by 0, 5; hash 3 by 0 only; hash 4 by 0, 5.
  for (uint64_t r : {0, 2, 9}) oracle->AddUse(SequenceHash(1), r);
  for (uint64_t r : {0, 5}) oracle->AddUse(SequenceHash(2), r);
  oracle->AddUse(SequenceHash(3), 0);
  for (uint64_t r : {0, 5}) oracle->AddUse(SequenceHash(4), r);
  oracle->SetNow(0);
  auto ev = MakeOptEvictor(oracle, 8);
  EXPECT_TRUE(ev->leaf_only());
  ev->Insert(Entry(0, 1, 1, 0));
  ev->Insert(Entry(1, 2, 2, 1));
  ev->Insert(Entry(2, 3, 3, 0));
  ev->Insert(Entry(3, 4, 4, 4));
  // Never again first; then next use 5 (deepest of the tie first), then 2.
  EXPECT_EQ(ev->Order(), (std::vector<uint32_t>{2, 3, 1, 0}));
  EXPECT_EQ(ev->PopVictim(), 2u);
  // Request 2 passes: hash 1's next use becomes 9, the farthest now.
  oracle->SetNow(2);
  EXPECT_EQ(oracle->NextUse(SequenceHash(1)), 9u);
  EXPECT_EQ(ev->PopVictim(), 0u);
  EXPECT_EQ(ev->PopVictim(), 3u);
  EXPECT_EQ(ev->PopVictim(), 1u);
  oracle->SetNow(9);
  EXPECT_EQ(oracle->NextUse(SequenceHash(1)), NextUseOracle::kNever);
}

// In a pool, reuse evicts only leaves: a parent never goes before its cached child.
TEST(Eviction, ReusePoolEvictsLeavesOnly) {
  auto pool = BlockPool::Create(TierId::kHost, 3, EvictionPolicy::kReuse);
  std::vector<Token> tokens(12);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<Token>(i + 1);
  auto chain = *HashTokenBlocks(tokens, 4, 0);
  {
    auto blocks = pool->Allocate(3);
    ASSERT_TRUE(blocks);
    std::vector<ImmutableBlock> held;
    for (size_t i = 0; i < 3; ++i) {
      ASSERT_TRUE((*blocks)[i].Complete(KeyOf(chain[i])));
      auto r = pool->Register(std::move((*blocks)[i]));
      ASSERT_TRUE(r);
      held.push_back(std::move(*r));
    }
  }
  // Only the leaf is evictable, whatever the release order gave.
  EXPECT_EQ(pool->stats().evictable, 1u);
  auto one = pool->Allocate(1);
  ASSERT_TRUE(one);
  std::vector<BlockKey> keys{KeyOf(chain[0]), KeyOf(chain[1]), KeyOf(chain[2])};
  EXPECT_EQ(pool->CountPrefix(keys), 2u);  // the deepest block went
}

}  // namespace
}  // namespace kvbm
