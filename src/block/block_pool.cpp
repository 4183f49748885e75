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

void BlockRegistry::OnStored(TierId tier, const BlockKey& key, std::span<const Token> tokens) {
  std::lock_guard lock(mu_);
  uint32_t& mask = presence_[key.sequence_hash];
  bool first = mask == 0;
  mask |= 1u << static_cast<unsigned>(tier);
  if (first && !sinks_.empty()) {
    KvEvent e{KvEvent::Kind::kStored, tier, key, std::vector<Token>(tokens.begin(), tokens.end()), next_event_id_++};
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
// BlockPool

std::shared_ptr<BlockPool> BlockPool::Create(TierId tier, uint64_t num_blocks, EvictionPolicy policy,
                                             std::shared_ptr<BlockRegistry> registry) {
  if (num_blocks == 0 || num_blocks > (uint64_t{1} << 31))
    throw ConfigError(fmt::format("{} block pool: num_blocks {} must be in [1, 2^31]", TierName(tier), num_blocks));
  return std::shared_ptr<BlockPool>(new BlockPool(tier, num_blocks, policy, std::move(registry)));
}

BlockPool::BlockPool(TierId tier, uint64_t num_blocks, EvictionPolicy policy, std::shared_ptr<BlockRegistry> registry)
    : tier_(tier), policy_(policy), registry_(std::move(registry)), slots_(num_blocks) {
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

BlockPool::EvictKey BlockPool::KeyForLocked(uint32_t id) const {
  const Slot& s = slots_[id];
  uint32_t not_leaf = policy_ == EvictionPolicy::kLeafFirst && ChildCountLocked(s.key.sequence_hash) > 0 ? 1 : 0;
  return {s.priority, not_leaf, tick_, id};
}

uint32_t BlockPool::ChildCountLocked(SequenceHash hash) const {
  auto it = children_.find(hash);
  return it == children_.end() ? 0 : it->second;
}

void BlockPool::InsertInactiveLocked(uint32_t id) {
  Slot& s = slots_[id];
  ++tick_;
  s.inactive_key = KeyForLocked(id);
  s.inactive = true;
  inactive_.insert(s.inactive_key);
}

void BlockPool::RekeyParentLocked(SequenceHash parent) {
  if (policy_ != EvictionPolicy::kLeafFirst) return;
  auto it = by_hash_.find(parent);
  if (it == by_hash_.end()) return;
  Slot& p = slots_[it->second];
  if (!p.inactive) return;
  uint32_t not_leaf = ChildCountLocked(parent) > 0 ? 1 : 0;
  if (not_leaf == p.inactive_key.not_leaf) return;
  inactive_.erase(p.inactive_key);
  p.inactive_key.not_leaf = not_leaf;  // keeps its recency
  inactive_.insert(p.inactive_key);
}

void BlockPool::EvictLocked(uint32_t id) {
  Slot& s = slots_[id];
  inactive_.erase(s.inactive_key);
  s.inactive = false;
  by_hash_.erase(s.key.sequence_hash);
  if (s.key.parent) {
    auto it = children_.find(*s.key.parent);
    if (it != children_.end() && --it->second == 0) children_.erase(it);
    RekeyParentLocked(*s.key.parent);
  }
  if (registry_) registry_->OnRemoved(tier_, s.key);
  s.state = BlockState::kReset;
  s.key = {};
  ++evictions_;
}

Result<std::vector<MutableBlock>> BlockPool::Allocate(size_t count) {
  std::vector<MutableBlock> out;
  {
    std::lock_guard lock(mu_);
    if (free_.size() + inactive_.size() < count)
      return MakeError(ErrorCode::kResourceExhausted,
                       fmt::format("{} pool: {} blocks requested, {} free and {} evictable of {}", TierName(tier_),
                                   count, free_.size(), inactive_.size(), slots_.size()));
    out.reserve(count);
    auto self = weak_from_this();
    for (size_t i = 0; i < count; ++i) {
      uint32_t id;
      if (!free_.empty()) {
        id = free_.back();
        free_.pop_back();
      } else {
        id = inactive_.begin()->id;
        EvictLocked(id);
      }
      Slot& s = slots_[id];
      s.state = BlockState::kReset;
      s.mutable_owned = true;
      ++active_;
      out.push_back(MutableBlock(self, BlockId(id), tier_));
    }
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

void BlockPool::AcquireLocked(uint32_t id) {
  Slot& s = slots_[id];
  if (s.refs++ > 0) return;
  // First reference: leave the inactive set and pin the parent.
  if (s.inactive) {
    inactive_.erase(s.inactive_key);
    s.inactive = false;
  }
  ++active_;
  if (s.key.parent) {
    auto it = by_hash_.find(*s.key.parent);
    if (it != by_hash_.end()) {
      s.parent_ref = it->second;
      AcquireLocked(it->second);  // depth 1: the parent is already referenced or becomes so here
    }
  }
}

Result<ImmutableBlock> BlockPool::Register(MutableBlock&& block) {
  auto pool = block.pool_.lock();
  if (pool.get() != this)
    return MakeError(ErrorCode::kInvalidArgument, "Register: block belongs to another pool or is empty");
  uint32_t id = block.id_.value();
  std::lock_guard lock(mu_);
  Slot& s = slots_[id];
  if (s.state != BlockState::kComplete)
    return MakeError(ErrorCode::kFailedPrecondition,
                     fmt::format("Register: block {} is not complete", id));
  auto existing = by_hash_.find(s.key.sequence_hash);
  if (existing != by_hash_.end()) {
    Slot& e = slots_[existing->second];
    if (e.key != s.key) {
      return MakeError(ErrorCode::kFailedPrecondition,
                       fmt::format("Register: sequence hash {} already held with different content (collision)",
                                   s.key.sequence_hash.value()));
    }
    // The existing block wins; the given one is returned to Reset by its handle.
    AcquireLocked(existing->second);
    ImmutableBlock handle(weak_from_this(), BlockId(existing->second), tier_, e.key, e.priority);
    s.state = BlockState::kReset;
    s.tokens.clear();
    s.mutable_owned = false;
    --active_;
    free_.push_back(id);
    block.pool_.reset();
    return handle;
  }
  s.mutable_owned = false;
  s.state = BlockState::kRegistered;
  by_hash_.emplace(s.key.sequence_hash, id);
  if (s.key.parent) {
    ++children_[*s.key.parent];
    RekeyParentLocked(*s.key.parent);
  }
  if (registry_) registry_->OnStored(tier_, s.key, s.tokens);
  s.tokens.clear();
  s.tokens.shrink_to_fit();
  // The mutable handle's count of active_ becomes the immutable reference's.
  --active_;
  AcquireLocked(id);
  block.pool_.reset();
  return ImmutableBlock(weak_from_this(), BlockId(id), tier_, s.key, s.priority);
}

void BlockPool::AddRef(BlockId bid) {
  std::lock_guard lock(mu_);
  Check(slots_[bid.value()].refs > 0, "AddRef on an unreferenced block");
  ++slots_[bid.value()].refs;
}

void BlockPool::ReleaseRef(BlockId bid) noexcept {
  std::lock_guard lock(mu_);
  uint32_t id = bid.value();
  // Iterative so that a long chain returning at once does not recurse.
  while (true) {
    Slot& s = slots_[id];
    if (s.refs == 0) return;
    if (--s.refs > 0) return;
    --active_;
    std::optional<uint32_t> parent = s.parent_ref;
    s.parent_ref.reset();
    if (s.state == BlockState::kRegistered) {
      InsertInactiveLocked(id);
    } else {
      s.state = BlockState::kReset;
      free_.push_back(id);
    }
    if (!parent) return;
    id = *parent;
  }
}

std::optional<uint32_t> BlockPool::FindLocked(const BlockKey& key, std::optional<SequenceHash> expected_parent) const {
  auto it = by_hash_.find(key.sequence_hash);
  if (it == by_hash_.end()) return std::nullopt;
  const Slot& s = slots_[it->second];
  if (s.key.block_hash != key.block_hash || s.key.parent != key.parent) return std::nullopt;
  if (key.parent != expected_parent) return std::nullopt;
  return it->second;
}

std::vector<ImmutableBlock> BlockPool::MatchPrefix(std::span<const BlockKey> keys) {
  std::vector<ImmutableBlock> out;
  std::lock_guard lock(mu_);
  out.reserve(keys.size());
  auto self = weak_from_this();
  std::optional<SequenceHash> parent;
  for (const BlockKey& key : keys) {
    // The first key may have any parent (a match that continues after another tier's run);
    // after it the chain must be unbroken.
    auto id = FindLocked(key, out.empty() ? key.parent : parent);
    if (!id) break;
    AcquireLocked(*id);
    const Slot& s = slots_[*id];
    out.push_back(ImmutableBlock(self, BlockId(*id), tier_, s.key, s.priority));
    parent = key.sequence_hash;
  }
  return out;
}

size_t BlockPool::CountPrefix(std::span<const BlockKey> keys) const {
  std::lock_guard lock(mu_);
  size_t n = 0;
  std::optional<SequenceHash> parent;
  for (const BlockKey& key : keys) {
    if (n > 0 && key.parent != parent) break;
    if (!FindLocked(key, n == 0 ? key.parent : parent)) break;
    parent = key.sequence_hash;
    ++n;
  }
  return n;
}

bool BlockPool::Contains(const BlockKey& key) const {
  std::lock_guard lock(mu_);
  return FindLocked(key, key.parent).has_value();
}

bool BlockPool::Invalidate(const BlockKey& key) {
  std::lock_guard lock(mu_);
  auto id = FindLocked(key, key.parent);
  if (!id) return false;
  Slot& s = slots_[*id];
  if (s.inactive) {
    EvictLocked(*id);
    free_.push_back(*id);
    return true;
  }
  // Referenced: unregister now; ReleaseRef returns it to Reset since it is no longer Registered.
  by_hash_.erase(s.key.sequence_hash);
  if (s.key.parent) {
    auto it = children_.find(*s.key.parent);
    if (it != children_.end() && --it->second == 0) children_.erase(it);
    RekeyParentLocked(*s.key.parent);
  }
  if (registry_) registry_->OnRemoved(tier_, s.key);
  s.state = BlockState::kComplete;
  return true;
}

void BlockPool::Touch(std::span<const SequenceHash> hashes) {
  std::lock_guard lock(mu_);
  for (SequenceHash h : hashes) {
    auto it = by_hash_.find(h);
    if (it == by_hash_.end()) continue;
    Slot& s = slots_[it->second];
    if (!s.inactive) continue;
    inactive_.erase(s.inactive_key);
    s.inactive = false;
    InsertInactiveLocked(it->second);
  }
}

Status BlockPool::Reset() {
  std::lock_guard lock(mu_);
  if (active_ != 0)
    return MakeError(ErrorCode::kFailedPrecondition,
                     fmt::format("{} pool reset: {} blocks are still held", TierName(tier_), active_));
  while (!inactive_.empty()) {
    uint32_t id = inactive_.begin()->id;
    EvictLocked(id);
    free_.push_back(id);
  }
  return {};
}

BlockPoolStats BlockPool::stats() const {
  std::lock_guard lock(mu_);
  return {slots_.size(), free_.size(), inactive_.size(), active_, by_hash_.size(), evictions_};
}

uint32_t BlockPool::ChildCount(SequenceHash hash) const {
  std::lock_guard lock(mu_);
  return ChildCountLocked(hash);
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
  for (const EvictKey& k : inactive_) out.push_back(slots_[k.id].key.sequence_hash);
  return out;
}

}  // namespace kvbm
