// Private: the CUDA driver API, loaded at run time with dlopen("libcuda.so.1"), so that kvbm
// never links against CUDA and builds and runs where no driver exists.
//
// Only the entry points kvbm calls are resolved, through our own minimal typedefs (no CUDA
// header at compile time). The versioned names (`_v2`) are the ABI the CUDA headers map the
// plain names to; they have been stable since CUDA 4.0.
//
// Why the driver API and not the runtime: the runtime keeps a per-thread "current device" that
// cudaSetDevice would change on whatever engine thread calls us. The driver API lets every
// call push the device's primary context (the one PyTorch uses, so the engine's tensor
// pointers are valid in it) and pop it again, leaving the caller's state exactly as it was.
//
// Thread safety: Driver() loads once (thread-safe static); the table is immutable afterwards.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace kvbm::cuda {

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
using CUcontext = struct CUctx_st*;
using CUmodule = struct CUmod_st*;
using CUfunction = struct CUfunc_st*;
using CUstream = struct CUstream_st*;
using CUevent = struct CUevent_st*;

inline constexpr CUresult kSuccess = 0;
inline constexpr CUresult kErrorNotReady = 600;
inline constexpr int kAttrMultiprocessorCount = 16;
inline constexpr int kAttrUnifiedAddressing = 41;
inline constexpr int kAttrComputeCapabilityMajor = 75;
inline constexpr int kAttrComputeCapabilityMinor = 76;
inline constexpr int kAttrCanUseHostPointerForRegisteredMem = 91;
inline constexpr unsigned kStreamNonBlocking = 1;
inline constexpr unsigned kEventDisableTiming = 2;
inline constexpr unsigned kHostRegisterPortable = 1;
inline constexpr unsigned kHostRegisterDeviceMap = 2;
inline constexpr unsigned kHostAllocPortable = 1;
inline constexpr unsigned kHostAllocDeviceMap = 2;

// CUmemLocation and CUmemcpyAttributes of cuMemcpyBatchAsync (CUDA 12.8 ABI).
struct MemLocation {
  int type;  // 1 device, 2 host
  int id;
};
struct MemcpyAttributes {
  int src_access_order;  // 1: in stream order
  MemLocation src_loc_hint;
  MemLocation dst_loc_hint;
  unsigned flags;
};

struct DriverApi {
  CUresult (*cuInit)(unsigned);
  CUresult (*cuDriverGetVersion)(int*);
  CUresult (*cuDeviceGetCount)(int*);
  CUresult (*cuDeviceGet)(CUdevice*, int);
  CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice);
  CUresult (*cuDeviceGetName)(char*, int, CUdevice);
  CUresult (*cuDeviceGetPCIBusId)(char*, int, CUdevice);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*cuDevicePrimaryCtxRelease)(CUdevice);  // _v2
  CUresult (*cuCtxPushCurrent)(CUcontext);          // _v2
  CUresult (*cuCtxPopCurrent)(CUcontext*);          // _v2
  CUresult (*cuStreamCreate)(CUstream*, unsigned);
  CUresult (*cuStreamDestroy)(CUstream);  // _v2
  CUresult (*cuStreamSynchronize)(CUstream);
  CUresult (*cuEventCreate)(CUevent*, unsigned);
  CUresult (*cuEventDestroy)(CUevent);  // _v2
  CUresult (*cuEventRecord)(CUevent, CUstream);
  CUresult (*cuEventQuery)(CUevent);
  CUresult (*cuEventSynchronize)(CUevent);
  CUresult (*cuEventElapsedTime)(float*, CUevent, CUevent);
  CUresult (*cuMemAlloc)(CUdeviceptr*, size_t);  // _v2
  CUresult (*cuMemFree)(CUdeviceptr);            // _v2
  CUresult (*cuMemHostAlloc)(void**, size_t, unsigned);
  CUresult (*cuMemFreeHost)(void*);
  CUresult (*cuMemHostRegister)(void*, size_t, unsigned);  // _v2
  CUresult (*cuMemHostUnregister)(void*);
  CUresult (*cuMemHostGetDevicePointer)(CUdeviceptr*, void*, unsigned);       // _v2
  CUresult (*cuMemcpyHtoDAsync)(CUdeviceptr, const void*, size_t, CUstream);  // _v2
  CUresult (*cuMemcpyDtoHAsync)(void*, CUdeviceptr, size_t, CUstream);        // _v2
  CUresult (*cuMemcpyAsync)(CUdeviceptr, CUdeviceptr, size_t, CUstream);
  CUresult (*cuMemsetD8Async)(CUdeviceptr, unsigned char, size_t, CUstream);
  CUresult (*cuModuleLoadData)(CUmodule*, const void*);
  CUresult (*cuModuleUnload)(CUmodule);
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*);
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                             unsigned, CUstream, void**, void**);
  CUresult (*cuGetErrorString)(CUresult, const char**);
  // Optional (driver of CUDA 12.8 or newer); nullptr otherwise.
  CUresult (*cuMemcpyBatchAsync)(CUdeviceptr*, CUdeviceptr*, size_t*, size_t, MemcpyAttributes*,
                                 size_t*, size_t, size_t*, CUstream);
  int driver_version = 0;  // e.g. 12080
  int device_count = 0;
};

// The loaded, initialised driver with at least one device, or nullptr; then DriverError() says
// why (no libcuda.so.1, a missing symbol, cuInit's error, no device). Never aborts.
const DriverApi* Driver();
const std::string& DriverError();

// "CUDA_ERROR_...: message (code)" for a driver result.
std::string ErrorText(CUresult result);
// "<what> failed: <ErrorText>".
std::string CallError(const char* what, CUresult result);

// Makes a context current on this thread for the scope and restores the previous one.
class ScopedContext {
 public:
  explicit ScopedContext(CUcontext context);
  ~ScopedContext();
  ScopedContext(const ScopedContext&) = delete;
  ScopedContext& operator=(const ScopedContext&) = delete;
  bool ok() const { return pushed_; }

 private:
  bool pushed_ = false;
};

// A retained primary context of one device (released on destruction). Move-only.
class PrimaryContext {
 public:
  PrimaryContext() = default;
  // Empty (context() == nullptr) with `*why` set when the device cannot be used.
  static PrimaryContext Retain(int device, std::string* why);
  PrimaryContext(PrimaryContext&& other) noexcept;
  PrimaryContext& operator=(PrimaryContext&& other) noexcept;
  ~PrimaryContext();
  CUcontext context() const { return context_; }
  int device() const { return device_; }

 private:
  void Reset();
  CUcontext context_ = nullptr;
  int device_ = -1;
};

// NUMA node of a device's PCI function (/sys/bus/pci/devices/<bus id>/numa_node), -1 unknown.
int DeviceNumaNode(int device);

// Logs through kvbm's logger (library build) or stderr (the standalone GPU check).
void CudaLog(int level, const std::string& message);  // 0 error, 1 warn, 2 info, 3 debug

}  // namespace kvbm::cuda
