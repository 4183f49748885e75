// Bindings of the common layer: error classes and ids, the configuration (KvbmConfig).
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

void BindErrorsAndIds(nb::module_& m) {
  nb::enum_<TierId>(m, "Tier", "Tiers numbered as in the reference: G1 device .. G4 remote.")
      .value("DEVICE", TierId::kDevice)
      .value("HOST", TierId::kHost)
      .value("DISK", TierId::kDisk)
      .value("REMOTE", TierId::kRemote);
  m.def("error_class_name", [](const std::string& code_name) -> std::string {
    for (ErrorCode c : {ErrorCode::kInvalidArgument, ErrorCode::kNotFound, ErrorCode::kResourceExhausted,
                        ErrorCode::kIoError, ErrorCode::kCorrupt, ErrorCode::kTimeout, ErrorCode::kUnavailable,
                        ErrorCode::kCancelled, ErrorCode::kFailedPrecondition, ErrorCode::kInternal})
      if (ErrorCodeName(c) == code_name) return PythonClassName(c);
    throw StatusException(Error(ErrorCode::kNotFound, fmt::format("no error code '{}'", code_name)));
  }, "code"_a, "The kvbm.errors class raised for an ErrorCode name (e.g. 'ResourceExhausted').");
  m.def("_raise_error", [](const std::string& code_name, const std::string& message) {
    for (ErrorCode c : {ErrorCode::kInvalidArgument, ErrorCode::kNotFound, ErrorCode::kResourceExhausted,
                        ErrorCode::kIoError, ErrorCode::kCorrupt, ErrorCode::kTimeout, ErrorCode::kUnavailable,
                        ErrorCode::kCancelled, ErrorCode::kFailedPrecondition, ErrorCode::kInternal})
      if (ErrorCodeName(c) == code_name) throw StatusException(Error(c, message));
    if (code_name == "Config") throw ConfigError(message);
    if (code_name == "Invariant") throw InvariantError(message);
    throw StatusException(Error(ErrorCode::kNotFound, fmt::format("no error code '{}'", code_name)));
  }, "code"_a, "message"_a, "Raises the error a C++ failure with this code raises (for tests).");
}


void BindConfig(nb::module_& m) {
  nb::class_<KvbmConfig>(m, "KvbmConfig", "Every DYN_KVBM_* setting, parsed and validated.")
      .def_static("from_environment", []() { return KvbmConfig::FromEnvironment(); },
                  "Reads os.environ; ConfigError names a variable that does not parse.")
      .def_static("from_map", &KvbmConfig::FromMap, "env"_a)
      .def("validate", &KvbmConfig::Validate)
      .def("host_blocks", &KvbmConfig::HostBlocks, "bytes_per_block"_a)
      .def("disk_blocks", &KvbmConfig::DiskBlocks, "bytes_per_block"_a)
      .def_ro("cpu_cache_gb", &KvbmConfig::cpu_cache_gb)
      .def_ro("cpu_cache_num_blocks", &KvbmConfig::cpu_cache_num_blocks)
      .def_ro("disk_cache_gb", &KvbmConfig::disk_cache_gb)
      .def_ro("disk_cache_num_blocks", &KvbmConfig::disk_cache_num_blocks)
      .def_ro("disk_cache_dir", &KvbmConfig::disk_cache_dir)
      .def_ro("disk_zerofill_fallback", &KvbmConfig::disk_zerofill_fallback)
      .def_ro("disk_disable_o_direct", &KvbmConfig::disk_disable_o_direct)
      .def_prop_ro("disk_allocator",
                   [](const KvbmConfig& c) {
                     return c.disk_allocator == DiskAllocatorType::kOpenDirect ? "open-direct" : "default";
                   })
      .def_ro("disable_disk_offload_filter", &KvbmConfig::disable_disk_offload_filter)
      .def_ro("host_offload_prefix_min_priority", &KvbmConfig::host_offload_prefix_min_priority)
      .def_ro("max_concurrent_transfers", &KvbmConfig::max_concurrent_transfers)
      .def_ro("max_transfer_batch_size", &KvbmConfig::max_transfer_batch_size)
      .def_ro("leader_worker_init_timeout_secs", &KvbmConfig::leader_worker_init_timeout_secs)
      .def_ro("leader_zmq_host", &KvbmConfig::leader_zmq_host)
      .def_ro("leader_zmq_pub_port", &KvbmConfig::leader_zmq_pub_port)
      .def_ro("leader_zmq_ack_port", &KvbmConfig::leader_zmq_ack_port)
      .def_ro("metrics", &KvbmConfig::metrics)
      .def_ro("metrics_port", &KvbmConfig::metrics_port)
      .def_ro("metrics_host", &KvbmConfig::metrics_host)
      .def_ro("cache_stats_max_requests", &KvbmConfig::cache_stats_max_requests)
      .def_ro("cache_stats_log_interval_secs", &KvbmConfig::cache_stats_log_interval_secs)
      .def_ro("events_endpoint", &KvbmConfig::events_endpoint);
}


void RegisterErrorTranslator() {
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const StatusException& e) {
      PyObject* fallback = PyExc_RuntimeError;
      switch (e.error().code()) {
        case ErrorCode::kInvalidArgument: fallback = PyExc_ValueError; break;
        case ErrorCode::kNotFound: fallback = PyExc_KeyError; break;
        case ErrorCode::kIoError: fallback = PyExc_OSError; break;
        case ErrorCode::kTimeout: fallback = PyExc_TimeoutError; break;
        default: break;
      }
      SetPythonError(PythonClassName(e.error().code()), std::string(ErrorCodeName(e.error().code())).c_str(),
                     e.error().message(), fallback);
    } catch (const ConfigError& e) {
      SetPythonError("ConfigError", "Config", e.what(), PyExc_ValueError);
    } catch (const InvariantError& e) {
      SetPythonError("InvariantError", "Invariant", e.what(), PyExc_RuntimeError);
    }
  });
}

}  // namespace kvbm::python
