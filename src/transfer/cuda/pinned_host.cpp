// AllocatePinnedHost and the availability queries of kvbm/cuda.h.
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

#include "kvbm/cuda.h"
#include "transfer/cuda/cuda_loader.h"

namespace kvbm {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// MPOL_PREFERRED through the raw syscall: no libnuma at link or run time. Preferred (not bind)
// so that a full node spills to another instead of failing the allocation.
bool BindToNode(void* addr, uint64_t bytes, int node) {
  constexpr int kMpolPreferred = 1;
  constexpr unsigned long kBits = 8 * sizeof(unsigned long);
  constexpr unsigned long kMaxNodes = 1024;
  if (node < 0 || static_cast<unsigned long>(node) >= kMaxNodes) return false;
  unsigned long mask[kMaxNodes / kBits] = {};
  mask[node / kBits] |= 1UL << (node % kBits);
  // The kernel reads maxnode - 1 bits.
  return syscall(SYS_mbind, addr, bytes, kMpolPreferred, mask, kMaxNodes + 1, 0) == 0;
}

// The kernel zeroes each page on first touch; one thread doing that for hundreds of GB takes
// minutes, so the pages are faulted in by several threads before pinning locks them.
void ParallelFirstTouch(uint8_t* data, uint64_t bytes) {
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t pages = (bytes + page - 1) / page;
  constexpr uint64_t kMinPagesPerThread = 16384;  // 64 MiB of 4 KiB pages
  const uint64_t hw = std::max(1u, std::thread::hardware_concurrency());
  const uint64_t threads =
      std::clamp<uint64_t>(pages / kMinPagesPerThread, 1, std::min<uint64_t>(hw, 32));
  const uint64_t per = (pages + threads - 1) / threads;
  auto touch = [=](uint64_t first, uint64_t last) {
    for (uint64_t p = first; p < last; ++p) data[p * page] = 0;
  };
  std::vector<std::thread> workers;
  for (uint64_t t = 1; t < threads; ++t)
    workers.emplace_back(touch, std::min(pages, t * per), std::min(pages, (t + 1) * per));
  touch(0, std::min(pages, per));
  for (auto& w : workers) w.join();
}

}  // namespace

bool CudaAvailable() { return cuda::Driver() != nullptr; }

std::string CudaUnavailableReason() {
  return cuda::Driver() != nullptr ? std::string() : cuda::DriverError();
}

int CudaDeviceCount() {
  const cuda::DriverApi* d = cuda::Driver();
  return d == nullptr ? 0 : d->device_count;
}

int CudaDeviceNumaNode(int device) { return cuda::DeviceNumaNode(device); }

PinnedHostMemory::PinnedHostMemory(PinnedHostMemory&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      pinned_(std::exchange(other.pinned_, false)),
      numa_node_(std::exchange(other.numa_node_, -1)),
      device_(std::exchange(other.device_, -1)),
      touch_seconds_(other.touch_seconds_),
      pin_seconds_(other.pin_seconds_) {}

PinnedHostMemory& PinnedHostMemory::operator=(PinnedHostMemory&& other) noexcept {
  if (this != &other) {
    Release();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    pinned_ = std::exchange(other.pinned_, false);
    numa_node_ = std::exchange(other.numa_node_, -1);
    device_ = std::exchange(other.device_, -1);
    touch_seconds_ = other.touch_seconds_;
    pin_seconds_ = other.pin_seconds_;
  }
  return *this;
}

PinnedHostMemory::~PinnedHostMemory() { Release(); }

void PinnedHostMemory::Release() {
  if (data_ == nullptr) return;
  if (pinned_) {
    // Unregistering needs a context of the driver; the primary one that pinned the pages.
    std::string why;
    cuda::PrimaryContext ctx = cuda::PrimaryContext::Retain(device_, &why);
    cuda::ScopedContext scope(ctx.context());
    cuda::CUresult r = cuda::Driver()->cuMemHostUnregister(data_);
    if (r != cuda::kSuccess) cuda::CudaLog(1, cuda::CallError("cuMemHostUnregister", r));
  }
  munmap(data_, size_);
  data_ = nullptr;
  size_ = 0;
  pinned_ = false;
}

Result<PinnedHostMemory> AllocatePinnedHost(uint64_t bytes, const PinnedHostOptions& options) {
  if (bytes == 0)
    return MakeError(ErrorCode::kInvalidArgument, "pinned host memory of 0 bytes requested");
  const auto start = Clock::now();
  void* mapped = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mapped == MAP_FAILED)
    return MakeError(
        ErrorCode::kResourceExhausted,
        "cannot map " + std::to_string(bytes) + " bytes of host memory: " + std::strerror(errno));
  PinnedHostMemory out;
  out.data_ = static_cast<uint8_t*>(mapped);
  out.size_ = bytes;
  out.device_ = options.device;

  // Huge pages make both first touch and pinning cheaper (fewer faults, fewer page entries).
  madvise(mapped, bytes, MADV_HUGEPAGE);
  int node = options.numa_node == kNumaFromDevice ? cuda::DeviceNumaNode(options.device)
                                                  : options.numa_node;
  if (node >= 0 && BindToNode(mapped, bytes, node)) out.numa_node_ = node;
  ParallelFirstTouch(out.data_, bytes);
  out.touch_seconds_ = Since(start);

  const auto pin_start = Clock::now();
  std::string why;
  if (const cuda::DriverApi* d = cuda::Driver(); d != nullptr) {
    cuda::PrimaryContext ctx = cuda::PrimaryContext::Retain(options.device, &why);
    if (ctx.context() != nullptr) {
      cuda::ScopedContext scope(ctx.context());
      // Portable: pinned for every context; device-mapped: the gather kernel can reach it.
      cuda::CUresult r = d->cuMemHostRegister(
          mapped, bytes, cuda::kHostRegisterPortable | cuda::kHostRegisterDeviceMap);
      if (r == cuda::kSuccess)
        out.pinned_ = true;
      else
        why = cuda::CallError("cuMemHostRegister", r);
    }
  } else {
    why = cuda::DriverError();
  }
  out.pin_seconds_ = Since(pin_start);
  if (!out.pinned_ && options.require_pinned)
    return MakeError(ErrorCode::kUnavailable,
                     "cannot pin " + std::to_string(bytes) + " bytes of host memory: " + why);

  char line[200];
  std::snprintf(
      line, sizeof(line),
      "allocated %.2f GiB of %s host memory (NUMA node %d) in %.3f s (touch %.3f s, pin %.3f s)",
      bytes / double(1ULL << 30), out.pinned_ ? "pinned" : "plain", out.numa_node_, Since(start),
      out.touch_seconds_, out.pin_seconds_);
  cuda::CudaLog(2, out.pinned_ ? std::string(line) : std::string(line) + ": " + why);
  return out;
}

}  // namespace kvbm
