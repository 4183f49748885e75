#include <gtest/gtest.h>

#include <map>

#include "kvbm/layout.h"

namespace kvbm {
namespace {

// Every byte of every block maps to exactly one place: full coverage of the chunks, no
// overlap, inside the allocation, alignment kept.
void ExpectExactCover(const Layout& layout) {
  const auto& d = layout.dims();
  std::map<uint32_t, std::map<uint64_t, uint64_t>> ranges;  // allocation -> offset -> end
  uint64_t covered = 0;
  for (uint64_t b = 0; b < d.num_blocks; ++b)
    for (uint64_t l = 0; l < d.num_layers; ++l)
      for (uint64_t o = 0; o < d.outer_dim; ++o) {
        MemoryRange r = layout.Chunk(b, l, o);
        ASSERT_EQ(r.length, d.chunk_bytes());
        ASSERT_LT(r.allocation, layout.num_allocations());
        ASSERT_LE(r.offset + r.length, layout.allocation_bytes(r.allocation));
        auto [it, inserted] = ranges[r.allocation].emplace(r.offset, r.offset + r.length);
        ASSERT_TRUE(inserted) << "two chunks start at the same offset";
        covered += r.length;
      }
  for (auto& [alloc, m] : ranges) {
    uint64_t prev_end = 0;
    for (auto& [start, end] : m) {
      ASSERT_GE(start, prev_end) << "overlap in allocation " << alloc;
      prev_end = end;
    }
  }
  EXPECT_EQ(covered, d.num_blocks * d.block_bytes());
}

TEST(Layout, FullyContiguousCoversExactlyAndAligns) {
  LayoutDims d{7, 3, 2, 4, 24, 2};
  FullyContiguousLayout plain(d);
  ExpectExactCover(plain);
  EXPECT_EQ(plain.allocation_bytes(0), 7 * d.block_bytes());
  FullyContiguousLayout aligned(d, 4096);
  ExpectExactCover(aligned);
  EXPECT_EQ(aligned.block_stride() % 4096, 0u);
  for (uint64_t b = 0; b < d.num_blocks; ++b) EXPECT_EQ(aligned.Chunk(b, 0, 0).offset % 4096, 0u);
}

TEST(Layout, LayerSeparateBothOrders) {
  LayoutDims d{5, 4, 2, 16, 64, 2};
  for (bool outer_first : {true, false}) {
    LayerSeparateLayout layout(d, outer_first);
    ExpectExactCover(layout);
    EXPECT_EQ(layout.num_allocations(), 4u);
  }
  LayerSeparateLayout of(d, true);
  EXPECT_EQ(of.Chunk(1, 2, 1).offset, (1 * 5 + 1) * d.chunk_bytes());
  LayerSeparateLayout bf(d, false);
  EXPECT_EQ(bf.Chunk(1, 2, 1).offset, (1 * 2 + 1) * d.chunk_bytes());
}

TEST(Layout, BadDimensionsAreClearErrors) {
  EXPECT_THROW(FullyContiguousLayout(LayoutDims{0, 1, 2, 16, 64, 2}), ConfigError);
  EXPECT_THROW(FullyContiguousLayout(LayoutDims{1, 1, 2, 16, 64, 0}), ConfigError);
  EXPECT_THROW(FullyContiguousLayout(LayoutDims{1ull << 40, 1ull << 20, 2, 16, 64, 2}), ConfigError);
  EXPECT_THROW(FullyContiguousLayout(LayoutDims{1, 1, 2, 16, 64, 2}, 3000), ConfigError);
  FullyContiguousLayout ok(LayoutDims{2, 1, 1, 1, 1, 1});
  EXPECT_THROW(ok.Chunk(2, 0, 0), InvariantError);
  try {
    FullyContiguousLayout(LayoutDims{1, 1, 2, 0, 64, 2});
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("page_size"), std::string::npos);
  }
}

TensorShape Dense(std::vector<int64_t> shape, uint64_t dtype_bytes = 2) {
  TensorShape t{shape, std::vector<int64_t>(shape.size()), dtype_bytes};
  int64_t s = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    t.strides[i] = s;
    s *= shape[i];
  }
  return t;
}

