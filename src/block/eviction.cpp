#include "kvbm/eviction.h"

#include <algorithm>
#include <deque>
#include <map>
#include <set>

#include "kvbm/error.h"

namespace kvbm {

std::string_view EvictionPolicyName(EvictionPolicy policy) {
  switch (policy) {
    case EvictionPolicy::kLeafFirst: return "leaf-first";
    case EvictionPolicy::kLru: return "lru";
    case EvictionPolicy::kReuse: return "reuse";
    case EvictionPolicy::kAdaptive: return "adaptive";
  }
  return "unknown";
}

std::optional<EvictionPolicy> ParseEvictionPolicy(std::string_view name) {
  if (name == "leaf-first" || name == "leaf_first") return EvictionPolicy::kLeafFirst;
  if (name == "lru") return EvictionPolicy::kLru;
  if (name == "reuse" || name == "reuse-interval" || name == "reuse_interval") return EvictionPolicy::kReuse;
  if (name == "adaptive") return EvictionPolicy::kAdaptive;
  return std::nullopt;
}

namespace {

// Lowest priority first, then oldest last use; O(log n) per operation. Ties (equal ticks cannot
// happen inside one pool) fall back to the slot number so the order is total.
class RecencyEvictor final : public Evictor {
 public:
  RecencyEvictor(bool leaf_only, uint32_t num_slots) : leaf_only_(leaf_only), where_(num_slots) {}

  bool leaf_only() const override { return leaf_only_; }
  std::string_view name() const override {
    return EvictionPolicyName(leaf_only_ ? EvictionPolicy::kLeafFirst : EvictionPolicy::kLru);
  }

  void Insert(const EvictionEntry& e) override {
    Key k{e.priority, e.last_use, e.slot};
    where_[e.slot] = k;
    order_.insert(k);
  }
  void Remove(uint32_t slot) override { order_.erase(where_[slot]); }
  // REQUIRES: size() > 0.
  uint32_t LowestPriority() const { return order_.begin()->priority; }
  uint32_t PopVictim() override {
    auto it = order_.begin();
    uint32_t slot = it->slot;
    order_.erase(it);
    return slot;
  }
  size_t size() const override { return order_.size(); }
  std::vector<uint32_t> Order() const override {
    std::vector<uint32_t> out;
    out.reserve(order_.size());
    for (const Key& k : order_) out.push_back(k.slot);
    return out;
  }

 private:
  struct Key {
    uint32_t priority = 0;
    uint64_t last_use = 0;
    uint32_t slot = 0;
    auto operator<=>(const Key&) const = default;
  };
  const bool leaf_only_;
  std::vector<Key> where_;  // slot -> its key while in order_
  std::set<Key> order_;
};

// Reuse-interval prediction (see eviction.h). Per hash a history {last use, last interval}
// outlives the block by a bounded ghost FIFO (4 per slot), so a block that comes back
// after an eviction keeps its interval. Keys: predicted next use = last + interval, or kFar
// for a block with no interval yet.
class ReuseEvictor final : public Evictor {
 public:
  explicit ReuseEvictor(uint32_t num_slots)
      : where_(num_slots), hit_pending_(num_slots, false), ghost_cap_(GhostCap(num_slots)) {
    history_.reserve(2 * size_t{num_slots});
  }

  std::string_view name() const override { return EvictionPolicyName(EvictionPolicy::kReuse); }
  bool leaf_only() const override { return true; }

  void Insert(const EvictionEntry& e) override {
    now_ = std::max(now_, e.last_use);
    auto [it, fresh] = history_.try_emplace(e.hash);
    History& h = it->second;
    if (fresh) {
      h.last = e.last_use;
    } else if (h.tick != e.last_use) {
      // Returned after a use. A hit already counted this use's interval; anything else (a
      // block stored again after its eviction, a touch) is a use now.
      if (!hit_pending_[e.slot] && e.last_use > h.last) h.interval = e.last_use - h.last;
      h.last = e.last_use;
    }
    hit_pending_[e.slot] = false;
    h.tick = e.last_use;
    h.resident = true;
    Key k{Predict(h), e.last_use, e.position, e.slot};
    where_[e.slot] = {e.priority, k};
    groups_[e.priority].insert(k);
    ++size_;
  }

