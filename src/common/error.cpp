#include "kvbm/error.h"

namespace kvbm {

std::string_view ErrorCodeName(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument: return "InvalidArgument";
    case ErrorCode::kNotFound: return "NotFound";
    case ErrorCode::kResourceExhausted: return "ResourceExhausted";
    case ErrorCode::kIoError: return "IoError";
    case ErrorCode::kCorrupt: return "Corrupt";
    case ErrorCode::kTimeout: return "Timeout";
    case ErrorCode::kUnavailable: return "Unavailable";
    case ErrorCode::kCancelled: return "Cancelled";
    case ErrorCode::kFailedPrecondition: return "FailedPrecondition";
    case ErrorCode::kInternal: return "Internal";
  }
  return "Unknown";
}

std::string Error::ToString() const {
  return std::string(ErrorCodeName(code_)) + ": " + message_;
}

void Check(bool condition, std::string_view what) {
  if (!condition) throw InvariantError(std::string(what));
}

}  // namespace kvbm
