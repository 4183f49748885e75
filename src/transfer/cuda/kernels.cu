// Gather/scatter copy kernel of the CUDA backend. Compiled by nvcc at build time into a fatbin
// (sm_80, sm_90 and compute_90 PTX), embedded in libkvbm and loaded with cuModuleLoadData, so
// the library never links against CUDA. No CUDA headers beyond the compiler's built-ins.
//
// One descriptor = (src, dst, bytes), the layout of kvbm::cuda::CopyDescriptor. Thread blocks
// take descriptors in a grid-stride loop; the host splits long ranges into pieces so that work
// spreads over the grid. Host-side pointers are device-mapped pinned memory, so the same kernel
// serves device -> host (posted PCIe writes) and host -> device (PCIe reads, kept in flight by
// issuing four 16-byte loads per thread before the stores).

struct KvbmCopyDescriptor {
  unsigned long long src;
  unsigned long long dst;
  unsigned long long bytes;
};

extern "C" __global__ void __launch_bounds__(1024)
kvbm_copy_descriptors(const KvbmCopyDescriptor* __restrict__ descriptors, unsigned long long count) {
  for (unsigned long long i = blockIdx.x; i < count; i += gridDim.x) {
    const KvbmCopyDescriptor d = descriptors[i];
    const unsigned long long stride = blockDim.x;
    if (((d.src | d.dst | d.bytes) & 15ull) == 0) {
      const uint4* s = reinterpret_cast<const uint4*>(d.src);
      uint4* t = reinterpret_cast<uint4*>(d.dst);
      const unsigned long long n = d.bytes >> 4;
      unsigned long long j = threadIdx.x;
      for (; j + 3 * stride < n; j += 4 * stride) {
        const uint4 a = s[j];
        const uint4 b = s[j + stride];
        const uint4 c = s[j + 2 * stride];
        const uint4 e = s[j + 3 * stride];
        t[j] = a;
        t[j + stride] = b;
        t[j + 2 * stride] = c;
        t[j + 3 * stride] = e;
      }
      for (; j < n; j += stride) t[j] = s[j];
    } else if (((d.src | d.dst | d.bytes) & 7ull) == 0) {
      const unsigned long long* s = reinterpret_cast<const unsigned long long*>(d.src);
      unsigned long long* t = reinterpret_cast<unsigned long long*>(d.dst);
      const unsigned long long n = d.bytes >> 3;
      for (unsigned long long j = threadIdx.x; j < n; j += stride) t[j] = s[j];
    } else {
      const unsigned char* s = reinterpret_cast<const unsigned char*>(d.src);
      unsigned char* t = reinterpret_cast<unsigned char*>(d.dst);
      for (unsigned long long j = threadIdx.x; j < d.bytes; j += stride) t[j] = s[j];
    }
  }
}
