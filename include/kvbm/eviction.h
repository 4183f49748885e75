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
//
// Thread safety: none; the owning pool calls it under its mutex.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string_view>
#include <vector>

#include "kvbm/types.h"

namespace kvbm {

enum class EvictionPolicy : uint8_t { kLeafFirst, kLru };

// "leaf-first" / "lru".
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
  virtual size_t size() const = 0;
  // Slots in eviction order (first = next victim); for tests, O(n).
  virtual std::vector<uint32_t> Order() const = 0;
};

// REQUIRES: num_slots > 0.
std::unique_ptr<Evictor> MakeEvictor(EvictionPolicy policy, uint32_t num_slots);

}  // namespace kvbm
