// The leader side of the connector core: one per engine instance, beside the engine's
// scheduler. It keeps one slot per request (its tokens and hashes, the engine's device blocks,
// the pins of its loads) and speaks the engine protocol; every policy decision (which tier,
// what to store, admission, priorities, promotion) belongs to the tier chain it drives
// (tier_chain.h). It emits per-step transfer operations (StepMetadata) that every worker
// applies to its own shard. Nothing here is engine-specific: the vLLM, TensorRT-LLM and SGLang
// adapters are thin layers over these calls.
//
// A request's life, as an engine drives it:
//   AddRequest / ExtendTokens  the request's tokens (hashed into full blocks as they come)
//   GetNumNewMatchedTokens     how many tokens past the engine's own prefix hit kvbm can load
//                              (the chain's run); no side effects; never the whole prompt
//   UpdateStateAfterAlloc      the engine gave device blocks: matched blocks are pinned and
//                              load operations emitted (asynchronous, or synchronous: below)
//   OnScheduled                per step: blocks completed by this step's forward pass go to
//                              the chain (write-through)
//   BuildStepMetadata          the step's operations for the workers
//   OnWorkerOutput             loads finished (pins released), load errors (source blocks
//                              invalidated so they are never matched again)
//   RequestFinished            true when a load still writes the request's blocks: the engine
//                              must wait for the worker to report the request as sent
//
// Thread safety: not thread-safe; the engine's scheduler thread makes every call.
#pragma once

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
#include "kvbm/tier_chain.h"
#include "kvbm/tokens.h"

namespace kvbm {

// How the leader is set up when it builds its own tier chain (tests, the simulated engine).
struct LeaderOptions {
  uint32_t page_size = 16;       // tokens per block (the engine's block size)
  uint64_t bytes_per_block = 0;  // one block, all layers, summed over every rank
  std::optional<EvictionPolicy> policy;  // G2 and G3; unset: the settings' (leaf-first by default)
  // Sizes in blocks; when unset they come from the config (GB / bytes_per_block, or overrides).
  std::optional<uint64_t> host_blocks, disk_blocks;
  // G4 key descriptor (model, dtype, block size) and tensor-parallel size; needed when
  // DYN_KVBM_REMOTE_URL is set (remote_tier.h).
  std::string remote_descriptor;
  uint32_t world_size = 1;
};

struct MatchResult {
  uint64_t external_tokens = 0;  // tokens past num_computed_tokens kvbm will load
  // The load is asynchronous: the engine waits for the worker to report it before scheduling
  // the request. False with tokens > 0: a synchronous load (SetSyncLoadMaxBlocks).
  bool async = false;
  uint32_t host_blocks = 0;      // of which from G2
  uint32_t disk_blocks = 0;      // of which from G3
  uint32_t remote_blocks = 0;    // of which from G4 (through G2)
};

struct LeaderStats {
  uint64_t requests = 0;
  uint64_t matched_tokens = 0, requested_tokens = 0;
};

class ConnectorLeader {
 public:
  // Drives `chain` (shared with the KvBlockManager that owns the observability). Throws
  // ConfigError when page_size is 0.
  ConnectorLeader(std::shared_ptr<TierChain> chain, const KvbmConfig& config, uint32_t page_size,
                  std::shared_ptr<KvbmMetrics> metrics);
  // Builds its own chain from the settings and `options`. Throws ConfigError when the config
  // sizes no tier, or page_size/bytes_per_block are 0.
  ConnectorLeader(const KvbmConfig& config, const LeaderOptions& options,
                  std::shared_ptr<KvbmMetrics> metrics = nullptr,
                  std::shared_ptr<BlockRegistry> registry = nullptr);
  ~ConnectorLeader();

  uint64_t host_blocks() const { return chain_->host_blocks(); }
  uint64_t disk_blocks() const { return chain_->disk_blocks(); }
  uint32_t page_size() const { return page_size_; }
  BlockPool* host_pool() const { return chain_->host(); }
  BlockPool* disk_pool() const { return chain_->disk(); }
  TierChain& chain() { return *chain_; }
  const TierChain& chain() const { return *chain_; }
  const std::shared_ptr<KvbmMetrics>& metrics() const { return metrics_; }

