#include "transfer/cuda/copy_plan.h"

#include <algorithm>
#include <string>

namespace kvbm::cuda {
namespace {

Status CheckMemory(const TierMemory& m, const char* side) {
  if (m.layout == nullptr)
    return MakeError(ErrorCode::kInvalidArgument, std::string(side) + " memory has no layout");
  if (m.bases.size() != m.layout->num_allocations())
    return MakeError(ErrorCode::kInvalidArgument,
                     std::string(side) + " memory has " + std::to_string(m.bases.size()) +
                         " base pointers for " + std::to_string(m.layout->num_allocations()) +
                         " allocations of " + m.layout->Describe());
  for (uint8_t* base : m.bases)
    if (base == nullptr)
      return MakeError(ErrorCode::kInvalidArgument, std::string(side) + " memory has a null base");
  return {};
}

uint64_t Address(const TierMemory& m, const MemoryRange& r) {
  return reinterpret_cast<uint64_t>(m.bases[r.allocation]) + r.offset;
}

}  // namespace

Result<std::vector<CopyDescriptor>> BuildCopyPlan(const TierMemory& src, const TierMemory& dst,
                                                  std::span<const BlockCopy> copies) {
  if (auto s = CheckMemory(src, "source"); !s) return std::unexpected(s.error());
  if (auto s = CheckMemory(dst, "destination"); !s) return std::unexpected(s.error());
  const LayoutDims& a = src.layout->dims();
  const LayoutDims& b = dst.layout->dims();
  if (a.num_layers != b.num_layers || a.outer_dim != b.outer_dim ||
      a.chunk_bytes() != b.chunk_bytes())
    return MakeError(
        ErrorCode::kInvalidArgument,
        "layouts do not match: " + src.layout->Describe() + " vs " + dst.layout->Describe());
  for (const BlockCopy& c : copies)
    if (c.src >= a.num_blocks || c.dst >= b.num_blocks)
      return MakeError(ErrorCode::kInvalidArgument,
                       "block copy " + std::to_string(c.src) + " -> " + std::to_string(c.dst) +
                           " is out of range (" + std::to_string(a.num_blocks) + " -> " +
                           std::to_string(b.num_blocks) + " blocks)");

  std::vector<CopyDescriptor> plan;
  const bool whole_blocks = src.layout->block_is_contiguous() && dst.layout->block_is_contiguous();
  if (whole_blocks) {
    plan.reserve(copies.size());
    for (const BlockCopy& c : copies)
      plan.push_back({Address(src, src.layout->Chunk(c.src, 0, 0)),
                      Address(dst, dst.layout->Chunk(c.dst, 0, 0)), a.block_bytes()});
  } else {
    plan.reserve(copies.size() * a.num_layers * a.outer_dim);
    for (const BlockCopy& c : copies)
      for (uint64_t l = 0; l < a.num_layers; ++l)
        for (uint64_t o = 0; o < a.outer_dim; ++o)
          plan.push_back({Address(src, src.layout->Chunk(c.src, l, o)),
                          Address(dst, dst.layout->Chunk(c.dst, l, o)), a.chunk_bytes()});
  }

  // Two copies into the same bytes would make the result depend on the copy engine's order.
  std::sort(plan.begin(), plan.end(),
            [](const CopyDescriptor& x, const CopyDescriptor& y) { return x.dst < y.dst; });
  for (size_t i = 1; i < plan.size(); ++i)
    if (plan[i - 1].dst + plan[i - 1].bytes > plan[i].dst)
      return MakeError(ErrorCode::kInvalidArgument,
                       "two block copies write the same destination bytes");

  // Sorted by source, a run that continues on both sides becomes one descriptor: one DMA
  // instead of many for neighbouring blocks, and whole-block runs for matching layouts.
  std::sort(plan.begin(), plan.end(),
            [](const CopyDescriptor& x, const CopyDescriptor& y) { return x.src < y.src; });
  std::vector<CopyDescriptor> merged;
  merged.reserve(plan.size());
  for (const CopyDescriptor& d : plan) {
    if (!merged.empty()) {
      CopyDescriptor& last = merged.back();
      if (last.src + last.bytes == d.src && last.dst + last.bytes == d.dst) {
        last.bytes += d.bytes;
        continue;
      }
    }
    merged.push_back(d);
  }
  return merged;
}

std::vector<CopyDescriptor> SplitDescriptors(std::span<const CopyDescriptor> plan,
                                             uint64_t max_bytes) {
  max_bytes = std::max<uint64_t>(16, max_bytes / 16 * 16);
  std::vector<CopyDescriptor> out;
  out.reserve(plan.size());
  for (const CopyDescriptor& d : plan)
    for (uint64_t off = 0; off < d.bytes; off += max_bytes)
      out.push_back({d.src + off, d.dst + off, std::min(max_bytes, d.bytes - off)});
  return out;
}

uint64_t PlanBytes(std::span<const CopyDescriptor> plan) {
  uint64_t total = 0;
  for (const CopyDescriptor& d : plan) total += d.bytes;
  return total;
}

}  // namespace kvbm::cuda
