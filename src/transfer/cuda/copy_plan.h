// Private: turns a list of block copies between two memory layouts into (src, dst, bytes)
// copy descriptors, merging ranges that are adjacent on both sides. A pure function of the
// layouts and base addresses — no CUDA — so it is unit-tested on CPU pointers and shared by the
// DMA path (one copy per descriptor) and the gather/scatter kernel.
//
// Thread safety: stateless; call from any thread.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kvbm/error.h"
#include "kvbm/transfer.h"

namespace kvbm::cuda {

// Binary layout shared with kernels.cu (three little-endian u64).
struct CopyDescriptor {
  uint64_t src = 0;
  uint64_t dst = 0;
  uint64_t bytes = 0;
  friend bool operator==(const CopyDescriptor&, const CopyDescriptor&) = default;
};
static_assert(sizeof(CopyDescriptor) == 24);

// Descriptors that move every chunk of `copies` from `src` to `dst`, sorted by source address,
// with ranges that continue each other on both sides merged into one. Padding between blocks
// of a FullyContiguous layout is never copied.
// kInvalidArgument: missing layout or base, layouts whose dims differ (other than num_blocks),
// a block index out of range, or two copies that write overlapping destination bytes.
Result<std::vector<CopyDescriptor>> BuildCopyPlan(const TierMemory& src, const TierMemory& dst,
                                                  std::span<const BlockCopy> copies);

// Splits descriptors longer than `max_bytes` (a multiple of 16, so alignment is kept) into
// pieces, so that the kernel spreads one large chunk across many thread blocks.
std::vector<CopyDescriptor> SplitDescriptors(std::span<const CopyDescriptor> plan,
                                             uint64_t max_bytes);

uint64_t PlanBytes(std::span<const CopyDescriptor> plan);

}  // namespace kvbm::cuda