  // Creates the request's slot (idempotent: a known request keeps its tokens). `extra`: the
  // prompt's multimodal items and embedding digests (tokens.h), folded into the hashes of the
  // blocks they shape; made for this leader's page size (else ConfigError).
  void AddRequest(const std::string& request_id, std::span<const Token> tokens,
                  const std::optional<std::string>& salt = std::nullopt,
                  const std::optional<std::string>& lora_name = std::nullopt, uint32_t priority = 0,
                  BlockExtraKeys extra = {});
  bool HasRequest(const std::string& request_id) const { return slots_.count(request_id) > 0; }
  // Tokens known for the request (so an adapter passes only the new ones).
  size_t NumTokens(const std::string& request_id) const;
  Status ExtendTokens(const std::string& request_id, std::span<const Token> new_tokens);

  // Loads served wholly from G2 of at most `max_blocks` blocks are synchronous (MatchResult::async
  // false): for an engine that schedules such a request in the step that loads it, whose worker
  // waits for the copy before the forward pass, and that reports the load done through
  // OnWorkerOutput like any other (vLLM: the worker's per-step metadata). 0 (the default): every
  // load is asynchronous. G3 and G4 loads always are: their latency is a disk's or a network's.
  void SetSyncLoadMaxBlocks(uint64_t max_blocks) { sync_load_max_blocks_ = max_blocks; }
  uint64_t sync_load_max_blocks() const { return sync_load_max_blocks_; }

  Result<MatchResult> GetNumNewMatchedTokens(const std::string& request_id, uint64_t num_computed_tokens);
  Status UpdateStateAfterAlloc(const std::string& request_id, std::span<const uint32_t> block_ids,
                               uint64_t num_external_tokens);
  // `block_ids`: all of the request's device blocks, in order, after this step's allocation.
  Status OnScheduled(const std::string& request_id, std::span<const uint32_t> block_ids,
                     uint64_t num_computed_tokens, uint64_t num_scheduled_tokens);
  // Blocks before `first_block` are never stored for this request (those not stored yet are
  // skipped): for a layer group that keeps only a window of blocks, such as vLLM's sliding-window
  // groups, whose blocks outside every possible hit's window no later hit reads. Never moves the
  // store cursor back.
  Status SkipStores(const std::string& request_id, uint64_t first_block);
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
    // What KV events list beside the tokens (BlockInputs); `has_inputs` when any is set.
    std::optional<std::string> salt, lora_name;
    bool has_inputs = false;
    uint32_t priority = 0;
    std::vector<uint32_t> device_blocks;
    size_t offload_cursor = 0;  // blocks [0, cursor) are stored, skipped or cut off
    bool offload_stopped = false;
    std::optional<MatchResult> pending_match;
    uint64_t pending_match_start = 0;  // block index the match starts at
    bool loading = false;
    bool finished = false;
    OnboardPins pins;                              // matched blocks, until the load is done
    std::map<uint32_t, LoadedBlock> loading_into;  // device block -> what is being loaded
  };

  Slot* Find(const std::string& request_id);
  void KeysFrom(const Slot& slot, size_t first, size_t last, std::vector<BlockKey>& out) const;
  // Block `index`'s extra keys, as its stored event lists them.
  static BlockInputs InputsOf(const Slot& slot, size_t index);

  const KvbmConfig config_;
  const uint32_t page_size_;
  std::shared_ptr<KvbmMetrics> metrics_;
  std::shared_ptr<TierChain> chain_;
  std::unordered_map<std::string, Slot> slots_;
  uint64_t step_ = 0;
  uint64_t next_op_id_ = 1;
  uint64_t sync_load_max_blocks_ = 0;
  std::vector<TransferOp> ops_;  // this step's loads
  std::vector<std::string> finished_while_loading_;
  std::vector<BlockKey> keys_;                         // scratch
  std::vector<std::span<const Token>> tokens_;         // scratch
  std::vector<BlockInputs> inputs_;                    // scratch
  LeaderStats stats_;
};

}  // namespace kvbm
