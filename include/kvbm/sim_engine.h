// A simulated engine on the CPU: KV "tensors" in host memory laid out like vLLM's (one tensor
// per layer, blocks first, K and V), a leader and a worker in one process, and the same call
// sequence an engine makes (match, allocate, load, forward, store, finish). It stands in for
// G1 in the end-to-end tests, `kvbm replay --bytes` and `kvbm bench transfer`.
//
// The "forward pass" writes, for every computed block, bytes that are a pure function of the
// block's sequence hash, layer and K/V index; every loaded block is compared with that function
// byte for byte, so a wrong or torn block is counted, never silently accepted.
//
// Thread safety: one thread drives it.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "kvbm/leader.h"
#include "kvbm/worker.h"

namespace kvbm {

struct SimEngineOptions {
  uint32_t num_layers = 4;
  uint32_t page_size = 16;
  uint32_t inner_dim = 128;  // kv_heads * head_size
  uint32_t dtype_bytes = 2;
  uint32_t device_blocks = 64;
  bool outer_first = false;  // FlashAttention-like (2, num_blocks, ...) instead of blocks first
  std::string remote_descriptor = "sim-engine";  // G4 keys and persistent G3 files
  // Tests: build the leader before the worker opens its tiers (engines kvbm drives do the
  // opposite), so a persistent G3's leader restores claims the worker has not verified yet.
  bool leader_before_worker_tiers = false;
};

struct SimRequestOutcome {
  uint64_t prompt_tokens = 0;
  uint64_t loaded_tokens = 0;
  uint32_t host_blocks = 0, disk_blocks = 0, remote_blocks = 0;
  uint32_t load_errors = 0;        // blocks the worker reported as failed (then recomputed)
  uint32_t mismatched_blocks = 0;  // loaded blocks whose bytes were wrong (must stay 0)
};

class SimulatedEngine {
 public:
  // Throws ConfigError on bad options or config.
  SimulatedEngine(const KvbmConfig& config, const SimEngineOptions& options, LeaderOptions leader_options = {});
  ~SimulatedEngine();

  // Runs one request to completion: prefill of `tokens` (loading what kvbm matched), one
  // store pass, finish. The device blocks are scribbled over afterwards, as reuse would.
  Result<SimRequestOutcome> RunRequest(const std::string& request_id, std::span<const Token> tokens);

  ConnectorLeader& leader() { return *leader_; }
  KvbmWorker& worker() { return *worker_; }
  uint64_t bytes_per_block() const;
  // The byte pattern of a block (exposed for tests).
  static void FillChunk(uint8_t* out, uint64_t length, uint64_t sequence_hash, uint64_t layer, uint64_t outer);

 private:
  Status Step(uint64_t request_index, const std::string& request_id);
  SimEngineOptions options_;
  std::vector<std::vector<uint8_t>> tensors_;  // one per layer
  std::unique_ptr<KvbmWorker> worker_;
  std::unique_ptr<ConnectorLeader> leader_;
};

}  // namespace kvbm
