// libFuzzer target: the settings parser (KvbmConfig::FromMap, src/common/config.cpp) and the
// size conversions that follow it (HostBlocks/DiskBlocks: the float -> integer conversion of
// issue 17 lives there).
// Input: text lines `NAME=VALUE`; a line `BYTES_PER_BLOCK=N` sets the block size used for the
// conversions. Properties: a bad value is a ConfigError (any other exception, a crash or
// undefined behaviour is a bug); an accepted size converts to at most kMaxCacheBlocks blocks.
#include <cstdint>
#include <cstdlib>
#include <map>
#include <string>
#include <string_view>

#include "kvbm/config.h"
#include "kvbm/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  std::map<std::string, std::string> env;
  uint64_t bytes_per_block = 4096;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string_view::npos) nl = text.size();
    const std::string_view line = text.substr(pos, nl - pos);
    pos = nl + 1;
    const size_t eq = line.find('=');
    if (eq == std::string_view::npos) continue;
    std::string name(line.substr(0, eq)), value(line.substr(eq + 1));
    if (name == "BYTES_PER_BLOCK") {
      bytes_per_block = std::strtoull(value.c_str(), nullptr, 10);
      continue;
    }
    env[name] = value;  // a NUL inside a value is cut there, as the environment would
  }
  try {
    const kvbm::KvbmConfig c = kvbm::KvbmConfig::FromMap(env);
    try {
      c.Validate();
    } catch (const kvbm::ConfigError&) {
    }
    for (bool host : {true, false}) {
      try {
        const uint64_t blocks =
            host ? c.HostBlocks(bytes_per_block) : c.DiskBlocks(bytes_per_block);
        if (blocks > kvbm::kMaxCacheBlocks) std::abort();
      } catch (const kvbm::ConfigError& e) {
        if (std::string_view(e.what()).find("DYN_KVBM_") == std::string_view::npos) std::abort();
      }
    }
  } catch (const kvbm::ConfigError& e) {
    if (std::string_view(e.what()).find("DYN_KVBM_") == std::string_view::npos) std::abort();
  }
  return 0;
}