  void Remove(uint32_t slot) override {
    auto g = groups_.find(where_[slot].priority);
    g->second.erase(where_[slot].key);
    if (g->second.empty()) groups_.erase(g);
    --size_;
  }

  uint32_t PopVictim() override {
    auto g = groups_.begin();
    auto& set = g->second;
    // A block overdue by more than its own interval has stopped being reused: it goes first.
    auto victim = set.begin();
    const Key& low = *victim;
    bool overdue = low.next != kFar && now_ > low.next && now_ - low.next > low.next - low.last;
    if (!overdue) victim = std::prev(set.end());
    uint32_t slot = victim->slot;
    set.erase(victim);
    if (set.empty()) groups_.erase(g);
    --size_;
    return slot;
  }

  void OnHit(uint32_t slot, SequenceHash hash) override {
    if (slot >= hit_pending_.size() || hit_pending_[slot]) return;  // one use per episode
    auto it = history_.find(hash);
    if (it == history_.end()) return;
    History& h = it->second;
    if (now_ > h.last) h.interval = now_ - h.last;
    h.last = now_;
    hit_pending_[slot] = true;
  }

  void OnEvicted(SequenceHash hash) override {
    auto it = history_.find(hash);
    if (it == history_.end()) return;
    it->second.resident = false;
    it->second.ghost_seq = ++ghost_seq_;
    ghosts_.push_back({hash, ghost_seq_});
    while (ghosts_.size() > ghost_cap_) {
      auto [old, seq] = ghosts_.front();
      ghosts_.pop_front();
      auto o = history_.find(old);
      if (o != history_.end() && !o->second.resident && o->second.ghost_seq == seq) history_.erase(o);
    }
  }

  size_t size() const override { return size_; }
  std::vector<uint32_t> Order() const override {
    // Simulates PopVictim on a copy.
    ReuseEvictor copy(*this);
    std::vector<uint32_t> out;
    out.reserve(size_);
    while (copy.size() > 0) out.push_back(copy.PopVictim());
    return out;
  }

 private:
  static constexpr uint64_t kFar = std::numeric_limits<uint64_t>::max();
  struct History {
    uint64_t last = 0;      // time of the latest use
    uint64_t interval = 0;  // between the two latest uses; 0 = used once so far
    uint64_t tick = 0;      // the pool's last_use at the latest Insert
    uint64_t ghost_seq = 0;
    bool resident = false;
  };
  // Ordered so that the farthest prediction, then the oldest, then the deepest, is last.
  struct Key {
    uint64_t next = 0;
    uint64_t last = 0;
    uint32_t position = 0;
    uint32_t slot = 0;
    bool operator<(const Key& o) const {
      if (next != o.next) return next < o.next;
      if (last != o.last) return last > o.last;
      if (position != o.position) return position < o.position;
      return slot < o.slot;
    }
  };
  struct Where {
    uint32_t priority = 0;
    Key key;
  };
  // Ghost histories kept per slot. Measured on the embedded conversation trace at 5,859 blocks
  // (G1 0): 1 per slot 0.164, 4 per slot 0.178, 30 per slot 0.164 token hit rate.
  static constexpr size_t kGhostsPerSlot = 4;
  static size_t GhostCap(uint32_t num_slots) { return size_t{num_slots} * kGhostsPerSlot; }
  static uint64_t Predict(const History& h) {
    if (h.interval == 0 || h.last > kFar - 1 - h.interval) return kFar;
    return h.last + h.interval;
  }

