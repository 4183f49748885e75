// The CUDA side of kvbm: a copy backend between the engine's device KV tensors and pinned host
// memory, and a NUMA-local pinned host allocator. CUDA is loaded at run time (libcuda.so.1,
// the driver API); nothing here needs a CUDA header or library to build, and every entry point
// reports "unavailable" cleanly on a machine without a driver or device.
//
// The backend copies on its own non-blocking streams, never the engine's stream and never with
// a device-wide synchronisation: one DMA per contiguous range for large chunks, or a
// gather/scatter kernel (embedded fatbin, sm_80/sm_90 + PTX) for many small chunks.
// Completions are reported from the backend's own polling thread.
//
// Thread safety: all functions may be called from any thread. A backend's Execute() may be
// called concurrently. Ownership: the backend owns its streams, events, staging buffers and a
// reference on the device's primary context; PinnedHostMemory owns its mapping.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "kvbm/error.h"
#include "kvbm/storage.h"
#include "kvbm/transfer.h"

namespace kvbm {

// True when the driver loads and at least one device is visible. Cheap after the first call.
bool CudaAvailable();
// Why CudaAvailable() is false ("" when it is true).
std::string CudaUnavailableReason();
int CudaDeviceCount();  // 0 when unavailable
// NUMA node of the device's PCI function; -1 when unknown or a single-node machine.
int CudaDeviceNumaNode(int device);

enum class CudaCopyMode : uint8_t {
  kAuto,  // kernel for small chunks (mean < kernel_max_mean_bytes) when the host side is mapped,
          // DMA otherwise
  kDma,   // one cuMemcpy{DtoH,HtoD}Async per merged range
  kBatchDma,  // cuMemcpyBatchAsync (driver >= 12.8) per batch; DMA when the driver lacks it
  kKernel,    // the gather/scatter kernel; DMA when the host side is not pinned+mapped or no kernel
              // is built in
};

struct CudaBackendOptions {
  CudaCopyMode mode = CudaCopyMode::kAuto;
  uint32_t streams_per_direction = 2;
  uint64_t kernel_max_mean_bytes = 256
                                   << 10;  // kAuto: mean merged range below this goes to the kernel
  uint64_t kernel_piece_bytes = 64
                                << 10;  // large ranges are split so many thread blocks share them
  uint32_t kernel_threads = 256;
  uint32_t kernel_blocks_per_sm = 4;
};

// A backend for kDevice <-> kHost on CUDA device `device` (the ordinal the engine uses).
// kUnavailable (naming the reason: no driver, no device, a device that does not exist) when
// CUDA cannot be used; never aborts.
Result<std::unique_ptr<CopyBackend>> MakeCudaBackend(int device,
                                                     const CudaBackendOptions& options = {});

inline constexpr int kNumaFromDevice = -1;
inline constexpr int kNumaNone = -2;

struct PinnedHostOptions {
  int device = 0;  // whose primary context pins the pages (pinned for all, portable)
  int numa_node = kNumaFromDevice;  // bind pages to this node; kNumaFromDevice: the device's node
  bool require_pinned = false;      // fail instead of returning plain memory when pinning fails
};

// Host memory from HostStorage::Allocate (kvbm/storage.h: the one host allocator, also G2's),
// bound to a NUMA node, huge pages, first touched in parallel, then page-locked and mapped for
// the device through the driver API of a device's primary context (cuMemHostRegister
// portable|devicemap). Move-only; unpins and unmaps on destruction.
class PinnedHostMemory {
 public:
  PinnedHostMemory();
  PinnedHostMemory(PinnedHostMemory&& other) noexcept;
  PinnedHostMemory& operator=(PinnedHostMemory&& other) noexcept;
  ~PinnedHostMemory();
  PinnedHostMemory(const PinnedHostMemory&) = delete;
  PinnedHostMemory& operator=(const PinnedHostMemory&) = delete;

  uint8_t* data() const;
  uint64_t size() const;
  bool pinned() const { return pinned_; }
  int numa_node() const;  // the node the pages were bound to, -1 none
  double touch_seconds() const { return touch_seconds_; }
  double pin_seconds() const { return pin_seconds_; }

 private:
  friend Result<PinnedHostMemory> AllocatePinnedHost(uint64_t bytes,
                                                     const PinnedHostOptions& options);
  void Release();
  std::unique_ptr<HostStorage> storage_;
  bool pinned_ = false;
  int device_ = -1;
  double touch_seconds_ = 0;
  double pin_seconds_ = 0;
};

// kResourceExhausted when the memory cannot be mapped; kUnavailable when require_pinned and
// pinning failed (the message says why). The time taken is logged.
Result<PinnedHostMemory> AllocatePinnedHost(uint64_t bytes, const PinnedHostOptions& options = {});

}  // namespace kvbm
