// Layouts: where the bytes of (block, layer, outer) live inside a tier's allocations.
//
// Block bytes = num_layers * outer_dim * page_size * inner_dim * dtype_bytes. A "chunk" is the
// bytes of one (block, layer, outer): page_size * inner_dim * dtype_bytes, always contiguous.
//
// - FullyContiguous: one allocation, [block][layer][outer][chunk], each block optionally padded
//   to `block_alignment` bytes (4096 for the disk tier). Host and disk tiers use it.
// - LayerSeparate: one allocation per layer, either [outer][block][chunk] (outer first, e.g.
//   FlashAttention's (2, num_blocks, ...)) or [block][outer][chunk] (blocks first, FlashInfer
//   and vLLM's CPU backend). The device tier follows the engine.
//
// Layouts are immutable values after construction; share them across threads freely.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kvbm/error.h"

namespace kvbm {

struct LayoutDims {
  uint64_t num_blocks = 0;
  uint64_t num_layers = 0;
  uint64_t outer_dim = 0;  // 2 (K and V) or 1 (MLA, or K and V packed in one chunk)
  uint64_t page_size = 0;  // tokens per block
  uint64_t inner_dim = 0;  // kv_heads * head_size (elements per token per outer)
  uint64_t dtype_bytes = 0;

  // Throws ConfigError naming the zero dimension or the overflowing product.
  void Validate() const;
  uint64_t chunk_bytes() const { return page_size * inner_dim * dtype_bytes; }
  uint64_t block_bytes() const { return num_layers * outer_dim * chunk_bytes(); }
  std::string ToString() const;
};

// A byte range inside allocation `allocation` of a layout.
struct MemoryRange {
  uint32_t allocation = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
};

enum class LayoutKind { kFullyContiguous, kLayerSeparate };

class Layout {
 public:
  virtual ~Layout() = default;
  const LayoutDims& dims() const { return dims_; }
  virtual LayoutKind kind() const = 0;
  virtual uint32_t num_allocations() const = 0;
  virtual uint64_t allocation_bytes(uint32_t allocation) const = 0;
  // REQUIRES: block < num_blocks, layer < num_layers, outer < outer_dim (else InvariantError).
  virtual MemoryRange Chunk(uint64_t block, uint64_t layer, uint64_t outer) const = 0;
  // True when each block's bytes are one contiguous range (FullyContiguous).
  virtual bool block_is_contiguous() const = 0;
  // Bytes between consecutive blocks in a FullyContiguous layout (block_bytes padded).
  virtual uint64_t block_stride() const = 0;
  virtual std::string Describe() const = 0;

 protected:
  explicit Layout(const LayoutDims& dims) : dims_(dims) {}
  void CheckIndex(uint64_t block, uint64_t layer, uint64_t outer) const;
  LayoutDims dims_;
};

class FullyContiguousLayout final : public Layout {
 public:
  // Throws ConfigError on bad dims or an alignment that is not a power of two.
  FullyContiguousLayout(const LayoutDims& dims, uint64_t block_alignment = 1);
  LayoutKind kind() const override { return LayoutKind::kFullyContiguous; }
  uint32_t num_allocations() const override { return 1; }
  uint64_t allocation_bytes(uint32_t allocation) const override;
  MemoryRange Chunk(uint64_t block, uint64_t layer, uint64_t outer) const override;
  bool block_is_contiguous() const override { return true; }
  uint64_t block_stride() const override { return block_stride_; }
  uint64_t block_alignment() const { return block_alignment_; }
  std::string Describe() const override;

 private:
  uint64_t block_alignment_;
  uint64_t block_stride_;
};

class LayerSeparateLayout final : public Layout {
 public:
  // outer_first: [outer][block][chunk] per layer; otherwise [block][outer][chunk].
  LayerSeparateLayout(const LayoutDims& dims, bool outer_first);
  LayoutKind kind() const override { return LayoutKind::kLayerSeparate; }
  uint32_t num_allocations() const override { return static_cast<uint32_t>(dims_.num_layers); }
  uint64_t allocation_bytes(uint32_t allocation) const override;
  MemoryRange Chunk(uint64_t block, uint64_t layer, uint64_t outer) const override;
  bool block_is_contiguous() const override { return false; }
  uint64_t block_stride() const override;
  bool outer_first() const { return outer_first_; }
  std::string Describe() const override;

 private:
  bool outer_first_;
};

// One engine KV tensor as the engine describes it: shape and strides in elements.
struct TensorShape {
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;
  uint64_t dtype_bytes = 0;
};

// Builds the device-tier layout from the engine's per-layer tensors. The block dimension is
// the one of size `num_blocks`; a dimension of size 2 before it makes the layout outer-first;
// everything after the block (and outer) dimension must be contiguous and forms the chunk.
// Errors name the layer and the dimension that did not fit.
Result<std::unique_ptr<LayerSeparateLayout>> LayoutFromTensorShapes(
    std::span<const TensorShape> layers, uint64_t num_blocks, uint64_t page_size);

// Builds the device-tier layout from ONE tensor that holds every layer, blocks first:
// [num_blocks, num_layers, outer (1 or 2), chunk...] dense row-major (TensorRT-LLM's primary
// pool: [blocks, layers, kv_factor, heads * tokens_per_block * head_dim]). The result is
// FullyContiguous with no padding, so a block moves as one range. Errors name the dimension.
Result<std::unique_ptr<FullyContiguousLayout>> LayoutFromPoolTensor(const TensorShape& pool, uint64_t num_blocks,
                                                                    uint64_t page_size);

}  // namespace kvbm
