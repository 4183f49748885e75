// Eviction policies of a block pool: which evictable block goes first.
//
// A pool (block_pool.h) decides WHICH blocks are evictable: registered, unreferenced, and, when
// the policy asks for it (`leaf_only()`), without a cached child in the same pool (a parent is
// never evicted while its child sits in the tier: the child would become unreachable). The
// Evictor only ORDERS the evictable set. Every operation is O(1) or O(log n); nothing walks a
// chain.
//
// Policies:
//   kLeafFirst  leaves only; lowest priority first, then least recently returned. The parent
//               of an evicted leaf re-enters the order at its own last-use time.
//   kLru        the reference's order: lowest priority first, then least recently returned;
//               any unreferenced block, leaf or not.
//   kReuse      leaves only; reuse-interval prediction (opt-in). Each block's
//               next use is predicted as its last use plus its last reuse interval (the time
//               between its two latest uses, remembered across evictions by bounded ghost
//               entries). Within the lowest priority: first a block overdue by more than one
//               interval (its pattern stopped: a finished conversation), else the block
//               predicted farthest away, where a block never reused yet counts as farthest;
//               ties oldest first, then deepest. Time is the pool's release tick. With no reuse
//               at all it is leaf-first.
//   kAdaptive   the default (kDefaultEvictionPolicy). Leaves only; follows whichever of leaf-first (recency) and reuse has been winning
//               lately. Both orders are kept over the evictable set (O(log n) each); two
//               shadow caches, one per order, replay a spatial sample of the hash space (SHARDS:
//               the hashes below a threshold, at the pool's capacity times the sample rate) over
//               the pool's stream of uses (hits and stores), and a decaying count of their hit
//               difference picks the order the victims come from. Starts as leaf-first.
//               Cost-aware: a block the tier below holds a copy of (OnCopiedBelow: G2 blocks
//               written to G3) goes before any other of its priority, least recently returned
//               first: with G3 on, G2 then keeps the blocks G3 lacks (the reuse order alone
//               kept reused blocks, the ones G3 had, and evicted new ones before their second
//               sight could admit them to G3). The mark stays until the slot is stored again,
//               also when G3 evicts its copy later (G3 is usually larger and slower to turn).
//
// Belady's MIN (MakeOptEvictor) needs the future and exists for trace replay only: the victim
// is the leaf whose next use, as told by a NextUseOracle, is farthest (never used again
// first); ties deepest first.
//
// Thread safety: none for Evictors; the owning pool calls them under its mutex. A NextUseOracle
// is built by one thread, then read by the pools' callers while one thread advances `now`.
#pragma once

#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <unordered_map>
#include <optional>
#include <string_view>
#include <vector>

#include "kvbm/types.h"

namespace kvbm {

enum class EvictionPolicy : uint8_t { kLeafFirst, kLru, kReuse, kAdaptive };

// The policy of G2 and G3 when none is set: kAdaptive. On the embedded conversation trace it
// gives 1.49x / 1.74x / 1.17x LRU's hit rate at 1k / 3k / 5,859 blocks of G2 and is never more
// than 0.0027 below LRU at any capacity, with or without G1 and G3; on generated conversation
// traces, where kReuse lost to LRU by up to 0.1, it stays within 0.0005 of leaf-first, never
// below LRU (BENCHMARKS.md). kReuse is opt-in; leaf-first and the reference's kLru stay
// available (DYN_KVBM_{HOST,DISK}_EVICTION_POLICY).
inline constexpr EvictionPolicy kDefaultEvictionPolicy = EvictionPolicy::kAdaptive;

// "leaf-first" / "lru" / "reuse" (also "reuse-interval") / "adaptive".
std::string_view EvictionPolicyName(EvictionPolicy policy);
std::optional<EvictionPolicy> ParseEvictionPolicy(std::string_view name);

// What a policy may know about a block when it becomes evictable.
struct EvictionEntry {
  uint32_t slot = 0;
  SequenceHash hash;
  uint32_t priority = 0;
  uint32_t position = 0;  // index of the block in its sequence (0 = first block of a prompt)
  uint64_t last_use = 0;  // the pool's tick when the block was last returned or touched
};

class Evictor {
 public:
  virtual ~Evictor() = default;
  // The policy's name ("leaf-first", "lru", ...).
  virtual std::string_view name() const = 0;
  // True when only blocks without a cached child may be evicted.
  virtual bool leaf_only() const = 0;
  // `entry.slot` became evictable. REQUIRES: not already in.
  virtual void Insert(const EvictionEntry& entry) = 0;
  // `slot` is no longer evictable (referenced again, gained a child, invalidated).
  // REQUIRES: in.
  virtual void Remove(uint32_t slot) = 0;
  // Removes and returns the next victim. REQUIRES: size() > 0.
  virtual uint32_t PopVictim() = 0;
  // A lookup found the block (a hit); policies that count reuse use it. Any slot, in or not.
  virtual void OnHit(uint32_t /*slot*/, SequenceHash /*hash*/) {}
  // The block with `hash` left the pool by eviction (policies with ghost entries use it).
  virtual void OnEvicted(SequenceHash /*hash*/) {}
  // A block with `hash` was stored (registered) in `slot`: a use that the pool missed. With
  // OnHit it makes the pool's whole stream of uses, which sampling policies replay.
  virtual void OnStored(uint32_t /*slot*/, SequenceHash /*hash*/) {}
  // The tier below now holds a copy of the block in `slot` (written there), so evicting it
  // here loses little; cost-aware policies evict such blocks first. Any slot, evictable or not;
  // it holds until the slot is stored again.
  virtual void OnCopiedBelow(uint32_t /*slot*/) {}
  virtual size_t size() const = 0;
  // Slots in eviction order (first = next victim); for tests, O(n).
  virtual std::vector<uint32_t> Order() const = 0;
};

// REQUIRES: num_slots > 0.
std::unique_ptr<Evictor> MakeEvictor(EvictionPolicy policy, uint32_t num_slots);

// The future of a trace for Belady's MIN: for each sequence hash, the sorted indices of the
// requests whose prompts hold it, and `now`, the index of the latest request already looked up.
class NextUseOracle {
 public:
  static constexpr uint64_t kNever = std::numeric_limits<uint64_t>::max();
  // Build phase: call with non-decreasing `request` per hash (a repeat of the last is ignored).
  void AddUse(SequenceHash hash, uint64_t request);
  // Requests <= `request` have been looked up.
  void SetNow(uint64_t request) { now_.store(request, std::memory_order_relaxed); }
  uint64_t now() const { return now_.load(std::memory_order_relaxed); }
  // The first request after now() that holds `hash`; kNever when none. O(log uses).
  uint64_t NextUse(SequenceHash hash) const;
  size_t distinct_hashes() const { return uses_.size(); }

 private:
  std::unordered_map<SequenceHash, std::vector<uint64_t>> uses_;
  std::atomic<uint64_t> now_{0};
};

// Belady's MIN over `oracle` (leaf_only). Stale keys (a next use already passed) are refreshed
// lazily at PopVictim; amortised O(log n) per operation. REQUIRES: oracle, num_slots > 0.
std::unique_ptr<Evictor> MakeOptEvictor(std::shared_ptr<const NextUseOracle> oracle, uint32_t num_slots);

}  // namespace kvbm