  std::vector<Where> where_;
  std::vector<bool> hit_pending_;  // slot hit since it was last inserted
  std::map<uint32_t, std::set<Key>> groups_;  // priority -> order
  size_t size_ = 0;
  uint64_t now_ = 0;
  std::unordered_map<SequenceHash, History> history_;
  std::deque<std::pair<SequenceHash, uint64_t>> ghosts_;
  size_t ghost_cap_;
  uint64_t ghost_seq_ = 0;
};

// Two candidate orders replayed on a sample of the hash space (eviction.h, kAdaptive). A hash
// is sampled when its mixed value falls below `threshold_`; the sample is simulated in two
// caches of capacity_ = num_slots * rate entries over the pool's uses, one evicting by recency,
// one by the reuse rule (ReuseEvictor's, on the shadow's own clock: one tick per use of any
// hash). Shadows know nothing of prefixes or references: they estimate which order keeps more
// of what comes back, not the pool's exact hits.
class ShadowPair {
 public:
  explicit ShadowPair(uint32_t num_slots) {
    const double rate = std::min(1.0, double(kSampleEntries) / double(num_slots));
    threshold_ = rate >= 1.0 ? std::numeric_limits<uint64_t>::max()
                             : static_cast<uint64_t>(rate * 18446744073709551616.0);
    capacity_ = std::max<size_t>(1, static_cast<size_t>(double(num_slots) * rate + 0.5));
    ghost_cap_ = capacity_ * kGhostsPerEntry;
    decay_ = 1.0 - 1.0 / double(std::max<size_t>(kMinWindow, kWindowPerEntry * capacity_));
    history_.reserve(2 * capacity_);
  }

  // One use of `hash` (a hit or a store in the pool).
  void Use(SequenceHash hash) {
    const uint64_t now = ++clock_;
    if (Mix(hash.value()) >= threshold_ && threshold_ != std::numeric_limits<uint64_t>::max()) return;
    auto [it, fresh] = history_.try_emplace(hash);
    History& h = it->second;
    const bool hit_recency = h.in_recency, hit_reuse = h.in_reuse;
    if (!fresh) h.interval = now - h.last;
    h.last = now;
    // Recency shadow.
    if (hit_recency) recency_.erase({h.recency_key, hash});
    h.recency_key = now;
    recency_.insert({now, hash});
    h.in_recency = true;
    while (recency_.size() > capacity_) {
      auto victim = recency_.begin();
      SequenceHash v = victim->second;
      recency_.erase(victim);
      Leave(v, /*recency=*/true);
    }
    // Reuse shadow.
    if (hit_reuse) reuse_.erase(h.reuse_key);
    h.reuse_key = {Predict(h), now, hash};
    reuse_.insert(h.reuse_key);
    h.in_reuse = true;
    while (reuse_.size() > capacity_) {
      auto victim = reuse_.begin();
      bool overdue = victim->next != kFar && now > victim->next && now - victim->next > victim->next - victim->last;
      if (!overdue) victim = std::prev(reuse_.end());
      SequenceHash v = victim->hash;
      reuse_.erase(victim);
      Leave(v, /*recency=*/false);
    }
    score_ = score_ * decay_ + (double(hit_reuse) - double(hit_recency));
  }

  // > 0: the reuse order has kept more of the sample lately.
  double score() const { return score_; }

 private:
  static constexpr uint64_t kFar = std::numeric_limits<uint64_t>::max();
  // Sampled entries per shadow when the pool is larger (smaller pools are simulated whole).
  static constexpr size_t kSampleEntries = 4096;
  static constexpr size_t kGhostsPerEntry = 4;  // as ReuseEvictor::kGhostsPerSlot
  // The hit difference decays with a time constant of this many sampled uses per entry.
  static constexpr size_t kWindowPerEntry = 2;
  static constexpr size_t kMinWindow = 1024;

  struct ReuseKey {
    uint64_t next = 0;
    uint64_t last = 0;
    SequenceHash hash;
    bool operator<(const ReuseKey& o) const {
      if (next != o.next) return next < o.next;
      if (last != o.last) return last > o.last;
      return hash.value() < o.hash.value();
    }
  };
  struct History {
    uint64_t last = 0;
    uint64_t interval = 0;
    uint64_t recency_key = 0;
    ReuseKey reuse_key;
    uint64_t ghost_seq = 0;
    bool in_recency = false;
    bool in_reuse = false;
  };
  struct RecencyLess {
    bool operator()(const std::pair<uint64_t, SequenceHash>& a, const std::pair<uint64_t, SequenceHash>& b) const {
      return a.first != b.first ? a.first < b.first : a.second.value() < b.second.value();
    }
  };

  static uint64_t Mix(uint64_t x) {  // splitmix64's finaliser: sampled hashes spread evenly
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
  }
  static uint64_t Predict(const History& h) {
    if (h.interval == 0 || h.last > kFar - 1 - h.interval) return kFar;
    return h.last + h.interval;
  }

