#include "kvbm/transfer_bench.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "kvbm/io_queue.h"
#include "kvbm/storage.h"
#include "kvbm/transfer.h"

namespace kvbm {
namespace {

using Clock = std::chrono::steady_clock;

constexpr uint64_t kSeed = 42;
// IoQueue::Create's default depth, which TransferEngine uses; kvbm keeps at most
// max_concurrent_transfers x max_batch_size blocks in flight, so the smaller of the two is its
// queue depth.
constexpr uint32_t kEngineIoDepth = 64;

// One contiguous source -> destination range of a memcpy anchor.
struct Segment {
  const uint8_t* src;
  uint8_t* dst;
  uint64_t length;
};

// Copies the concatenation of `segments` as `threads` equal byte ranges, one per thread (the
// calling thread takes the first).
void ParallelMemcpy(const std::vector<Segment>& segments, uint64_t total, uint32_t threads) {
  auto copy_range = [&](uint64_t begin, uint64_t end) {
    uint64_t base = 0;
    for (const Segment& s : segments) {
      const uint64_t lo = std::max(begin, base), hi = std::min(end, base + s.length);
      if (lo < hi) std::memcpy(s.dst + (lo - base), s.src + (lo - base), hi - lo);
      base += s.length;
      if (base >= end) break;
    }
  };
  threads = std::max(1u, threads);
  std::vector<std::thread> workers;
  for (uint32_t t = 1; t < threads; ++t)
    workers.emplace_back(copy_range, total * t / threads, total * (t + 1) / threads);
  copy_range(0, total / threads);
  for (auto& w : workers) w.join();
}

}  // namespace

Result<TransferBenchPass> ParseTransferBenchPass(std::string_view name) {
  static constexpr std::pair<std::string_view, TransferBenchPass> kNames[] = {
      {"g1_to_g2", TransferBenchPass::kG1ToG2},
      {"g2_to_g1", TransferBenchPass::kG2ToG1},
      {"g2_to_g3", TransferBenchPass::kG2ToG3},
      {"g3_to_g2", TransferBenchPass::kG3ToG2},
      {"memcpy_g1_to_g2", TransferBenchPass::kMemcpyG1ToG2},
      {"memcpy_g2_to_g1", TransferBenchPass::kMemcpyG2ToG1},
  };
  for (const auto& [n, p] : kNames)
    if (n == name) return p;
  return MakeError(ErrorCode::kInvalidArgument,
                   fmt::format("unknown transfer bench pass '{}' (expected g1_to_g2, g2_to_g1, g2_to_g3, g3_to_g2, "
                               "memcpy_g1_to_g2 or memcpy_g2_to_g1)",
                               name));
}

struct TransferBench::Impl {
  TransferBenchOptions options;
  uint64_t chunk_pair = 0;  // bytes of one block in one G1 layer (K and V)
  std::unique_ptr<LayerSeparateLayout> g1_layout;
  std::unique_ptr<FullyContiguousLayout> g2_layout, g3_layout;
  std::vector<AlignedBuffer> g1_tensors;
  std::unique_ptr<HostStorage> host;
  std::unique_ptr<DiskStorage> disk;
  std::unique_ptr<DiskSideData> side;
  TierMemory g1, g2, g3;
  std::unique_ptr<TransferEngine> engine;
  std::vector<BlockCopy> copies;
  std::vector<Segment> g1_to_g2_segments, g2_to_g1_segments;
  uint64_t bytes = 0;

  void FillG1() {
    std::mt19937_64 rng(kSeed);
    for (auto& t : g1_tensors)
      for (uint64_t i = 0; i + 8 <= t.size(); i += 8) {
        const uint64_t v = rng();
        std::memcpy(t.data() + i, &v, 8);
      }
  }

