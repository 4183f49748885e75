#include "kvbm/eviction.h"

#include <set>

#include "kvbm/error.h"

namespace kvbm {

std::string_view EvictionPolicyName(EvictionPolicy policy) {
  switch (policy) {
    case EvictionPolicy::kLeafFirst: return "leaf-first";
    case EvictionPolicy::kLru: return "lru";
  }
  return "unknown";
}

std::optional<EvictionPolicy> ParseEvictionPolicy(std::string_view name) {
  if (name == "leaf-first" || name == "leaf_first") return EvictionPolicy::kLeafFirst;
  if (name == "lru") return EvictionPolicy::kLru;
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

}  // namespace

std::unique_ptr<Evictor> MakeEvictor(EvictionPolicy policy, uint32_t num_slots) {
  Check(num_slots > 0, "MakeEvictor: num_slots must be > 0");
  switch (policy) {
    case EvictionPolicy::kLeafFirst: return std::make_unique<RecencyEvictor>(true, num_slots);
    case EvictionPolicy::kLru: return std::make_unique<RecencyEvictor>(false, num_slots);
  }
  return nullptr;
}

}  // namespace kvbm
