// Distinct id types. No implicit conversion from or to integers: a BlockId is never a
// SequenceHash by accident.
#pragma once

#include <compare>
#include <cstdint>
#include <functional>
#include <string_view>

namespace kvbm {

template <typename Tag, typename Rep>
class StrongId {
 public:
  using rep = Rep;
  constexpr StrongId() = default;
  constexpr explicit StrongId(Rep value) : value_(value) {}
  constexpr Rep value() const { return value_; }
  constexpr auto operator<=>(const StrongId&) const = default;

 private:
  Rep value_{};
};

struct BlockIdTag {};
struct SequenceHashTag {};
// Index of a block (and of its storage slot) inside one tier's pool.
using BlockId = StrongId<BlockIdTag, uint32_t>;
// The chained hash that names a prefix ending at a block (ARCHITECTURE.md, "Blocks and hashing").
using SequenceHash = StrongId<SequenceHashTag, uint64_t>;

// Tiers, numbered as in the reference (G1..G4).
enum class TierId : uint8_t { kDevice = 1, kHost = 2, kDisk = 3, kRemote = 4 };
inline constexpr int kMaxTiers = 5;

constexpr std::string_view TierName(TierId tier) {
  switch (tier) {
    case TierId::kDevice: return "device";
    case TierId::kHost: return "host";
    case TierId::kDisk: return "disk";
    case TierId::kRemote: return "remote";
  }
  return "unknown";
}

}  // namespace kvbm

template <typename Tag, typename Rep>
struct std::hash<kvbm::StrongId<Tag, Rep>> {
  size_t operator()(const kvbm::StrongId<Tag, Rep>& id) const noexcept {
    // Sequence hashes are already uniformly distributed; block ids are dense.
    return static_cast<size_t>(id.value());
  }
};
