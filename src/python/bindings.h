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
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include "kvbm/block_pool.h"
#include "kvbm/error.h"
#include "kvbm/tokens.h"

namespace kvbm::python {

namespace nb = nanobind;

// Shared by the binding files (moved out of the old core_bindings.cpp, one file per layer now).
using Release = nb::call_guard<nb::gil_scoped_release>;
using Tokens = std::vector<Token>;
using OptHash = std::optional<uint64_t>;

// ---------------------------------------------------------------------------------------------
// Errors

inline const char* PythonClassName(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument: return "InvalidArgumentError";
    case ErrorCode::kNotFound: return "NotFoundError";
    case ErrorCode::kResourceExhausted: return "ResourceExhaustedError";
    case ErrorCode::kIoError: return "IoError";
    case ErrorCode::kCorrupt: return "CorruptError";
    case ErrorCode::kTimeout: return "TimeoutError";
    case ErrorCode::kUnavailable: return "UnavailableError";
    case ErrorCode::kCancelled: return "CancelledError";
    case ErrorCode::kFailedPrecondition: return "FailedPreconditionError";
    case ErrorCode::kInternal: return "InternalError";
  }
  return "InternalError";
}

// Sets the Python error to kvbm.errors.<class_name>(message) with `.code` = code. Falls back
// to `fallback` when kvbm.errors cannot be imported (the extension used on its own).
inline void SetPythonError(const char* class_name, const char* code, const std::string& message,
                    PyObject* fallback) {
  try {
    nb::object cls = nb::module_::import_("kvbm.errors").attr(class_name);
    nb::object exc = cls(message);
    exc.attr("code") = code;
    PyErr_SetObject(cls.ptr(), exc.ptr());
  } catch (nb::python_error&) {
    PyErr_SetString(fallback, message.c_str());
  }
}

// ---------------------------------------------------------------------------------------------
// Conversions

inline nb::object OptionalHash(const std::optional<SequenceHash>& h) {
  return h ? nb::int_(h->value()) : nb::none();
}

inline std::optional<SequenceHash> ToSequenceHash(const OptHash& h) {
  return h ? std::optional(SequenceHash(*h)) : std::nullopt;
}

inline nb::tuple KeyTuple(const BlockKey& k) {
  return nb::make_tuple(k.sequence_hash.value(), k.block_hash, OptionalHash(k.parent));
}

inline const char* StateName(BlockState s) {
  switch (s) {
    case BlockState::kReset: return "reset";
    case BlockState::kPartial: return "partial";
    case BlockState::kComplete: return "complete";
    case BlockState::kRegistered: return "registered";
  }
  return "unknown";
}


inline bool InterpreterFinalizing();  // defined below; PythonSink uses it first

// An event sink held by the C++ registry. The callable is a strong reference that is dropped
// under the GIL whichever thread destroys the last copy of the sink.
class PythonSink {
 public:
  explicit PythonSink(nb::callable fn)
      : fn_(fn.release().ptr(), [](PyObject* o) {
          if (PyGILState_Check()) {
            Py_DECREF(o);
            return;
          }
          // Another thread at exit cannot take the GIL any more: leak rather than hang.
          if (InterpreterFinalizing()) return;
          nb::gil_scoped_acquire gil;
          Py_DECREF(o);
        }) {}

  // Called from whichever thread changed a pool, with the pool and registry mutexes held.
  void operator()(const KvEvent& event) const {
    if (InterpreterFinalizing() && !PyGILState_Check()) return;  // see the deleter above
    nb::gil_scoped_acquire gil;
    try {
      nb::handle(fn_.get())(nb::cast(event, nb::rv_policy::copy));
    } catch (nb::python_error& e) {
      // The pool operation that fired the event must not fail because a sink did.
      e.discard_as_unraisable("kvbm event sink");
    } catch (const std::exception& e) {
      PyErr_WarnFormat(PyExc_RuntimeWarning, 1, "kvbm event sink failed: %s", e.what());
    }
  }

 private:
  std::shared_ptr<PyObject> fn_;
};


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

// One Bind* per layer; module.cpp calls them in order.
void BindErrorsAndIds(nb::module_& m);  // common_bindings.cpp
void BindConfig(nb::module_& m);        // common_bindings.cpp
void BindHashing(nb::module_& m);       // tokens_bindings.cpp
void BindLayouts(nb::module_& m);       // memory_bindings.cpp
void BindPools(nb::module_& m);         // block_bindings.cpp
void BindBench(nb::module_& m);         // core_bench_bindings.cpp

}  // namespace kvbm::python
