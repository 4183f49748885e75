// The `kvbm._core` extension module. Each binding file contributes one Bind* function; the
// Python package (python/kvbm) re-exports what users need.
#include <nanobind/nanobind.h>

void BindCore(nanobind::module_& m);       // core_bindings.cpp: hashing, layouts, pools, config
void BindConnector(nanobind::module_& m);
void BindTransferBench(nanobind::module_& m);  // bench_bindings.cpp: data-path benchmark
void BindReplay(nanobind::module_& m);       // replay_bindings.cpp: `kvbm replay`
void BindStats(nanobind::module_& m);        // stats_bindings.cpp: worker counters, recording settings
void BindBuildInfo(nanobind::module_& m);    // build_info_bindings.cpp: `kvbm build-info`

NB_MODULE(_core, m) {
  m.doc() = "kvbm native core (C++), see include/kvbm/ for the contracts";
  m.attr("__version__") = "0.1.0";
  BindCore(m);
  BindConnector(m);
  BindTransferBench(m);
  BindReplay(m);
  BindStats(m);
  BindBuildInfo(m);
}