  // `hash` left one shadow; out of both, its history becomes a bounded ghost.
  void Leave(SequenceHash hash, bool recency) {
    auto it = history_.find(hash);
    History& h = it->second;
    (recency ? h.in_recency : h.in_reuse) = false;
    if (h.in_recency || h.in_reuse) return;
    h.ghost_seq = ++ghost_seq_;
    ghosts_.push_back({hash, ghost_seq_});
    while (ghosts_.size() > ghost_cap_) {
      auto [old, seq] = ghosts_.front();
      ghosts_.pop_front();
      auto o = history_.find(old);
      if (o != history_.end() && !o->second.in_recency && !o->second.in_reuse && o->second.ghost_seq == seq)
        history_.erase(o);
    }
  }

  uint64_t threshold_ = 0;
  size_t capacity_ = 1;
  size_t ghost_cap_ = 4;
  double decay_ = 0;
  double score_ = 0;
  uint64_t clock_ = 0;
  uint64_t ghost_seq_ = 0;
  std::unordered_map<SequenceHash, History> history_;
  std::set<std::pair<uint64_t, SequenceHash>, RecencyLess> recency_;
  std::set<ReuseKey> reuse_;
  std::deque<std::pair<SequenceHash, uint64_t>> ghosts_;
};

// kAdaptive (eviction.h): both orders over the same evictable leaves; the shadows choose.
// Evictable blocks with a copy below are also kept in `copied_` (priority, then recency), which
// goes first.
class AdaptiveEvictor final : public Evictor {
 public:
  explicit AdaptiveEvictor(uint32_t num_slots)
      : recency_(true, num_slots), reuse_(num_slots), shadows_(num_slots), in_(num_slots, false),
        copied_below_(num_slots, false), where_(num_slots) {}

  std::string_view name() const override { return EvictionPolicyName(EvictionPolicy::kAdaptive); }
  bool leaf_only() const override { return true; }

  void Insert(const EvictionEntry& e) override {
    recency_.Insert(e);
    reuse_.Insert(e);
    where_[e.slot] = {e.priority, e.last_use, e.slot};
    in_[e.slot] = true;
    if (copied_below_[e.slot]) copied_.insert(where_[e.slot]);
  }
  void Remove(uint32_t slot) override {
    recency_.Remove(slot);
    reuse_.Remove(slot);
    in_[slot] = false;
    if (copied_below_[slot]) copied_.erase(where_[slot]);
  }
  uint32_t PopVictim() override {
    if (!copied_.empty() && copied_.begin()->priority <= recency_.LowestPriority()) {
      uint32_t slot = copied_.begin()->slot;
      copied_.erase(copied_.begin());
      recency_.Remove(slot);
      reuse_.Remove(slot);
      in_[slot] = false;
      return slot;
    }
    uint32_t slot = PopFromOrder();
    in_[slot] = false;
    if (copied_below_[slot]) copied_.erase(where_[slot]);
    return slot;
  }
  void OnCopiedBelow(uint32_t slot) override {
    if (slot >= copied_below_.size() || copied_below_[slot]) return;
    copied_below_[slot] = true;
    if (in_[slot]) copied_.insert(where_[slot]);
  }
  void OnHit(uint32_t slot, SequenceHash hash) override {
    reuse_.OnHit(slot, hash);
    shadows_.Use(hash);
  }
  void OnEvicted(SequenceHash hash) override { reuse_.OnEvicted(hash); }
  void OnStored(uint32_t slot, SequenceHash hash) override {
    if (slot < copied_below_.size()) copied_below_[slot] = false;  // a new block in the slot
    shadows_.Use(hash);
  }
  size_t size() const override { return recency_.size(); }
  std::vector<uint32_t> Order() const override {
    AdaptiveEvictor copy(*this);
    std::vector<uint32_t> out;
    out.reserve(size());
    while (copy.size() > 0) out.push_back(copy.PopVictim());
    return out;
  }

 private:
  struct Key {
    uint32_t priority = 0;
    uint64_t last_use = 0;
    uint32_t slot = 0;
    auto operator<=>(const Key&) const = default;
  };

  bool UseReuse() const { return shadows_.score() > 0; }
  uint32_t PopFromOrder() {
    if (UseReuse()) {
      uint32_t slot = reuse_.PopVictim();
      recency_.Remove(slot);
      return slot;
    }
    uint32_t slot = recency_.PopVictim();
    reuse_.Remove(slot);
    return slot;
  }

