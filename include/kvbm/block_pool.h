// Per-tier block pools with RAII handles, and the registry of sequence hashes across tiers.
//
// A pool owns `num_blocks` block slots; BlockId i is also storage slot i of the tier's layout.
// States: Reset -> Partial -> Complete -> Registered (ARCHITECTURE.md, "Block lifecycle").
//
//   MutableBlock   exclusive, move-only; dropping it returns the block to Reset.
//   ImmutableBlock one shared reference (copy = one more); dropping the last reference of a
//                  registered block makes it inactive: still matchable, and evictable.
//   BlockRun       references on a run of blocks of one pool (what a match or a batch store
//                  returns), taken and released under one lock, leaf first.
//
// Leaf-first without walks: a block does not reference its parent. Instead the pool counts, per
// sequence hash, the registered children it holds; a policy whose evictor is `leaf_only()`
// (eviction.h) never evicts a block with a cached child, so a chain leaves the pool leaf first
// whatever order its handles are dropped in. Every operation costs O(1) or O(log n) per block,
// independent of the chain's length.
//
// Collisions: a match needs the sequence hash, the block's own token hash and the parent's
// sequence hash to agree, so a 64-bit collision is a miss, never wrong KV.
//
// Thread safety: every BlockPool method and every handle operation is thread-safe. One mutex
// per pool. Lock order: BlockPool::mu_ -> BlockRegistry::mu_ -> event sinks. Event sinks must
// not call back into a pool. Handles keep only a weak_ptr to their pool: a handle that
// outlives its pool releases nothing and reports valid() == false.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <unordered_map>
#include <vector>

#include "kvbm/error.h"
#include "kvbm/eviction.h"
#include "kvbm/tokens.h"
#include "kvbm/types.h"

namespace kvbm {

enum class BlockState : uint8_t { kReset, kPartial, kComplete, kRegistered };

// What identifies the content of a registered block: its sequence hash, its own token hash and
// its parent's sequence hash. `position` (the block's index in its sequence) informs eviction
// policies and is not part of the identity.
struct BlockKey {
  SequenceHash sequence_hash;
  uint64_t block_hash = 0;
  std::optional<SequenceHash> parent;
  uint32_t position = 0;
  friend bool operator==(const BlockKey& a, const BlockKey& b) {
    return a.sequence_hash == b.sequence_hash && a.block_hash == b.block_hash && a.parent == b.parent;
  }
};

inline BlockKey KeyOf(const TokenBlock& b) { return {b.sequence_hash, b.block_hash, b.parent, b.index}; }

// A KV event: a hash entered its first tier (stored) or left its last (removed).
struct KvEvent {
  enum class Kind : uint8_t { kStored, kRemoved };
  Kind kind;
  TierId tier;  // the tier it entered or left last
  BlockKey key;
  std::vector<Token> tokens;  // stored only; may be empty when the caller kept no tokens
  uint64_t event_id = 0;
  BlockInputs inputs;  // stored only: what besides the tokens entered the block's hash
};

// Presence of each sequence hash across tiers; emits exactly one stored event when a hash
// first appears in any tier and one removed event when it has left every tier.
class BlockRegistry {
 public:
  using Sink = std::function<void(const KvEvent&)>;
  void AddSink(Sink sink);
  void OnStored(TierId tier, const BlockKey& key, std::span<const Token> tokens,
                const BlockInputs* inputs = nullptr);
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

// References on a run of blocks of one pool (a match, a batch store), released together under
// one lock, last block first (leaf first). Move-only. Block i is the i-th key asked for.
class BlockRun {
 public:
  BlockRun() = default;
  BlockRun(BlockRun&& other) noexcept;
  BlockRun& operator=(BlockRun&& other) noexcept;
  BlockRun(const BlockRun&) = delete;
  BlockRun& operator=(const BlockRun&) = delete;
  ~BlockRun();

  size_t size() const { return ids_.size(); }
  bool empty() const { return ids_.empty(); }
  TierId tier() const { return tier_; }
  BlockId id(size_t i) const { return BlockId(ids_[i]); }
  // One more, individual reference on block i. REQUIRES: i < size(); an empty handle when the
  // pool is gone.
  ImmutableBlock Share(size_t i) const;
  // Moves `other`'s references to the end of this run. REQUIRES: same pool (or this is empty).
  void Append(BlockRun&& other);
  void Release() noexcept;

