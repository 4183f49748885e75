// AllocatePinnedHost and the availability queries of kvbm/cuda.h.
#include <chrono>
#include <cstdio>
#include <string>
#include <utility>

#include "kvbm/cuda.h"
#include "transfer/cuda/cuda_loader.h"

namespace kvbm {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
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

PinnedHostMemory::PinnedHostMemory() = default;

PinnedHostMemory::PinnedHostMemory(PinnedHostMemory&& other) noexcept
    : storage_(std::move(other.storage_)),
      pinned_(std::exchange(other.pinned_, false)),
      device_(std::exchange(other.device_, -1)),
      touch_seconds_(other.touch_seconds_),
      pin_seconds_(other.pin_seconds_) {}

PinnedHostMemory& PinnedHostMemory::operator=(PinnedHostMemory&& other) noexcept {
  if (this != &other) {
    Release();
    storage_ = std::move(other.storage_);
    pinned_ = std::exchange(other.pinned_, false);
    device_ = std::exchange(other.device_, -1);
    touch_seconds_ = other.touch_seconds_;
    pin_seconds_ = other.pin_seconds_;
  }
  return *this;
}

PinnedHostMemory::~PinnedHostMemory() { Release(); }

uint8_t* PinnedHostMemory::data() const { return storage_ ? storage_->data() : nullptr; }
uint64_t PinnedHostMemory::size() const { return storage_ ? storage_->size() : 0; }
int PinnedHostMemory::numa_node() const { return storage_ ? storage_->numa_node() : kNoNumaNode; }

void PinnedHostMemory::Release() {
  if (!storage_) return;
  if (pinned_) {
    // Unregistering needs a context of the driver; the primary one that pinned the pages.
    std::string why;
    cuda::PrimaryContext ctx = cuda::PrimaryContext::Retain(device_, &why);
    cuda::ScopedContext scope(ctx.context());
    cuda::CUresult r = cuda::Driver()->cuMemHostUnregister(storage_->data());
    if (r != cuda::kSuccess) cuda::CudaLog(1, cuda::CallError("cuMemHostUnregister", r));
  }
  storage_.reset();  // unmaps
  pinned_ = false;
}

Result<PinnedHostMemory> AllocatePinnedHost(uint64_t bytes, const PinnedHostOptions& options) {
  if (bytes == 0)
    return MakeError(ErrorCode::kInvalidArgument, "pinned host memory of 0 bytes requested");
  const auto start = Clock::now();
  HostStorageOptions host;
  host.try_pin = false;  // pinned below, through the driver, in the device's primary context
  host.huge_pages = true;
  int node = options.numa_node == kNumaFromDevice ? cuda::DeviceNumaNode(options.device) : options.numa_node;
  host.numa_node = node >= 0 ? node : kNoNumaNode;
  auto storage = HostStorage::Allocate(bytes, host);
  if (!storage) return std::unexpected(storage.error());
  PinnedHostMemory out;
  out.storage_ = std::move(*storage);
  out.device_ = options.device;
  out.touch_seconds_ = Since(start);
  void* mapped = out.storage_->data();

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
      bytes / double(1ULL << 30), out.pinned_ ? "pinned" : "plain", out.numa_node(), Since(start),
      out.touch_seconds_, out.pin_seconds_);
  cuda::CudaLog(2, out.pinned_ ? std::string(line) : std::string(line) + ": " + why);
  return out;
}

}  // namespace kvbm
