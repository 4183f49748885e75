#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "kvbm/storage.h"
#include "kvbm/transfer.h"

namespace kvbm {
namespace {

struct Memory {
  Memory(std::unique_ptr<Layout> l) : layout(std::move(l)) {
    for (uint32_t a = 0; a < layout->num_allocations(); ++a) buffers.emplace_back(layout->allocation_bytes(a));
    mem.layout = layout.get();
    for (auto& b : buffers) mem.bases.push_back(b.data());
  }
  void Randomize(uint32_t seed) {
    std::mt19937 rng(seed);
    for (auto& b : buffers)
      for (uint64_t i = 0; i < b.size(); ++i) b.data()[i] = static_cast<uint8_t>(rng());
  }
  std::unique_ptr<Layout> layout;
  std::vector<AlignedBuffer> buffers;
  TierMemory mem;
};

bool SameBlock(const Memory& a, uint32_t ba, const Memory& b, uint32_t bb) {
  const LayoutDims& d = a.layout->dims();
  for (uint64_t l = 0; l < d.num_layers; ++l)
    for (uint64_t o = 0; o < d.outer_dim; ++o)
      if (std::memcmp(a.mem.ChunkAddress(ba, l, o), b.mem.ChunkAddress(bb, l, o), d.chunk_bytes()) != 0) return false;
  return true;
}

TEST(TransferEngine, GatherScatterEveryLayoutPairByteExact) {
  LayoutDims d{12, 3, 2, 8, 40, 2};
  auto make = [&](int kind) -> std::unique_ptr<Layout> {
    if (kind == 0) return std::make_unique<FullyContiguousLayout>(d, 4096);
    if (kind == 1) return std::make_unique<LayerSeparateLayout>(d, true);
    return std::make_unique<LayerSeparateLayout>(d, false);
  };
  TransferEngineOptions o;
  o.max_batch_size = 5;  // several batches per transfer
  o.max_concurrent_transfers = 2;
  auto metrics = std::make_shared<KvbmMetrics>();
  TransferEngine engine(o, metrics);
  for (int s = 0; s < 3; ++s)
    for (int t = 0; t < 3; ++t) {
      Memory src(make(s)), dst(make(t));
      src.Randomize(s * 3 + t);
      std::vector<BlockCopy> copies;
      for (uint32_t b = 0; b < 12; ++b) copies.push_back({b, 11 - b, SequenceHash(b)});
      const TransferResult& r = engine.Submit(TransferPath::kD2H, src.mem, dst.mem, copies)->Wait();
      ASSERT_TRUE(r.ok());
      for (uint32_t b = 0; b < 12; ++b) EXPECT_TRUE(SameBlock(src, b, dst, 11 - b)) << s << "->" << t << " block " << b;
    }
  EXPECT_EQ(metrics->blocks[static_cast<size_t>(TransferPath::kD2H)].load(), 9u * 12);
  EXPECT_EQ(metrics->bytes[static_cast<size_t>(TransferPath::kD2H)].load(), 9u * 12 * d.block_bytes());
}

TEST(TransferEngine, DiskRoundTripVerifiesAndReportsExactFailures) {
  LayoutDims d{16, 2, 2, 16, 64, 2};
  Memory host(std::make_unique<FullyContiguousLayout>(d, 4096));
  Memory g1(std::make_unique<LayerSeparateLayout>(d, false));
  host.Randomize(1);
  FullyContiguousLayout disk_layout(d, 4096);
  auto disk = DiskStorage::Create(DiskStorageOptions{}, disk_layout.allocation_bytes(0));
  ASSERT_TRUE(disk.has_value()) << disk.error().ToString();
  DiskSideData side(d.num_blocks);
  TierMemory dm{TierId::kDisk, MemoryKind::kDisk, &disk_layout, {}, (*disk)->fd(), &side};
  TransferEngine engine(TransferEngineOptions{}, nullptr);
  std::vector<BlockCopy> out, back;
  for (uint32_t b = 0; b < 16; ++b) {
    out.push_back({b, b, SequenceHash(100 + b)});
    back.push_back({b, b, SequenceHash(100 + b)});
  }
  ASSERT_TRUE(engine.Submit(TransferPath::kH2D_Disk, host.mem, dm, out)->Wait().ok());
  // Disk -> a LayerSeparate G1 (bounce + scatter); ask for block 5 under a wrong hash.
  back[5].hash = SequenceHash(999);
  const TransferResult& r = engine.Submit(TransferPath::kDisk2Dev, dm, g1.mem, back)->Wait();
  ASSERT_EQ(r.failed, std::vector<uint32_t>{5});
  ASSERT_TRUE(r.first_error.has_value());
  EXPECT_EQ(r.first_error->code(), ErrorCode::kCorrupt);
  for (uint32_t b = 0; b < 16; ++b) {
    if (b != 5) {
      EXPECT_TRUE(SameBlock(host, b, g1, b)) << b;
    }
  }
}

TEST(TransferEngine, EmptySubmitCompletesAtOnce) {
  TransferEngine engine(TransferEngineOptions{}, nullptr);
  LayoutDims d{1, 1, 1, 1, 1, 1};
  FullyContiguousLayout l(d);
  TierMemory m{TierId::kHost, MemoryKind::kHost, &l, {nullptr}};
  auto c = engine.Submit(TransferPath::kD2H, m, m, {});
  EXPECT_TRUE(c->done());
  bool called = false;
  c->OnDone([&](const TransferResult& r) { called = r.ok(); });
  EXPECT_TRUE(called);
}

}  // namespace
}  // namespace kvbm
