#include "kvbm/eviction.h"

#include <gtest/gtest.h>

#include <memory>
#include <span>
#include <unordered_map>
#include <vector>

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
  for (auto p : {EvictionPolicy::kLeafFirst, EvictionPolicy::kLru, EvictionPolicy::kReuse, EvictionPolicy::kAdaptive}) {
    auto parsed = ParseEvictionPolicy(EvictionPolicyName(p));
    ASSERT_TRUE(parsed.has_value());
    EXPECT_EQ(*parsed, p);
    EXPECT_EQ(MakeEvictor(p, 4)->name(), EvictionPolicyName(p));
  }
  EXPECT_EQ(ParseEvictionPolicy("reuse-interval"), EvictionPolicy::kReuse);
  EXPECT_FALSE(ParseEvictionPolicy("opt").has_value());  // replay only: it needs the future
  EXPECT_FALSE(ParseEvictionPolicy("mru").has_value());
  EXPECT_EQ(kDefaultEvictionPolicy, EvictionPolicy::kAdaptive);
  EXPECT_TRUE(MakeEvictor(EvictionPolicy::kReuse, 4)->leaf_only());
  EXPECT_TRUE(MakeEvictor(EvictionPolicy::kAdaptive, 4)->leaf_only());
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

// A cache of `capacity` slots driven through the Evictor interface as a pool drives it: a use
// of a held hash is a hit (taken out, hit, returned at a new tick), any other use stores it in a
// free or evicted slot. Returns the hits.
size_t DriveCache(Evictor& ev, size_t capacity, const std::vector<uint64_t>& uses) {
  std::unordered_map<uint64_t, uint32_t> slot_of;
  std::vector<uint64_t> hash_of;
  uint64_t tick = 0;
  size_t hits = 0;
  for (uint64_t h : uses) {
    uint32_t slot;
    if (auto it = slot_of.find(h); it != slot_of.end()) {
      slot = it->second;
      ev.Remove(slot);
      ev.OnHit(slot, SequenceHash(h));
      ++hits;
    } else {
      if (hash_of.size() < capacity) {
        slot = static_cast<uint32_t>(hash_of.size());
        hash_of.push_back(h);
      } else {
        slot = ev.PopVictim();
        slot_of.erase(hash_of[slot]);
        ev.OnEvicted(SequenceHash(hash_of[slot]));
        hash_of[slot] = h;
      }
      slot_of[h] = slot;
      ev.OnStored(slot, SequenceHash(h));
    }
    ev.Insert(Entry(slot, h, ++tick));
  }
  return hits;
}

// With nothing learnt yet, adaptive evicts as leaf-first does (least recently returned).
TEST(Eviction, AdaptiveStartsInRecencyOrder) {
  auto adaptive = MakeEvictor(EvictionPolicy::kAdaptive, 8);
  auto lru = MakeEvictor(EvictionPolicy::kLeafFirst, 8);
  for (auto* ev : {adaptive.get(), lru.get()}) {
    ev->Insert(Entry(0, 70, 3));
    ev->Insert(Entry(1, 71, 1));
    ev->Insert(Entry(2, 72, 2));
  }
  EXPECT_EQ(adaptive->Order(), (std::vector<uint32_t>{1, 2, 0}));
  EXPECT_EQ(adaptive->Order(), lru->Order());
}

// A loop over 1.5x the capacity: LRU evicts each block just before its next use and never
// hits. Adaptive's shadows see the reuse order keep part of the loop, it switches, and hits.
// On a pattern that recency serves (a small working set), it hits as much as LRU.
TEST(Eviction, AdaptiveLeavesLruOnALoopAndKeepsItOnAWorkingSet) {
  constexpr size_t kCapacity = 64;
  std::vector<uint64_t> loop;
  for (int pass = 0; pass < 40; ++pass)
    for (uint64_t h = 1; h <= kCapacity * 3 / 2; ++h) loop.push_back(h);
  auto lru = MakeEvictor(EvictionPolicy::kLeafFirst, kCapacity);
  auto adaptive = MakeEvictor(EvictionPolicy::kAdaptive, kCapacity);
  EXPECT_EQ(DriveCache(*lru, kCapacity, loop), 0u);
  const size_t adaptive_hits = DriveCache(*adaptive, kCapacity, loop);
  EXPECT_GT(adaptive_hits, loop.size() / 3);

  // 48 hot hashes used round-robin between one-off hashes: recency keeps the hot ones.
  std::vector<uint64_t> hot;
  uint64_t cold = 1000;
  for (int pass = 0; pass < 40; ++pass)
    for (uint64_t h = 1; h <= 48; ++h) {
      hot.push_back(h);
      if (h % 4 == 0) hot.push_back(++cold);
    }
  auto lru2 = MakeEvictor(EvictionPolicy::kLeafFirst, kCapacity);
  auto adaptive2 = MakeEvictor(EvictionPolicy::kAdaptive, kCapacity);
  const size_t lru_hits = DriveCache(*lru2, kCapacity, hot);
  EXPECT_GE(DriveCache(*adaptive2, kCapacity, hot), lru_hits * 98 / 100);
}

