// Trace replay: drives the real connector core (KvBlockManager -> ConnectorLeader, and with
// `move_bytes` a real KvbmWorker) with a recorded request trace, the way an engine would, and
// measures what the tiers hit. It backs `kvbm replay` (docs/REPLAY.md).
//
// The trace and its parser are in kvbm/trace.h.
//
// The engine model (RunReplay):
//   - G1 is a BlockPool (TierId::kDevice) of `g1_blocks` standing for the engine's own prefix
//     cache, always plain LRU (the engine's policy, not kvbm's). A request needs
//     ceil((input + output) / page) G1 blocks, all at once (all-or-nothing); it first reuses
//     the longest cached G1 prefix of its prompt. Requests are admitted first come, first
//     served: when the oldest waiting request cannot get its blocks, it and every later
//     request wait until a running request finishes (head-of-line, like vLLM's FCFS queue).
//     A request that needs more blocks than G1 has is rejected (counted, never run).
//     g1_blocks == 0 models an engine without prefix caching: G1 only allocates.
//   - Past its G1 prefix, kvbm is asked (GetNumNewMatchedTokens: G2 run, then G3 run, never
//     the whole prompt) and the matched blocks are onboarded.
//   - Time: a request admitted at t computes until t + input_length / prefill_tokens_per_s
//     (cache hits do not shorten it, so the schedule does not depend on G2/G3 sizes or the
//     policy); then its full prompt blocks are stored (write-through G1 -> G2, G2 -> G3
//     through the admission filter) and registered in G1; it finishes at
//     prefill end + output_length / decode_tokens_per_s and releases its G1 blocks. Events at
//     the same instant: prefill ends and finishes before arrivals, then in creation order.
//   - After each store step the leader's store pins are flushed (three empty steps), as an
//     engine stepping every few ms would within trace time.
//
// Thread safety: RunReplay is re-entrant (each call owns all it creates); a Trace is
// immutable after parsing and may be shared by concurrent runs.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kvbm/block_pool.h"
#include "kvbm/eviction.h"
#include "kvbm/config.h"
#include "kvbm/error.h"
#include "kvbm/tokens.h"
#include "kvbm/trace.h"

namespace kvbm {

inline constexpr uint32_t kMaxReplayInstances = 1024;

// How requests are spread over instances.
enum class ReplayAssign : uint8_t {
  // Round-robin by conversation: a conversation is the requests whose first block past the
  // trace's common prefix (the blocks every request starts with, e.g. a shared system prompt)
  // is the same; the k-th conversation to appear goes to instance k mod N. Every turn of a
  // conversation lands on the instance that holds its history.
  kConversation,
  // Each request independently to a pseudo-random instance (splitmix64 of seed and index).
  kRandom,
};

// The instance of each request (by trace index), in [0, instances). Throws ConfigError when
// instances is 0.
std::vector<uint32_t> AssignInstances(const Trace& trace, uint32_t instances, ReplayAssign assign,
                                      uint64_t seed = 0);

struct ReplayProgress {
  uint64_t finished = 0, total = 0;
  double trace_seconds = 0;   // simulated time reached
  double token_hit_rate = 0;  // so far
  uint16_t metrics_port = 0;  // the metrics endpoint's bound port; 0 when off or not bound
};

struct ReplayOptions {
  uint32_t page_size = kTraceBlockTokens;  // kvbm's block size in tokens
  std::optional<uint64_t> g1_blocks;       // nullopt: unlimited (TotalPages); 0: no G1 prefix cache
  std::optional<uint64_t> g2_blocks;       // nullopt: unlimited (DistinctFullPages); 0: off
  std::optional<uint64_t> g3_blocks = 0;   // likewise
  std::optional<EvictionPolicy> policy;  // G2 and G3; unset: the settings' (leaf-first by default)
  std::optional<EvictionPolicy> disk_policy;  // G3 only; unset: as `policy`
  // Belady's MIN in G2 / G3 (wins over the policies): the replay knows the trace, so the pool
  // is told each block's next use (NextUseOracle over the requests' full pages; "now" is the
  // latest request looked up, requests in trace order).
  bool opt_host = false;
  bool opt_disk = false;
  // Engine steps a load takes (without --bytes). 0: a load finishes within its step. With N > 0
  // the loaded blocks stay pinned while N more steps (other requests' admissions and stores)
  // happen, as with a slow tier, so policies that treat held children differently differ;
  // a request's load finishes at the latest when its prefill ends.
  uint32_t load_steps = 0;
  double prefill_tokens_per_s = 10'000;                // may be +inf (instantaneous)
  double decode_tokens_per_s = 50;
  // Real bytes: G1 tensors in host memory, a KvbmWorker moving bytes_per_token * page_size
  // bytes per block through the transfer engine and the disk file; every loaded block is
  // compared with the pattern its sequence hash dictates.
  bool move_bytes = false;
  uint32_t bytes_per_token = 8;  // multiple of 4 (1 layer, K and V, 2-byte elements)
  KvbmConfig config;             // metrics endpoint, disk directory, admission filter
  std::function<bool(const ReplayProgress&)> progress;  // false cancels (Cancelled)
  uint64_t progress_every = 256;                        // finished requests between calls
  // Seconds to keep the manager (and its Prometheus endpoint, DYN_KVBM_METRICS) alive after
  // the last request, so the final figures can be scraped.
  double linger_seconds = 0;