  Status Run(TransferPath path, const TierMemory& src, const TierMemory& dst) {
    const TransferResult res = engine->Submit(path, src, dst, copies)->Wait();
    if (!res.ok()) {
      if (res.first_error) return std::unexpected(*res.first_error);
      return MakeError(ErrorCode::kIoError, fmt::format("{} of {} blocks failed", res.failed.size(), copies.size()));
    }
    return {};
  }
};

TransferBench::TransferBench(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TransferBench::~TransferBench() = default;

Result<std::unique_ptr<TransferBench>> TransferBench::Create(const TransferBenchOptions& o) {
  auto impl = std::make_unique<Impl>();
  impl->options = o;
  if (impl->options.memcpy_threads == 0) impl->options.memcpy_threads = TransferEngineOptions{}.memcpy_threads;
  if (o.num_blocks == 0) return MakeError(ErrorCode::kInvalidArgument, "num_blocks must be at least 1");
  // A vLLM-like G1: one tensor per layer, [block][K/V][page*inner], chunks of 16 or 32 KiB.
  const uint64_t outer = 2, page = 32, dtype = 2;
  const uint64_t inner = o.block_bytes >= (1u << 20) ? 512 : 256;
  const uint64_t chunk = page * inner * dtype;
  impl->chunk_pair = outer * chunk;
  if (o.block_bytes == 0 || o.block_bytes % impl->chunk_pair != 0)
    return MakeError(ErrorCode::kInvalidArgument,
                     fmt::format("block_bytes {} is not a positive multiple of {}", o.block_bytes, impl->chunk_pair));
  LayoutDims dims{o.num_blocks, o.block_bytes / impl->chunk_pair, outer, page, inner, dtype};
  impl->g1_layout = std::make_unique<LayerSeparateLayout>(dims, /*outer_first=*/false);
  impl->g2_layout = std::make_unique<FullyContiguousLayout>(dims, kDiskAlignment);
  impl->g3_layout = std::make_unique<FullyContiguousLayout>(dims, kDiskAlignment);

  impl->g1 = TierMemory{TierId::kDevice, MemoryKind::kHost, impl->g1_layout.get(), {}};
  for (uint64_t l = 0; l < dims.num_layers; ++l) {
    impl->g1_tensors.emplace_back(impl->g1_layout->allocation_bytes(static_cast<uint32_t>(l)));
    impl->g1.bases.push_back(impl->g1_tensors.back().data());
  }
  const uint64_t g2_bytes = impl->g2_layout->allocation_bytes(0);
  HostStorageOptions host_options;  // as the worker's G2: huge pages, not pinned (no GPU here)
  host_options.try_pin = false;
  host_options.huge_pages = true;
  auto host = HostStorage::Allocate(g2_bytes, host_options);
  if (!host) return std::unexpected(host.error());
  impl->host = std::move(*host);
  std::memset(impl->host->data(), 0, g2_bytes);  // touched: no page faults in the first pass
  impl->g2 = TierMemory{TierId::kHost, MemoryKind::kHost, impl->g2_layout.get(), {impl->host->data()}};
  DiskStorageOptions disk_options;
  disk_options.directory = o.disk_dir;
  auto disk = DiskStorage::Create(disk_options, impl->g3_layout->allocation_bytes(0));
  if (!disk) return std::unexpected(disk.error());
  impl->disk = std::move(*disk);
  impl->side = std::make_unique<DiskSideData>(o.num_blocks);
  impl->g3 = TierMemory{TierId::kDisk, MemoryKind::kDisk, impl->g3_layout.get(), {}, impl->disk->fd(), impl->side.get()};
  impl->FillG1();

  TransferEngineOptions eo;
  eo.max_concurrent_transfers = o.max_concurrent_transfers;
  eo.max_batch_size = o.max_batch_size;
  eo.memcpy_threads = impl->options.memcpy_threads;
  impl->engine = std::make_unique<TransferEngine>(eo, nullptr);
  for (uint32_t b = 0; b < o.num_blocks; ++b) impl->copies.push_back({b, b, SequenceHash(0x1000 + b)});

  // The memcpy anchors: G1's tensors, one after another, to and from the start of G2.
  uint64_t offset = 0;
  for (auto& t : impl->g1_tensors) {
    impl->g1_to_g2_segments.push_back({t.data(), impl->host->data() + offset, t.size()});
    impl->g2_to_g1_segments.push_back({impl->host->data() + offset, t.data(), t.size()});
    offset += t.size();
  }
  impl->bytes = offset;
  if (offset > g2_bytes)
    return MakeError(ErrorCode::kInternal, fmt::format("G1 holds {} bytes, G2 only {}", offset, g2_bytes));
  return std::unique_ptr<TransferBench>(new TransferBench(std::move(impl)));
}

Result<double> TransferBench::Pass(TransferBenchPass pass, uint32_t threads) {
  Impl& m = *impl_;
  if (threads == 0) threads = m.options.memcpy_threads;
  const auto t0 = Clock::now();
  Status st;
  switch (pass) {
    case TransferBenchPass::kG1ToG2: st = m.Run(TransferPath::kD2H, m.g1, m.g2); break;
    case TransferBenchPass::kG2ToG1: st = m.Run(TransferPath::kH2Dev, m.g2, m.g1); break;
    case TransferBenchPass::kG2ToG3: st = m.Run(TransferPath::kH2D_Disk, m.g2, m.g3); break;
    case TransferBenchPass::kG3ToG2: st = m.Run(TransferPath::kDisk2H, m.g3, m.g2); break;
    case TransferBenchPass::kMemcpyG1ToG2: ParallelMemcpy(m.g1_to_g2_segments, m.bytes, threads); break;
    case TransferBenchPass::kMemcpyG2ToG1: ParallelMemcpy(m.g2_to_g1_segments, m.bytes, threads); break;
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  if (!st) return std::unexpected(st.error());
  return seconds;
}

Result<uint64_t> TransferBench::Verify() {
  Impl& m = *impl_;
  m.FillG1();
  if (Status s = m.Run(TransferPath::kD2H, m.g1, m.g2); !s) return std::unexpected(s.error());
  if (Status s = m.Run(TransferPath::kH2D_Disk, m.g2, m.g3); !s) return std::unexpected(s.error());
  std::memset(m.host->data(), 0, m.g2_layout->allocation_bytes(0));
  if (Status s = m.Run(TransferPath::kDisk2H, m.g3, m.g2); !s) return std::unexpected(s.error());
  for (auto& t : m.g1_tensors) std::memset(t.data(), 0xEE, t.size());
  if (Status s = m.Run(TransferPath::kH2Dev, m.g2, m.g1); !s) return std::unexpected(s.error());
  // Replay the seed in FillG1's order; a block is wrong when any of its bytes in any layer is.
  std::vector<bool> bad(m.options.num_blocks, false);
  std::mt19937_64 rng(kSeed);
  for (auto& t : m.g1_tensors)
    for (uint64_t i = 0; i + 8 <= t.size(); i += 8) {
      const uint64_t v = rng();
      if (std::memcmp(t.data() + i, &v, 8) != 0) bad[i / m.chunk_pair] = true;
    }
  return static_cast<uint64_t>(std::count(bad.begin(), bad.end(), true));
}

uint64_t TransferBench::bytes() const { return impl_->bytes; }
uint64_t TransferBench::disk_bytes() const { return impl_->disk->size(); }
int TransferBench::disk_fd() const { return impl_->disk->fd(); }
uint32_t TransferBench::memcpy_threads() const { return impl_->options.memcpy_threads; }
uint32_t TransferBench::io_depth() const {
  return std::min(kEngineIoDepth, impl_->options.max_concurrent_transfers * impl_->options.max_batch_size);
}
std::string TransferBench::io_queue() const { return impl_->engine->io_queue().name(); }

}  // namespace kvbm
