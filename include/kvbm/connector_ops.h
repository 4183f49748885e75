// What passes from the leader (scheduler side) to the workers (one per TP rank) each step:
// the tier chain's transfer operations (tier_ops.h) in block indices of each tier, never
// pointers. Every worker applies the same operations to its own shard of the KV cache.
//
// Wire format: msgpack, versioned (kProtocolVersion), decoded defensively: a malformed,
// truncated or wrong-version message is an InvalidArgument error, never a crash. No pickle.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "kvbm/error.h"
#include "kvbm/tier_ops.h"

namespace kvbm {

inline constexpr uint32_t kProtocolVersion = 4;  // 2: kPromoteHost; 3: G4 ops; 4: block lineage

struct StepMetadata {
  uint64_t step = 0;
  uint64_t host_blocks = 0;  // the leader's sizing, checked by workers
  uint64_t disk_blocks = 0;
  std::vector<TransferOp> ops;
  // Requests that finished (or were aborted) while their load was in flight: the worker
  // reports them as "sending done" once the load has stopped touching their blocks.
  std::vector<std::string> finished_while_loading;
  friend bool operator==(const StepMetadata&, const StepMetadata&) = default;
};

std::string EncodeStepMetadata(const StepMetadata& meta);
Result<StepMetadata> DecodeStepMetadata(std::span<const uint8_t> bytes);

}  // namespace kvbm