  // RunReplayInstances only: engines sharing G4 (sizes above are per instance).
  uint32_t instances = 1;
  uint64_t g4_blocks = 0;  // shared G4 capacity in blocks; 0 = none
  ReplayAssign assign = ReplayAssign::kConversation;
  uint64_t assign_seed = 0;  // kRandom
};

struct ReplayResult {
  uint64_t requests = 0, rejected = 0;
  uint64_t block_refs = 0;  // trace blocks (hash ids) of the replayed requests
  uint64_t page_refs = 0;   // kvbm pages of the prompts (ceil(input / page))
  uint64_t input_tokens = 0;
  uint64_t g1_hit_blocks = 0, g2_hit_blocks = 0, g3_hit_blocks = 0;  // pages
  uint64_t g1_blocks = 0, g2_blocks = 0, g3_blocks = 0;              // sizes used
  uint64_t store_g1_g2 = 0, store_g1_g3 = 0, offload_g2_g3 = 0;      // blocks per path
  uint64_t disk_writes_avoided = 0, dropped_full = 0, skipped_cached = 0;
  uint64_t g1_evictions = 0, g2_evictions = 0, g3_evictions = 0;
  uint64_t max_waiting = 0, max_running = 0;
  double trace_seconds = 0;  // simulated time at the last finish
  double seconds = 0;        // wall time of the replay (parsing excluded)
  // move_bytes only
  uint64_t bytes_loaded = 0, bytes_stored = 0, blocks_verified = 0, mismatched_blocks = 0,
           load_errors = 0;
  uint16_t metrics_port = 0;
  uint64_t g4_hit_blocks = 0;  // RunReplayInstances: pages loaded from the shared G4
  uint64_t g4_put_blocks = 0;  // RunReplayInstances: pages this instance put into G4

  // Prefill tokens served by the instance's own tiers (G1 + G2 + G3): the local hits.
  uint64_t hit_tokens(uint32_t page_size) const {
    return (g1_hit_blocks + g2_hit_blocks + g3_hit_blocks) * page_size;
  }
};

struct ReplayInstancesResult {
  std::vector<ReplayResult> instances;  // by instance
  ReplayResult total;  // counts summed; sizes per instance; max_* the largest; seconds: wall time
  uint64_t g4_blocks = 0, g4_used = 0, g4_evictions = 0;
};

// Throws ConfigError for inconsistent options (no G2 and no G3, bytes_per_token not a multiple
// of 4, ...). Errors from the connector core are returned; Cancelled when progress said stop.
// RunReplay models one instance and ignores `instances`, `g4_blocks` and `assign`.
Result<ReplayResult> RunReplay(const Trace& trace, const ReplayOptions& options);

// `options.instances` instances sharing a G4 of `options.g4_blocks` (see above). ConfigError
// also for 0 instances, G4 without G2, and move_bytes (the byte path models one instance).
Result<ReplayInstancesResult> RunReplayInstances(const Trace& trace, const ReplayOptions& options);

}  // namespace kvbm
