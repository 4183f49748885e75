// The tier chain: the tiers below the engine's G1 (G2 host, G3 disk) and the policy that moves
// blocks along them. Every caller drives tiers through it: the connector leader (the vLLM and
// TensorRT-LLM adapters), the page connector (SGLang's adapter, page_connector.h), the
// simulated engine and trace replay. It owns
//
//   - the order of tiers and one block pool per tier (metadata: the bytes live in workers);
//   - write-through: a block the engine completed is stored G1 -> G2 (G1 -> G3 when only disk
//     is sized), once; blocks a tier already holds are not stored again;
//   - admission to G3: a frequency filter (DiskAdmissionFilter) on each sight of a block (a
//     repeat store or a G2 hit), unless DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER;
//   - priorities: offloads leave a priority queue highest first, FIFO within a priority;
//   - pins: blocks matched for a load stay referenced until the caller drops the returned
//     OnboardPins; blocks written by a step stay referenced for `pin_steps` more steps, so no
//     slot is reused while a worker (which may run a step behind) still writes or reads it;
//   - promotion: with `promote_disk_hits`, a G3 block onboarded to G1 is also copied G3 -> G2;
//   - warm restart: with `persistent_disk`, the G3 pool starts with the blocks every rank's
//     persistent disk file holds (RestoreDisk, at construction).
//
// It emits TransferOps (tier_ops.h); nothing here is engine-specific.
//
// Thread safety: not thread-safe; one thread (the engine's scheduler thread) makes every call.
// The pools it owns are thread-safe on their own.
#pragma once

#include <array>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kvbm/block_pool.h"
#include "kvbm/config.h"
#include "kvbm/metrics.h"
#include "kvbm/offload.h"
#include "kvbm/remote_tier.h"
#include "kvbm/tier_ops.h"

namespace kvbm {

struct TierChainOptions {
  uint64_t host_blocks = 0;  // G2 size in blocks; 0 = off
  uint64_t disk_blocks = 0;  // G3 size in blocks; 0 = off
  EvictionPolicy host_policy = kDefaultEvictionPolicy;
  EvictionPolicy disk_policy = kDefaultEvictionPolicy;
  // When set and it returns an Evictor for (tier, blocks), that one orders the tier instead of
  // its policy (trace replay's Belady optimum uses it).
  std::function<std::unique_ptr<Evictor>(TierId, uint64_t)> make_evictor;
  size_t offload_queue_capacity = 1 << 16;
  size_t disk_offloads_per_step = 1024;
  uint32_t pin_steps = 3;          // steps a written block stays referenced (this one + 2)
  bool promote_disk_hits = false;  // copy onboarded G3 blocks up to G2 (DYN_KVBM_PROMOTE_DISK_HITS)
  std::optional<RemoteTierOptions> remote;  // G4 (DYN_KVBM_REMOTE_*); needs G2

  // DYN_KVBM_DISK_PERSISTENT: where the workers keep their persistent G3 files and what names
  // them (storage.h PersistentDiskFileKey), so that the chain can take their blocks back.
  struct PersistentDisk {
    std::string directory;         // DYN_KVBM_DISK_CACHE_DIR
    std::string model_descriptor;  // the engine adapter's (model, KV dtype, block size)
    uint32_t world_size = 1;
  };
  std::optional<PersistentDisk> persistent_disk;

  // From the settings: sizes from the GB settings (or their block overrides) over
  // `bytes_per_block` (one block over every rank), eviction policies from
  // DYN_KVBM_{HOST,DISK}_EVICTION_POLICY, promotion from DYN_KVBM_PROMOTE_DISK_HITS. Arguments
  // that are given win over the settings. Throws ConfigError naming the setting at fault (no
  // tier sized, an unknown policy, bytes_per_block 0 with GB sizes, DYN_KVBM_DISK_PERSISTENT
  // without a model descriptor). `remote_descriptor` names G4 keys and persistent G3 files.
  static TierChainOptions FromConfig(const KvbmConfig& config, uint64_t bytes_per_block,
                                     std::optional<uint64_t> host_blocks = std::nullopt,
                                     std::optional<uint64_t> disk_blocks = std::nullopt,
                                     std::optional<EvictionPolicy> policy = std::nullopt,
                                     const std::string& remote_descriptor = "", uint32_t world_size = 1);
};

// Runs of a key list held along the chain: blocks[tier] consecutive keys from `host` then
// `disk`, in chain order.
struct ChainMatch {
  uint32_t host = 0;
  uint32_t disk = 0;
  uint32_t remote = 0;
  uint32_t total() const { return host + disk + remote; }
};

// Blocks pinned for one request's load, and which tier each device block loads from.
struct OnboardPins {
  std::vector<BlockRun> runs;  // dropped when the load is reported finished
  uint32_t host = 0, disk = 0, remote = 0, missing = 0;
};

struct TierChainStats {
  uint64_t store_host_blocks = 0, store_disk_blocks = 0, offload_disk_blocks = 0, promote_host_blocks = 0;
  uint64_t onboard_host_blocks = 0, onboard_disk_blocks = 0, onboard_remote_blocks = 0;
  uint64_t offload_remote_blocks = 0;
  uint64_t skipped_cached_blocks = 0;
  uint64_t dropped_full = 0, dropped_filter = 0, dropped_queue = 0;
  uint64_t load_errors = 0;
  // Blocks a match offered that Onboard could not place (G2 full of pinned blocks for a G4 fetch,
  // or gone): each becomes a load error the engine recomputes.
  uint64_t onboard_missing_blocks = 0;
  uint64_t restored_disk_blocks = 0;  // put back into G3 at start (warm restart)
};

class TierChain {
 public:
  // Throws ConfigError when no tier is sized.
  TierChain(const KvbmConfig& config, const TierChainOptions& options, std::shared_ptr<KvbmMetrics> metrics,
            std::shared_ptr<BlockRegistry> registry);
  ~TierChain();
  TierChain(const TierChain&) = delete;
  TierChain& operator=(const TierChain&) = delete;

