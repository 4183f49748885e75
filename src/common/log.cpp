#include "kvbm/log.h"

#include <atomic>
#include <chrono>

#include <fmt/chrono.h>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace kvbm {
namespace {

LogLevel LevelFromEnvironment() {
  const char* value = std::getenv("KVBM_LOG");
  if (value == nullptr) value = std::getenv("DYN_LOG");
  if (value == nullptr) return LogLevel::kWarn;
  std::string v(value);
  if (v == "error") return LogLevel::kError;
  if (v == "info") return LogLevel::kInfo;
  if (v == "debug" || v == "trace") return LogLevel::kDebug;
  return LogLevel::kWarn;
}

std::atomic<int> g_level{static_cast<int>(LevelFromEnvironment())};

const char* LevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kError: return "ERROR";
    case LogLevel::kWarn: return "WARN";
    case LogLevel::kInfo: return "INFO";
    case LogLevel::kDebug: return "DEBUG";
  }
  return "?";
}

}  // namespace

LogLevel CurrentLogLevel() { return static_cast<LogLevel>(g_level.load(std::memory_order_relaxed)); }
void SetLogLevel(LogLevel level) { g_level.store(static_cast<int>(level)); }

void LogLine(LogLevel level, std::string_view message) {
  auto now = std::chrono::system_clock::now();
  std::string line = fmt::format("{:%FT%T}Z kvbm {} {}\n",
                                 std::chrono::floor<std::chrono::milliseconds>(now),
                                 LevelName(level), message);
  std::fwrite(line.data(), 1, line.size(), stderr);
}

}  // namespace kvbm
