// Minimal leveled logging to stderr. KVBM_LOG (or DYN_LOG) sets the level: error, warn, info,
// debug. Thread-safe: each line is written with one call.
#pragma once

#include <fmt/format.h>
#include <string>
#include <string_view>

namespace kvbm {

enum class LogLevel { kError = 0, kWarn = 1, kInfo = 2, kDebug = 3 };

LogLevel CurrentLogLevel();
void SetLogLevel(LogLevel level);
void LogLine(LogLevel level, std::string_view message);

template <typename... Args>
void Log(LogLevel level, fmt::format_string<Args...> fmt, Args&&... args) {
  if (level <= CurrentLogLevel()) LogLine(level, fmt::format(fmt, std::forward<Args>(args)...));
}

}  // namespace kvbm
