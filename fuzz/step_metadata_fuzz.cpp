// libFuzzer target: the per-step operations a worker decodes from vLLM's connector metadata
// (DecodeStepMetadata, src/connector/connector_ops.cpp). Bytes come from the scheduler process,
// so the decoder must hold up against anything.
// Properties: no crash, leak or undefined behaviour; whatever decodes re-encodes to bytes that
// decode to an equal value (nothing is dropped or altered on the way through).
#include <cstdint>
#include <cstdlib>
#include <span>
#include <string>

#include "kvbm/connector_ops.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto meta = kvbm::DecodeStepMetadata(std::span<const uint8_t>(data, size));
  if (!meta) {
    if (meta.error().message().empty()) std::abort();  // every refusal says why
    return 0;
  }
  const std::string again = kvbm::EncodeStepMetadata(*meta);
  auto back = kvbm::DecodeStepMetadata(
      std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(again.data()), again.size()));
  if (!back || !(*back == *meta)) std::abort();
  return 0;
}
