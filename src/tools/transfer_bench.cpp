#include "kvbm/transfer_bench.h"

#include <chrono>
#include <cstring>
#include <random>

#include <fmt/format.h>

#include "kvbm/storage.h"
#include "kvbm/transfer.h"

namespace kvbm {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

}  // namespace

Result<TransferBenchResult> RunTransferBench(const TransferBenchOptions& o) {
  // A vLLM-like G1: one tensor per layer, [block][K/V][page*inner], chunks of 16 or 32 KiB.
  const uint64_t outer = 2, page = 32, dtype = 2;
  uint64_t inner = o.block_bytes >= (1u << 20) ? 512 : 256;
  uint64_t chunk = page * inner * dtype;
  if (o.block_bytes % (outer * chunk) != 0)
    return MakeError(ErrorCode::kInvalidArgument, fmt::format("block_bytes {} is not a multiple of {}", o.block_bytes, outer * chunk));
  LayoutDims dims{o.num_blocks, o.block_bytes / (outer * chunk), outer, page, inner, dtype};
  LayerSeparateLayout g1_layout(dims, /*outer_first=*/false);
  FullyContiguousLayout g2_layout(dims, kDiskAlignment), g3_layout(dims, kDiskAlignment);

  std::vector<AlignedBuffer> g1_tensors;
  TierMemory g1{TierId::kDevice, MemoryKind::kHost, &g1_layout, {}};
  for (uint64_t l = 0; l < dims.num_layers; ++l) {
    g1_tensors.emplace_back(g1_layout.allocation_bytes(static_cast<uint32_t>(l)));
    g1.bases.push_back(g1_tensors.back().data());
  }
  auto host = HostStorage::Allocate(g2_layout.allocation_bytes(0), /*try_pin=*/false);
  if (!host) return std::unexpected(host.error());
  TierMemory g2{TierId::kHost, MemoryKind::kHost, &g2_layout, {(*host)->data()}};
  DiskStorageOptions disk_options;
  disk_options.directory = o.disk_dir;
  auto disk = DiskStorage::Create(disk_options, g3_layout.allocation_bytes(0));
  if (!disk) return std::unexpected(disk.error());
  DiskSideData side(o.num_blocks);
  TierMemory g3{TierId::kDisk, MemoryKind::kDisk, &g3_layout, {}, (*disk)->fd(), &side};

  // Fill G1 with random bytes.
  std::mt19937_64 rng(42);
  for (auto& t : g1_tensors)
    for (uint64_t i = 0; i + 8 <= t.size(); i += 8) {
      uint64_t v = rng();
      std::memcpy(t.data() + i, &v, 8);
    }

  TransferEngineOptions eo;
  eo.max_concurrent_transfers = o.max_concurrent_transfers;
  eo.max_batch_size = o.max_batch_size;
  TransferEngine engine(eo, nullptr);
  std::vector<BlockCopy> copies;
  for (uint32_t b = 0; b < o.num_blocks; ++b) copies.push_back({b, b, SequenceHash(0x1000 + b)});

  TransferBenchResult r;
  r.bytes = o.num_blocks * o.block_bytes;
  r.io_queue = engine.io_queue().name();
  auto best = [&](auto fn) {
    double best_s = 1e100;
    for (uint32_t p = 0; p < std::max(1u, o.passes); ++p) {
      auto t0 = Clock::now();
      fn();
      best_s = std::min(best_s, Seconds(t0, Clock::now()));
    }
    return static_cast<double>(r.bytes) / best_s / 1e9;
  };
  // Anchor: one memcpy of the same bytes between two contiguous buffers (both already touched).
  AlignedBuffer a(r.bytes), b(r.bytes);
  std::memset(a.data(), 1, r.bytes);
  std::memset(b.data(), 2, r.bytes);
  r.memcpy_gbps = best([&] { std::memcpy(b.data(), a.data(), r.bytes); });

  Status failed;
  auto run = [&](TransferPath path, const TierMemory& s, const TierMemory& d) {
    const TransferResult& res = engine.Submit(path, s, d, copies)->Wait();
    if (!res.ok() && failed) failed = std::unexpected(*res.first_error);
  };
  r.g1_to_g2_gbps = best([&] { run(TransferPath::kD2H, g1, g2); });
  r.g2_to_g3_gbps = best([&] { run(TransferPath::kH2D_Disk, g2, g3); });
  // Clear G2 so the read back is checked, not left over.
  std::memset((*host)->data(), 0, g2_layout.allocation_bytes(0));
  r.g3_to_g2_gbps = best([&] { run(TransferPath::kDisk2H, g3, g2); });
  // Scribble on G1, bring it back from G2, compare with what G3 returned through G2 (the
  // original bytes, written G1 -> G2 -> G3 -> G2).
  std::vector<std::vector<uint8_t>> original;
  for (auto& t : g1_tensors) original.emplace_back(t.data(), t.data() + t.size());
  for (auto& t : g1_tensors) std::memset(t.data(), 0xEE, t.size());
  r.g2_to_g1_gbps = best([&] { run(TransferPath::kH2Dev, g2, g1); });
  if (!failed) return std::unexpected(failed.error());
  for (uint64_t blk = 0; blk < o.num_blocks; ++blk)
    for (uint64_t l = 0; l < dims.num_layers; ++l) {
      MemoryRange rg = g1_layout.Chunk(blk, l, 0);
      if (std::memcmp(g1_tensors[l].data() + rg.offset, original[l].data() + rg.offset, outer * chunk) != 0) {
        ++r.mismatched_blocks;
        break;
      }
    }
  return r;
}

}  // namespace kvbm
