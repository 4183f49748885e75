// Shared by the binding files of the `kvbm._core` extension (core_bindings.cpp,
// connector_bindings.cpp, ...). Internal: nothing here is installed.
//
// Errors. `ThrowIfError(result)` turns a failed Result/Status into a C++ `StatusException`.
// One translator, registered by RegisterErrorTranslator() at module import, raises it as the
// Python class of python/kvbm/errors.py that matches its ErrorCode (kvbm::ConfigError and
// kvbm::InvariantError likewise). The classes are looked up in `kvbm.errors` when an error is
// raised, so they are defined once, in Python, and `except kvbm.errors.X` always matches.
// Because StatusException is a plain C++ exception, ThrowIfError may run with the GIL released.
//
// The GIL. Every binding that can block or take a pool mutex releases the GIL
// (nb::call_guard<nb::gil_scoped_release>()). Handles are wrapped (PyMutableBlock,
// PyImmutableBlock) so that dropping one from Python also releases the GIL before it takes the
// pool's mutex: a C++ thread that holds that mutex may be waiting for the GIL inside a Python
// event sink, and holding the GIL while waiting for the mutex would deadlock.
#pragma once

#include <exception>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nanobind/nanobind.h>

#include "kvbm/block_pool.h"
#include "kvbm/error.h"

namespace kvbm::python {

namespace nb = nanobind;

class StatusException : public std::exception {
 public:
  explicit StatusException(Error error) : error_(std::move(error)), what_(error_.ToString()) {}
  const Error& error() const { return error_; }
  const char* what() const noexcept override { return what_.c_str(); }

 private:
  Error error_;
  std::string what_;
};

inline void ThrowIfError(const Status& status) {
  if (!status) throw StatusException(status.error());
}

template <typename T>
  requires(!std::is_void_v<T>)
T ThrowIfError(Result<T>&& result) {
  if (!result) throw StatusException(std::move(result.error()));
  return std::move(*result);
}

// Registers the translator described above. Call once from NB_MODULE.
void RegisterErrorTranslator();

inline bool InterpreterFinalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

// Drops `handle` with the GIL released (unless the interpreter is finalizing, when no other
// thread can run Python anyway and releasing is not allowed).
template <typename Handle>
void ReleaseWithoutGil(Handle& handle) noexcept {
  if (!handle.valid()) {
    handle = Handle();
    return;
  }
  if (InterpreterFinalizing() || !PyGILState_Check()) {
    handle = Handle();
    return;
  }
  nb::gil_scoped_release release;
  handle = Handle();
}

// Python-facing owners of the pool handles. Move-only; the Python object owns exactly one.
struct PyMutableBlock {
  MutableBlock block;
  PyMutableBlock() = default;
  explicit PyMutableBlock(MutableBlock b) : block(std::move(b)) {}
  PyMutableBlock(PyMutableBlock&&) noexcept = default;
  PyMutableBlock& operator=(PyMutableBlock&& other) noexcept {
    if (this != &other) {
      ReleaseWithoutGil(block);
      block = std::move(other.block);
    }
    return *this;
  }
  ~PyMutableBlock() { ReleaseWithoutGil(block); }
};

struct PyImmutableBlock {
  ImmutableBlock block;
  PyImmutableBlock() = default;
  explicit PyImmutableBlock(ImmutableBlock b) : block(std::move(b)) {}
  PyImmutableBlock(PyImmutableBlock&&) noexcept = default;
  PyImmutableBlock& operator=(PyImmutableBlock&& other) noexcept {
    if (this != &other) {
      ReleaseWithoutGil(block);
      block = std::move(other.block);
    }
    return *this;
  }
  ~PyImmutableBlock() { ReleaseWithoutGil(block); }
};

// A block key from Python: a TokenBlock, or a (sequence_hash, block_hash, parent|None) tuple.
// Raises TypeError (nb::type_error) for anything else. REQUIRES: the GIL.
BlockKey KeyFromPython(nb::handle item);
std::vector<BlockKey> KeysFromPython(nb::handle items);

// "reuse", "leaf-first" (or "leaf_first") / "lru"; InvalidArgument otherwise.
EvictionPolicy PolicyFromName(const std::string& name);
// A pool's occupancy as a Python dict (num_blocks, free, inactive, active, registered, evictions).
nb::dict PoolStatsDict(const BlockPoolStats& stats);

// TierId from a kvbm._core.Tier, a name ("host", "G2", ...) or its number (1..4).
TierId TierFromPython(nb::handle tier);

}  // namespace kvbm::python
