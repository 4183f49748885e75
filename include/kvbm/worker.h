// The worker side of the connector core: one per tensor-parallel rank, in the engine's worker
// process. It owns the memory (G2 host storage, the G3 file) and the transfer engine, knows the
// engine's KV tensors (G1), and applies the leader's per-step operations to its own shard.
//
// Ordering (why loads and stores never see torn or stale bytes):
//  - loads start when a step is bound (before the forward pass);
//  - stores of G1 blocks run in ForwardPassDone(), i.e. after the forward pass that wrote them,
//    and complete before it returns, so the engine may reuse those G1 blocks afterwards;
//  - a store into a host slot waits until no load or disk offload still reads that slot;
//  - a load or write of a disk slot starts only after the previous write of that slot finished;
//  - every disk read is verified against the slot's side data (hash + checksum); a block that
//    does not verify is a load error for exactly that G1 block, never served.
//
// Thread safety: the engine calls BindStep / ForwardPassDone / GetFinished / TakeLoadErrors from
// one thread (its worker thread); completions arrive on transfer threads. mu_ guards the
// bookkeeping; it is never held while submitting a transfer.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <thread>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "kvbm/config.h"
#include "kvbm/connector_ops.h"
#include "kvbm/layout.h"
#include "kvbm/metrics.h"
#include "kvbm/remote_tier.h"
#include "kvbm/storage.h"
#include "kvbm/transfer.h"

namespace kvbm {

// The engine's KV tensors, one per layer (vLLM: kv_caches dict in layer order), or, with
// `pool`, one tensor holding every layer blocks-first (TensorRT-LLM's primary pool).
struct DeviceTensors {
  std::vector<uintptr_t> layer_pointers;
  std::vector<TensorShape> layer_shapes;
  uint64_t num_blocks = 0;
  uint64_t page_size = 0;  // tokens per block
  MemoryKind kind = MemoryKind::kHost;  // kHost for a CPU engine, kDevice for CUDA tensors
  int device_index = -1;
  bool pool = false;  // one [num_blocks, num_layers, kv_factor, ...] tensor (LayoutFromPoolTensor)
  // How the elements inside one chunk are ordered, as the engine adapter knows it (e.g.
  // "token,head,dim" or "head,token,dim"); kvbm sees chunks as bytes, so this is what tells two
  // engines with equal sizes but different orders apart. Part of block_format().
  std::string element_order;
};

class KvbmWorker {
 public:
  KvbmWorker(const KvbmConfig& config, uint32_t rank, uint32_t world_size,
             std::shared_ptr<KvbmMetrics> metrics = nullptr);
  ~KvbmWorker();  // waits for transfers in flight

  // Reads the engine tensors' shapes and strides into the G1 layout. Errors name the layer.
  // Registering again (another engine attaching to the same tiers) waits for transfers in
  // flight and is refused when its block_format() differs from the format of the blocks the
  // tiers hold: those bytes would be misread, so they are never served to it.
  Status RegisterKvCaches(const DeviceTensors& tensors);
  // The layout fingerprint of one block as G2/G3 store it: layers, K/V split, page size,
  // elements per token, element size and element order. Empty before registration.
  std::string block_format() const;
  // The fingerprint of the blocks the tiers hold (set by AllocateTiers); empty before.
  const std::string& tier_block_format() const { return tier_format_; }
  bool registered() const { return device_layout_ != nullptr; }
  uint64_t bytes_per_block() const;  // this rank's bytes of one block (all layers)
  uint64_t device_blocks() const;
  const Layout* device_layout() const { return device_layout_.get(); }

  // Allocates G2 (host) and G3 (disk) for this many blocks (0 = tier off). Errors name the
  // setting that sized them. With DYN_KVBM_DISK_PERSISTENT, G3 is this rank's persistent file,
  // named by `model_descriptor` (the engine adapter's: model, KV dtype, block size; the same the
  // leader gets), rank and world size, and its intact blocks are kept (disk_recovery()); the
  // descriptor is then required (InvalidArgument naming the setting without it).
  Status AllocateTiers(uint64_t host_blocks, uint64_t disk_blocks, const std::string& model_descriptor = "");
  // What opening a persistent G3 found (empty otherwise).
  const DiskRecovery* disk_recovery() const { return disk_ && disk_->persistent() ? &disk_->recovery() : nullptr; }
  uint64_t host_blocks() const { return host_blocks_; }
  uint64_t disk_blocks() const { return disk_blocks_; }

  // Connects this rank to the remote tier (G4). Unreachable: an error when options.required,
  // else a warning and no G4 (its fetches fail as load errors, its offloads are skipped).
  // REQUIRES: AllocateTiers with a host tier.
  Status ConnectRemote(const RemoteTierOptions& options);
  bool has_remote() const { return remote_ != nullptr; }

