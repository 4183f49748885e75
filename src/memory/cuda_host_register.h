// Private: page-locks host memory through the CUDA runtime when one can be loaded at run time
// (dlopen of libcudart), so kvbm never links against CUDA. A placeholder for the full CUDA layer,
// which may replace it. Thread-safe: the library is loaded once, on first use.
#pragma once

#include <cstddef>
#include <string>

namespace kvbm::cuda {

// True when `bytes` at `ptr` are now pinned; otherwise `why` says why not (no runtime, or the
// runtime's error string) and the memory stays plain.
bool HostRegister(void* ptr, size_t bytes, std::string* why);
// REQUIRES: `ptr` was pinned by HostRegister.
void HostUnregister(void* ptr);

}  // namespace kvbm::cuda
