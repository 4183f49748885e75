#include "transfer/cuda/copy_plan.h"

#include <gtest/gtest.h>

#include <cstring>
#include <numeric>
#include <random>

namespace kvbm::cuda {
namespace {

// A tier over plain CPU memory, one buffer per layout allocation.
struct CpuTier {
  CpuTier(std::unique_ptr<Layout> l, MemoryKind kind) : layout(std::move(l)) {
    for (uint32_t a = 0; a < layout->num_allocations(); ++a)
      buffers.emplace_back(layout->allocation_bytes(a), 0);
    tier.kind = kind;
    tier.layout = layout.get();
    for (auto& b : buffers) tier.bases.push_back(b.data());
  }
  std::unique_ptr<Layout> layout;
  std::vector<std::vector<uint8_t>> buffers;
  TierMemory tier;
};

void Execute(const std::vector<CopyDescriptor>& plan) {
  for (const auto& d : plan)
    std::memcpy(reinterpret_cast<void*>(d.dst), reinterpret_cast<const void*>(d.src), d.bytes);
}

const LayoutDims kDims{16, 3, 2, 4, 8, 2};  // 64-byte chunks, 384-byte blocks

TEST(CudaCopyPlan, FullyContiguousBlocksAreWholeRangesAndNeighboursMerge) {
  CpuTier src(std::make_unique<FullyContiguousLayout>(kDims), MemoryKind::kDevice);
  CpuTier dst(std::make_unique<FullyContiguousLayout>(kDims), MemoryKind::kHost);
  std::vector<BlockCopy> copies = {{5, 0, {}}, {6, 1, {}}, {7, 2, {}}, {1, 9, {}}};
  auto plan = BuildCopyPlan(src.tier, dst.tier, copies);
  ASSERT_TRUE(plan.has_value()) << plan.error().ToString();
  ASSERT_EQ(plan->size(), 2u);
  const uint64_t bb = kDims.block_bytes();
  EXPECT_EQ((*plan)[0],
            (CopyDescriptor{reinterpret_cast<uint64_t>(src.buffers[0].data()) + bb,
                            reinterpret_cast<uint64_t>(dst.buffers[0].data()) + 9 * bb, bb}));
  EXPECT_EQ((*plan)[1],
            (CopyDescriptor{reinterpret_cast<uint64_t>(src.buffers[0].data()) + 5 * bb,
                            reinterpret_cast<uint64_t>(dst.buffers[0].data()), 3 * bb}));
}

TEST(CudaCopyPlan, PaddedHostBlocksNeverCopyPaddingAndDoNotMerge) {
  CpuTier src(std::make_unique<FullyContiguousLayout>(kDims), MemoryKind::kDevice);
  CpuTier dst(std::make_unique<FullyContiguousLayout>(kDims, 4096), MemoryKind::kHost);
  std::vector<BlockCopy> copies = {{0, 0, {}}, {1, 1, {}}};
  auto plan = BuildCopyPlan(src.tier, dst.tier, copies);
  ASSERT_TRUE(plan.has_value());
  ASSERT_EQ(plan->size(), 2u);
  EXPECT_EQ(PlanBytes(*plan), 2 * kDims.block_bytes());
}

TEST(CudaCopyPlan, BlockFirstLayerSeparateMergesKAndVOfALayer) {
  CpuTier src(std::make_unique<LayerSeparateLayout>(kDims, /*outer_first=*/false),
              MemoryKind::kDevice);
  CpuTier dst(std::make_unique<FullyContiguousLayout>(kDims), MemoryKind::kHost);
  std::vector<BlockCopy> copies = {{3, 4, {}}};
  auto plan = BuildCopyPlan(src.tier, dst.tier, copies);
  ASSERT_TRUE(plan.has_value());
  // [block][outer] per layer: K and V of one layer are adjacent on both sides.
  ASSERT_EQ(plan->size(), kDims.num_layers);
  for (const auto& d : *plan) EXPECT_EQ(d.bytes, 2 * kDims.chunk_bytes());
}

TEST(CudaCopyPlan, OuterFirstLayerSeparateGivesOneRangePerChunk) {
  CpuTier src(std::make_unique<LayerSeparateLayout>(kDims, /*outer_first=*/true),
              MemoryKind::kDevice);
  CpuTier dst(std::make_unique<FullyContiguousLayout>(kDims), MemoryKind::kHost);
  std::vector<BlockCopy> copies = {{3, 4, {}}, {9, 1, {}}};
  auto plan = BuildCopyPlan(src.tier, dst.tier, copies);
  ASSERT_TRUE(plan.has_value());
  EXPECT_EQ(plan->size(), 2 * kDims.num_layers * kDims.outer_dim);
  EXPECT_EQ(PlanBytes(*plan), 2 * kDims.block_bytes());
  for (size_t i = 1; i < plan->size(); ++i) EXPECT_LT((*plan)[i - 1].src, (*plan)[i].src);
}

// Executing the plan with memcpy must equal a chunk-by-chunk reference copy, both directions
// and for every pair of layouts.
TEST(CudaCopyPlan, ExecutedPlanIsByteExactForEveryLayoutPair) {
  std::mt19937_64 rng(42);
  auto make = [](int kind) -> std::unique_ptr<Layout> {
    if (kind == 0) return std::make_unique<FullyContiguousLayout>(kDims);
    if (kind == 1) return std::make_unique<FullyContiguousLayout>(kDims, 512);
    return std::make_unique<LayerSeparateLayout>(kDims, kind == 2);
  };
  for (int sk = 0; sk < 4; ++sk)
    for (int dk = 0; dk < 4; ++dk) {
      CpuTier src(make(sk), MemoryKind::kDevice);
      CpuTier dst(make(dk), MemoryKind::kHost);
      CpuTier ref(make(dk), MemoryKind::kHost);
      for (auto& b : src.buffers)
        for (auto& x : b) x = static_cast<uint8_t>(rng());
      // Random blocks among 0..13, then neighbours 14 and 15 on both sides (merged ranges).
      std::vector<uint32_t> s(14), t(14);
      std::iota(s.begin(), s.end(), 0u);
      std::iota(t.begin(), t.end(), 0u);
      std::shuffle(s.begin(), s.end(), rng);
      std::shuffle(t.begin(), t.end(), rng);
      std::vector<BlockCopy> copies;
      for (int i = 0; i < 10; ++i) copies.push_back({s[i], t[i], {}});
      copies.push_back({14, 14, {}});
      copies.push_back({15, 15, {}});
      auto plan = BuildCopyPlan(src.tier, dst.tier, copies);
      ASSERT_TRUE(plan.has_value()) << plan.error().ToString();
      EXPECT_LE(plan->size(), copies.size() * kDims.num_layers * kDims.outer_dim);
      Execute(*plan);
      for (const auto& c : copies)
        for (uint64_t l = 0; l < kDims.num_layers; ++l)
          for (uint64_t o = 0; o < kDims.outer_dim; ++o)
            std::memcpy(ref.tier.ChunkAddress(c.dst, l, o), src.tier.ChunkAddress(c.src, l, o),
                        kDims.chunk_bytes());
      EXPECT_EQ(dst.buffers, ref.buffers)
          << src.layout->Describe() << " -> " << dst.layout->Describe();
      // Splitting keeps every byte and bounds piece sizes.
      auto pieces = SplitDescriptors(*plan, 48);
      EXPECT_EQ(PlanBytes(pieces), PlanBytes(*plan));
      for (const auto& p : pieces) EXPECT_LE(p.bytes, 48u);
    }
}

TEST(CudaCopyPlan, RejectsMismatchedLayoutsOutOfRangeAndOverlappingWrites) {
  CpuTier src(std::make_unique<FullyContiguousLayout>(kDims), MemoryKind::kDevice);
  CpuTier dst(std::make_unique<FullyContiguousLayout>(kDims), MemoryKind::kHost);
  LayoutDims other = kDims;
  other.inner_dim = 16;
  CpuTier wrong(std::make_unique<FullyContiguousLayout>(other), MemoryKind::kHost);

  std::vector<BlockCopy> ok = {{0, 0, {}}};
  auto r1 = BuildCopyPlan(src.tier, wrong.tier, ok);
  ASSERT_FALSE(r1.has_value());
  EXPECT_EQ(r1.error().code(), ErrorCode::kInvalidArgument);

  std::vector<BlockCopy> out_of_range = {{0, 16, {}}};
  EXPECT_FALSE(BuildCopyPlan(src.tier, dst.tier, out_of_range).has_value());

  std::vector<BlockCopy> same_dst = {{0, 3, {}}, {1, 3, {}}};
  auto r3 = BuildCopyPlan(src.tier, dst.tier, same_dst);
  ASSERT_FALSE(r3.has_value());
  EXPECT_NE(r3.error().message().find("same destination"), std::string::npos);

  TierMemory no_bases = dst.tier;
  no_bases.bases.clear();
  EXPECT_FALSE(BuildCopyPlan(src.tier, no_bases, ok).has_value());

  std::vector<BlockCopy> none;
  auto empty = BuildCopyPlan(src.tier, dst.tier, none);
  ASSERT_TRUE(empty.has_value());
  EXPECT_TRUE(empty->empty());
}

TEST(CudaCopyPlan, SplitKeepsSixteenByteAlignment) {
  std::vector<CopyDescriptor> plan = {{0x1000, 0x9000, 1000}};
  auto pieces = SplitDescriptors(plan, 100);  // rounded down to 96
  ASSERT_EQ(pieces.size(), 11u);
  for (size_t i = 0; i + 1 < pieces.size(); ++i) {
    EXPECT_EQ(pieces[i].bytes, 96u);
    EXPECT_EQ(pieces[i].src % 16, 0u);
    EXPECT_EQ(pieces[i].dst - pieces[i].src, 0x8000u);
  }
  EXPECT_EQ(pieces.back().bytes, 1000u - 960u);
}

}  // namespace
}  // namespace kvbm::cuda
