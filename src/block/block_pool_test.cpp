#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <random>
#include <thread>

#include "kvbm/block_pool.h"

namespace kvbm {
namespace {

std::vector<TokenBlock> Chain(Token first, size_t n, uint32_t block_size = 4) {
  std::vector<Token> tokens;
  for (size_t i = 0; i < n * block_size; ++i) tokens.push_back(first + static_cast<Token>(i));
  return *HashTokenBlocks(tokens, block_size, 0);
}

std::vector<BlockKey> Keys(const std::vector<TokenBlock>& blocks) {
  std::vector<BlockKey> keys;
  for (auto& b : blocks) keys.push_back(KeyOf(b));
  return keys;
}

// Registers the chain; returns the immutable handles (active).
std::vector<ImmutableBlock> RegisterChain(BlockPool& pool, const std::vector<TokenBlock>& chain, uint32_t priority = 0) {
  auto blocks = pool.Allocate(chain.size());
  EXPECT_TRUE(blocks.has_value());
  std::vector<ImmutableBlock> out;
  for (size_t i = 0; i < chain.size(); ++i) {
    EXPECT_TRUE((*blocks)[i].Complete(KeyOf(chain[i]), {}, priority).has_value());
    auto r = pool.Register(std::move((*blocks)[i]));
    EXPECT_TRUE(r.has_value());
    out.push_back(std::move(*r));
  }
  return out;
}

TEST(BlockPool, AllocateIsAllOrNothing) {
  auto pool = BlockPool::Create(TierId::kHost, 4, EvictionPolicy::kLru);
  auto a = pool->Allocate(3);
  ASSERT_TRUE(a.has_value());
  auto b = pool->Allocate(2);
  ASSERT_FALSE(b.has_value());
  EXPECT_EQ(b.error().code(), ErrorCode::kResourceExhausted);
  EXPECT_EQ(pool->stats().free, 1u);
  a->clear();
  EXPECT_EQ(pool->stats().free, 4u);
  EXPECT_EQ(pool->stats().active, 0u);
}

TEST(BlockPool, RegisterRequiresComplete) {
  auto pool = BlockPool::Create(TierId::kHost, 2, EvictionPolicy::kLru);
  auto a = pool->Allocate(1);
  auto r = pool->Register(std::move((*a)[0]));
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code(), ErrorCode::kFailedPrecondition);
  MutableBlock empty;
  EXPECT_FALSE(pool->Register(std::move(empty)).has_value());
}

TEST(BlockPool, DuplicateRegistrationReturnsExisting) {
  auto pool = BlockPool::Create(TierId::kHost, 4, EvictionPolicy::kLru);
  auto chain = Chain(1, 1);
  auto first = RegisterChain(*pool, chain);
  auto second = RegisterChain(*pool, chain);
  EXPECT_EQ(first[0].id(), second[0].id());
  EXPECT_EQ(pool->stats().registered, 1u);
  EXPECT_EQ(pool->stats().free, 3u);
}

TEST(BlockPool, CollisionIsRejectedNotServed) {
  auto pool = BlockPool::Create(TierId::kHost, 4, EvictionPolicy::kLru);
  auto chain = Chain(1, 1);
  auto held = RegisterChain(*pool, chain);
  BlockKey forged = KeyOf(chain[0]);
  forged.block_hash ^= 1;  // same sequence hash, other content
  auto b = pool->Allocate(1);
  ASSERT_TRUE((*b)[0].Complete(forged).has_value());
  EXPECT_FALSE(pool->Register(std::move((*b)[0])).has_value());
  std::vector<BlockKey> keys = {forged};
  EXPECT_TRUE(pool->MatchPrefix(keys).empty());
}

TEST(BlockPool, MatchLongestPrefixAndChainBreaks) {
  auto pool = BlockPool::Create(TierId::kHost, 16, EvictionPolicy::kLeafFirst);
  auto chain = Chain(1, 5);
  { auto held = RegisterChain(*pool, chain); }
  EXPECT_EQ(pool->stats().inactive, 5u);
  auto keys = Keys(chain);
  auto m = pool->MatchPrefix(keys);
  EXPECT_EQ(m.size(), 5u);
  EXPECT_EQ(pool->stats().active, 5u);
  m.Release();
  EXPECT_EQ(pool->stats().active, 0u);
  std::vector<BlockKey> empty;
  EXPECT_TRUE(pool->MatchPrefix(empty).empty());
  // A different first block breaks the match at 0.
  auto other = Keys(Chain(100, 3));
  EXPECT_EQ(pool->CountPrefix(other), 0u);
  // Suffix starting in the middle (continuation after another tier's run) matches.
  std::vector<BlockKey> tail(keys.begin() + 2, keys.end());
  EXPECT_EQ(pool->CountPrefix(tail), 3u);
}

TEST(BlockPool, FreeBlocksBeforeEvictionAndEvictionOrderLru) {
  auto pool = BlockPool::Create(TierId::kHost, 4, EvictionPolicy::kLru);
  auto a = Chain(1, 1), b = Chain(10, 1);
  { RegisterChain(*pool, a); }
  { RegisterChain(*pool, b); }
  auto m = pool->Allocate(2);  // two free ones are left; nothing evicted
  EXPECT_EQ(pool->stats().evictions, 0u);
  EXPECT_EQ(pool->CountPrefix(Keys(a)), 1u);
  auto n = pool->Allocate(1);  // evicts a (least recently returned)
  EXPECT_EQ(pool->CountPrefix(Keys(a)), 0u);
  EXPECT_EQ(pool->CountPrefix(Keys(b)), 1u);
}

TEST(BlockPool, PriorityBeforeRecency) {
  auto pool = BlockPool::Create(TierId::kHost, 2, EvictionPolicy::kLru);
  auto hi = Chain(1, 1), lo = Chain(10, 1);
  { RegisterChain(*pool, hi, 80); }
  { RegisterChain(*pool, lo, 10); }
  auto x = pool->Allocate(1);
  EXPECT_EQ(pool->CountPrefix(Keys(hi)), 1u);
  EXPECT_EQ(pool->CountPrefix(Keys(lo)), 0u);
}

TEST(BlockPool, LeafFirstEvictsOnlyLeavesWhateverTheReleaseOrder) {
  auto pool = BlockPool::Create(TierId::kHost, 3, EvictionPolicy::kLeafFirst);
  auto chain = Chain(1, 3);
  {
    auto held = RegisterChain(*pool, chain);
    held[0] = ImmutableBlock();  // the root returns first: it must still not be a victim
  }
  EXPECT_EQ(pool->stats().inactive, 3u);
  EXPECT_EQ(pool->ChildCount(chain[0].sequence_hash), 1u);
  EXPECT_EQ(pool->EvictionOrder(), std::vector<SequenceHash>{chain[2].sequence_hash});
  // Each eviction exposes the next leaf.
  std::vector<MutableBlock> taken;
  for (size_t k = 3; k-- > 0;) {
    auto a = pool->Allocate(1);
    ASSERT_TRUE(a.has_value());
    taken.push_back(std::move((*a)[0]));
    EXPECT_EQ(pool->CountPrefix(Keys(chain)), k);
  }
}

TEST(BlockPool, LruEvictsByRecencyEvenAParent) {
  auto pool = BlockPool::Create(TierId::kHost, 3, EvictionPolicy::kLru);
  auto chain = Chain(1, 3);
  {
    auto held = RegisterChain(*pool, chain);
    held[0] = ImmutableBlock();  // root returned first: oldest
  }
  auto order = pool->EvictionOrder();
  ASSERT_EQ(order.size(), 3u);
  EXPECT_EQ(order[0], chain[0].sequence_hash);
  // A run returns last block first, so a matched chain goes back leaf-oldest.
  { auto m = pool->MatchPrefix(Keys(chain)); }
  order = pool->EvictionOrder();
  EXPECT_EQ(order[0], chain[2].sequence_hash);
  // Touch the leaf: LRU now evicts the middle block, orphaning the leaf.
  std::vector<SequenceHash> leaf = {chain[2].sequence_hash};
  pool->Touch(leaf);
  EXPECT_EQ(pool->EvictionOrder()[0], chain[1].sequence_hash);
}

// A child held (being loaded) while its parent sits inactive: leaf-first keeps the parent,
// LRU may evict it. Nothing walks the chain: matching the leaf references only the leaf.
TEST(BlockPool, HeldChildProtectsItsParentOnlyUnderLeafFirst) {
  for (auto policy : {EvictionPolicy::kLeafFirst, EvictionPolicy::kLru}) {
    auto pool = BlockPool::Create(TierId::kHost, 2, policy);
    auto chain = Chain(1, 2);
    { RegisterChain(*pool, chain); }
    std::vector<BlockKey> tail = {KeyOf(chain[1])};
    auto child = pool->MatchPrefix(tail);
    ASSERT_EQ(child.size(), 1u);
    EXPECT_EQ(pool->stats().active, 1u);  // the parent is not referenced by its child
    auto a = pool->Allocate(1);
    if (policy == EvictionPolicy::kLeafFirst) {
      EXPECT_FALSE(a.has_value());
      EXPECT_EQ(pool->CountPrefix(Keys(chain)), 2u);
    } else {
      ASSERT_TRUE(a.has_value());
      EXPECT_EQ(pool->CountPrefix(Keys(chain)), 0u);  // the root is gone: the child is unreachable
      EXPECT_EQ(pool->CountPrefix(tail), 1u);
    }
  }
}

TEST(BlockPool, MatchFollowsTheRightBranchWhateverChildRegisteredLast) {
  // Two prompts share 2 blocks, then branch. The shared block's child hint points at the branch
  // registered last; a match of the other branch, and matches after the hinted child left or
  // its slot was reused for another block, must still find exactly the cached prefix.
  auto pool = BlockPool::Create(TierId::kHost, 8, EvictionPolicy::kLeafFirst);
  auto branch = [](Token second) {
    std::vector<Token> t = {1, 2, 3, 4, 5, 6, 7, 8, second, 10, 11, 12, second, 14, 15, 16};
    return *HashTokenBlocks(t, 4, 0);
  };
  auto a = branch(100), b = branch(200);
  ASSERT_EQ(a[1].sequence_hash, b[1].sequence_hash);
  ASSERT_NE(a[2].sequence_hash, b[2].sequence_hash);
  std::vector<uint32_t> a_slots, b_slots;
  {
    auto held = RegisterChain(*pool, a);
    for (auto& h : held) a_slots.push_back(h.id().value());
  }
  {
    auto held = RegisterChain(*pool, std::vector<TokenBlock>(b.begin(), b.begin() + 2));  // shared: existing
    auto tail = RegisterChain(*pool, std::vector<TokenBlock>(b.begin() + 2, b.end()));
    for (auto& h : held) b_slots.push_back(h.id().value());
    for (auto& h : tail) b_slots.push_back(h.id().value());
  }
  EXPECT_EQ(pool->ChildCount(a[1].sequence_hash), 2u);
  auto slots_of = [](const BlockRun& run) {
    std::vector<uint32_t> out;
    for (size_t i = 0; i < run.size(); ++i) out.push_back(run.id(i).value());
    return out;
  };
  EXPECT_EQ(slots_of(pool->MatchPrefix(Keys(a))), a_slots);  // not b's blocks, which the hint names
  EXPECT_EQ(slots_of(pool->MatchPrefix(Keys(b))), b_slots);
  EXPECT_EQ(pool->CountPrefix(Keys(a)), 4u);
  // The hinted branch leaves: its parent's hint goes with it.
  EXPECT_TRUE(pool->Invalidate(KeyOf(b[3])));
  EXPECT_TRUE(pool->Invalidate(KeyOf(b[2])));
  EXPECT_EQ(pool->ChildCount(a[1].sequence_hash), 1u);
  EXPECT_EQ(pool->CountPrefix(Keys(b)), 2u);
  EXPECT_EQ(pool->CountPrefix(Keys(a)), 4u);
  // The freed slots take other blocks (chains of their own): nothing points into them.
  { auto other = RegisterChain(*pool, Chain(500, 2)); }
  EXPECT_EQ(pool->CountPrefix(Keys(b)), 2u);
  EXPECT_EQ(slots_of(pool->MatchPrefix(Keys(a))), a_slots);
  // The shared block is a leaf only when both branches are gone.
  EXPECT_TRUE(pool->Invalidate(KeyOf(a[3])));
  EXPECT_TRUE(pool->Invalidate(KeyOf(a[2])));
  auto order = pool->EvictionOrder();
  EXPECT_NE(std::find(order.begin(), order.end(), a[1].sequence_hash), order.end());
}

TEST(BlockPool, ChildRegisteredBeforeItsParentStillProtectsIt) {
  auto pool = BlockPool::Create(TierId::kHost, 4, EvictionPolicy::kLeafFirst);
  auto chain = Chain(1, 2);
  {
    std::vector<TokenBlock> child = {chain[1]};
    RegisterChain(*pool, child);  // a continuation stored before its parent arrived
  }
  { RegisterChain(*pool, std::vector<TokenBlock>{chain[0]}); }
  EXPECT_EQ(pool->ChildCount(chain[0].sequence_hash), 1u);
  EXPECT_EQ(pool->EvictionOrder(), std::vector<SequenceHash>{chain[1].sequence_hash});
  // Invalidating the child makes the parent a leaf.
  EXPECT_TRUE(pool->Invalidate(KeyOf(chain[1])));
  EXPECT_EQ(pool->EvictionOrder(), std::vector<SequenceHash>{chain[0].sequence_hash});
}

TEST(BlockPool, MatchingOneBlockOfALongChainTouchesOneBlock) {
  const size_t n = 20000;
  auto pool = BlockPool::Create(TierId::kHost, n + 1, EvictionPolicy::kLeafFirst);
  auto chain = Chain(1, n, 2);
  auto keys = Keys(chain);
  {
    auto stored = pool->StoreRun(keys, 0);
    ASSERT_EQ(stored.run.size(), n);
  }
  EXPECT_EQ(pool->stats().inactive, n);
  EXPECT_EQ(pool->stats().evictable, 1u);  // only the leaf
  std::vector<BlockKey> last = {keys.back()};
  auto m = pool->MatchPrefix(last);
  ASSERT_EQ(m.size(), 1u);
  auto s = pool->stats();
  EXPECT_EQ(s.active, 1u);
  EXPECT_EQ(s.inactive, n - 1);
  EXPECT_EQ(s.evictable, 0u);
}

TEST(BlockPool, StoreRunReportsFreshBlocksAndStopsWhenFull) {
  auto pool = BlockPool::Create(TierId::kHost, 3, EvictionPolicy::kLeafFirst);
  auto chain = Chain(1, 5);
  auto keys = Keys(chain);
  {
    std::vector<BlockKey> first(keys.begin(), keys.begin() + 1);
    auto r = pool->StoreRun(first, 0);
    EXPECT_EQ(r.fresh, std::vector<uint8_t>{1});
  }
  auto r = pool->StoreRun(keys, 7);
  ASSERT_EQ(r.run.size(), 3u);  // 3 blocks, all referenced by the run: the 4th finds none
  EXPECT_EQ(r.fresh, (std::vector<uint8_t>{0, 1, 1}));
  EXPECT_EQ(r.run.Share(1).priority(), 7u);
  EXPECT_EQ(pool->stats().active, 3u);
  r.run.Release();
  EXPECT_EQ(pool->CountPrefix(keys), 3u);
  // A key colliding with a held hash stops the run: never stored under another's content.
  BlockKey forged = keys[0];
  forged.block_hash ^= 1;
  std::vector<BlockKey> bad = {forged};
  EXPECT_TRUE(pool->StoreRun(bad, 0).run.empty());
}

TEST(BlockPool, RegistryEmitsOneStoredAndOneRemovedAcrossTiers) {
  auto registry = std::make_shared<BlockRegistry>();
  std::vector<KvEvent> events;
  registry->AddSink([&](const KvEvent& e) { events.push_back(e); });
  auto host = BlockPool::Create(TierId::kHost, 1, EvictionPolicy::kLru, registry);
  auto disk = BlockPool::Create(TierId::kDisk, 1, EvictionPolicy::kLru, registry);
  auto chain = Chain(1, 1);
  { RegisterChain(*host, chain); }
  { RegisterChain(*disk, chain); }
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, KvEvent::Kind::kStored);
  { auto evict = host->Allocate(1); }
  EXPECT_EQ(events.size(), 1u);  // still in disk
  ASSERT_TRUE(disk->Reset().has_value());
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[1].kind, KvEvent::Kind::kRemoved);
  EXPECT_EQ(events[1].key.sequence_hash, chain[0].sequence_hash);
}

