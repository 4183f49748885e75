// Per-tier block pools with RAII handles, and the registry of sequence hashes across tiers.
//
// A pool owns `num_blocks` block slots; BlockId i is also storage slot i of the tier's layout.
// States: Reset -> Partial -> Complete -> Registered (ARCHITECTURE.md, "Block lifecycle").
//
//   MutableBlock   exclusive, move-only; dropping it returns the block to Reset.
//   ImmutableBlock shared (copy = one more reference); dropping the last reference of a
//                  registered block moves it to the inactive set, where it can still be matched
//                  and is evictable.
//
// While a registered block is referenced it holds a reference on its parent in the same pool,
// so a chain returns leaf first. Handles keep only a weak_ptr to their pool: a handle that
// outlives its pool releases nothing and reports valid() == false.
//
// Eviction (only inactive blocks; Reset blocks are always used first):
//   kLeafFirst: lowest priority, then blocks with no cached child in this pool (leaves), then
//               least recently returned.
//   kLru:       lowest priority, then least recently returned (the reference's order).
//
// Collisions: a match needs the sequence hash, the block's own token hash and the parent's
// sequence hash to agree, so a 64-bit collision is a miss, never wrong KV.
//
// Thread safety: every BlockPool method and every handle operation is thread-safe. One mutex
// per pool. Lock order: BlockPool::mu_ -> BlockRegistry::mu_ -> event sinks. Event sinks must
// not call back into a pool.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <unordered_map>
#include <vector>

#include "kvbm/error.h"
#include "kvbm/tokens.h"
#include "kvbm/types.h"

namespace kvbm {

enum class BlockState : uint8_t { kReset, kPartial, kComplete, kRegistered };
enum class EvictionPolicy : uint8_t { kLeafFirst, kLru };

// What identifies the content of a registered block.
struct BlockKey {
  SequenceHash sequence_hash;
  uint64_t block_hash = 0;
  std::optional<SequenceHash> parent;
  friend bool operator==(const BlockKey&, const BlockKey&) = default;
};

inline BlockKey KeyOf(const TokenBlock& b) { return {b.sequence_hash, b.block_hash, b.parent}; }

// A KV event: a hash entered its first tier (stored) or left its last (removed).
struct KvEvent {
  enum class Kind : uint8_t { kStored, kRemoved };
  Kind kind;
  TierId tier;  // the tier it entered or left last
  BlockKey key;
  std::vector<Token> tokens;  // stored only; may be empty when the caller kept no tokens
  uint64_t event_id = 0;
};

// Presence of each sequence hash across tiers; emits exactly one stored event when a hash
// first appears in any tier and one removed event when it has left every tier.
class BlockRegistry {
 public:
  using Sink = std::function<void(const KvEvent&)>;
  void AddSink(Sink sink);
  void OnStored(TierId tier, const BlockKey& key, std::span<const Token> tokens);
  void OnRemoved(TierId tier, const BlockKey& key);
  // Tiers (bit i = TierId i) currently holding `hash`.
  uint32_t TiersHolding(SequenceHash hash) const;
  size_t size() const;

 private:
  mutable std::mutex mu_;
  std::unordered_map<SequenceHash, uint32_t> presence_;  // GUARDED_BY(mu_)
  std::vector<Sink> sinks_;                              // GUARDED_BY(mu_)
  uint64_t next_event_id_ = 0;                           // GUARDED_BY(mu_)
};

class BlockPool;

class MutableBlock {
 public:
  MutableBlock() = default;
  MutableBlock(MutableBlock&& other) noexcept;
  MutableBlock& operator=(MutableBlock&& other) noexcept;
  MutableBlock(const MutableBlock&) = delete;
  MutableBlock& operator=(const MutableBlock&) = delete;
  ~MutableBlock();

  bool valid() const;
  BlockId id() const { return id_; }
  TierId tier() const { return tier_; }
  // Fills the block with a full, hashed token block. `tokens` may be empty (then KV events
  // carry no tokens). REQUIRES: valid(); else FailedPrecondition.
  Status Complete(const BlockKey& key, std::span<const Token> tokens = {}, uint32_t priority = 0);
  // Marks the block as receiving tokens (Partial). REQUIRES: valid().
  Status MarkPartial();
  BlockState state() const;

 private:
  friend class BlockPool;
  MutableBlock(std::weak_ptr<BlockPool> pool, BlockId id, TierId tier)
      : pool_(std::move(pool)), id_(id), tier_(tier) {}
  void Release() noexcept;
  std::weak_ptr<BlockPool> pool_;
  BlockId id_;
  TierId tier_ = TierId::kHost;
};

class ImmutableBlock {
 public:
  ImmutableBlock() = default;
  ImmutableBlock(const ImmutableBlock& other);
  ImmutableBlock& operator=(const ImmutableBlock& other);
  ImmutableBlock(ImmutableBlock&& other) noexcept;
  ImmutableBlock& operator=(ImmutableBlock&& other) noexcept;
  ~ImmutableBlock();

  bool valid() const;
  BlockId id() const { return id_; }
  TierId tier() const { return tier_; }
  const BlockKey& key() const { return key_; }
  SequenceHash sequence_hash() const { return key_.sequence_hash; }
  uint32_t priority() const { return priority_; }

