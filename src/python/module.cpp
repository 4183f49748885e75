// The `kvbm._core` extension module. Each binding file contributes one Bind* function; the
// Python package (python/kvbm) re-exports what users need.
#include <cstdlib>

#include <nanobind/nanobind.h>

#include "python/bindings.h"

void BindConnector(nanobind::module_& m);
void BindTransferBench(nanobind::module_& m);  // bench_bindings.cpp: data-path benchmark
void BindReplay(nanobind::module_& m);       // replay_bindings.cpp: `kvbm replay`
void BindPageConnector(nanobind::module_& m);  // connector_bindings.cpp: PageConnector (pages by key)
void BindStats(nanobind::module_& m);        // stats_bindings.cpp: worker counters, recording settings
void BindBuildInfo(nanobind::module_& m);    // build_info_bindings.cpp: `kvbm build-info`

NB_MODULE(_core, m) {
  m.doc() = "kvbm native core (C++), see include/kvbm/ for the contracts";
  m.attr("__version__") = "0.1.0";
  using namespace kvbm::python;
  // nanobind reports objects still alive when it shuts down. Registry sinks (see add_sink) can
  // legitimately keep pools alive until then, so the report is opt-in, for debugging bindings.
  const char* leaks = std::getenv("KVBM_NB_LEAK_WARNINGS");
  nanobind::set_leak_warnings(leaks != nullptr && leaks[0] != '\0' && leaks[0] != '0');
  RegisterErrorTranslator();
  BindErrorsAndIds(m);
  BindHashing(m);
  BindLayouts(m);
  BindPools(m);
  BindConfig(m);
  BindBench(m);
  BindConnector(m);
  BindTransferBench(m);
  BindReplay(m);
  BindPageConnector(m);
  BindStats(m);
  BindBuildInfo(m);
}