TEST(BlockPool, ResetRefusesWhileHeld) {
  auto pool = BlockPool::Create(TierId::kHost, 2, EvictionPolicy::kLru);
  auto held = RegisterChain(*pool, Chain(1, 1));
  EXPECT_FALSE(pool->Reset().has_value());
  held.clear();
  EXPECT_TRUE(pool->Reset().has_value());
  EXPECT_EQ(pool->stats().free, 2u);
}

TEST(BlockPool, HandleOutlivingPoolIsHarmless) {
  ImmutableBlock survivor;
  MutableBlock mut;
  {
    auto pool = BlockPool::Create(TierId::kHost, 2, EvictionPolicy::kLru);
    survivor = RegisterChain(*pool, Chain(1, 1))[0];
    mut = std::move((*pool->Allocate(1))[0]);
  }
  EXPECT_FALSE(survivor.valid());
  EXPECT_FALSE(mut.valid());
  EXPECT_FALSE(mut.Complete(BlockKey{}).has_value());
}

TEST(BlockPool, BadSizesAreConfigErrors) {
  EXPECT_THROW(BlockPool::Create(TierId::kHost, 0, EvictionPolicy::kLru), ConfigError);
}

// Several threads allocate, register, match and drop at once; run under ThreadSanitizer by
// the sanitizer build. The invariant checked: at the end every block is free or inactive.
TEST(BlockPool, ConcurrentStress) {
  auto registry = std::make_shared<BlockRegistry>();
  std::atomic<int64_t> stored{0}, removed{0};
  registry->AddSink([&](const KvEvent& e) { (e.kind == KvEvent::Kind::kStored ? stored : removed)++; });
  auto pool = BlockPool::Create(TierId::kHost, 64, EvictionPolicy::kLeafFirst, registry);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < 2000; ++i) {
        auto chain = Chain(static_cast<Token>(rng() % 16) * 100, 1 + rng() % 4);
        auto keys = Keys(chain);
        auto matched = pool->MatchPrefix(keys);
        size_t need = chain.size() - matched.size();
        auto fresh = pool->Allocate(need);
        if (!fresh) continue;
        std::vector<ImmutableBlock> held;
        for (size_t k = 0; k < matched.size(); ++k) held.push_back(matched.Share(k));
        for (size_t k = 0; k < need; ++k) {
          auto& blk = (*fresh)[k];
          ASSERT_TRUE(blk.Complete(KeyOf(chain[matched.size() + k])).has_value());
          auto r = pool->Register(std::move(blk));
          if (r) held.push_back(std::move(*r));
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  auto s = pool->stats();
  EXPECT_EQ(s.active, 0u);
  EXPECT_EQ(s.free + s.inactive, 64u);
  EXPECT_EQ(stored.load() - removed.load(), static_cast<int64_t>(s.registered));
}

}  // namespace
}  // namespace kvbm