  BlockPool* host() const { return host_.get(); }
  BlockPool* disk() const { return disk_.get(); }
  BlockPool* pool(TierId tier) const;
  uint64_t host_blocks() const { return host_ ? host_->num_blocks() : 0; }
  uint64_t disk_blocks() const { return disk_ ? disk_->num_blocks() : 0; }
  // The G4 index, when G4 is configured and was reachable at start.
  RemoteIndex* remote() const { return remote_.get(); }
  const TierChainOptions& options() const { return options_; }

  // The run of `keys` held along the chain: G2's longest prefix, then G3's continuing after it.
  // No side effects.
  ChainMatch Count(std::span<const BlockKey> keys) const;

  // Pins what `Count` found for `keys` (at most expected.total() blocks; fewer if blocks
  // vanished since) and appends load operations into `device_blocks` (one per key) for
  // `request_id` to `ops`. A promised block that vanished is a load from kNoBlock (the worker
  // reports it as a load error and the engine recomputes). With promotion on, disk hits are
  // also copied to G2. A G2 hit counts as a sight for G3 admission.
  OnboardPins Onboard(const std::string& request_id, std::span<const BlockKey> keys, const ChainMatch& expected,
                      std::span<const uint32_t> device_blocks, uint32_t priority, std::vector<TransferOp>& ops,
                      uint64_t& next_op_id);

  // Write-through of blocks the engine computed into `device_blocks` (one per key, in order).
  // `tokens`, when not empty, has one entry per key (KV events carry them), and so has
  // `inputs` (each block's extra keys, for the same events).
  void Store(std::span<const BlockKey> keys, std::span<const std::span<const Token>> tokens,
             std::span<const uint32_t> device_blocks, uint32_t priority,
             std::span<const BlockInputs> inputs = {});

  // A load from `tier` of `key` failed verification or I/O: never matched again.
  void LoadFailed(TierId tier, const BlockKey& key);

  // Ends a step: drains the G3 queue (within the per-step budget), appends the step's stores
  // and offloads to `ops`, and ages the store pins.
  void EndStep(std::vector<TransferOp>& ops, uint64_t& next_op_id);

  const TierChainStats& stats() const { return stats_; }
  size_t disk_queue_size() const { return disk_queue_.size(); }

  // For callers whose keys are independent pages (no parent links: an engine's own page keys,
  // see page_connector.h) and whose worker finishes each step's operations before the next.

  // Where each key is held, each key on its own: G2, else G3; the keys held in neither are
  // asked of G4 in one pipelined check, in order, and its leading hits are kRemote. nullopt:
  // not held. No side effects on the pools. (Count wants a parent-linked run; these keys
  // have no parents.)
  std::vector<std::optional<TierId>> Locate(std::span<const BlockKey> keys) const;
  // Drops the pins of every step ended so far and of the current one (stores, offloads,
  // promotions). Only for a caller whose worker has finished every transfer of those steps.
  void ReleaseStepPins();

 private:
  // Registers in the G3 pool, at their slots, the blocks that the side file of every rank says
  // it holds intact under the same key (a slot counts only where all ranks agree). Reads the
  // side files without locking them; the workers have verified their blocks when they opened
  // the files (before the scheduler side is built, in every engine kvbm drives), and verify
  // each one again on every read, so a claim that is wrong costs a load error, never a wrong
  // byte. Counted in stats and metrics, logged once.
  void RestoreDisk(const TierChainOptions::PersistentDisk& persistent);
  struct DiskOffload {
    ImmutableBlock host_block;
    BlockKey key;
  };
  void SeeForDisk(const BlockRun& host_run, size_t index, const BlockKey& key, uint32_t priority);
  void CountDropped(uint64_t blocks);
  void DrainDiskQueue();

  const KvbmConfig config_;
  const TierChainOptions options_;
  std::shared_ptr<KvbmMetrics> metrics_;
  std::shared_ptr<BlockRegistry> registry_;
  std::shared_ptr<BlockPool> host_, disk_;
  DiskAdmissionFilter filter_;
  OffloadQueue<DiskOffload> disk_queue_;
  void SeeForRemote(const BlockRun& host_run, size_t index, const BlockKey& key);
  std::unique_ptr<RemoteIndex> remote_;
  DiskAdmissionFilter remote_filter_;
  std::vector<BlockOp> step_store_host_, step_store_disk_, step_offload_disk_, step_promote_host_,
      step_offload_remote_;
  std::vector<BlockRun> current_pins_;
  std::vector<ImmutableBlock> current_single_pins_;
  std::deque<std::pair<std::vector<BlockRun>, std::vector<ImmutableBlock>>> step_pins_;
  TierChainStats stats_;
};

}  // namespace kvbm
