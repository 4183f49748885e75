// What passes from the leader (scheduler side) to the workers (one per TP rank) each step:
// transfer operations in block indices of each tier, never pointers. Every worker applies the
// same operations to its own shard of the KV cache.
//
// Wire format: msgpack, versioned (kProtocolVersion), decoded defensively: a malformed,
// truncated or wrong-version message is an InvalidArgument error, never a crash. No pickle.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "kvbm/error.h"

namespace kvbm {

inline constexpr uint32_t kProtocolVersion = 1;
// A load whose source is kNoBlock cannot be served: the worker reports its target as a load error.
inline constexpr uint32_t kNoBlock = 0xFFFFFFFFu;

enum class OpKind : uint8_t {
  kStoreHost = 0,    // G1 -> G2, after the forward pass that wrote the blocks (write-through)
  kStoreDisk = 1,    // G1 -> G3 (bypass, no G2 configured), after the forward pass
  kOffloadDisk = 2,  // G2 -> G3 (asynchronous)
  kLoadHost = 3,     // G2 -> G1 (onboard)
  kLoadDisk = 4,     // G3 -> G1 (onboard, verified)
};
inline constexpr uint8_t kMaxOpKind = 4;
const char* OpKindName(OpKind kind);
inline bool IsLoad(OpKind k) { return k == OpKind::kLoadHost || k == OpKind::kLoadDisk; }

struct BlockOp {
  uint32_t src = 0;
  uint32_t dst = 0;
  uint64_t hash = 0;  // sequence hash of the block (disk side data)
  friend bool operator==(const BlockOp&, const BlockOp&) = default;
};

struct TransferOp {
  uint64_t id = 0;
  OpKind kind = OpKind::kStoreHost;
  std::string request_id;  // loads: the request whose completion the worker reports
  std::vector<BlockOp> blocks;
  friend bool operator==(const TransferOp&, const TransferOp&) = default;
};

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
