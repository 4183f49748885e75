// Bindings of the native core benchmark (src/tools/core_bench.cpp).
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

void BindBench(nb::module_& m) {
  CoreBenchOptions d;
  m.def("bench_core",
        [](uint64_t num_tokens, uint32_t block_size, uint32_t passes, uint64_t pool_cycles, uint64_t match_blocks) {
          CoreBenchOptions o;
          o.num_tokens = num_tokens;
          o.block_size = block_size;
          o.passes = passes;
          o.pool_cycles = pool_cycles;
          o.match_blocks = match_blocks;
          CoreBenchResult r;
          {
            nb::gil_scoped_release release;
            r = RunCoreBench(o);
          }
          nb::dict out;
          out["hash_tokens_per_s"] = r.hash_tokens_per_s;
          out["hash_request_us"] = r.hash_request_us;
          out["hash_request_best_us"] = r.hash_request_best_us;
          out["pool_cycles_per_s"] = r.pool_cycles_per_s;
          nb::dict by_policy;
          for (const auto& [name, rate] : r.policy_cycles_per_s) by_policy[name.c_str()] = rate;
          out["policy_cycles_per_s"] = by_policy;
          out["match_8192_blocks_us"] = r.match_8192_blocks_us;
          out["match_8192_blocks_best_us"] = r.match_8192_blocks_best_us;
          out["leader_request_miss_us"] = r.leader_request_miss_us;
          out["leader_request_hit_us"] = r.leader_request_hit_us;
          out["blocks_matched"] = r.blocks_matched;
          out["blocks_stored"] = r.blocks_stored;
          out["blocks_loaded"] = r.blocks_loaded;
          nb::dict opts;
          opts["num_tokens"] = r.options.num_tokens;
          opts["block_size"] = r.options.block_size;
          opts["salt_hash"] = r.options.salt_hash;
          opts["passes"] = r.options.passes;
          opts["pool_cycles"] = r.options.pool_cycles;
          opts["pool_blocks"] = r.options.pool_blocks;
          opts["match_blocks"] = r.options.match_blocks;
          out["options"] = opts;
          return out;
        },
        "num_tokens"_a = d.num_tokens, "block_size"_a = d.block_size, "passes"_a = d.passes,
        "pool_cycles"_a = d.pool_cycles, "match_blocks"_a = d.match_blocks,
        "Runs the native core timings (medians of `passes`) and returns them as a dict.");
}

}  // namespace kvbm::python
