// libFuzzer target for the leader/worker decoder (built by cmake/distributed.cmake with clang
// only): clang++ -fsanitize=fuzzer,address. The property: no crash, and anything accepted
// re-encodes to an equal message.
#include <cstdint>
#include <cstdlib>
#include <span>

#include "distributed/wire.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto m = kvbm::wire::Decode(std::span<const uint8_t>(data, size));
  if (m) {
    std::string again = kvbm::wire::Encode(*m);
    auto back = kvbm::wire::Decode(
        std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(again.data()), again.size()));
    if (!back || !(*back == *m)) std::abort();
  }
  return 0;
}