 private:
  friend class BlockPool;
  ImmutableBlock(std::weak_ptr<BlockPool> pool, BlockId id, TierId tier, const BlockKey& key, uint32_t priority)
      : pool_(std::move(pool)), id_(id), tier_(tier), key_(key), priority_(priority) {}
  void Release() noexcept;
  std::weak_ptr<BlockPool> pool_;
  BlockId id_;
  TierId tier_ = TierId::kHost;
  BlockKey key_;
  uint32_t priority_ = 0;
};

struct BlockPoolStats {
  uint64_t num_blocks = 0;
  uint64_t free = 0;      // Reset, unowned
  uint64_t inactive = 0;  // registered, unreferenced, matchable, evictable
  uint64_t active = 0;    // owned by a handle
  uint64_t registered = 0;
  uint64_t evictions = 0;
};

class BlockPool : public std::enable_shared_from_this<BlockPool> {
 public:
  // Throws ConfigError when num_blocks is 0 or above 2^31.
  static std::shared_ptr<BlockPool> Create(TierId tier, uint64_t num_blocks, EvictionPolicy policy,
                                           std::shared_ptr<BlockRegistry> registry = nullptr);
  ~BlockPool();
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  TierId tier() const { return tier_; }
  uint64_t num_blocks() const { return slots_.size(); }
  EvictionPolicy policy() const { return policy_; }

  // All or nothing: `count` blocks in Reset, using free blocks before evicting any registered
  // one. ResourceExhausted when free + inactive < count.
  Result<std::vector<MutableBlock>> Allocate(size_t count);
  // Registers a Complete block. A hash the pool already holds returns the existing block (the
  // given one goes back to Reset); a hash held with different content is a collision:
  // FailedPrecondition, nothing registered.
  Result<ImmutableBlock> Register(MutableBlock&& block);
  // Longest prefix of `keys` held in this pool, each returned block referenced (pinned).
  // An empty list matches nothing.
  std::vector<ImmutableBlock> MatchPrefix(std::span<const BlockKey> keys);
  // Like MatchPrefix but only counts, taking no references.
  size_t CountPrefix(std::span<const BlockKey> keys) const;
  bool Contains(const BlockKey& key) const;
  // Removes `key` from the pool's matchable set (e.g. its bytes failed verification): never
  // matched again; an unreferenced block is freed at once, a referenced one when released.
  // Returns false when the pool did not hold it.
  bool Invalidate(const BlockKey& key);
  // Marks inactive blocks with these hashes as most recently used.
  void Touch(std::span<const SequenceHash> hashes);
  // Drops every registered block. FailedPrecondition when any block is still referenced.
  Status Reset();

  BlockPoolStats stats() const;
  // Number of registered children of `hash` in this pool (for tests of leaf tracking).
  uint32_t ChildCount(SequenceHash hash) const;
  // Every registered block (id, key), for tests and audits.
  std::vector<std::pair<BlockId, BlockKey>> RegisteredBlocks() const;
  // Sequence hashes in eviction order (first = next victim), for tests.
  std::vector<SequenceHash> EvictionOrder() const;

 private:
  friend class MutableBlock;
  friend class ImmutableBlock;
  struct EvictKey {
    uint32_t priority;
    uint32_t not_leaf;
    uint64_t tick;
    uint32_t id;
    auto operator<=>(const EvictKey&) const = default;
  };
  struct Slot {
    BlockState state = BlockState::kReset;
    bool mutable_owned = false;
    uint32_t refs = 0;
    bool inactive = false;
    EvictKey inactive_key{};
    BlockKey key;
    uint32_t priority = 0;
    std::optional<uint32_t> parent_ref;  // slot on which this block holds a reference
    std::vector<Token> tokens;           // kept from Complete until Register, for the stored event
  };
  BlockPool(TierId tier, uint64_t num_blocks, EvictionPolicy policy, std::shared_ptr<BlockRegistry> registry);

  void ReleaseMutable(BlockId id) noexcept;
  void AddRef(BlockId id);
  void ReleaseRef(BlockId id) noexcept;
  Status CompleteBlock(BlockId id, const BlockKey& key, std::span<const Token> tokens, uint32_t priority);
  Status MarkPartialBlock(BlockId id);
  BlockState StateOf(BlockId id) const;

  // All REQUIRES mu_ held.
  void AcquireLocked(uint32_t id);
  void EvictLocked(uint32_t id);
  void InsertInactiveLocked(uint32_t id);
  void RekeyParentLocked(SequenceHash parent);
  EvictKey KeyForLocked(uint32_t id) const;
  uint32_t ChildCountLocked(SequenceHash hash) const;
  std::optional<uint32_t> FindLocked(const BlockKey& key, std::optional<SequenceHash> expected_parent) const;

  const TierId tier_;
  const EvictionPolicy policy_;
  const std::shared_ptr<BlockRegistry> registry_;
  mutable std::mutex mu_;
  std::vector<Slot> slots_;                                  // GUARDED_BY(mu_)
  std::vector<uint32_t> free_;                               // GUARDED_BY(mu_)
  std::unordered_map<SequenceHash, uint32_t> by_hash_;       // GUARDED_BY(mu_)
  std::unordered_map<SequenceHash, uint32_t> children_;      // GUARDED_BY(mu_) parent -> count
  std::set<EvictKey> inactive_;                              // GUARDED_BY(mu_)
  uint64_t tick_ = 0;                                        // GUARDED_BY(mu_)
  uint64_t active_ = 0;                                      // GUARDED_BY(mu_)
  uint64_t evictions_ = 0;                                   // GUARDED_BY(mu_)
};

}  // namespace kvbm
