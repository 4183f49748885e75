// `kvbm._core.build_info()`: what this extension was built with, for `kvbm build-info` and bug
// reports. Header versions are those compiled in; the run-time ones (ZeroMQ, xxHash) are asked
// of the shared libraries actually loaded, which differ when a wheel carries its own copies.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>

#include <fmt/format.h>
#include <msgpack/version.hpp>
#include <xxhash.h>
#include <zmq.h>

namespace nb = nanobind;

// From pkg-config, passed by CMake: liburing has no version macro before 2.4, and including
// httplib.h here would compile the whole library into this file.
#ifndef KVBM_URING_VERSION
#define KVBM_URING_VERSION "unknown"
#endif
#ifndef KVBM_HTTPLIB_VERSION
#define KVBM_HTTPLIB_VERSION "unknown"
#endif

void BindBuildInfo(nb::module_& m) {
  m.def(
      "build_info",
      []() {
        nb::dict d;
        d["compiler"] = fmt::format("g++ {}.{}.{}", __GNUC__, __GNUC_MINOR__, __GNUC_PATCHLEVEL__);
        d["cplusplus"] = static_cast<long>(__cplusplus);
        d["nanobind"] = fmt::format("{}.{}.{}", NB_VERSION_MAJOR, NB_VERSION_MINOR, NB_VERSION_PATCH);
        d["fmt"] = fmt::format("{}.{}.{}", FMT_VERSION / 10000, FMT_VERSION / 100 % 100, FMT_VERSION % 100);
        d["cpp-httplib"] = std::string(KVBM_HTTPLIB_VERSION);
        d["msgpack-cxx"] = std::string(msgpack_version());
        d["liburing"] = std::string(KVBM_URING_VERSION);
        d["xxhash"] = fmt::format("{}.{}.{}", XXH_VERSION_MAJOR, XXH_VERSION_MINOR, XXH_VERSION_RELEASE);
        unsigned xxh = XXH_versionNumber();
        d["xxhash_loaded"] = fmt::format("{}.{}.{}", xxh / 10000, xxh / 100 % 100, xxh % 100);
        d["zeromq"] = fmt::format("{}.{}.{}", ZMQ_VERSION_MAJOR, ZMQ_VERSION_MINOR, ZMQ_VERSION_PATCH);
        int major = 0, minor = 0, patch = 0;
        zmq_version(&major, &minor, &patch);
        d["zeromq_loaded"] = fmt::format("{}.{}.{}", major, minor, patch);
#ifdef NDEBUG
        d["build_type"] = "release";
#else
        d["build_type"] = "debug";
#endif
        return d;
      },
      "Versions of the compiler and libraries this extension was built with (and the loaded ZeroMQ/xxHash).");
}