  // Binds one step's metadata (msgpack from the leader): loads start now.
  Status BindStep(std::span<const uint8_t> metadata);
  Status BindStep(const StepMetadata& meta);
  // True when the bound step has stores for ForwardPassDone (a GPU engine must make its
  // compute stream's writes visible before them).
  bool HasPendingStores() const { return !pending_stores_.empty(); }
  // The forward pass of the bound step finished: runs its stores (blocking until G1 has been
  // read), then starts its disk offloads.
  Status ForwardPassDone();
  // Requests whose loads completed since the last call, and requests the leader asked to be
  // told about once their in-flight load stopped touching their blocks.
  std::pair<std::vector<std::string>, std::vector<std::string>> GetFinished();  // (sending, recving)
  // G1 block ids whose load failed since the last call.
  std::vector<uint32_t> TakeLoadErrors();
  // Waits until no transfer is in flight (tests, shutdown).
  void WaitIdle();
  // Waits until every load started so far has finished (its request is then reported by
  // GetFinished): for engines that load synchronously, before the forward pass reads the blocks.
  void WaitForLoads();
  // Waits until the loads of these requests have finished (loads of other requests may still
  // run): a synchronous load's blocks are in place before the forward pass that reads them,
  // without waiting for another request's asynchronous load from a slower tier.
  void WaitForRequestLoads(std::span<const std::string> request_ids);
  // Test seam: holds back the completion of every load started from now on by `delay`, as a
  // slow tier would, so engine tests can abort or preempt requests while loads are in flight.
  void SetLoadDelayForTesting(std::chrono::milliseconds delay) { test_load_delay_ms_ = delay.count(); }

  // Direct access for tests and benchmarks (the simulated engine fills G1 through these).
  uint8_t* host_data() const { return host_ ? host_->data() : nullptr; }
  const HostStorage* host_storage() const { return host_.get(); }
  const TierMemory& device_memory() const { return device_mem_; }
  const TierMemory& host_memory() const { return host_mem_; }
  const TierMemory& disk_memory() const { return disk_mem_; }
  TransferEngine& transfer_engine() { return *engine_; }
  const std::shared_ptr<KvbmMetrics>& metrics() const { return metrics_; }

 private:
  void StartLoad(const TransferOp& op);
  void StartPromotion(const TransferOp& op);
  void StartFetch(const TransferOp& op);
  void StartRemotePut(const TransferOp& op);
  void RunRemote(std::function<void()> task);  // on the G4 thread, in order
  void RemoteLoop();
  void StartDiskWrite(const TransferOp& op, TransferPath path, const TierMemory& src);
  void LoadDone(const std::string& request_id, const std::vector<uint32_t>& failed_device_blocks);
  void WaitHostSlotsFree(const std::vector<BlockOp>& blocks);
  void ReleaseHostReaders(const std::vector<BlockOp>& blocks);
  // Unfinished writes among `slots` (forgetting finished ones). Takes mu_.
  std::vector<std::shared_ptr<TransferCompletion>> PendingWrites(
      std::unordered_map<uint32_t, std::shared_ptr<TransferCompletion>>& writes, const std::vector<uint32_t>& slots);

  const KvbmConfig config_;
  const uint32_t rank_, world_size_;
  std::shared_ptr<KvbmMetrics> metrics_;
  std::unique_ptr<Layout> device_layout_;
  std::string element_order_;  // of the registered G1 tensors
  std::string tier_format_;    // block_format() when the tiers were allocated
  std::unique_ptr<FullyContiguousLayout> host_layout_, disk_layout_;
  std::unique_ptr<HostStorage> host_;
  std::unique_ptr<DiskStorage> disk_;
  std::unique_ptr<DiskSideData> side_;
  TierMemory device_mem_, host_mem_, disk_mem_;
  uint64_t host_blocks_ = 0, disk_blocks_ = 0;
  std::unique_ptr<TransferEngine> engine_;

  std::vector<TransferOp> pending_stores_;  // bound step's stores, engine thread only
  std::vector<std::vector<uint32_t>> host_store_ops_;  // host slots of each G1 -> G2 store of the step
  std::vector<TransferOp> pending_offloads_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::unordered_map<uint32_t, uint32_t> host_readers_;                          // GUARDED_BY(mu_)
  std::unordered_map<uint32_t, std::shared_ptr<TransferCompletion>> disk_writes_;  // GUARDED_BY(mu_)
  std::unordered_map<uint32_t, std::shared_ptr<TransferCompletion>> host_writes_;  // GUARDED_BY(mu_) promotions
  std::map<std::string, uint32_t> loads_in_flight_;                              // GUARDED_BY(mu_)
  std::set<std::string> report_sending_;                                         // GUARDED_BY(mu_)
  std::vector<std::string> done_recving_, done_sending_;                         // GUARDED_BY(mu_)
  std::vector<uint32_t> load_errors_;                                            // GUARDED_BY(mu_)
  uint32_t transfers_in_flight_ = 0;                                             // GUARDED_BY(mu_)
  std::vector<uint8_t> host_valid_;  // GUARDED_BY(mu_) 1 = the slot holds the block last stored
  std::atomic<int64_t> test_load_delay_ms_{0};

  // G4: calls run on one thread of their own, never the engine's (remote_mu_ guards the queue).
  std::unique_ptr<RedisCluster> remote_;
  std::optional<RemoteTierOptions> remote_options_;
  uint64_t remote_fingerprint_ = 0;
  std::mutex remote_mu_;
  std::condition_variable remote_cv_;
  std::deque<std::function<void()>> remote_tasks_;  // GUARDED_BY(remote_mu_)
  bool remote_stop_ = false;                         // GUARDED_BY(remote_mu_)
  std::thread remote_thread_;
};

}  // namespace kvbm
