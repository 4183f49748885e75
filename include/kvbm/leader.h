// The leader side of the connector core: one per engine instance, beside the engine's
// scheduler. It owns the G2/G3 block pools (metadata only: the bytes live in the workers),
// one slot per request, the offload policy, and emits per-step transfer operations
// (StepMetadata) that every worker applies to its own shard. Nothing here is engine-specific:
// the vLLM, TensorRT-LLM and SGLang adapters are thin layers over these calls.
//
// A request's life, as an engine drives it:
//   AddRequest / ExtendTokens  the request's tokens (hashed into full blocks as they come)
//   GetNumNewMatchedTokens     how many tokens past the engine's own prefix hit kvbm can load
//                              (G2 run, then G3 run); no side effects; never the whole prompt
//   UpdateStateAfterAlloc      the engine gave device blocks: matched blocks are pinned and
//                              load operations emitted (the load is asynchronous)
//   OnScheduled                per step: blocks completed by this step's forward pass are
//                              stored G1 -> G2 (write-through; G1 -> G3 when only disk is
//                              sized), then G2 -> G3 through the admission filter
//   BuildStepMetadata          the step's operations for the workers
//   OnWorkerOutput             loads finished (pins released), load errors (source blocks
//                              invalidated so they are never matched again)
//   RequestFinished            true when a load still writes the request's blocks: the engine
//                              must wait for the worker to report the request as sent
//
// Pins: matched blocks stay referenced until their load is reported finished; blocks written
// by a step's stores stay referenced for two more steps, so no slot is reallocated while a
// worker may still be writing it.
//
// Thread safety: not thread-safe; the engine's scheduler thread makes every call.
#pragma once

#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "kvbm/block_pool.h"
#include "kvbm/config.h"
#include "kvbm/connector_ops.h"
#include "kvbm/metrics.h"
#include "kvbm/offload.h"
#include "kvbm/tokens.h"

namespace kvbm {

struct LeaderOptions {
  uint32_t page_size = 16;       // tokens per block (the engine's block size)
  uint64_t bytes_per_block = 0;  // one block, all layers, summed over every rank
  EvictionPolicy policy = EvictionPolicy::kLeafFirst;
  size_t offload_queue_capacity = 1 << 16;
  size_t disk_offloads_per_step = 1024;
  // Sizes in blocks; when unset they come from the config (GB / bytes_per_block, or overrides).
  std::optional<uint64_t> host_blocks, disk_blocks;
};

struct MatchResult {
  uint64_t external_tokens = 0;  // tokens past num_computed_tokens kvbm will load
  bool async = false;            // the load is asynchronous (true whenever tokens > 0)
  uint32_t host_blocks = 0;      // of which from G2
  uint32_t disk_blocks = 0;      // of which from G3
};

struct LeaderStats {
  uint64_t requests = 0;
  uint64_t matched_tokens = 0, requested_tokens = 0;
  uint64_t onboard_host_blocks = 0, onboard_disk_blocks = 0;
  uint64_t store_host_blocks = 0, store_disk_blocks = 0, offload_disk_blocks = 0;
  uint64_t skipped_cached_blocks = 0;
  uint64_t dropped_full = 0, dropped_filter = 0, dropped_priority = 0, dropped_queue = 0;
  uint64_t load_errors = 0;
};

class ConnectorLeader {
 public:
  // Throws ConfigError when the config sizes no tier, or page_size/bytes_per_block are 0.
  ConnectorLeader(const KvbmConfig& config, const LeaderOptions& options,
                  std::shared_ptr<KvbmMetrics> metrics = nullptr,
                  std::shared_ptr<BlockRegistry> registry = nullptr);
  ~ConnectorLeader();

  uint64_t host_blocks() const { return host_ ? host_->num_blocks() : 0; }
  uint64_t disk_blocks() const { return disk_ ? disk_->num_blocks() : 0; }
  uint32_t page_size() const { return options_.page_size; }
  BlockPool* host_pool() const { return host_.get(); }
  BlockPool* disk_pool() const { return disk_.get(); }
  const std::shared_ptr<BlockRegistry>& registry() const { return registry_; }
  const std::shared_ptr<KvbmMetrics>& metrics() const { return metrics_; }