 private:
  friend class BlockPool;
  BlockRun(std::weak_ptr<BlockPool> pool, TierId tier) : pool_(std::move(pool)), tier_(tier) {}
  std::weak_ptr<BlockPool> pool_;
  TierId tier_ = TierId::kHost;
  std::vector<uint32_t> ids_;
};

struct BlockPoolStats {
  uint64_t num_blocks = 0;
  uint64_t free = 0;       // Reset, unowned
  uint64_t inactive = 0;   // registered, unreferenced, matchable
  uint64_t evictable = 0;  // of the inactive, those the policy may evict now
  uint64_t active = 0;     // owned by a handle
  uint64_t registered = 0;
  uint64_t evictions = 0;
};

// What StoreRun did: `run` holds one reference per stored key, in order; `fresh[i]` is true
// when block i was newly allocated (its bytes must be written), false when the pool already
// held the key.
struct StoreRunResult {
  BlockRun run;
  std::vector<uint8_t> fresh;
};

class BlockPool : public std::enable_shared_from_this<BlockPool> {
 public:
  // Throws ConfigError when num_blocks is 0 or above 2^31.
  static std::shared_ptr<BlockPool> Create(TierId tier, uint64_t num_blocks, EvictionPolicy policy,
                                           std::shared_ptr<BlockRegistry> registry = nullptr);
  // With a policy object of the caller's (replay's oracle, experiments). REQUIRES: evictor sized
  // for num_blocks.
  static std::shared_ptr<BlockPool> Create(TierId tier, uint64_t num_blocks, std::unique_ptr<Evictor> evictor,
                                           std::shared_ptr<BlockRegistry> registry = nullptr);
  ~BlockPool();
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  TierId tier() const { return tier_; }
  uint64_t num_blocks() const { return slots_.size(); }
  bool leaf_only() const { return leaf_only_; }
  std::string_view policy_name() const { return evictor_->name(); }  // fixed at creation

  // All or nothing: `count` blocks in Reset, using free blocks before evicting any registered
  // one. ResourceExhausted when free + evictable < count.
  Result<std::vector<MutableBlock>> Allocate(size_t count);
  // Registers a Complete block. A hash the pool already holds returns the existing block (the
  // given one goes back to Reset); a hash held with different content is a collision:
  // FailedPrecondition, nothing registered.
  Result<ImmutableBlock> Register(MutableBlock&& block);
  // Allocate + Complete + Register for each key, in order, under one lock: a key already held
  // gives the existing block. Stops at the first key that gets no block (the pool is full of
  // referenced or protected blocks) or collides; the run is shorter then. `tokens`, when not
  // empty, has one entry per key (for the stored KV event), and so has `inputs` (the block's
  // extra keys, for the same event).
  StoreRunResult StoreRun(std::span<const BlockKey> keys, uint32_t priority,
                          std::span<const std::span<const Token>> tokens = {},
                          std::span<const BlockInputs> inputs = {});
  // Longest prefix of `keys` held in this pool, each returned block referenced (pinned).
  // The first key may have any parent (a match continuing another tier's run); after it the
  // chain must be unbroken. An empty list matches nothing.
  BlockRun MatchPrefix(std::span<const BlockKey> keys);
  // Like MatchPrefix but only counts, taking no references.
  size_t CountPrefix(std::span<const BlockKey> keys) const;
  bool Contains(const BlockKey& key) const;
  // The tier below holds a copy of `key` now (Evictor::OnCopiedBelow); nothing when not held.
  void MarkCopiedBelow(const BlockKey& key);
  // Removes `key` from the pool's matchable set (e.g. its bytes failed verification): never
  // matched again; an unreferenced block is freed at once, a referenced one when released.
  // Returns false when the pool did not hold it.
  bool Invalidate(const BlockKey& key);
  // Registers each (id, key) at exactly that slot, inactive and matchable (KV events see them
  // stored): blocks found intact in a tier's storage after a restart (the persistent G3). A slot
  // that is not free, out of range or given twice, or a key the pool already holds, is skipped.
  // Returns how many were registered. O(n + num_blocks).
  size_t Restore(std::span<const std::pair<BlockId, BlockKey>> blocks);
  // Marks inactive blocks with these hashes as most recently used.
  void Touch(std::span<const SequenceHash> hashes);
  // Drops every registered block. FailedPrecondition when any block is still referenced.
  Status Reset();

