#include "kvbm/block_pool.h"

#include <fmt/format.h>

#include "kvbm/log.h"

namespace kvbm {

// ---------------------------------------------------------------------------------------------
// BlockRegistry

void BlockRegistry::AddSink(Sink sink) {
  std::lock_guard lock(mu_);
  sinks_.push_back(std::move(sink));
}

void BlockRegistry::OnStored(TierId tier, const BlockKey& key, std::span<const Token> tokens,
                             const BlockInputs* inputs) {
  std::lock_guard lock(mu_);
  uint32_t& mask = presence_[key.sequence_hash];
  bool first = mask == 0;
  mask |= 1u << static_cast<unsigned>(tier);
  if (first && !sinks_.empty()) {
    KvEvent e{KvEvent::Kind::kStored, tier, key, std::vector<Token>(tokens.begin(), tokens.end()), next_event_id_++,
              inputs ? *inputs : BlockInputs{}};
    for (auto& sink : sinks_) sink(e);
  }
}

void BlockRegistry::OnRemoved(TierId tier, const BlockKey& key) {
  std::lock_guard lock(mu_);
  auto it = presence_.find(key.sequence_hash);
  if (it == presence_.end()) return;
  it->second &= ~(1u << static_cast<unsigned>(tier));
  if (it->second != 0) return;
  presence_.erase(it);
  if (!sinks_.empty()) {
    KvEvent e{KvEvent::Kind::kRemoved, tier, key, {}, next_event_id_++};
    for (auto& sink : sinks_) sink(e);
  }
}

uint32_t BlockRegistry::TiersHolding(SequenceHash hash) const {
  std::lock_guard lock(mu_);
  auto it = presence_.find(hash);
  return it == presence_.end() ? 0 : it->second;
}

size_t BlockRegistry::size() const {
  std::lock_guard lock(mu_);
  return presence_.size();
}

// ---------------------------------------------------------------------------------------------
// Handles

MutableBlock::MutableBlock(MutableBlock&& other) noexcept
    : pool_(std::move(other.pool_)), id_(other.id_), tier_(other.tier_) {
  other.pool_.reset();
}

MutableBlock& MutableBlock::operator=(MutableBlock&& other) noexcept {
  if (this != &other) {
    Release();
    pool_ = std::move(other.pool_);
    id_ = other.id_;
    tier_ = other.tier_;
    other.pool_.reset();
  }
  return *this;
}

MutableBlock::~MutableBlock() { Release(); }

void MutableBlock::Release() noexcept {
  if (auto pool = pool_.lock()) pool->ReleaseMutable(id_);
  pool_.reset();
}

bool MutableBlock::valid() const { return !pool_.expired(); }

Status MutableBlock::Complete(const BlockKey& key, std::span<const Token> tokens, uint32_t priority) {
  auto pool = pool_.lock();
  if (!pool) return MakeError(ErrorCode::kFailedPrecondition, "MutableBlock: handle is empty or its pool is gone");
  return pool->CompleteBlock(id_, key, tokens, priority);
}

Status MutableBlock::MarkPartial() {
  auto pool = pool_.lock();
  if (!pool) return MakeError(ErrorCode::kFailedPrecondition, "MutableBlock: handle is empty or its pool is gone");
  return pool->MarkPartialBlock(id_);
}

BlockState MutableBlock::state() const {
  auto pool = pool_.lock();
  return pool ? pool->StateOf(id_) : BlockState::kReset;
}

ImmutableBlock::ImmutableBlock(const ImmutableBlock& other)
    : pool_(other.pool_), id_(other.id_), tier_(other.tier_), key_(other.key_), priority_(other.priority_) {
  if (auto pool = pool_.lock()) pool->AddRef(id_);
  else pool_.reset();
}

ImmutableBlock& ImmutableBlock::operator=(const ImmutableBlock& other) {
  if (this != &other) {
    ImmutableBlock copy(other);
    *this = std::move(copy);
  }
  return *this;
}

ImmutableBlock::ImmutableBlock(ImmutableBlock&& other) noexcept
    : pool_(std::move(other.pool_)), id_(other.id_), tier_(other.tier_), key_(other.key_), priority_(other.priority_) {
  other.pool_.reset();
}

ImmutableBlock& ImmutableBlock::operator=(ImmutableBlock&& other) noexcept {
  if (this != &other) {
    Release();
    pool_ = std::move(other.pool_);
    id_ = other.id_;
    tier_ = other.tier_;
    key_ = other.key_;
    priority_ = other.priority_;
    other.pool_.reset();
  }
  return *this;
}

ImmutableBlock::~ImmutableBlock() { Release(); }

void ImmutableBlock::Release() noexcept {
  if (auto pool = pool_.lock()) pool->ReleaseRef(id_);
  pool_.reset();
}

bool ImmutableBlock::valid() const { return !pool_.expired(); }

// ---------------------------------------------------------------------------------------------
// BlockRun

BlockRun::BlockRun(BlockRun&& other) noexcept
    : pool_(std::move(other.pool_)), tier_(other.tier_), ids_(std::move(other.ids_)) {
  other.pool_.reset();
  other.ids_.clear();
}

BlockRun& BlockRun::operator=(BlockRun&& other) noexcept {
  if (this != &other) {
    Release();
    pool_ = std::move(other.pool_);
    tier_ = other.tier_;
    ids_ = std::move(other.ids_);
    other.pool_.reset();
    other.ids_.clear();
  }
  return *this;
}

BlockRun::~BlockRun() { Release(); }

void BlockRun::Release() noexcept {
  if (!ids_.empty())
    if (auto pool = pool_.lock()) pool->ReleaseRun(ids_);
  ids_.clear();
  pool_.reset();
}

ImmutableBlock BlockRun::Share(size_t i) const {
  auto pool = pool_.lock();
  if (!pool) return {};
  std::lock_guard lock(pool->mu_);
  return pool->ShareLocked(ids_[i]);
}

void BlockRun::Append(BlockRun&& other) {
  if (other.ids_.empty()) return;
  if (ids_.empty() && pool_.expired()) {
    *this = std::move(other);
    return;
  }
  Check(!pool_.owner_before(other.pool_) && !other.pool_.owner_before(pool_), "BlockRun::Append: runs of two pools");
  ids_.insert(ids_.end(), other.ids_.begin(), other.ids_.end());
  other.ids_.clear();
  other.pool_.reset();
}

// ---------------------------------------------------------------------------------------------
// BlockPool

std::shared_ptr<BlockPool> BlockPool::Create(TierId tier, uint64_t num_blocks, EvictionPolicy policy,
                                             std::shared_ptr<BlockRegistry> registry) {
  if (num_blocks == 0 || num_blocks > (uint64_t{1} << 31))
    throw ConfigError(fmt::format("{} block pool: num_blocks {} must be in [1, 2^31]", TierName(tier), num_blocks));
  return Create(tier, num_blocks, MakeEvictor(policy, static_cast<uint32_t>(num_blocks)), std::move(registry));
}

std::shared_ptr<BlockPool> BlockPool::Create(TierId tier, uint64_t num_blocks, std::unique_ptr<Evictor> evictor,
                                             std::shared_ptr<BlockRegistry> registry) {
  if (num_blocks == 0 || num_blocks > (uint64_t{1} << 31))
    throw ConfigError(fmt::format("{} block pool: num_blocks {} must be in [1, 2^31]", TierName(tier), num_blocks));
  if (!evictor) throw ConfigError(fmt::format("{} block pool: no eviction policy", TierName(tier)));
  return std::shared_ptr<BlockPool>(new BlockPool(tier, num_blocks, std::move(evictor), std::move(registry)));
}

BlockPool::BlockPool(TierId tier, uint64_t num_blocks, std::unique_ptr<Evictor> evictor,
                     std::shared_ptr<BlockRegistry> registry)
    : tier_(tier), registry_(std::move(registry)), evictor_(std::move(evictor)), leaf_only_(evictor_->leaf_only()),
      slots_(num_blocks) {
  free_.reserve(num_blocks);
  for (uint64_t i = num_blocks; i-- > 0;) free_.push_back(static_cast<uint32_t>(i));
  by_hash_.reserve(num_blocks);
}

BlockPool::~BlockPool() {
  if (active_ != 0)
    Log(LogLevel::kError, "{} block pool destroyed with {} blocks still held by handles; they release nothing",
        TierName(tier_), active_);
  if (registry_) {
    for (auto& slot : slots_)
      if (slot.state == BlockState::kRegistered) registry_->OnRemoved(tier_, slot.key);
  }
}

void BlockPool::MaybeEvictableLocked(uint32_t id) {
  Slot& s = slots_[id];
  if (s.evictable || s.refs > 0 || s.mutable_owned || s.state != BlockState::kRegistered) return;
  if (leaf_only_ && s.children > 0) return;
  s.evictable = true;
  evictor_->Insert({id, s.key.sequence_hash, s.priority, s.key.position, s.last_use});
}

void BlockPool::UnevictableLocked(uint32_t id) {
  Slot& s = slots_[id];
  if (!s.evictable) return;
  s.evictable = false;
  evictor_->Remove(id);
}

void BlockPool::AcquireLocked(uint32_t id) {
  Slot& s = slots_[id];
  if (s.refs++ > 0) return;
  UnevictableLocked(id);
  --inactive_;
  ++active_;
}

void BlockPool::ReleaseLocked(uint32_t id) {
  Slot& s = slots_[id];
  if (s.refs == 0) return;
  if (--s.refs > 0) return;
  --active_;
  if (s.state == BlockState::kRegistered) {
    ++inactive_;
    s.last_use = ++tick_;
    MaybeEvictableLocked(id);
  } else {
    // Invalidated while referenced: its slot is free now.
    s.state = BlockState::kReset;
    s.key = {};
    free_.push_back(id);
  }
}

void BlockPool::RegisterLocked(uint32_t id, std::span<const Token> tokens, const BlockInputs* inputs) {
  Slot& s = slots_[id];
  s.state = BlockState::kRegistered;
  by_hash_.emplace(s.key.sequence_hash, id);
  evictor_->OnStored(id, s.key.sequence_hash);
  auto own = children_.find(s.key.sequence_hash);  // children registered before this block
  s.children = own == children_.end() ? 0 : own->second;
  s.child_hint = kNoSlot;
  if (s.key.parent) {
    ++children_[*s.key.parent];
    auto p = by_hash_.find(*s.key.parent);
    if (p != by_hash_.end()) {
      Slot& parent = slots_[p->second];
      parent.child_hint = id;
      if (++parent.children == 1 && leaf_only_) UnevictableLocked(p->second);
    }
  }
  if (registry_) registry_->OnStored(tier_, s.key, tokens, inputs);
}

void BlockPool::UnregisterLocked(uint32_t id) {
  Slot& s = slots_[id];
  by_hash_.erase(s.key.sequence_hash);
  if (s.key.parent) {
    auto it = children_.find(*s.key.parent);
    if (it != children_.end() && --it->second == 0) children_.erase(it);
    auto p = by_hash_.find(*s.key.parent);
    if (p != by_hash_.end()) {
      Slot& parent = slots_[p->second];
      if (parent.child_hint == id) parent.child_hint = kNoSlot;
      if (parent.children > 0 && --parent.children == 0) MaybeEvictableLocked(p->second);  // a leaf now
    }
  }
  if (registry_) registry_->OnRemoved(tier_, s.key);
}

void BlockPool::EvictLocked(uint32_t id) {
  Slot& s = slots_[id];
  // The caller took it out of the evictor.
  s.evictable = false;
  --inactive_;
  SequenceHash hash = s.key.sequence_hash;
  UnregisterLocked(id);
  s.state = BlockState::kReset;
  s.key = {};
  ++evictions_;
  evictor_->OnEvicted(hash);
}

std::optional<uint32_t> BlockPool::TakeBlockLocked() {
  uint32_t id;
  if (!free_.empty()) {
    id = free_.back();
    free_.pop_back();
  } else if (evictor_->size() > 0) {
    id = evictor_->PopVictim();
    EvictLocked(id);
  } else {
    return std::nullopt;
  }
  Slot& s = slots_[id];
  s.state = BlockState::kReset;
  s.mutable_owned = true;
  ++active_;
  return id;
}

Result<std::vector<MutableBlock>> BlockPool::Allocate(size_t count) {
  std::vector<MutableBlock> out;
  std::lock_guard lock(mu_);
  if (free_.size() + evictor_->size() < count)
    return MakeError(ErrorCode::kResourceExhausted,
                     fmt::format("{} pool: {} blocks requested, {} free and {} evictable of {}", TierName(tier_), count,
                                 free_.size(), evictor_->size(), slots_.size()));
  out.reserve(count);
  auto self = weak_from_this();
  for (size_t i = 0; i < count; ++i) {
    // Evicting a leaf can make its parent evictable: the count never drops below what was checked.
    auto id = TakeBlockLocked();
    Check(id.has_value(), "BlockPool::Allocate: a counted block vanished");
    out.push_back(MutableBlock(self, BlockId(*id), tier_));
  }
  return out;
}

void BlockPool::ReleaseMutable(BlockId bid) noexcept {
  std::lock_guard lock(mu_);
  Slot& s = slots_[bid.value()];
  if (!s.mutable_owned) return;
  s.mutable_owned = false;
  s.state = BlockState::kReset;
  s.tokens.clear();
  --active_;
  free_.push_back(bid.value());
}

Status BlockPool::CompleteBlock(BlockId bid, const BlockKey& key, std::span<const Token> tokens, uint32_t priority) {
  std::lock_guard lock(mu_);
  Slot& s = slots_[bid.value()];
  if (!s.mutable_owned) return MakeError(ErrorCode::kFailedPrecondition, "Complete: block is not owned by this handle");
  s.key = key;
  s.priority = priority;
  s.tokens.assign(tokens.begin(), tokens.end());
  s.state = BlockState::kComplete;
  return {};
}

Status BlockPool::MarkPartialBlock(BlockId bid) {
  std::lock_guard lock(mu_);
  Slot& s = slots_[bid.value()];
  if (!s.mutable_owned) return MakeError(ErrorCode::kFailedPrecondition, "MarkPartial: block is not owned by this handle");
  if (s.state != BlockState::kReset && s.state != BlockState::kPartial)
    return MakeError(ErrorCode::kFailedPrecondition, "MarkPartial: block is already complete");
  s.state = BlockState::kPartial;
  return {};
}

BlockState BlockPool::StateOf(BlockId bid) const {
  std::lock_guard lock(mu_);
  return slots_[bid.value()].state;
}

ImmutableBlock BlockPool::ShareLocked(uint32_t id) {
  Slot& s = slots_[id];
  if (s.refs == 0) AcquireLocked(id);
  else ++s.refs;
  return ImmutableBlock(weak_from_this(), BlockId(id), tier_, s.key, s.priority);
}

Result<ImmutableBlock> BlockPool::Register(MutableBlock&& block) {
  auto pool = block.pool_.lock();
  if (pool.get() != this)
    return MakeError(ErrorCode::kInvalidArgument, "Register: block belongs to another pool or is empty");
  uint32_t id = block.id_.value();
  std::lock_guard lock(mu_);
  Slot& s = slots_[id];
  if (s.state != BlockState::kComplete)
    return MakeError(ErrorCode::kFailedPrecondition, fmt::format("Register: block {} is not complete", id));
  auto existing = by_hash_.find(s.key.sequence_hash);
  if (existing != by_hash_.end()) {
    Slot& e = slots_[existing->second];
    if (e.key != s.key) {
      return MakeError(ErrorCode::kFailedPrecondition,
                       fmt::format("Register: sequence hash {} already held with different content (collision)",
                                   s.key.sequence_hash.value()));
    }
    // The existing block wins; the given one goes back to Reset.
    uint32_t eid = existing->second;
    evictor_->OnHit(eid, e.key.sequence_hash);
    ImmutableBlock handle = ShareLocked(eid);
    s.state = BlockState::kReset;
    s.tokens.clear();
    s.mutable_owned = false;
    --active_;
    free_.push_back(id);
    block.pool_.reset();
    return handle;
  }
  s.mutable_owned = false;
  std::vector<Token> tokens = std::move(s.tokens);
  s.tokens = {};
  RegisterLocked(id, tokens);
  // The mutable handle's count in active_ becomes the immutable reference's.
  s.refs = 1;
  block.pool_.reset();
  return ImmutableBlock(weak_from_this(), BlockId(id), tier_, s.key, s.priority);
}

StoreRunResult BlockPool::StoreRun(std::span<const BlockKey> keys, uint32_t priority,
                                   std::span<const std::span<const Token>> tokens,
                                   std::span<const BlockInputs> inputs) {
  StoreRunResult out{BlockRun(weak_from_this(), tier_), {}};
  out.run.ids_.reserve(keys.size());
  out.fresh.reserve(keys.size());
  std::lock_guard lock(mu_);
  for (size_t i = 0; i < keys.size(); ++i) {
    const BlockKey& key = keys[i];
    auto existing = by_hash_.find(key.sequence_hash);
    if (existing != by_hash_.end()) {
      if (slots_[existing->second].key != key) break;  // a collision: not ours to store
      evictor_->OnHit(existing->second, key.sequence_hash);
      AcquireLocked(existing->second);
      out.run.ids_.push_back(existing->second);
      out.fresh.push_back(0);
      continue;
    }
    auto id = TakeBlockLocked();
    if (!id) break;
    Slot& s = slots_[*id];
    s.mutable_owned = false;
    s.key = key;
    s.priority = priority;
    s.refs = 1;  // active_ was counted by TakeBlockLocked
    RegisterLocked(*id, tokens.empty() ? std::span<const Token>() : tokens[i],
                   i < inputs.size() && !inputs[i].empty() ? &inputs[i] : nullptr);
    out.run.ids_.push_back(*id);
    out.fresh.push_back(1);
  }
  return out;
}

size_t BlockPool::Restore(std::span<const std::pair<BlockId, BlockKey>> blocks) {
  std::lock_guard lock(mu_);
  std::vector<uint8_t> taken(slots_.size(), 0);
  size_t restored = 0;
  for (const auto& [bid, key] : blocks) {
    const uint32_t id = bid.value();
    if (id >= slots_.size() || taken[id]) continue;
    Slot& s = slots_[id];
    if (s.state != BlockState::kReset || s.mutable_owned || s.refs > 0 || by_hash_.count(key.sequence_hash)) continue;
    taken[id] = 1;
    s.key = key;
    s.priority = 0;
    s.last_use = ++tick_;
    RegisterLocked(id, {});
    ++inactive_;
    ++restored;
  }
  if (restored == 0) return 0;
  std::erase_if(free_, [&](uint32_t id) { return taken[id] != 0; });
  // Evictable only once every restored child is counted, so that leaf-first holds from the start.
  for (const auto& [bid, key] : blocks)
    if (bid.value() < slots_.size() && taken[bid.value()]) MaybeEvictableLocked(bid.value());
  return restored;
}

void BlockPool::AddRef(BlockId bid) {
  std::lock_guard lock(mu_);
  Check(slots_[bid.value()].refs > 0, "AddRef on an unreferenced block");
  ++slots_[bid.value()].refs;
}

void BlockPool::ReleaseRef(BlockId bid) noexcept {
  std::lock_guard lock(mu_);
  ReleaseLocked(bid.value());
}

void BlockPool::ReleaseRun(std::span<const uint32_t> ids) noexcept {
  std::lock_guard lock(mu_);
  // Last first: under a recency order the leaf then counts as older than its parent.
  for (size_t i = ids.size(); i-- > 0;) ReleaseLocked(ids[i]);
}

namespace {
// True when a block held under `held` is the block `key` names, continuing `expected_parent`.
bool SameBlock(const BlockKey& held, const BlockKey& key, std::optional<SequenceHash> expected_parent) {
  return held.sequence_hash == key.sequence_hash && held.block_hash == key.block_hash &&
         held.parent == key.parent && key.parent == expected_parent;
}
}  // namespace

std::optional<uint32_t> BlockPool::FindNextLocked(uint32_t prev, const BlockKey& key) const {
  const uint32_t hint = slots_[prev].child_hint;
  const SequenceHash parent = slots_[prev].key.sequence_hash;
  if (hint != kNoSlot && slots_[hint].state == BlockState::kRegistered && SameBlock(slots_[hint].key, key, parent))
    return hint;
  return FindLocked(key, parent);
}

std::optional<uint32_t> BlockPool::FindLocked(const BlockKey& key, std::optional<SequenceHash> expected_parent) const {
  auto it = by_hash_.find(key.sequence_hash);
  if (it == by_hash_.end() || !SameBlock(slots_[it->second].key, key, expected_parent)) return std::nullopt;
  return it->second;
}

BlockRun BlockPool::MatchPrefix(std::span<const BlockKey> keys) {
  BlockRun out(weak_from_this(), tier_);
  out.ids_.reserve(keys.size());
  std::lock_guard lock(mu_);
  for (const BlockKey& key : keys) {
    auto id = out.ids_.empty() ? FindLocked(key, key.parent) : FindNextLocked(out.ids_.back(), key);
    if (!id) break;
    evictor_->OnHit(*id, key.sequence_hash);
    AcquireLocked(*id);
    out.ids_.push_back(*id);
  }
  return out;
}

size_t BlockPool::CountPrefix(std::span<const BlockKey> keys) const {
  std::lock_guard lock(mu_);
  size_t n = 0;
  uint32_t prev = kNoSlot;
  for (const BlockKey& key : keys) {
    auto id = n == 0 ? FindLocked(key, key.parent) : FindNextLocked(prev, key);
    if (!id) break;
    prev = *id;
    ++n;
  }
  return n;
}

bool BlockPool::Contains(const BlockKey& key) const {
  std::lock_guard lock(mu_);
  return FindLocked(key, key.parent).has_value();
}

void BlockPool::MarkCopiedBelow(const BlockKey& key) {
  std::lock_guard lock(mu_);
  if (auto id = FindLocked(key, key.parent)) evictor_->OnCopiedBelow(*id);
}

bool BlockPool::Invalidate(const BlockKey& key) {
  std::lock_guard lock(mu_);
  auto id = FindLocked(key, key.parent);
  if (!id) return false;
  Slot& s = slots_[*id];
  if (s.refs == 0) {
    UnevictableLocked(*id);
    --inactive_;
    UnregisterLocked(*id);
    s.state = BlockState::kReset;
    s.key = {};
    free_.push_back(*id);
    return true;
  }
  // Referenced: unregister now; the last release frees the slot since it is no longer Registered.
  UnregisterLocked(*id);
  s.state = BlockState::kComplete;
  return true;
}

void BlockPool::Touch(std::span<const SequenceHash> hashes) {
  std::lock_guard lock(mu_);
  for (SequenceHash h : hashes) {
    auto it = by_hash_.find(h);
    if (it == by_hash_.end()) continue;
    Slot& s = slots_[it->second];
    if (s.refs > 0) continue;
    s.last_use = ++tick_;
    if (s.evictable) {
      UnevictableLocked(it->second);
      MaybeEvictableLocked(it->second);
    }
  }
}

Status BlockPool::Reset() {
  std::lock_guard lock(mu_);
  if (active_ != 0)
    return MakeError(ErrorCode::kFailedPrecondition,
                     fmt::format("{} pool reset: {} blocks are still held", TierName(tier_), active_));
  for (uint32_t id = 0; id < slots_.size(); ++id) {
    Slot& s = slots_[id];
    if (s.state != BlockState::kRegistered) continue;
    UnevictableLocked(id);
    --inactive_;
    UnregisterLocked(id);
    s.state = BlockState::kReset;
    s.key = {};
    free_.push_back(id);
  }
  return {};
}

BlockPoolStats BlockPool::stats() const {
  std::lock_guard lock(mu_);
  return {slots_.size(), free_.size(), inactive_, evictor_->size(), active_, by_hash_.size(), evictions_};
}

uint32_t BlockPool::ChildCount(SequenceHash hash) const {
  std::lock_guard lock(mu_);
  auto it = children_.find(hash);
  return it == children_.end() ? 0 : it->second;
}

std::vector<std::pair<BlockId, BlockKey>> BlockPool::RegisteredBlocks() const {
  std::lock_guard lock(mu_);
  std::vector<std::pair<BlockId, BlockKey>> out;
  for (const auto& [hash, id] : by_hash_) out.emplace_back(BlockId(id), slots_[id].key);
  return out;
}

std::vector<SequenceHash> BlockPool::EvictionOrder() const {
  std::lock_guard lock(mu_);
  std::vector<SequenceHash> out;
  for (uint32_t id : evictor_->Order()) out.push_back(slots_[id].key.sequence_hash);
  return out;
}

}  // namespace kvbm