TEST(Layout, FromTensorShapes) {
  // FlashAttention: (2, num_blocks, block_size, heads, head) -> outer first.
  std::vector<TensorShape> fa(3, Dense({2, 10, 16, 4, 64}));
  auto l = LayoutFromTensorShapes(fa, 10, 16);
  ASSERT_TRUE(l.has_value()) << l.error().ToString();
  EXPECT_TRUE((*l)->outer_first());
  EXPECT_EQ((*l)->dims().outer_dim, 2u);
  EXPECT_EQ((*l)->dims().inner_dim, 256u);
  // FlashInfer: (num_blocks, 2, block_size, heads, head) -> blocks first, outer 2.
  std::vector<TensorShape> fi(2, Dense({10, 2, 16, 4, 64}));
  l = LayoutFromTensorShapes(fi, 10, 16);
  ASSERT_TRUE(l.has_value());
  EXPECT_FALSE((*l)->outer_first());
  EXPECT_EQ((*l)->dims().outer_dim, 2u);
  // vLLM CPU: (num_blocks, heads, block_size, 2*head) -> blocks first, one packed chunk.
  std::vector<TensorShape> cpu(2, Dense({10, 4, 16, 128}));
  l = LayoutFromTensorShapes(cpu, 10, 16);
  ASSERT_TRUE(l.has_value());
  EXPECT_EQ((*l)->dims().outer_dim, 1u);
  EXPECT_EQ((*l)->dims().block_bytes(), 2u * 4 * 16 * 128 * 2);
  // MLA: (num_blocks, block_size, 576).
  std::vector<TensorShape> mla(2, Dense({10, 16, 576}));
  l = LayoutFromTensorShapes(mla, 10, 16);
  ASSERT_TRUE(l.has_value());
  EXPECT_EQ((*l)->dims().inner_dim, 576u);
}

TEST(Layout, FromTensorShapesRejectsMismatches) {
  std::vector<TensorShape> wrong_blocks(1, Dense({11, 16, 64}));
  auto l = LayoutFromTensorShapes(wrong_blocks, 10, 16);
  ASSERT_FALSE(l.has_value());
  EXPECT_NE(l.error().message().find("num_blocks=10"), std::string::npos);
  TensorShape padded = Dense({10, 16, 64});
  padded.strides[0] = 2048;
  std::vector<TensorShape> p(1, padded);
  EXPECT_FALSE(LayoutFromTensorShapes(p, 10, 16).has_value());
  std::vector<TensorShape> mixed = {Dense({10, 16, 64}), Dense({10, 16, 128})};
  l = LayoutFromTensorShapes(mixed, 10, 16);
  ASSERT_FALSE(l.has_value());
  EXPECT_NE(l.error().message().find("layer 1"), std::string::npos);
  std::vector<TensorShape> none;
  EXPECT_FALSE(LayoutFromTensorShapes(none, 10, 16).has_value());
  std::vector<TensorShape> odd(1, Dense({10, 15, 3}));
  EXPECT_FALSE(LayoutFromTensorShapes(odd, 10, 16).has_value());
}

TEST(Layout, FromPoolTensorIsFullyContiguous) {
  // TensorRT-LLM's primary pool: [blocks, layers, kv_factor, heads * tokens * head_dim].
  auto l = LayoutFromPoolTensor(Dense({10, 3, 2, 4 * 16 * 64}), 10, 16);
  ASSERT_TRUE(l.has_value()) << l.error().ToString();
  EXPECT_EQ((*l)->dims().num_layers, 3u);
  EXPECT_EQ((*l)->dims().outer_dim, 2u);
  EXPECT_EQ((*l)->dims().inner_dim, 256u);
  EXPECT_EQ((*l)->block_stride(), 3u * 2 * 16 * 256 * 2);  // no padding: the engine's own stride
  ExpectExactCover(**l);
  // K-only (MLA) pools have kv_factor 1; extra trailing dimensions are part of the chunk.
  l = LayoutFromPoolTensor(Dense({10, 3, 1, 16, 576}), 10, 16);
  ASSERT_TRUE(l.has_value());
  EXPECT_EQ((*l)->dims().inner_dim, 576u);
}

TEST(Layout, FromPoolTensorRejectsOtherShapes) {
  auto bad = [](TensorShape t, const char* want) {
    auto l = LayoutFromPoolTensor(t, 10, 16);
    ASSERT_FALSE(l.has_value());
    EXPECT_NE(l.error().message().find(want), std::string::npos) << l.error().message();
  };
  bad(Dense({10, 3, 2048}), "at least 4");
  bad(Dense({11, 3, 2, 2048}), "num_blocks=10");
  bad(Dense({10, 3, 3, 2048}), "kv_factor");
  TensorShape strided = Dense({10, 3, 2, 2048});
  strided.strides[0] *= 2;  // padded blocks
  bad(strided, "not dense");
  bad(Dense({10, 3, 2, 24}), "multiple of page_size");
}

}  // namespace
}  // namespace kvbm