  BlockPoolStats stats() const;
  // Number of registered children of `hash` in this pool.
  uint32_t ChildCount(SequenceHash hash) const;
  // Every registered block (id, key), for tests and audits.
  std::vector<std::pair<BlockId, BlockKey>> RegisteredBlocks() const;
  // Sequence hashes in eviction order (first = next victim), for tests.
  std::vector<SequenceHash> EvictionOrder() const;

 private:
  friend class MutableBlock;
  friend class ImmutableBlock;
  friend class BlockRun;
  struct Slot {
    BlockKey key;
    uint64_t last_use = 0;
    uint32_t refs = 0;
    uint32_t priority = 0;
    BlockState state = BlockState::kReset;
    bool mutable_owned = false;
    bool evictable = false;    // in evictor_
    // While Registered: how many registered blocks of this pool name this one as parent (as
    // children_[key.sequence_hash]), and the slot of the latest of them to register (kNoSlot
    // when none or when it left), which lets a prefix match follow a chain without hashing.
    uint32_t children = 0;
    uint32_t child_hint = kNoSlot;
    std::vector<Token> tokens; // kept from Complete until Register, for the stored event
  };
  static constexpr uint32_t kNoSlot = std::numeric_limits<uint32_t>::max();
  BlockPool(TierId tier, uint64_t num_blocks, std::unique_ptr<Evictor> evictor,
            std::shared_ptr<BlockRegistry> registry);

  void ReleaseMutable(BlockId id) noexcept;
  void AddRef(BlockId id);
  void ReleaseRef(BlockId id) noexcept;
  void ReleaseRun(std::span<const uint32_t> ids) noexcept;
  ImmutableBlock ShareLocked(uint32_t id);
  Status CompleteBlock(BlockId id, const BlockKey& key, std::span<const Token> tokens, uint32_t priority);
  Status MarkPartialBlock(BlockId id);
  BlockState StateOf(BlockId id) const;

  // All REQUIRES mu_ held.
  void AcquireLocked(uint32_t id);
  void ReleaseLocked(uint32_t id);
  void MaybeEvictableLocked(uint32_t id);
  void UnevictableLocked(uint32_t id);
  void RegisterLocked(uint32_t id, std::span<const Token> tokens, const BlockInputs* inputs = nullptr);
  void UnregisterLocked(uint32_t id);
  void EvictLocked(uint32_t id);
  std::optional<uint32_t> TakeBlockLocked();
  // FindLocked for the block after `prev` (a slot just matched): its child hint first.
  std::optional<uint32_t> FindNextLocked(uint32_t prev, const BlockKey& key) const;
  std::optional<uint32_t> FindLocked(const BlockKey& key, std::optional<SequenceHash> expected_parent) const;

  const TierId tier_;
  const std::shared_ptr<BlockRegistry> registry_;
  mutable std::mutex mu_;
  std::unique_ptr<Evictor> evictor_;                     // GUARDED_BY(mu_)
  const bool leaf_only_;
  std::vector<Slot> slots_;                              // GUARDED_BY(mu_)
  std::vector<uint32_t> free_;                           // GUARDED_BY(mu_)
  std::unordered_map<SequenceHash, uint32_t> by_hash_;   // GUARDED_BY(mu_)
  std::unordered_map<SequenceHash, uint32_t> children_;  // GUARDED_BY(mu_) parent -> count
  uint64_t tick_ = 0;                                    // GUARDED_BY(mu_)
  uint64_t active_ = 0;                                  // GUARDED_BY(mu_)
  uint64_t inactive_ = 0;                                // GUARDED_BY(mu_)
  uint64_t evictions_ = 0;                               // GUARDED_BY(mu_)
};

}  // namespace kvbm
