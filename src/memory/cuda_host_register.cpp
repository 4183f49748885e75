#include "memory/cuda_host_register.h"

#include <dlfcn.h>
#include <fmt/format.h>

namespace kvbm::cuda {
namespace {

// The three entry points we need, with the runtime's C signatures (cudaError_t is an int enum).
struct Runtime {
  int (*host_register)(void*, size_t, unsigned) = nullptr;
  int (*host_unregister)(void*) = nullptr;
  const char* (*error_string)(int) = nullptr;
  std::string load_error;
};

// Loaded once and never closed: pinned pages must be unregistered through the same library.
const Runtime& LoadRuntime() {
  static const Runtime runtime = [] {
    Runtime r;
    void* lib = nullptr;
    for (const char* name : {"libcudart.so", "libcudart.so.13", "libcudart.so.12",
                             "libcudart.so.11.0", "libcudart.so.11"}) {
      lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (lib != nullptr) break;
    }
    if (lib == nullptr) {
      r.load_error = "no CUDA runtime (libcudart.so) could be loaded";
      return r;
    }
    r.host_register =
        reinterpret_cast<int (*)(void*, size_t, unsigned)>(dlsym(lib, "cudaHostRegister"));
    r.host_unregister = reinterpret_cast<int (*)(void*)>(dlsym(lib, "cudaHostUnregister"));
    r.error_string = reinterpret_cast<const char* (*)(int)>(dlsym(lib, "cudaGetErrorString"));
    if (r.host_register == nullptr || r.host_unregister == nullptr) {
      r.host_register = nullptr;
      r.load_error = "libcudart.so lacks cudaHostRegister/cudaHostUnregister";
    }
    return r;
  }();
  return runtime;
}

}  // namespace

bool HostRegister(void* ptr, size_t bytes, std::string* why) {
  const Runtime& rt = LoadRuntime();
  if (rt.host_register == nullptr) {
    *why = rt.load_error;
    return false;
  }
  // cudaHostRegisterPortable (1): pinned for every CUDA context, not just the current one;
  // cudaHostRegisterMapped (2): also mapped into the device address space, so the CUDA
  // backend's gather/scatter kernel can read and write G2 directly (src/transfer/cuda/).
  constexpr unsigned kPortableMapped = 1 | 2;
  int err = rt.host_register(ptr, bytes, kPortableMapped);
  if (err == 0) return true;
  *why = fmt::format("cudaHostRegister failed: {} ({})",
                     rt.error_string ? rt.error_string(err) : "?", err);
  return false;
}

void HostUnregister(void* ptr) {
  const Runtime& rt = LoadRuntime();
  if (rt.host_unregister != nullptr) rt.host_unregister(ptr);
}

}  // namespace kvbm::cuda
