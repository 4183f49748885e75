#include "transfer/cuda/cuda_loader.h"

#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <utility>

#ifndef KVBM_CUDA_STANDALONE
#include "kvbm/log.h"
#endif

namespace kvbm::cuda {
namespace {

struct Loaded {
  DriverApi api{};
  bool ok = false;
  std::string error;
};

template <typename F>
bool Resolve(void* lib, const char* name, F*& out, std::string* missing) {
  out = reinterpret_cast<F*>(dlsym(lib, name));
  if (out == nullptr) {
    if (!missing->empty()) *missing += ", ";
    *missing += name;
  }
  return out != nullptr;
}

Loaded Load() {
  Loaded loaded;
  // libcuda.so.1 is the driver's soname; the unversioned name only exists with dev packages.
  void* lib = nullptr;
  for (const char* name : {"libcuda.so.1", "libcuda.so"}) {
    lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (lib != nullptr) break;
  }
  if (lib == nullptr) {
    const char* why = dlerror();
    loaded.error =
        std::string("no NVIDIA driver: libcuda.so.1 cannot be loaded (") + (why ? why : "?") + ")";
    return loaded;
  }
  // The library stays loaded for the life of the process: pinned pages and contexts refer to it.
  DriverApi& a = loaded.api;
  std::string missing;
  Resolve(lib, "cuInit", a.cuInit, &missing);
  Resolve(lib, "cuDriverGetVersion", a.cuDriverGetVersion, &missing);
  Resolve(lib, "cuDeviceGetCount", a.cuDeviceGetCount, &missing);
  Resolve(lib, "cuDeviceGet", a.cuDeviceGet, &missing);
  Resolve(lib, "cuDeviceGetAttribute", a.cuDeviceGetAttribute, &missing);
  Resolve(lib, "cuDeviceGetName", a.cuDeviceGetName, &missing);
  Resolve(lib, "cuDeviceGetPCIBusId", a.cuDeviceGetPCIBusId, &missing);
  Resolve(lib, "cuDevicePrimaryCtxRetain", a.cuDevicePrimaryCtxRetain, &missing);
  Resolve(lib, "cuDevicePrimaryCtxRelease_v2", a.cuDevicePrimaryCtxRelease, &missing);
  Resolve(lib, "cuCtxPushCurrent_v2", a.cuCtxPushCurrent, &missing);
  Resolve(lib, "cuCtxPopCurrent_v2", a.cuCtxPopCurrent, &missing);
  Resolve(lib, "cuStreamCreate", a.cuStreamCreate, &missing);
  Resolve(lib, "cuStreamDestroy_v2", a.cuStreamDestroy, &missing);
  Resolve(lib, "cuStreamSynchronize", a.cuStreamSynchronize, &missing);
  Resolve(lib, "cuEventCreate", a.cuEventCreate, &missing);
  Resolve(lib, "cuEventDestroy_v2", a.cuEventDestroy, &missing);
  Resolve(lib, "cuEventRecord", a.cuEventRecord, &missing);
  Resolve(lib, "cuEventQuery", a.cuEventQuery, &missing);
  Resolve(lib, "cuEventSynchronize", a.cuEventSynchronize, &missing);
  Resolve(lib, "cuEventElapsedTime", a.cuEventElapsedTime, &missing);
  Resolve(lib, "cuMemAlloc_v2", a.cuMemAlloc, &missing);
  Resolve(lib, "cuMemFree_v2", a.cuMemFree, &missing);
  Resolve(lib, "cuMemHostAlloc", a.cuMemHostAlloc, &missing);
  Resolve(lib, "cuMemFreeHost", a.cuMemFreeHost, &missing);
  Resolve(lib, "cuMemHostRegister_v2", a.cuMemHostRegister, &missing);
  Resolve(lib, "cuMemHostUnregister", a.cuMemHostUnregister, &missing);
  Resolve(lib, "cuMemHostGetDevicePointer_v2", a.cuMemHostGetDevicePointer, &missing);
  Resolve(lib, "cuMemcpyHtoDAsync_v2", a.cuMemcpyHtoDAsync, &missing);
  Resolve(lib, "cuMemcpyDtoHAsync_v2", a.cuMemcpyDtoHAsync, &missing);
  Resolve(lib, "cuMemcpyAsync", a.cuMemcpyAsync, &missing);
  Resolve(lib, "cuMemsetD8Async", a.cuMemsetD8Async, &missing);
  Resolve(lib, "cuModuleLoadData", a.cuModuleLoadData, &missing);
  Resolve(lib, "cuModuleUnload", a.cuModuleUnload, &missing);
  Resolve(lib, "cuModuleGetFunction", a.cuModuleGetFunction, &missing);
  Resolve(lib, "cuLaunchKernel", a.cuLaunchKernel, &missing);
  Resolve(lib, "cuGetErrorString", a.cuGetErrorString, &missing);
  if (!missing.empty()) {
    loaded.error = "libcuda.so.1 is too old or not a CUDA driver: missing " + missing;
    return loaded;
  }
  std::string optional;
  Resolve(lib, "cuMemcpyBatchAsync", a.cuMemcpyBatchAsync, &optional);

  if (CUresult r = a.cuInit(0); r != kSuccess) {
    loaded.error = "the NVIDIA driver is present but cuInit failed: " + std::to_string(r) +
                   (r == 100 ? " (no CUDA device)" : "");
    const char* s = nullptr;
    if (a.cuGetErrorString(r, &s) == kSuccess && s != nullptr) loaded.error += std::string(" ") + s;
    return loaded;
  }
  a.cuDriverGetVersion(&a.driver_version);
  if (a.cuDeviceGetCount(&a.device_count) != kSuccess || a.device_count <= 0) {
    loaded.error = "no CUDA device (the driver reports 0 devices)";
    return loaded;
  }
  loaded.ok = true;
  return loaded;
}

const Loaded& Get() {
  static const Loaded loaded = Load();
  return loaded;
}

}  // namespace

const DriverApi* Driver() { return Get().ok ? &Get().api : nullptr; }
const std::string& DriverError() { return Get().error; }

std::string ErrorText(CUresult result) {
  const char* s = nullptr;
  const DriverApi* d = Driver();
  if (d != nullptr) d->cuGetErrorString(result, &s);
  return std::string(s != nullptr ? s : "unknown CUDA error") + " (" + std::to_string(result) + ")";
}

std::string CallError(const char* what, CUresult result) {
  return std::string(what) + " failed: " + ErrorText(result);
}

ScopedContext::ScopedContext(CUcontext context) {
  const DriverApi* d = Driver();
  if (d != nullptr && context != nullptr) pushed_ = d->cuCtxPushCurrent(context) == kSuccess;
}

ScopedContext::~ScopedContext() {
  if (pushed_) {
    CUcontext popped = nullptr;
    Driver()->cuCtxPopCurrent(&popped);
  }
}

PrimaryContext PrimaryContext::Retain(int device, std::string* why) {
  PrimaryContext out;
  const DriverApi* d = Driver();
  if (d == nullptr) {
    *why = DriverError();
    return out;
  }
  if (device < 0 || device >= d->device_count) {
    *why = "CUDA device " + std::to_string(device) + " does not exist (" +
           std::to_string(d->device_count) + " visible)";
    return out;
  }
  CUdevice dev = 0;
  if (CUresult r = d->cuDeviceGet(&dev, device); r != kSuccess) {
    *why = CallError("cuDeviceGet", r);
    return out;
  }
  if (CUresult r = d->cuDevicePrimaryCtxRetain(&out.context_, dev); r != kSuccess) {
    *why = CallError("cuDevicePrimaryCtxRetain", r);
    out.context_ = nullptr;
    return out;
  }
  out.device_ = dev;
  return out;
}

PrimaryContext::PrimaryContext(PrimaryContext&& other) noexcept
    : context_(std::exchange(other.context_, nullptr)), device_(std::exchange(other.device_, -1)) {}

PrimaryContext& PrimaryContext::operator=(PrimaryContext&& other) noexcept {
  if (this != &other) {
    Reset();
    context_ = std::exchange(other.context_, nullptr);
    device_ = std::exchange(other.device_, -1);
  }
  return *this;
}

PrimaryContext::~PrimaryContext() { Reset(); }

void PrimaryContext::Reset() {
  if (context_ != nullptr) Driver()->cuDevicePrimaryCtxRelease(device_);
  context_ = nullptr;
  device_ = -1;
}

int DeviceNumaNode(int device) {
  const DriverApi* d = Driver();
  if (d == nullptr || device < 0 || device >= d->device_count) return -1;
  CUdevice dev = 0;
  char bus_id[64] = {};
  if (d->cuDeviceGet(&dev, device) != kSuccess ||
      d->cuDeviceGetPCIBusId(bus_id, sizeof(bus_id), dev) != kSuccess)
    return -1;
  // The driver writes "0000:1B:00.0"; sysfs names are lower case.
  for (char* c = bus_id; *c != '\0'; ++c)
    if (*c >= 'A' && *c <= 'F') *c = static_cast<char>(*c - 'A' + 'a');
  std::ifstream in(std::string("/sys/bus/pci/devices/") + bus_id + "/numa_node");
  int node = -1;
  if (!(in >> node)) return -1;
  return node;  // the kernel reports -1 on single-node machines
}

void CudaLog(int level, const std::string& message) {
#ifdef KVBM_CUDA_STANDALONE
  static const char* const kNames[] = {"ERROR", "WARN", "INFO", "DEBUG"};
  std::fprintf(stderr, "kvbm %s %s\n", kNames[level < 0 ? 0 : (level > 3 ? 3 : level)],
               message.c_str());
#else
  const auto lvl = static_cast<LogLevel>(level);
  if (lvl <= CurrentLogLevel()) LogLine(lvl, message);
#endif
}

}  // namespace kvbm::cuda
