#include "transfer/cuda/gpu_roundtrip.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>

#include "kvbm/cuda.h"
#include "transfer/cuda/cuda_backend.h"
#include "transfer/cuda/cuda_loader.h"

namespace kvbm::cuda::gpucheck {
namespace {

using Clock = std::chrono::steady_clock;

// Device memory owned by the check (cuMemAlloc in the primary context).
class DeviceMemory {
 public:
  DeviceMemory(CUcontext ctx, uint64_t bytes) : ctx_(ctx), bytes_(bytes) {
    ScopedContext s(ctx_);
    if (Driver()->cuMemAlloc(&ptr_, bytes) != kSuccess) ptr_ = 0;
  }
  ~DeviceMemory() {
    ScopedContext s(ctx_);
    if (ptr_) Driver()->cuMemFree(ptr_);
  }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  uint8_t* data() const { return reinterpret_cast<uint8_t*>(ptr_); }
  CUdeviceptr ptr() const { return ptr_; }
  uint64_t size() const { return bytes_; }

 private:
  CUcontext ctx_;
  CUdeviceptr ptr_ = 0;
  uint64_t bytes_;
};

// A private stream for the check's own synchronous uploads and downloads.
class SyncStream {
 public:
  explicit SyncStream(CUcontext ctx) : ctx_(ctx) {
    ScopedContext s(ctx_);
    Driver()->cuStreamCreate(&stream_, kStreamNonBlocking);
  }
  ~SyncStream() {
    ScopedContext s(ctx_);
    Driver()->cuStreamDestroy(stream_);
  }
  bool Upload(CUdeviceptr dst, const void* src, uint64_t n) {
    ScopedContext s(ctx_);
    return Driver()->cuMemcpyHtoDAsync(dst, src, n, stream_) == kSuccess &&
           Driver()->cuStreamSynchronize(stream_) == kSuccess;
  }
  bool Download(void* dst, CUdeviceptr src, uint64_t n) {
    ScopedContext s(ctx_);
    return Driver()->cuMemcpyDtoHAsync(dst, src, n, stream_) == kSuccess &&
           Driver()->cuStreamSynchronize(stream_) == kSuccess;
  }
  bool Zero(CUdeviceptr dst, uint64_t n) {
    ScopedContext s(ctx_);
    return Driver()->cuMemsetD8Async(dst, 0, n, stream_) == kSuccess &&
           Driver()->cuStreamSynchronize(stream_) == kSuccess;
  }
  CUstream get() const { return stream_; }