  RecencyEvictor recency_;
  ReuseEvictor reuse_;
  ShadowPair shadows_;
  std::vector<bool> in_;            // slot -> evictable (held here)
  std::vector<bool> copied_below_;  // slot -> the tier below holds a copy
  std::vector<Key> where_;          // slot -> its key while evictable
  std::set<Key> copied_;            // evictable slots with a copy below
};

// Belady's MIN: farthest next use first (never again = kNever, farthest of all); ties deepest
// first. A stored key whose next use is still after now() is exact (no use in between); keys
// at or before now() are refreshed at PopVictim from the low end. Each refresh moves past one
// use of the hash in the trace, so refreshes cost O(uses log n) over a whole replay.
class OptEvictor final : public Evictor {
 public:
  OptEvictor(std::shared_ptr<const NextUseOracle> oracle, uint32_t num_slots)
      : oracle_(std::move(oracle)), where_(num_slots) {}

  std::string_view name() const override { return "opt"; }
  bool leaf_only() const override { return true; }

  void Insert(const EvictionEntry& e) override {
    Key k{oracle_->NextUse(e.hash), e.position, e.slot};
    where_[e.slot] = {k, e.hash};
    order_.insert(k);
  }
  void Remove(uint32_t slot) override { order_.erase(where_[slot].key); }
  uint32_t PopVictim() override {
    const uint64_t now = oracle_->now();
    while (!order_.empty() && order_.begin()->next != NextUseOracle::kNever && order_.begin()->next <= now) {
      Key k = *order_.begin();
      order_.erase(order_.begin());
      k.next = oracle_->NextUse(where_[k.slot].hash);
      where_[k.slot].key = k;
      order_.insert(k);
    }
    auto it = std::prev(order_.end());
    uint32_t slot = it->slot;
    order_.erase(it);
    return slot;
  }
  size_t size() const override { return order_.size(); }
  std::vector<uint32_t> Order() const override {
    std::vector<uint32_t> out;
    out.reserve(order_.size());
    for (auto it = order_.rbegin(); it != order_.rend(); ++it) out.push_back(it->slot);
    return out;
  }

 private:
  struct Key {
    uint64_t next = 0;
    uint32_t position = 0;
    uint32_t slot = 0;
    auto operator<=>(const Key&) const = default;
  };
  struct Where {
    Key key;
    SequenceHash hash;
  };
  std::shared_ptr<const NextUseOracle> oracle_;
  std::vector<Where> where_;
  std::set<Key> order_;
};

}  // namespace

void NextUseOracle::AddUse(SequenceHash hash, uint64_t request) {
  auto& v = uses_[hash];
  if (!v.empty() && v.back() == request) return;
  Check(v.empty() || v.back() < request, "NextUseOracle::AddUse: requests must not decrease");
  v.push_back(request);
}

uint64_t NextUseOracle::NextUse(SequenceHash hash) const {
  auto it = uses_.find(hash);
  if (it == uses_.end()) return kNever;
  auto u = std::upper_bound(it->second.begin(), it->second.end(), now());
  return u == it->second.end() ? kNever : *u;
}

std::unique_ptr<Evictor> MakeOptEvictor(std::shared_ptr<const NextUseOracle> oracle, uint32_t num_slots) {
  Check(oracle != nullptr, "MakeOptEvictor: no oracle");
  Check(num_slots > 0, "MakeOptEvictor: num_slots must be > 0");
  return std::make_unique<OptEvictor>(std::move(oracle), num_slots);
}

std::unique_ptr<Evictor> MakeEvictor(EvictionPolicy policy, uint32_t num_slots) {
  Check(num_slots > 0, "MakeEvictor: num_slots must be > 0");
  switch (policy) {
    case EvictionPolicy::kLeafFirst: return std::make_unique<RecencyEvictor>(true, num_slots);
    case EvictionPolicy::kLru: return std::make_unique<RecencyEvictor>(false, num_slots);
    case EvictionPolicy::kReuse: return std::make_unique<ReuseEvictor>(num_slots);
    case EvictionPolicy::kAdaptive: return std::make_unique<AdaptiveEvictor>(num_slots);
  }
  return nullptr;
}

}  // namespace kvbm
