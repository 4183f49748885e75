#include "kvbm/layout.h"

#include <fmt/format.h>
#include <limits>
#include <optional>

namespace kvbm {
namespace {

bool MulOverflows(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_mul_overflow(a, b, out); }

}  // namespace

void LayoutDims::Validate() const {
  const std::pair<const char*, uint64_t> fields[] = {
      {"num_blocks", num_blocks}, {"num_layers", num_layers}, {"outer_dim", outer_dim},
      {"page_size", page_size},   {"inner_dim", inner_dim},   {"dtype_bytes", dtype_bytes}};
  for (auto& [name, value] : fields)
    if (value == 0) throw ConfigError(fmt::format("layout dimension {} must be > 0 ({})", name, ToString()));
  uint64_t p = 1;
  for (auto& [name, value] : fields)
    if (MulOverflows(p, value, &p) || p > (uint64_t{1} << 60))
      throw ConfigError(fmt::format("layout dimensions overflow 2^60 bytes at {} ({})", name, ToString()));
}

std::string LayoutDims::ToString() const {
  return fmt::format("blocks={} layers={} outer={} page={} inner={} dtype_bytes={}", num_blocks,
                     num_layers, outer_dim, page_size, inner_dim, dtype_bytes);
}

void Layout::CheckIndex(uint64_t block, uint64_t layer, uint64_t outer) const {
  if (block >= dims_.num_blocks || layer >= dims_.num_layers || outer >= dims_.outer_dim)
    throw InvariantError(fmt::format("layout index (block {}, layer {}, outer {}) out of range ({})",
                                     block, layer, outer, dims_.ToString()));
}

FullyContiguousLayout::FullyContiguousLayout(const LayoutDims& dims, uint64_t block_alignment)
    : Layout(dims), block_alignment_(block_alignment) {
  dims.Validate();
  if (block_alignment == 0 || (block_alignment & (block_alignment - 1)) != 0)
    throw ConfigError(fmt::format("block alignment {} is not a power of two", block_alignment));
  uint64_t bytes = dims.block_bytes();
  block_stride_ = (bytes + block_alignment - 1) / block_alignment * block_alignment;
  uint64_t total;
  if (MulOverflows(block_stride_, dims.num_blocks, &total))
    throw ConfigError("fully contiguous layout size overflows 64 bits");
}

uint64_t FullyContiguousLayout::allocation_bytes(uint32_t allocation) const {
  Check(allocation == 0, "FullyContiguousLayout has one allocation");
  return block_stride_ * dims_.num_blocks;
}

MemoryRange FullyContiguousLayout::Chunk(uint64_t block, uint64_t layer, uint64_t outer) const {
  CheckIndex(block, layer, outer);
  uint64_t chunk = dims_.chunk_bytes();
  return {0, block * block_stride_ + (layer * dims_.outer_dim + outer) * chunk, chunk};
}

std::string FullyContiguousLayout::Describe() const {
  return fmt::format("FullyContiguous({}, align={}, stride={})", dims_.ToString(), block_alignment_,
                     block_stride_);
}

LayerSeparateLayout::LayerSeparateLayout(const LayoutDims& dims, bool outer_first)
    : Layout(dims), outer_first_(outer_first) {
  dims.Validate();
}

uint64_t LayerSeparateLayout::allocation_bytes(uint32_t allocation) const {
  Check(allocation < dims_.num_layers, "LayerSeparateLayout allocation out of range");
  return dims_.num_blocks * dims_.outer_dim * dims_.chunk_bytes();
}

uint64_t LayerSeparateLayout::block_stride() const {
  return outer_first_ ? dims_.chunk_bytes() : dims_.outer_dim * dims_.chunk_bytes();
}

MemoryRange LayerSeparateLayout::Chunk(uint64_t block, uint64_t layer, uint64_t outer) const {
  CheckIndex(block, layer, outer);
  uint64_t chunk = dims_.chunk_bytes();
  uint64_t index = outer_first_ ? outer * dims_.num_blocks + block : block * dims_.outer_dim + outer;
  return {static_cast<uint32_t>(layer), index * chunk, chunk};
}

std::string LayerSeparateLayout::Describe() const {
  return fmt::format("LayerSeparate({}, {})", dims_.ToString(),
                     outer_first_ ? "outer-first" : "block-first");
}

Result<std::unique_ptr<LayerSeparateLayout>> LayoutFromTensorShapes(std::span<const TensorShape> layers,
                                                                    uint64_t num_blocks,
                                                                    uint64_t page_size) {
  if (layers.empty()) return MakeError(ErrorCode::kInvalidArgument, "no KV tensors given");
  if (num_blocks == 0 || page_size == 0)
    return MakeError(ErrorCode::kInvalidArgument, "num_blocks and page_size must be > 0");
  std::optional<LayoutDims> first;
  std::optional<bool> first_outer_first;
  for (size_t l = 0; l < layers.size(); ++l) {
    const TensorShape& t = layers[l];
    auto err = [&](const std::string& why) {
      std::string shape;
      for (auto d : t.shape) shape += fmt::format("{}{}", shape.empty() ? "" : ",", d);
      return MakeError(ErrorCode::kInvalidArgument, fmt::format("KV tensor of layer {} (shape [{}]): {}", l, shape, why));
    };
    if (t.shape.size() != t.strides.size()) return err("shape and strides differ in rank");
    if (t.dtype_bytes == 0) return err("dtype_bytes is 0");
    for (auto d : t.shape)
      if (d <= 0) return err("has a zero or negative dimension");
    size_t bdim;
    bool outer_first = false;
    if (t.shape.size() >= 2 && t.shape[0] == 2 && static_cast<uint64_t>(t.shape[1]) == num_blocks &&
        static_cast<uint64_t>(t.shape[0]) != num_blocks) {
      bdim = 1;
      outer_first = true;
    } else if (static_cast<uint64_t>(t.shape[0]) == num_blocks) {
      bdim = 0;
    } else {
      return err(fmt::format("no dimension 0 or 1 of size num_blocks={}", num_blocks));
    }
    uint64_t outer = outer_first ? 2 : 1;
    size_t rest = bdim + 1;
    // Blocks first with an explicit K/V dimension: [num_blocks, 2, ...].
    if (!outer_first && t.shape.size() > 2 && t.shape[1] == 2) {
      outer = 2;
      rest = 2;
    }
    // Everything after `rest - 1` must be dense row-major: it is the chunk.
    int64_t expect = 1;
    for (size_t d = t.shape.size(); d-- > rest;) {
      if (t.strides[d] != expect) return err(fmt::format("dimension {} is not contiguous (stride {}, expected {})", d, t.strides[d], expect));
      expect *= t.shape[d];
    }
    uint64_t chunk_elems = static_cast<uint64_t>(expect);
    if (chunk_elems % page_size != 0)
      return err(fmt::format("{} elements per block are not a multiple of page_size {}", chunk_elems, page_size));
    // The block and outer strides must match the dense layout the LayerSeparate model assumes.
    int64_t block_stride = t.strides[bdim];
    int64_t want_block_stride = outer_first ? expect : expect * static_cast<int64_t>(outer);
    if (block_stride != want_block_stride)
      return err(fmt::format("block dimension stride {} is not {} (padded or non-dense tensor)", block_stride, want_block_stride));
    if (outer == 2) {
      size_t odim = outer_first ? 0 : 1;
      int64_t want = outer_first ? expect * static_cast<int64_t>(num_blocks) : expect;
      if (t.strides[odim] != want) return err(fmt::format("K/V dimension stride {} is not {}", t.strides[odim], want));
    }
    LayoutDims dims{num_blocks, layers.size(), outer, page_size, chunk_elems / page_size, t.dtype_bytes};
    if (!first) {
      first = dims;
      first_outer_first = outer_first;
    } else if (dims.outer_dim != first->outer_dim || dims.inner_dim != first->inner_dim ||
               dims.dtype_bytes != first->dtype_bytes || outer_first != *first_outer_first) {
      return err(fmt::format("differs from layer 0 ({})", first->ToString()));
    }
  }
  try {
    return std::make_unique<LayerSeparateLayout>(*first, *first_outer_first);
  } catch (const ConfigError& e) {
    return MakeError(ErrorCode::kInvalidArgument, e.what());
  }
}

Result<std::unique_ptr<FullyContiguousLayout>> LayoutFromPoolTensor(const TensorShape& t, uint64_t num_blocks,
                                                                    uint64_t page_size) {
  auto err = [&](const std::string& why) {
    std::string shape;
    for (auto d : t.shape) shape += fmt::format("{}{}", shape.empty() ? "" : ",", d);
    return MakeError(ErrorCode::kInvalidArgument, fmt::format("KV pool tensor (shape [{}]): {}", shape, why));
  };
  if (num_blocks == 0 || page_size == 0) return err("num_blocks and page_size must be > 0");
  if (t.shape.size() != t.strides.size()) return err("shape and strides differ in rank");
  if (t.shape.size() < 4) return err("expected [num_blocks, num_layers, kv_factor, ...] (at least 4 dimensions)");
  if (t.dtype_bytes == 0) return err("dtype_bytes is 0");
  for (auto d : t.shape)
    if (d <= 0) return err("has a zero or negative dimension");
  if (static_cast<uint64_t>(t.shape[0]) != num_blocks)
    return err(fmt::format("dimension 0 is not num_blocks={}", num_blocks));
  if (t.shape[2] != 1 && t.shape[2] != 2) return err(fmt::format("dimension 2 (kv_factor) is {}, not 1 or 2", t.shape[2]));
  // The whole tensor must be dense row-major: then block b, layer l, outer o is one chunk.
  int64_t expect = 1;
  for (size_t d = t.shape.size(); d-- > 0;) {
    if (t.strides[d] != expect)
      return err(fmt::format("dimension {} is not dense (stride {}, expected {})", d, t.strides[d], expect));
    expect *= t.shape[d];
  }
  uint64_t chunk_elems = 1;
  for (size_t d = 3; d < t.shape.size(); ++d) chunk_elems *= static_cast<uint64_t>(t.shape[d]);
  if (chunk_elems % page_size != 0)
    return err(fmt::format("{} elements per (block, layer, kv) are not a multiple of page_size {}", chunk_elems, page_size));
  LayoutDims dims{num_blocks, static_cast<uint64_t>(t.shape[1]), static_cast<uint64_t>(t.shape[2]), page_size,
                  chunk_elems / page_size, t.dtype_bytes};
  try {
    return std::make_unique<FullyContiguousLayout>(dims, 1);
  } catch (const ConfigError& e) {
    return err(e.what());
  }
}

}  // namespace kvbm