 private:
  CUcontext ctx_;
  CUstream stream_ = nullptr;
};

// Waits for several Execute() calls; never hangs (a deadline turns into a failure).
class Waiter {
 public:
  std::function<void(TransferResult)> Callback() {
    {
      std::lock_guard<std::mutex> l(mu_);
      ++outstanding_;
    }
    return [this](TransferResult r) {
      std::lock_guard<std::mutex> l(mu_);
      if (!r.ok() && error_.empty())
        error_ = r.first_error ? r.first_error->ToString()
                               : std::string("a copy failed without an error");
      --outstanding_;
      cv_.notify_all();
    };
  }
  // "" on success.
  std::string Wait(double seconds = 60) {
    std::unique_lock<std::mutex> l(mu_);
    if (!cv_.wait_for(l, std::chrono::duration<double>(seconds), [&] { return outstanding_ == 0; }))
      return "timed out waiting for the CUDA backend";
    return error_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int outstanding_ = 0;
  std::string error_;
};

enum class DeviceLayoutKind { kFullyContiguous, kOuterFirst, kBlockFirst };

const char* KindName(DeviceLayoutKind k) {
  switch (k) {
    case DeviceLayoutKind::kFullyContiguous:
      return "fc";
    case DeviceLayoutKind::kOuterFirst:
      return "ls_outer_first";
    case DeviceLayoutKind::kBlockFirst:
      return "ls_block_first";
  }
  return "?";
}

const char* ModeName(CudaCopyMode m) {
  switch (m) {
    case CudaCopyMode::kAuto:
      return "auto";
    case CudaCopyMode::kDma:
      return "dma";
    case CudaCopyMode::kBatchDma:
      return "batch";
    case CudaCopyMode::kKernel:
      return "kernel";
  }
  return "?";
}

std::unique_ptr<Layout> MakeDeviceLayout(DeviceLayoutKind kind, const LayoutDims& dims) {
  if (kind == DeviceLayoutKind::kFullyContiguous)
    return std::make_unique<FullyContiguousLayout>(dims);
  return std::make_unique<LayerSeparateLayout>(dims, kind == DeviceLayoutKind::kOuterFirst);
}

// Device tier over one device allocation, each layout allocation at its own offset.
struct DeviceTier {
  std::unique_ptr<Layout> layout;
  std::unique_ptr<DeviceMemory> memory;
  TierMemory tier;
  uint64_t total = 0;
};

DeviceTier MakeDeviceTier(CUcontext ctx, int device, DeviceLayoutKind kind,
                          const LayoutDims& dims) {
  DeviceTier t;
  t.layout = MakeDeviceLayout(kind, dims);
  for (uint32_t a = 0; a < t.layout->num_allocations(); ++a)
    t.total += (t.layout->allocation_bytes(a) + 255) / 256 * 256;
  t.memory = std::make_unique<DeviceMemory>(ctx, t.total);
  t.tier.tier = TierId::kDevice;
  t.tier.kind = MemoryKind::kDevice;
  t.tier.layout = t.layout.get();
  t.tier.device_index = device;
  uint64_t off = 0;
  for (uint32_t a = 0; a < t.layout->num_allocations(); ++a) {
    t.tier.bases.push_back(t.memory->data() + off);
    off += (t.layout->allocation_bytes(a) + 255) / 256 * 256;
  }
  return t;
}

// Host memory for a FullyContiguous host tier: pinned (and mapped) or plain.
struct HostTier {
  std::unique_ptr<FullyContiguousLayout> layout;
  PinnedHostMemory pinned;
  std::vector<uint8_t> plain;
  TierMemory tier;
  uint8_t* data() const { return tier.bases[0]; }
};

std::string MakeHostTier(HostTier* h, int device, const LayoutDims& dims, uint64_t alignment,
                         bool pinned) {
  h->layout = std::make_unique<FullyContiguousLayout>(dims, alignment);
  const uint64_t bytes = h->layout->allocation_bytes(0);
  uint8_t* base = nullptr;
  if (pinned) {
    PinnedHostOptions o;
    o.device = device;
    o.require_pinned = true;
    auto m = AllocatePinnedHost(bytes, o);
    if (!m) return m.error().ToString();
    h->pinned = std::move(*m);
    base = h->pinned.data();
  } else {
    h->plain.assign(bytes, 0);
    base = h->plain.data();
  }
  h->tier.tier = TierId::kHost;
  h->tier.kind = MemoryKind::kHost;
  h->tier.layout = h->layout.get();
  h->tier.bases = {base};
  return "";
}

uint8_t* HostChunk(const TierMemory& m, uint64_t b, uint64_t l, uint64_t o) {
  return m.ChunkAddress(b, l, o);
}

// Offset of a chunk of the device tier inside its single device allocation.
uint64_t DeviceOffset(const DeviceTier& d, uint64_t b, uint64_t l, uint64_t o) {
  return static_cast<uint64_t>(d.tier.ChunkAddress(b, l, o) - d.memory->data());
}

std::vector<BlockCopy> RandomMapping(std::mt19937_64& rng, uint32_t count, uint32_t src_blocks,
                                     uint32_t dst_blocks) {
  std::vector<uint32_t> s(src_blocks), t(dst_blocks);
  std::iota(s.begin(), s.end(), 0u);
  std::iota(t.begin(), t.end(), 0u);
  std::shuffle(s.begin(), s.end(), rng);
  std::shuffle(t.begin(), t.end(), rng);
  std::vector<BlockCopy> out;
  for (uint32_t i = 0; i < count; ++i) out.push_back({s[i], t[i], SequenceHash(i)});
  // Some runs of neighbours on both sides, so that merging is exercised too.
  if (count >= 8 && src_blocks > count + 4 && dst_blocks > count + 4) {
    out.resize(count - 3);
    uint32_t bs = src_blocks - 3, bd = dst_blocks - 3;
    std::erase_if(out, [&](const BlockCopy& c) { return c.src >= bs || c.dst >= bd; });
    for (uint32_t k = 0; k < 3; ++k) out.push_back({bs + k, bd + k, SequenceHash(1000 + k)});
  }
  return out;
}

void Submit(CopyBackend& backend, const TierMemory& src, const TierMemory& dst,
            const std::vector<BlockCopy>& copies, Waiter& waiter, size_t batch) {
  for (size_t i = 0; i < copies.size(); i += batch) {
    std::span<const BlockCopy> part(copies.data() + i, std::min(batch, copies.size() - i));
    backend.Execute(src, dst, part, waiter.Callback());
  }
}

std::string Mismatch(const char* what, uint64_t b, uint64_t l, uint64_t o) {
  return std::string(what) + " mismatch at block " + std::to_string(b) + " layer " +
         std::to_string(l) + " outer " + std::to_string(o);
}

struct Case {
  DeviceLayoutKind kind;
  CudaCopyMode mode;
  bool pinned;
  LayoutDims dims;
  uint64_t host_alignment;
};

CheckResult RunCase(int device, CUcontext ctx, const Case& c, std::mt19937_64& rng) {
  CheckResult res;
  res.name = std::string("roundtrip/") + KindName(c.kind) + "/" + ModeName(c.mode) + "/" +
             (c.pinned ? "pinned" : "pageable") + "/chunk" + std::to_string(c.dims.chunk_bytes()) +
             (c.host_alignment > 1 ? "/host_align" + std::to_string(c.host_alignment) : "");
  CudaBackendOptions opt;
  opt.mode = c.mode;
  opt.kernel_piece_bytes =
      1024;  // small pieces: many thread blocks per chunk even in this small test
  auto backend = CudaCopyBackend::Create(device, opt);
  if (!backend) {
    res.detail = backend.error().ToString();
    return res;
  }
  DeviceTier dev = MakeDeviceTier(ctx, device, c.kind, c.dims);
  if (dev.memory->ptr() == 0) {
    res.detail = "cuMemAlloc failed";
    return res;
  }
  LayoutDims hdims = c.dims;
  hdims.num_blocks = c.dims.num_blocks - 5;
  HostTier host;
  if (std::string e = MakeHostTier(&host, device, hdims, c.host_alignment, c.pinned); !e.empty()) {
    res.detail = e;
    return res;
  }
  SyncStream ss(ctx);

  // Random device contents, a sentinel in host memory.
  std::vector<uint8_t> mirror(dev.total);
  for (auto& x : mirror) x = static_cast<uint8_t>(rng());
  if (!ss.Upload(dev.memory->ptr(), mirror.data(), dev.total)) {
    res.detail = "upload failed";
    return res;
  }
  std::memset(host.data(), 0xAB, host.layout->allocation_bytes(0));

  // Device -> host.
  const uint32_t n = static_cast<uint32_t>(hdims.num_blocks) - 6;
  std::vector<BlockCopy> d2h = RandomMapping(rng, n, static_cast<uint32_t>(c.dims.num_blocks),
                                             static_cast<uint32_t>(hdims.num_blocks));
  Waiter w1;
  Submit(**backend, dev.tier, host.tier, d2h, w1, 7);
  if (std::string e = w1.Wait(); !e.empty()) {
    res.detail = "device->host: " + e;
    return res;
  }
  const LayoutDims& d = c.dims;
  std::vector<bool> host_written(hdims.num_blocks, false);
  for (const BlockCopy& bc : d2h) {
    host_written[bc.dst] = true;
    for (uint64_t l = 0; l < d.num_layers; ++l)
      for (uint64_t o = 0; o < d.outer_dim; ++o)
        if (std::memcmp(HostChunk(host.tier, bc.dst, l, o),
                        mirror.data() + DeviceOffset(dev, bc.src, l, o), d.chunk_bytes()) != 0) {
          res.detail = Mismatch("device->host", bc.dst, l, o);
          return res;
        }
  }
  for (uint64_t b = 0; b < hdims.num_blocks; ++b)
    if (!host_written[b])
      for (uint64_t l = 0; l < d.num_layers; ++l)
        for (uint64_t o = 0; o < d.outer_dim; ++o) {
          const uint8_t* p = HostChunk(host.tier, b, l, o);
          if (std::any_of(p, p + d.chunk_bytes(), [](uint8_t x) { return x != 0xAB; })) {
            res.detail = Mismatch("device->host wrote a block it was not asked to", b, l, o);
            return res;
          }
        }

  // Host -> device into a zeroed device tier, other block ids.
  if (!ss.Zero(dev.memory->ptr(), dev.total)) {
    res.detail = "memset failed";
    return res;
  }
  std::vector<BlockCopy> h2d;
  {
    std::vector<uint32_t> targets(d.num_blocks);
    std::iota(targets.begin(), targets.end(), 0u);
    std::shuffle(targets.begin(), targets.end(), rng);
    for (size_t i = 0; i < d2h.size(); ++i) h2d.push_back({d2h[i].dst, targets[i], d2h[i].hash});
  }
  Waiter w2;
  Submit(**backend, host.tier, dev.tier, h2d, w2, 5);
  if (std::string e = w2.Wait(); !e.empty()) {
    res.detail = "host->device: " + e;
    return res;
  }
  std::vector<uint8_t> back(dev.total);
  if (!ss.Download(back.data(), dev.memory->ptr(), dev.total)) {
    res.detail = "download failed";
    return res;
  }
  std::vector<uint8_t> expected(dev.total, 0);
  for (const BlockCopy& bc : h2d)
    for (uint64_t l = 0; l < d.num_layers; ++l)
      for (uint64_t o = 0; o < d.outer_dim; ++o)
        std::memcpy(expected.data() + DeviceOffset(dev, bc.dst, l, o),
                    HostChunk(host.tier, bc.src, l, o), d.chunk_bytes());
  if (back != expected) {
    auto first = std::mismatch(back.begin(), back.end(), expected.begin());
    res.detail =
        "host->device mismatch at device byte " + std::to_string(first.first - back.begin());
    return res;
  }
  auto s = (*backend)->stats();
  res.ok = true;
  res.detail = "batches: dma " + std::to_string(s.dma_batches) + ", batch-api " +
               std::to_string(s.batch_api_batches) + ", kernel " +
               std::to_string(s.kernel_batches) + "; ranges " + std::to_string(s.descriptors);
  return res;
}

// File -> pinned bounce buffer -> device: the device half of the engine's disk -> device path.
CheckResult RunDiskBounce(int device, CUcontext ctx, std::mt19937_64& rng) {
  CheckResult res;
  res.name = "disk_bounce/ls_outer_first/auto";
  LayoutDims dims{64, 4, 2, 16, 128, 2};
  HostTier bounce;
  LayoutDims bdims = dims;
  bdims.num_blocks = 16;
  if (std::string e = MakeHostTier(&bounce, device, bdims, 4096, true); !e.empty()) {
    res.detail = e;
    return res;
  }
  const uint64_t stride = bounce.layout->block_stride();
  char path[] = "/tmp/kvbm-gpu-check-XXXXXX";
  int fd = mkstemp(path);
  if (fd < 0) {
    res.detail = std::string("mkstemp: ") + std::strerror(errno);
    return res;
  }
  unlink(path);
  std::vector<uint8_t> file(stride * 40);
  for (auto& x : file) x = static_cast<uint8_t>(rng());
  if (pwrite(fd, file.data(), file.size(), 0) != static_cast<ssize_t>(file.size())) {
    close(fd);
    res.detail = "pwrite failed";
    return res;
  }
  auto backend = MakeCudaBackend(device);
  if (!backend) {
    close(fd);
    res.detail = backend.error().ToString();
    return res;
  }
  DeviceTier dev = MakeDeviceTier(ctx, device, DeviceLayoutKind::kOuterFirst, dims);
  SyncStream ss(ctx);
  ss.Zero(dev.memory->ptr(), dev.total);
  // Disk blocks 3..18 -> bounce slots 0..15 -> device blocks 60 - i.
  std::vector<BlockCopy> copies;
  for (uint32_t i = 0; i < 16; ++i) {
    if (pread(fd, bounce.data() + i * stride, stride, (3 + i) * stride) !=
        static_cast<ssize_t>(stride)) {
      close(fd);
      res.detail = "pread failed";
      return res;
    }
    copies.push_back({i, 60 - i, SequenceHash(i)});
  }
  close(fd);
  Waiter w;
  (*backend)->Execute(bounce.tier, dev.tier, copies, w.Callback());
  if (std::string e = w.Wait(); !e.empty()) {
    res.detail = e;
    return res;
  }
  std::vector<uint8_t> back(dev.total);
  ss.Download(back.data(), dev.memory->ptr(), dev.total);
  for (uint32_t i = 0; i < 16; ++i)
    for (uint64_t l = 0; l < dims.num_layers; ++l)
      for (uint64_t o = 0; o < dims.outer_dim; ++o) {
        const uint64_t in_block = (l * dims.outer_dim + o) * dims.chunk_bytes();
        if (std::memcmp(back.data() + DeviceOffset(dev, 60 - i, l, o),
                        file.data() + (3 + i) * stride + in_block, dims.chunk_bytes()) != 0) {
          res.detail = Mismatch("disk->device", 60 - i, l, o);
          return res;
        }
      }
  res.ok = true;
  return res;
}

}  // namespace

std::vector<CheckResult> RunRoundTrips(int device) {
  std::vector<CheckResult> out;
  std::string why;
  PrimaryContext ctx = PrimaryContext::Retain(device, &why);
  if (ctx.context() == nullptr) {
    out.push_back({"setup", false, why});
    return out;
  }
  std::mt19937_64 rng(20240611);
  const LayoutDims aligned{64, 4, 2, 16, 128, 2};  // 4 KiB chunks
  const LayoutDims odd{64, 3, 2, 3, 33, 1};        // 99-byte chunks: the kernel's byte path
  const LayoutDims mla{64, 5, 1, 8, 72, 2};        // outer_dim 1, 1152-byte chunks (8-byte path)
  for (DeviceLayoutKind kind : {DeviceLayoutKind::kFullyContiguous, DeviceLayoutKind::kOuterFirst,
                                DeviceLayoutKind::kBlockFirst})
    for (CudaCopyMode mode :
         {CudaCopyMode::kAuto, CudaCopyMode::kDma, CudaCopyMode::kBatchDma, CudaCopyMode::kKernel})
      for (bool pinned : {true, false})
        for (const LayoutDims* dims : {&aligned, &odd, &mla})
          out.push_back(RunCase(device, ctx.context(), {kind, mode, pinned, *dims, 1}, rng));
  // A padded host layout (the disk tier's 4096 alignment) on both kinds of device layout.
  out.push_back(RunCase(device, ctx.context(),
                        {DeviceLayoutKind::kOuterFirst, CudaCopyMode::kKernel, true, odd, 4096},
                        rng));
  out.push_back(
      RunCase(device, ctx.context(),
              {DeviceLayoutKind::kFullyContiguous, CudaCopyMode::kDma, true, aligned, 4096}, rng));
  out.push_back(RunDiskBounce(device, ctx.context(), rng));
  return out;
}

namespace {

double Seconds(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Raw peak: `count` back-to-back copies of `bytes` on one stream.
double RawGbps(CUcontext ctx, bool d2h, uint8_t* host, CUdeviceptr dev, uint64_t bytes,
               uint32_t count) {
  SyncStream ss(ctx);
  ScopedContext s(ctx);
  double best = 0;
  for (int rep = 0; rep < 4; ++rep) {
    auto start = Clock::now();
    for (uint32_t i = 0; i < count; ++i) {
      if (d2h)
        Driver()->cuMemcpyDtoHAsync(host + i * bytes, dev + i * bytes, bytes, ss.get());
      else
        Driver()->cuMemcpyHtoDAsync(dev + i * bytes, host + i * bytes, bytes, ss.get());
    }
    Driver()->cuStreamSynchronize(ss.get());
    if (rep > 0) best = std::max(best, bytes * double(count) / Seconds(start) / 1e9);
  }
  return best;
}

double BackendGbps(CopyBackend& backend, const TierMemory& src, const TierMemory& dst,
                   const std::vector<BlockCopy>& copies, uint64_t block_bytes, std::string* error) {
  double best = 0;
  for (int rep = 0; rep < 4; ++rep) {
    Waiter w;
    auto start = Clock::now();
    Submit(backend, src, dst, copies, w, 16);  // DYN_KVBM_MAX_TRANSFER_BATCH_SIZE default
    if (std::string e = w.Wait(); !e.empty()) {
      *error = e;
      return 0;
    }
    if (rep > 0) best = std::max(best, block_bytes * double(copies.size()) / Seconds(start) / 1e9);
  }
  return best;
}

}  // namespace

std::vector<BenchFigure> RunBenchmark(int device, double pinned_gib) {
  std::vector<BenchFigure> out;
  std::string why;
  PrimaryContext ctx = PrimaryContext::Retain(device, &why);
  if (ctx.context() == nullptr) {
    out.push_back({"setup", 0, 0, why});
    return out;
  }
  constexpr uint32_t kBlocks = 512;  // 1 GiB of 2 MiB blocks
  std::mt19937_64 rng(7);
  std::vector<BlockCopy> copies;
  {
    std::vector<uint32_t> s(kBlocks), t(kBlocks);
    std::iota(s.begin(), s.end(), 0u);
    std::iota(t.begin(), t.end(), 0u);
    std::shuffle(s.begin(), s.end(), rng);
    std::shuffle(t.begin(), t.end(), rng);
    for (uint32_t i = 0; i < kBlocks; ++i) copies.push_back({s[i], t[i], SequenceHash(i)});
  }
  std::vector<BlockCopy> reversed;
  for (const BlockCopy& c : copies) reversed.push_back({c.dst, c.src, c.hash});

  const LayoutDims fc_dims{kBlocks, 32, 2, 16, 1024, 2};   // 32 KiB chunks, 2 MiB blocks
  const LayoutDims k64_dims{kBlocks, 16, 2, 32, 1024, 2};  // 64 KiB chunks, 2 MiB blocks
  const uint64_t block = fc_dims.block_bytes();
  HostTier host;
  if (std::string e = MakeHostTier(&host, device, fc_dims, 1, true); !e.empty()) {
    out.push_back({"setup", 0, 0, e});
    return out;
  }
  HostTier host64;
  host64.layout = std::make_unique<FullyContiguousLayout>(k64_dims);
  host64.tier = host.tier;
  host64.tier.layout = host64.layout.get();

  DeviceTier dev_fc =
      MakeDeviceTier(ctx.context(), device, DeviceLayoutKind::kFullyContiguous, fc_dims);
  if (dev_fc.memory->ptr() == 0) {
    out.push_back({"setup", 0, 0, "cuMemAlloc of 1 GiB failed"});
    return out;
  }
  const double peak_d2h =
      RawGbps(ctx.context(), true, host.data(), dev_fc.memory->ptr(), block, kBlocks);
  const double peak_h2d =
      RawGbps(ctx.context(), false, host.data(), dev_fc.memory->ptr(), block, kBlocks);
  out.push_back(
      {"raw_cuMemcpyAsync_d2h_2MiB", peak_d2h, 1, "peak: back-to-back 2 MiB copies, one stream"});
  out.push_back(
      {"raw_cuMemcpyAsync_h2d_2MiB", peak_h2d, 1, "peak: back-to-back 2 MiB copies, one stream"});
  {
    SyncStream ss(ctx.context());
    ScopedContext s(ctx.context());
    auto start = Clock::now();
    Driver()->cuMemcpyDtoHAsync(host.data(), dev_fc.memory->ptr(), block * kBlocks, ss.get());
    Driver()->cuStreamSynchronize(ss.get());
    out.push_back({"raw_single_1GiB_d2h", block * double(kBlocks) / Seconds(start) / 1e9, 0,
                   "one 1 GiB copy"});
  }

  auto add = [&](const char* name, CudaCopyMode mode, const TierMemory& src, const TierMemory& dst,
                 const std::vector<BlockCopy>& cps, double peak) {
    CudaBackendOptions opt;
    opt.mode = mode;
    auto backend = CudaCopyBackend::Create(device, opt);
    if (!backend) {
      out.push_back({name, 0, 0, backend.error().ToString()});
      return;
    }
    std::string err;
    double g = BackendGbps(**backend, src, dst, cps, block, &err);
    auto st = (*backend)->stats();
    std::string note = err.empty()
                           ? "batches dma/batch-api/kernel " + std::to_string(st.dma_batches) +
                                 "/" + std::to_string(st.batch_api_batches) + "/" +
                                 std::to_string(st.kernel_batches)
                           : "ERROR " + err;
    out.push_back({name, g, peak > 0 ? g / peak : 0, note});
  };
  add("kvbm_d2h_fc_2MiB_blocks", CudaCopyMode::kAuto, dev_fc.tier, host.tier, copies, peak_d2h);
  add("kvbm_h2d_fc_2MiB_blocks", CudaCopyMode::kAuto, host.tier, dev_fc.tier, reversed, peak_h2d);
  add("kvbm_d2h_fc_2MiB_blocks_batchapi", CudaCopyMode::kBatchDma, dev_fc.tier, host.tier, copies,
      peak_d2h);
  {
    DeviceTier ls = MakeDeviceTier(ctx.context(), device, DeviceLayoutKind::kOuterFirst, fc_dims);
    add("kvbm_d2h_ls_32KiB_chunks_auto", CudaCopyMode::kAuto, ls.tier, host.tier, copies, peak_d2h);
    add("kvbm_h2d_ls_32KiB_chunks_auto", CudaCopyMode::kAuto, host.tier, ls.tier, reversed,
        peak_h2d);
    add("kvbm_d2h_ls_32KiB_chunks_dma", CudaCopyMode::kDma, ls.tier, host.tier, copies, peak_d2h);
  }
  {
    DeviceTier ls = MakeDeviceTier(ctx.context(), device, DeviceLayoutKind::kOuterFirst, k64_dims);
    add("kernel_d2h_64KiB_chunks", CudaCopyMode::kKernel, ls.tier, host64.tier, copies, peak_d2h);
    add("kernel_h2d_64KiB_chunks", CudaCopyMode::kKernel, host64.tier, ls.tier, reversed, peak_h2d);
    add("dma_d2h_64KiB_chunks", CudaCopyMode::kDma, ls.tier, host64.tier, copies, peak_d2h);
    add("dma_h2d_64KiB_chunks", CudaCopyMode::kDma, host64.tier, ls.tier, reversed, peak_h2d);
    add("batchapi_d2h_64KiB_chunks", CudaCopyMode::kBatchDma, ls.tier, host64.tier, copies,
        peak_d2h);
  }
  if (pinned_gib > 0) {
    PinnedHostOptions o;
    o.device = device;
    o.require_pinned = true;
    auto start = Clock::now();
    auto m = AllocatePinnedHost(static_cast<uint64_t>(pinned_gib * (1ULL << 30)), o);
    const double total = Seconds(start);
    if (!m) {
      out.push_back({"pinned_alloc", 0, 0, m.error().ToString()});
    } else {
      char note[160];
      std::snprintf(note, sizeof(note),
                    "%.1f GiB: %.3f s total (touch %.3f s, pin %.3f s), NUMA node %d", pinned_gib,
                    total, m->touch_seconds(), m->pin_seconds(), m->numa_node());
      out.push_back({"pinned_alloc_seconds", total, 0, note});
    }
  }
  return out;
}

}  // namespace kvbm::cuda::gpucheck