// In a pool, whichever order adaptive follows, a parent never goes before its cached child:
// the blocks of every chain still cached form a prefix of it. The loop makes adaptive leave
// recency (it then hits where leaf-first cannot), so both of its orders are exercised.
TEST(Eviction, AdaptivePoolKeepsLeafFirstGuarantee) {
  constexpr size_t kChains = 12, kDepth = 4, kBlock = 4;
  auto run = [&](EvictionPolicy policy) {
    auto pool = BlockPool::Create(TierId::kHost, 32, policy);
    std::vector<std::vector<BlockKey>> chains;
    for (size_t c = 0; c < kChains; ++c) {
      std::vector<Token> tokens(kDepth * kBlock);
      for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<Token>(c * 1000 + i + 1);
      std::vector<BlockKey> keys;
      auto blocks = HashTokenBlocks(tokens, kBlock, 0);
      EXPECT_TRUE(blocks.has_value());
      for (const TokenBlock& b : *blocks) keys.push_back(KeyOf(b));
      chains.push_back(std::move(keys));
    }
    size_t hits = 0;
    for (int pass = 0; pass < 30; ++pass) {
      for (const auto& keys : chains) {
        {
          BlockRun matched = pool->MatchPrefix(keys);
          hits += matched.size();
          auto rest = std::span<const BlockKey>(keys).subspan(matched.size());
          StoreRunResult stored = pool->StoreRun(rest, 0);
          EXPECT_EQ(stored.run.size(), rest.size());
        }
        for (const auto& chain : chains) {
          size_t held = 0;
          for (const BlockKey& k : chain) held += pool->Contains(k) ? 1 : 0;
          EXPECT_EQ(pool->CountPrefix(chain), held) << "a cached block lost its parent";
        }
      }
    }
    return hits;
  };
  const size_t leaf_first = run(EvictionPolicy::kLeafFirst);
  const size_t adaptive = run(EvictionPolicy::kAdaptive);
  EXPECT_EQ(leaf_first, 0u);  // 48 blocks in a loop through 32 slots
  EXPECT_GT(adaptive, 0u);
}

// Cost-aware: a block the tier below holds a copy of goes first (within its priority), least
// recently returned first among such blocks; storing a new block in the slot clears the mark.
TEST(Eviction, AdaptiveEvictsBlocksCopiedBelowFirst) {
  auto ev = MakeEvictor(EvictionPolicy::kAdaptive, 8);
  ev->Insert(Entry(0, 80, 1));
  ev->Insert(Entry(1, 81, 2));
  ev->Insert(Entry(2, 82, 3));
  ev->Insert(Entry(3, 83, 4, 0, /*priority=*/0));
  ev->OnCopiedBelow(2);
  ev->OnCopiedBelow(5);  // not evictable yet: marked for when it is
  EXPECT_EQ(ev->Order(), (std::vector<uint32_t>{2, 0, 1, 3}));
  ev->Insert(Entry(5, 85, 5));
  EXPECT_EQ(ev->Order(), (std::vector<uint32_t>{2, 5, 0, 1, 3}));
  EXPECT_EQ(ev->PopVictim(), 2u);
  EXPECT_EQ(ev->PopVictim(), 5u);
  // Slot 5 gets a new block: no copy below any more.
  ev->OnStored(5, SequenceHash(95));
  ev->Insert(Entry(5, 95, 6));
  EXPECT_EQ(ev->Order(), (std::vector<uint32_t>{0, 1, 3, 5}));
  // A lower priority still goes before a copied block of a higher one.
  auto pr = MakeEvictor(EvictionPolicy::kAdaptive, 4);
  pr->Insert(Entry(0, 1, 1, 0, /*priority=*/5));
  pr->Insert(Entry(1, 2, 2, 0, /*priority=*/1));
  pr->OnCopiedBelow(0);
  EXPECT_EQ(pr->PopVictim(), 1u);
  EXPECT_EQ(pr->PopVictim(), 0u);
}

}  // namespace
}  // namespace kvbm
