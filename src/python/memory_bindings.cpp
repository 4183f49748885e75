// Bindings of the memory layer: layouts from tensor shapes.
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <fmt/format.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include "kvbm/block_pool.h"
#include "kvbm/config.h"
#include "kvbm/core_bench.h"
#include "kvbm/error.h"
#include "kvbm/layout.h"
#include "kvbm/tokens.h"
#include "python/bindings.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvbm::python {

void BindLayouts(nb::module_& m) {
  nb::class_<LayoutDims>(m, "LayoutDims")
      .def("__init__",
           [](LayoutDims* d, uint64_t num_blocks, uint64_t num_layers, uint64_t outer_dim, uint64_t page_size,
              uint64_t inner_dim, uint64_t dtype_bytes) {
             new (d) LayoutDims{num_blocks, num_layers, outer_dim, page_size, inner_dim, dtype_bytes};
           },
           "num_blocks"_a = 0, "num_layers"_a = 0, "outer_dim"_a = 0, "page_size"_a = 0, "inner_dim"_a = 0,
           "dtype_bytes"_a = 0)
      .def_rw("num_blocks", &LayoutDims::num_blocks)
      .def_rw("num_layers", &LayoutDims::num_layers)
      .def_rw("outer_dim", &LayoutDims::outer_dim)
      .def_rw("page_size", &LayoutDims::page_size)
      .def_rw("inner_dim", &LayoutDims::inner_dim)
      .def_rw("dtype_bytes", &LayoutDims::dtype_bytes)
      .def("validate", &LayoutDims::Validate)
      .def_prop_ro("chunk_bytes", &LayoutDims::chunk_bytes)
      .def_prop_ro("block_bytes", &LayoutDims::block_bytes)
      .def("__repr__", &LayoutDims::ToString);

  nb::class_<Layout>(m, "Layout", "Where the bytes of (block, layer, outer) live.")
      .def_prop_ro("dims", [](const Layout& l) { return l.dims(); })
      .def_prop_ro("kind", [](const Layout& l) {
        return l.kind() == LayoutKind::kFullyContiguous ? "fully-contiguous" : "layer-separate";
      })
      .def_prop_ro("num_allocations", &Layout::num_allocations)
      .def("allocation_bytes", &Layout::allocation_bytes, "allocation"_a)
      .def("chunk",
           [](const Layout& l, uint64_t block, uint64_t layer, uint64_t outer) {
             MemoryRange r = l.Chunk(block, layer, outer);
             return std::make_tuple(r.allocation, r.offset, r.length);
           },
           "block"_a, "layer"_a, "outer"_a, "(allocation, offset, length) of one (block, layer, outer).")
      .def_prop_ro("block_is_contiguous", &Layout::block_is_contiguous)
      .def_prop_ro("block_stride", &Layout::block_stride)
      .def("describe", &Layout::Describe)
      .def("__repr__", &Layout::Describe);

  nb::class_<FullyContiguousLayout, Layout>(m, "FullyContiguousLayout")
      .def(nb::init<const LayoutDims&, uint64_t>(), "dims"_a, "block_alignment"_a = 1)
      .def_prop_ro("block_alignment", &FullyContiguousLayout::block_alignment);
  nb::class_<LayerSeparateLayout, Layout>(m, "LayerSeparateLayout")
      .def(nb::init<const LayoutDims&, bool>(), "dims"_a, "outer_first"_a)
      .def_prop_ro("outer_first", &LayerSeparateLayout::outer_first);

  m.def("layout_from_tensor_shapes",
        [](const std::vector<std::tuple<std::vector<int64_t>, std::vector<int64_t>, uint64_t>>& layers,
           uint64_t num_blocks, uint64_t page_size) {
          std::vector<TensorShape> shapes;
          shapes.reserve(layers.size());
          for (const auto& [shape, strides, dtype_bytes] : layers) shapes.push_back({shape, strides, dtype_bytes});
          return ThrowIfError(LayoutFromTensorShapes(shapes, num_blocks, page_size));
        },
        "layers"_a, "num_blocks"_a, "page_size"_a,
        "The device-tier layout from the engine's per-layer (shape, strides, dtype_bytes).");
}


}  // namespace kvbm::python
