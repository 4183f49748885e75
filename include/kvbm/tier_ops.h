// Transfer operations between tiers, as the tier chain (tier_chain.h) plans them and a worker
// executes them: block indices of each tier, never pointers, so every tensor-parallel rank can
// apply the same operation to its own shard. The connector carries them to the workers
// (connector_ops.h: StepMetadata and its wire format).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace kvbm {

// A load whose source is kNoBlock cannot be served: the worker reports its target as a load error.
inline constexpr uint32_t kNoBlock = 0xFFFFFFFFu;

enum class OpKind : uint8_t {
  kStoreHost = 0,    // G1 -> G2, after the forward pass that wrote the blocks (write-through)
  kStoreDisk = 1,    // G1 -> G3 (bypass, no G2 configured), after the forward pass
  kOffloadDisk = 2,  // G2 -> G3 (asynchronous)
  kLoadHost = 3,     // G2 -> G1 (onboard)
  kLoadDisk = 4,     // G3 -> G1 (onboard, verified)
  kPromoteHost = 5,    // G3 -> G2 (a disk hit copied up, verified; asynchronous)
  kFetchRemote = 6,    // G4 -> G2 (dst: host slot; verified), before the G2 -> G1 load it feeds
  kOffloadRemote = 7,  // G2 -> G4 (src: host slot; asynchronous, after the step's stores)
};
inline constexpr uint8_t kMaxOpKind = 7;
const char* OpKindName(OpKind kind);
inline bool IsLoad(OpKind k) { return k == OpKind::kLoadHost || k == OpKind::kLoadDisk; }

struct BlockOp {
  uint32_t src = 0;
  uint32_t dst = 0;
  uint64_t hash = 0;  // sequence hash of the block (disk side data)
  // Disk writes (kStoreDisk, kOffloadDisk) carry the rest of the block's key (block_pool.h
  // BlockKey): a persistent G3 keeps it in the slot's record, so that a restarted leader can
  // register the block under its full key and match it (DYN_KVBM_DISK_PERSISTENT).
  bool has_lineage = false;
  uint64_t block_hash = 0;
  std::optional<uint64_t> parent;
  uint32_t position = 0;
  friend bool operator==(const BlockOp&, const BlockOp&) = default;
};
inline bool WritesDisk(OpKind k) { return k == OpKind::kStoreDisk || k == OpKind::kOffloadDisk; }

struct TransferOp {
  uint64_t id = 0;
  OpKind kind = OpKind::kStoreHost;
  std::string request_id;  // loads: the request whose completion the worker reports
  std::vector<BlockOp> blocks;
  friend bool operator==(const TransferOp&, const TransferOp&) = default;
};

}  // namespace kvbm
