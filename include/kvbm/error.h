// kvbm's one error scheme.
//
// What can fail at run time (I/O, a full tier, a timeout, a corrupt block) returns
// `Result<T>` = `std::expected<T, Error>`. Exceptions are reserved for bad configuration at
// construction (`ConfigError`) and broken invariants (`InvariantError`); the Python layer maps
// each `ErrorCode` and both exception types onto a Python exception class one to one.
//
// Thread safety: all types here are values; share them freely.
#pragma once

#include <expected>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

namespace kvbm {

enum class ErrorCode {
  kInvalidArgument,   // the caller passed something malformed
  kNotFound,          // a hash, block or request that is not there
  kResourceExhausted, // a tier or queue is full
  kIoError,           // the OS refused a read or a write
  kCorrupt,           // bytes read back are not the bytes that were stored
  kTimeout,
  kUnavailable,       // a peer (worker, remote store) is gone
  kCancelled,
  kFailedPrecondition,  // the object is in the wrong state for the call
  kInternal,
};

std::string_view ErrorCodeName(ErrorCode code);

class Error {
 public:
  Error(ErrorCode code, std::string message) : code_(code), message_(std::move(message)) {}
  ErrorCode code() const { return code_; }
  const std::string& message() const { return message_; }
  std::string ToString() const;

 private:
  ErrorCode code_;
  std::string message_;
};

template <typename T>
using Result = std::expected<T, Error>;
using Status = std::expected<void, Error>;

inline std::unexpected<Error> MakeError(ErrorCode code, std::string message) {
  return std::unexpected<Error>(Error(code, std::move(message)));
}

// Bad configuration found while constructing something. The message names the setting and
// the value that was wrong.
class ConfigError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A broken invariant: a bug in kvbm or a caller that broke a documented REQUIRES.
class InvariantError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

// Throws InvariantError with `what` when `condition` is false.
void Check(bool condition, std::string_view what);

}  // namespace kvbm
