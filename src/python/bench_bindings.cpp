// Native benchmarks of the data path, called by `kvbm bench transfer`.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "bindings.h"
#include "kvbm/transfer_bench.h"

namespace nb = nanobind;
using namespace nb::literals;

void BindTransferBench(nb::module_& m) {
  m.def(
      "bench_transfer",
      [](uint64_t block_bytes, uint64_t num_blocks, uint32_t passes, const std::string& disk_dir) {
        kvbm::TransferBenchOptions o;
        o.block_bytes = block_bytes;
        o.num_blocks = num_blocks;
        o.passes = passes;
        o.disk_dir = disk_dir;
        kvbm::Result<kvbm::TransferBenchResult> r = [&] {
          nb::gil_scoped_release release;
          return kvbm::RunTransferBench(o);
        }();
        auto v = kvbm::python::ThrowIfError(std::move(r));
        nb::dict d;
        d["bytes"] = v.bytes;
        d["memcpy_gbps"] = v.memcpy_gbps;
        d["g1_to_g2_gbps"] = v.g1_to_g2_gbps;
        d["g2_to_g1_gbps"] = v.g2_to_g1_gbps;
        d["g2_to_g3_gbps"] = v.g2_to_g3_gbps;
        d["g3_to_g2_gbps"] = v.g3_to_g2_gbps;
        d["io_queue"] = v.io_queue;
        d["mismatched_blocks"] = v.mismatched_blocks;
        return d;
      },
      "block_bytes"_a, "num_blocks"_a, "passes"_a = 3, "disk_dir"_a = "/tmp/");
}