  // Creates the request's slot (idempotent: a known request keeps its tokens).
  void AddRequest(const std::string& request_id, std::span<const Token> tokens,
                  const std::optional<std::string>& salt = std::nullopt,
                  const std::optional<std::string>& lora_name = std::nullopt, uint32_t priority = 0);
  bool HasRequest(const std::string& request_id) const { return slots_.count(request_id) > 0; }
  // Tokens known for the request (so an adapter passes only the new ones).
  size_t NumTokens(const std::string& request_id) const;
  Status ExtendTokens(const std::string& request_id, std::span<const Token> new_tokens);

  Result<MatchResult> GetNumNewMatchedTokens(const std::string& request_id, uint64_t num_computed_tokens);
  Status UpdateStateAfterAlloc(const std::string& request_id, std::span<const uint32_t> block_ids,
                               uint64_t num_external_tokens);
  // `block_ids`: all of the request's device blocks, in order, after this step's allocation.
  Status OnScheduled(const std::string& request_id, std::span<const uint32_t> block_ids,
                     uint64_t num_computed_tokens, uint64_t num_scheduled_tokens);
  // The engine preempted the request and freed its device blocks.
  void OnPreempted(const std::string& request_id);
  StepMetadata BuildStepMetadata();
  std::string BuildStepMetadataBytes() { return EncodeStepMetadata(BuildStepMetadata()); }
  void OnWorkerOutput(std::span<const std::string> finished_recving, std::span<const std::string> finished_sending,
                      std::span<const uint32_t> invalid_device_blocks);
  bool RequestFinished(const std::string& request_id);

  const LeaderStats& stats() const { return stats_; }
  size_t num_slots() const { return slots_.size(); }
  bool IsLoading(const std::string& request_id) const;

 private:
  struct LoadedBlock {
    TierId tier;
    BlockKey key;
  };
  struct Slot {
    std::string id;
    std::unique_ptr<TokenBlockSequence> seq;
    uint32_t priority = 0;
    std::vector<uint32_t> device_blocks;
    size_t offload_cursor = 0;  // blocks [0, cursor) are stored, skipped or cut off
    bool offload_stopped = false;
    std::optional<MatchResult> pending_match;
    uint64_t pending_match_start = 0;  // block index the match starts at
    bool loading = false;
    bool finished = false;
    std::vector<ImmutableBlock> pinned;            // matched blocks, until the load is done
    std::map<uint32_t, LoadedBlock> loading_into;  // device block -> what is being loaded
  };
  struct DiskOffload {
    ImmutableBlock host_block;
    BlockKey key;
  };

  Slot* Find(const std::string& request_id);
  std::vector<BlockKey> KeysFrom(const Slot& slot, size_t first, size_t last) const;
  void StoreBlock(Slot& slot, size_t index);
  // One block of `pool`, completed with `key` and registered; counts a drop when full.
  std::optional<ImmutableBlock> AllocateRegistered(BlockPool& pool, const BlockKey& key, std::span<const Token> tokens,
                                                   uint32_t priority);
  void MaybeQueueDiskOffload(const ImmutableBlock& host_block, const BlockKey& key, uint32_t priority);
  void DrainDiskQueue();

  const KvbmConfig config_;
  const LeaderOptions options_;
  std::shared_ptr<KvbmMetrics> metrics_;
  std::shared_ptr<BlockRegistry> registry_;
  std::shared_ptr<BlockPool> host_, disk_;
  DiskAdmissionFilter filter_;
  OffloadQueue<DiskOffload> disk_queue_;
  std::unordered_map<std::string, Slot> slots_;
  uint64_t step_ = 0;
  uint64_t next_op_id_ = 1;
  std::vector<TransferOp> ops_;  // this step's
  std::vector<BlockOp> step_store_host_, step_store_disk_, step_offload_disk_;
  std::vector<std::string> finished_while_loading_;
  std::deque<std::vector<ImmutableBlock>> step_pins_;  // stores of recent steps
  std::vector<ImmutableBlock> current_pins_;
  LeaderStats stats_;
};

}  // namespace kvbm
