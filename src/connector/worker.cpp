#include "kvbm/worker.h"

#include <fmt/format.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "kvbm/cuda.h"
#include "kvbm/log.h"
#include "kvbm/remote_block.h"

namespace kvbm {
namespace {

TransferPath PathOf(OpKind kind) {
  switch (kind) {
    case OpKind::kStoreHost: return TransferPath::kD2H;
    case OpKind::kStoreDisk: return TransferPath::kD2D;
    case OpKind::kOffloadDisk: return TransferPath::kH2D_Disk;
    case OpKind::kLoadHost: return TransferPath::kH2Dev;
    case OpKind::kLoadDisk: return TransferPath::kDisk2Dev;
    case OpKind::kPromoteHost: return TransferPath::kDisk2H;
    case OpKind::kFetchRemote: return TransferPath::kRemote2H;
    case OpKind::kOffloadRemote: return TransferPath::kH2Remote;
  }
  return TransferPath::kD2H;
}

// Calls `fn` once every completion in `deps` is done (at once when there are none).
void AfterAll(const std::vector<std::shared_ptr<TransferCompletion>>& deps, std::function<void()> fn) {
  if (deps.empty()) {
    fn();
    return;
  }
  auto remaining = std::make_shared<std::atomic<size_t>>(deps.size());
  auto shared_fn = std::make_shared<std::function<void()>>(std::move(fn));
  for (auto& d : deps)
    d->OnDone([remaining, shared_fn](const TransferResult&) {
      if (remaining->fetch_sub(1) == 1) (*shared_fn)();
    });
}

}  // namespace

KvbmWorker::KvbmWorker(const KvbmConfig& config, uint32_t rank, uint32_t world_size,
                       std::shared_ptr<KvbmMetrics> metrics)
    : config_(config), rank_(rank), world_size_(world_size),
      metrics_(metrics ? std::move(metrics) : std::make_shared<KvbmMetrics>(config.cache_stats_max_requests)) {
  TransferEngineOptions options;
  options.max_concurrent_transfers = config.max_concurrent_transfers;
  options.max_batch_size = config.max_transfer_batch_size;
  engine_ = std::make_unique<TransferEngine>(options, metrics_);
}

KvbmWorker::~KvbmWorker() {
  WaitIdle();
  if (remote_thread_.joinable()) {
    {
      std::lock_guard lock(remote_mu_);
      remote_stop_ = true;
    }
    remote_cv_.notify_all();
    remote_thread_.join();
  }
  // The engine's destructor returns once every batch (and its completion callback, which
  // touches this worker) has finished: it must go before the members those callbacks use.
  engine_.reset();
}

namespace {

std::string FormatOf(const LayoutDims& d, const std::string& element_order) {
  return fmt::format("layers={} outer={} page={} inner={} dtype_bytes={} order={}", d.num_layers, d.outer_dim,
                     d.page_size, d.inner_dim, d.dtype_bytes, element_order.empty() ? "?" : element_order);
}

}  // namespace

Status KvbmWorker::RegisterKvCaches(const DeviceTensors& t) {
  if (t.layer_pointers.size() != t.layer_shapes.size())
    return MakeError(ErrorCode::kInvalidArgument, "register_kv_caches: one pointer per layer shape is required");
  std::unique_ptr<Layout> layout;
  if (t.pool) {
    if (t.layer_shapes.size() != 1)
      return MakeError(ErrorCode::kInvalidArgument,
                       fmt::format("register_kv_caches: a pool is one tensor, got {}", t.layer_shapes.size()));
    auto pool = LayoutFromPoolTensor(t.layer_shapes[0], t.num_blocks, t.page_size);
    if (!pool) return std::unexpected(pool.error());
    layout = std::move(*pool);
  } else {
    auto layers = LayoutFromTensorShapes(t.layer_shapes, t.num_blocks, t.page_size);
    if (!layers) return std::unexpected(layers.error());
    layout = std::move(*layers);
  }
  if (!tier_format_.empty()) {
    std::string format = FormatOf(layout->dims(), t.element_order);
    if (format != tier_format_)
      return MakeError(ErrorCode::kFailedPrecondition,
                       fmt::format("rank {}: layout fingerprint differs: this engine's blocks are [{}], the blocks "
                                   "kvbm's tiers hold are [{}]; refusing, they would be misread",
                                   rank_, format, tier_format_));
    WaitIdle();  // nothing in flight may still address the previous G1 tensors
  }
  if (t.kind == MemoryKind::kDevice) {
    // GPU tensors need the CUDA backend; without it every copy would fail, so refuse now with
    // the reason rather than run an engine whose offloads all fail.
    auto cuda = MakeCudaBackend(t.device_index < 0 ? 0 : t.device_index);
    if (!cuda)
      return MakeError(ErrorCode::kUnavailable,
                       fmt::format("KV tensors are on CUDA device {} but kvbm's CUDA backend is unavailable: {}",
                                   t.device_index, cuda.error().message()));
    engine_->AddBackend(std::move(*cuda));
  }
  std::vector<uint8_t*> bases;
  for (uintptr_t p : t.layer_pointers) {
    if (p == 0) return MakeError(ErrorCode::kInvalidArgument, "register_kv_caches: null tensor pointer");
    bases.push_back(reinterpret_cast<uint8_t*>(p));
  }
  device_layout_ = std::move(layout);
  element_order_ = t.element_order;
  device_mem_ = TierMemory{TierId::kDevice, t.kind, device_layout_.get(), {}, -1, nullptr, t.device_index};
  device_mem_.bases = std::move(bases);
  Log(LogLevel::kInfo, "rank {}: G1 layout {}", rank_, device_layout_->Describe());
  return {};
}

std::string KvbmWorker::block_format() const {
  return device_layout_ ? FormatOf(device_layout_->dims(), element_order_) : std::string();
}

uint64_t KvbmWorker::bytes_per_block() const { return device_layout_ ? device_layout_->dims().block_bytes() : 0; }
uint64_t KvbmWorker::device_blocks() const { return device_layout_ ? device_layout_->dims().num_blocks : 0; }

Status KvbmWorker::AllocateTiers(uint64_t host_blocks, uint64_t disk_blocks, const std::string& model_descriptor) {
  if (!device_layout_) return MakeError(ErrorCode::kFailedPrecondition, "AllocateTiers before RegisterKvCaches");
  if (host_ || disk_) return MakeError(ErrorCode::kFailedPrecondition, "AllocateTiers called twice");
  LayoutDims dims = device_layout_->dims();
  if (host_blocks > 0) {
    dims.num_blocks = host_blocks;
    try {
      host_layout_ = std::make_unique<FullyContiguousLayout>(dims, kDiskAlignment);
    } catch (const ConfigError& e) {
      return MakeError(ErrorCode::kInvalidArgument, fmt::format("G2 sized by DYN_KVBM_CPU_CACHE_*: {}", e.what()));
    }
    HostStorageOptions host_options;
    // Huge pages: each 2 MiB of G2 is one physically contiguous page, so an O_DIRECT read or
    // write of a block is a few large DMA segments instead of hundreds of scattered 4 KiB pages.
    // On this project's VM that made G3 -> G2 reads 3x faster (0.7 -> 2.2 GB/s; BENCHMARKS.md,
    // "Disk: huge pages for G2"). It also makes first touch and pinning cheaper.
    host_options.huge_pages = true;
    if (config_.enable_numa.value_or(false)) {
      // DYN_KVBM_ENABLE_NUMA: G2 on the GPU's node, or, without a GPU (or when its node is
      // unknown), on the node of the thread that allocates it (the engine's worker thread).
      int node = device_mem_.kind == MemoryKind::kDevice ? CudaDeviceNumaNode(device_mem_.device_index) : -1;
      host_options.numa_node = node >= 0 ? node : CurrentNumaNode();
    }
    auto host = HostStorage::Allocate(host_layout_->allocation_bytes(0), host_options);
    if (!host)
      return MakeError(host.error().code(), fmt::format("G2 ({} blocks, from DYN_KVBM_CPU_CACHE_*): {}", host_blocks,
                                                        host.error().message()));
    host_ = std::move(*host);
    host_mem_ = TierMemory{TierId::kHost, MemoryKind::kHost, host_layout_.get(), {host_->data()}};
    host_blocks_ = host_blocks;
    host_valid_.assign(host_blocks, 0);
  }
  if (disk_blocks > 0) {
    dims.num_blocks = disk_blocks;
    try {
      disk_layout_ = std::make_unique<FullyContiguousLayout>(dims, kDiskAlignment);
    } catch (const ConfigError& e) {
      return MakeError(ErrorCode::kInvalidArgument, fmt::format("G3 sized by DYN_KVBM_DISK_CACHE_*: {}", e.what()));
    }
    const DiskStorageOptions disk_options = DiskStorageOptions::FromConfig(config_);
    Result<std::unique_ptr<DiskStorage>> disk;
    if (disk_options.persistent) {
      if (model_descriptor.empty())
        return MakeError(ErrorCode::kInvalidArgument,
                         fmt::format("rank {}: DYN_KVBM_DISK_PERSISTENT=true needs the engine's model descriptor to name "
                                     "the disk file by, and this engine adapter gives none",
                                     rank_));
      const uint64_t block_bytes = disk_layout_->dims().block_bytes();
      DiskSlotGeometry geometry{disk_blocks, block_bytes, disk_layout_->block_stride()};
      disk = DiskStorage::OpenPersistent(
          disk_options, geometry,
          PersistentDiskLayoutFingerprint(model_descriptor, rank_, world_size_, block_format(), block_bytes),
          PersistentDiskFileKey(model_descriptor, rank_, world_size_));
    } else {
      disk = DiskStorage::Create(disk_options, disk_layout_->allocation_bytes(0));
    }
    if (!disk)
      return MakeError(disk.error().code(), fmt::format("G3 ({} blocks, from DYN_KVBM_DISK_CACHE_*): {}", disk_blocks,
                                                        disk.error().message()));
    disk_ = std::move(*disk);
    if (disk_->persistent()) {
      const DiskRecovery& r = disk_->recovery();
      auto count = [&](DiskRecoveryResult result, uint64_t n) {
        metrics_->disk_recovery_blocks[static_cast<size_t>(result)] += n;
      };
      count(DiskRecoveryResult::kVerified, r.blocks.size());
      count(DiskRecoveryResult::kTorn, r.torn);
      count(DiskRecoveryResult::kCorrupt, r.corrupt);
      count(DiskRecoveryResult::kOtherLayout, r.other_layout);
      count(DiskRecoveryResult::kDuplicate, r.duplicates);
      side_ = std::make_unique<DiskSideData>(disk_blocks, disk_->slot_records(), r);
    } else {
      side_ = std::make_unique<DiskSideData>(disk_blocks);
    }
    disk_mem_ = TierMemory{TierId::kDisk, MemoryKind::kDisk, disk_layout_.get(), {}, disk_->fd(), side_.get()};
    disk_blocks_ = disk_blocks;
  }
  if (host_blocks > 0 || disk_blocks > 0) tier_format_ = block_format();
  return {};
}

Status KvbmWorker::BindStep(std::span<const uint8_t> metadata) {
  auto meta = DecodeStepMetadata(metadata);
  if (!meta) return std::unexpected(meta.error());
  return BindStep(*meta);
}

Status KvbmWorker::BindStep(const StepMetadata& meta) {
  if (meta.host_blocks != host_blocks_ || meta.disk_blocks != disk_blocks_)
    return MakeError(ErrorCode::kFailedPrecondition,
                     fmt::format("rank {}: leader sized G2/G3 as {}/{} blocks, this worker has {}/{}", rank_,
                                 meta.host_blocks, meta.disk_blocks, host_blocks_, disk_blocks_));
  for (const TransferOp& op : meta.ops) {
    const OpKind k = op.kind;
    bool needs_host = k == OpKind::kStoreHost || k == OpKind::kLoadHost || k == OpKind::kOffloadDisk ||
                      k == OpKind::kPromoteHost || k == OpKind::kFetchRemote || k == OpKind::kOffloadRemote;
    bool needs_disk = k == OpKind::kStoreDisk || k == OpKind::kLoadDisk || k == OpKind::kOffloadDisk ||
                      k == OpKind::kPromoteHost;
    if ((needs_host && !host_) || (needs_disk && !disk_))
      return MakeError(ErrorCode::kFailedPrecondition, fmt::format("op {} needs a tier this worker lacks", OpKindName(op.kind)));
    for (const BlockOp& b : op.blocks) {
      if (k == OpKind::kFetchRemote || k == OpKind::kOffloadRemote) {
        uint32_t slot = k == OpKind::kFetchRemote ? b.dst : b.src;
        if (slot >= host_blocks_)
          return MakeError(ErrorCode::kInvalidArgument,
                           fmt::format("op {} ({}) host slot {} out of range", op.id, OpKindName(k), slot));
        continue;
      }
      uint64_t src_n = k == OpKind::kStoreHost || k == OpKind::kStoreDisk                ? device_blocks()
                       : k == OpKind::kLoadDisk || k == OpKind::kPromoteHost ? disk_blocks_
                                                                             : host_blocks_;
      uint64_t dst_n = IsLoad(k)                                                   ? device_blocks()
                       : k == OpKind::kStoreHost || k == OpKind::kPromoteHost ? host_blocks_
                                                                             : disk_blocks_;
      bool src_ok = b.src < src_n || (IsLoad(op.kind) && b.src == kNoBlock);
      if (!src_ok || b.dst >= dst_n)
        return MakeError(ErrorCode::kInvalidArgument, fmt::format("op {} ({}) block ({} -> {}) out of range", op.id,
                                                                  OpKindName(op.kind), b.src, b.dst));
    }
  }
  {
    std::lock_guard lock(mu_);
    // Count every load of a request before starting any, so that a fast first load cannot
    // report the request finished while a second one is still running; and before the
    // finished requests below, so that a request finished in the step that starts its load
    // (this metadata) waits for that load instead of being reported as sent at once while
    // the load still writes into its blocks.
    for (const TransferOp& op : meta.ops)
      if (IsLoad(op.kind)) ++loads_in_flight_[op.request_id];
    for (const std::string& r : meta.finished_while_loading) {
      if (loads_in_flight_.count(r)) {
        report_sending_.insert(r);
        continue;
      }
      // The load finished after the last GetFinished, so the request sits in done_recving_.
      // The leader was told it is still loading and waits for "sending"; reporting it as
      // received too would make the engine free its blocks twice (vLLM asserts on that).
      std::erase(done_recving_, r);
      done_sending_.push_back(r);
    }
  }
  for (const TransferOp& op : meta.ops) {
    if (IsLoad(op.kind)) StartLoad(op);
    else if (op.kind == OpKind::kFetchRemote) StartFetch(op);  // before the loads that read its slots
    else if (op.kind == OpKind::kOffloadDisk || op.kind == OpKind::kPromoteHost || op.kind == OpKind::kOffloadRemote)
      pending_offloads_.push_back(op);
    else pending_stores_.push_back(op);
  }
  return {};
}

void KvbmWorker::StartLoad(const TransferOp& op) {
  const bool from_disk = op.kind == OpKind::kLoadDisk;
  std::vector<BlockCopy> copies;
  std::vector<uint32_t> missing;
  std::vector<uint32_t> src_slots;
  for (const BlockOp& b : op.blocks) {
    if (b.src == kNoBlock) {
      missing.push_back(b.dst);
      continue;
    }
    copies.push_back({b.src, b.dst, SequenceHash(b.hash)});
    src_slots.push_back(b.src);
  }
  std::vector<BlockOp> readers;
  {
    std::lock_guard lock(mu_);
    ++transfers_in_flight_;
    if (!from_disk)
      for (const auto& c : copies) {
        ++host_readers_[c.src];
        readers.push_back({c.src, c.dst, c.hash.value()});
      }
  }
  // A disk slot is read after its last write; a host slot after a promotion writing it.
  auto deps = from_disk ? PendingWrites(disk_writes_, src_slots) : PendingWrites(host_writes_, src_slots);
  std::string request_id = op.request_id;
  TransferPath path = PathOf(op.kind);
  const TierMemory* src = from_disk ? &disk_mem_ : &host_mem_;
  auto delay = std::chrono::milliseconds(test_load_delay_ms_.load());
  AfterAll(deps, [this, copies = std::move(copies), missing, request_id, path, src, readers, from_disk, delay]() mutable {
    // A host slot whose store or promotion failed holds no block: never served (disk slots
    // verify on read).
    std::vector<uint32_t> failed_now = missing;
    if (!from_disk) {
      std::vector<BlockCopy> valid;
      std::lock_guard lock(mu_);
      for (const BlockCopy& c : copies) {
        if (c.src < host_valid_.size() && host_valid_[c.src]) valid.push_back(c);
        else failed_now.push_back(c.dst);
      }
      copies.swap(valid);
    }
    std::vector<uint32_t> dst_of;
    for (const BlockCopy& c : copies) dst_of.push_back(c.dst);
    auto completion = engine_->Submit(path, *src, device_mem_, copies);
    completion->OnDone([this, dst_of, failed_now, request_id, readers, delay](const TransferResult& r) {
      std::vector<uint32_t> failed = failed_now;
      for (uint32_t i : r.failed) failed.push_back(dst_of[i]);
      if (r.first_error) Log(LogLevel::kWarn, "load for {} failed for {} blocks: {}", request_id, failed.size(), r.first_error->ToString());
      if (delay.count() > 0) {
        // Off the thread that completed the copy, which may be the engine's own.
        std::thread([this, readers, request_id, failed, delay] {
          std::this_thread::sleep_for(delay);
          ReleaseHostReaders(readers);
          LoadDone(request_id, failed);
        }).detach();
        return;
      }
      ReleaseHostReaders(readers);
      LoadDone(request_id, failed);
    });
  });
}

void KvbmWorker::StartPromotion(const TransferOp& op) {
  std::vector<BlockCopy> copies;
  std::vector<uint32_t> src_slots, dst_slots;
  for (const BlockOp& b : op.blocks) {
    copies.push_back({b.src, b.dst, SequenceHash(b.hash)});
    src_slots.push_back(b.src);
    dst_slots.push_back(b.dst);
  }
  WaitHostSlotsFree(op.blocks);
  auto deps = PendingWrites(disk_writes_, src_slots);
  auto gate = std::make_shared<TransferCompletion>();
  {
    std::lock_guard lock(mu_);
    for (uint32_t s : dst_slots) {
      host_valid_[s] = 0;  // until the verified read has landed
      host_writes_[s] = gate;
    }
    ++transfers_in_flight_;
  }
  AfterAll(deps, [this, copies, dst_slots, gate, id = op.id]() {
    auto completion = engine_->Submit(TransferPath::kDisk2H, disk_mem_, host_mem_, copies);
    completion->OnDone([this, dst_slots, gate, id](const TransferResult& r) {
      if (!r.ok())
        Log(LogLevel::kWarn, "promotion op {} (G3 -> G2) failed for {} blocks: {}", id, r.failed.size(),
            r.first_error ? r.first_error->ToString() : "unknown");
      std::vector<bool> failed(dst_slots.size(), false);
      for (uint32_t f : r.failed) failed[f] = true;
      {
        std::lock_guard lock(mu_);
        for (size_t k = 0; k < dst_slots.size(); ++k) host_valid_[dst_slots[k]] = failed[k] ? 0 : 1;
      }
      gate->Finish(r);
      std::lock_guard lock(mu_);
      --transfers_in_flight_;
      cv_.notify_all();
    });
  });
}

void KvbmWorker::LoadDone(const std::string& request_id, const std::vector<uint32_t>& failed) {
  {
    std::lock_guard lock(mu_);
    load_errors_.insert(load_errors_.end(), failed.begin(), failed.end());
    auto it = loads_in_flight_.find(request_id);
    if (it != loads_in_flight_.end() && --it->second == 0) {
      loads_in_flight_.erase(it);
      if (report_sending_.erase(request_id)) done_sending_.push_back(request_id);
      else done_recving_.push_back(request_id);
    }
    --transfers_in_flight_;
    // Under the lock: once the count drops, a waiter may destroy this worker.
    cv_.notify_all();
  }
}

void KvbmWorker::ReleaseHostReaders(const std::vector<BlockOp>& blocks) {
  {
    std::lock_guard lock(mu_);
    for (const BlockOp& b : blocks) {
      auto it = host_readers_.find(b.src);
      if (it != host_readers_.end() && --it->second == 0) host_readers_.erase(it);
    }
    cv_.notify_all();
  }
}

void KvbmWorker::WaitHostSlotsFree(const std::vector<BlockOp>& blocks) {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] {
    for (const BlockOp& b : blocks)
      if (host_readers_.count(b.dst)) return false;
    return true;
  });
}

std::vector<std::shared_ptr<TransferCompletion>> KvbmWorker::PendingWrites(
    std::unordered_map<uint32_t, std::shared_ptr<TransferCompletion>>& writes, const std::vector<uint32_t>& slots) {
  std::vector<std::shared_ptr<TransferCompletion>> deps;
  std::lock_guard lock(mu_);
  for (uint32_t s : slots) {
    auto it = writes.find(s);
    if (it == writes.end()) continue;
    if (it->second->done()) writes.erase(it);
    else deps.push_back(it->second);
  }
  return deps;
}

void KvbmWorker::StartDiskWrite(const TransferOp& op, TransferPath path, const TierMemory& src) {
  std::vector<BlockCopy> copies;
  std::vector<uint32_t> slots;
  for (const BlockOp& b : op.blocks) {
    BlockCopy c{b.src, b.dst, SequenceHash(b.hash)};
    if (b.has_lineage) c.lineage = DiskBlockLineage{b.block_hash, b.parent, b.position, true};
    copies.push_back(c);
    slots.push_back(b.dst);
  }
  const bool reads_host = op.kind == OpKind::kOffloadDisk;
  auto deps = PendingWrites(disk_writes_, slots);
  if (reads_host) {
    // A G4 fetch or a promotion still landing in a source host slot lands first.
    std::vector<uint32_t> host_slots;
    for (const BlockOp& b : op.blocks) host_slots.push_back(b.src);
    for (auto& w : PendingWrites(host_writes_, host_slots)) deps.push_back(std::move(w));
  }
  // This write's completion gates later reads and writes of the same slots.
  auto gate = std::make_shared<TransferCompletion>();
  std::vector<BlockOp> readers;
  {
    std::lock_guard lock(mu_);
    for (uint32_t s : slots) disk_writes_[s] = gate;
    ++transfers_in_flight_;
    if (reads_host)
      for (const BlockOp& b : op.blocks) {
        ++host_readers_[b.src];
        readers.push_back(b);
      }
  }
  const TierMemory* src_ptr = &src;
  AfterAll(deps, [this, copies, path, src_ptr, gate, readers, reads_host, id = op.id]() mutable {
    if (reads_host) {
      // Only a host slot that holds its block (its store, fetch or promotion landed) is written
      // down. The disk slot of any other is left holding nothing valid, so a read of it fails
      // verification instead of serving the stale bytes the host slot still had.
      std::vector<BlockCopy> valid;
      uint64_t skipped = 0;
      {
        std::lock_guard lock(mu_);
        for (const BlockCopy& c : copies) {
          if (c.src < host_valid_.size() && host_valid_[c.src]) {
            valid.push_back(c);
          } else {
            disk_mem_.side->Invalidate(c.dst);
            ++skipped;
          }
        }
      }
      copies.swap(valid);
      if (skipped > 0) {
        Log(LogLevel::kWarn, "disk offload op {}: {} blocks skipped, their host slots hold no valid block", id, skipped);
        if (metrics_) metrics_->dropped_offloads[static_cast<size_t>(DropReason::kIoError)] += skipped;
      }
    }
    auto completion = engine_->Submit(path, *src_ptr, disk_mem_, copies);
    completion->OnDone([this, gate, readers, id](const TransferResult& r) {
      if (!r.ok()) {
        Log(LogLevel::kWarn, "disk write op {} failed for {} blocks: {}", id, r.failed.size(),
            r.first_error ? r.first_error->ToString() : "unknown");
        if (metrics_) metrics_->dropped_offloads[static_cast<size_t>(DropReason::kIoError)] += r.failed.size();
      }
      ReleaseHostReaders(readers);
      gate->Finish(r);
      std::lock_guard lock(mu_);
      --transfers_in_flight_;
      cv_.notify_all();
    });
  });
}

Status KvbmWorker::ForwardPassDone() {
  std::vector<TransferOp> stores;
  stores.swap(pending_stores_);
  std::vector<std::shared_ptr<TransferCompletion>> waits, host_waits;
  for (const TransferOp& op : stores) {
    if (op.kind == OpKind::kStoreHost) {
      WaitHostSlotsFree(op.blocks);
      std::vector<BlockCopy> copies;
      std::vector<uint32_t> slots;
      for (const BlockOp& b : op.blocks) {
        copies.push_back({b.src, b.dst, SequenceHash(b.hash)});
        slots.push_back(b.dst);
      }
      // A promotion still writing one of these slots (its block since evicted) lands first.
      for (auto& w : PendingWrites(host_writes_, slots)) w->Wait();
      {
        std::lock_guard lock(mu_);
        for (uint32_t slot : slots) host_valid_[slot] = 0;  // until the copy has landed
      }
      host_store_ops_.push_back(std::move(slots));
      host_waits.push_back(engine_->Submit(TransferPath::kD2H, device_mem_, host_mem_, copies));
    } else if (op.kind == OpKind::kStoreDisk) {
      StartDiskWrite(op, TransferPath::kD2D, device_mem_);
      std::vector<uint32_t> slots;
      for (const BlockOp& b : op.blocks) slots.push_back(b.dst);
      for (auto& d : PendingWrites(disk_writes_, slots)) waits.push_back(d);
    }
  }
  // G1 must have been read before the engine may reuse the blocks.
  for (size_t i = 0; i < host_waits.size(); ++i) {
    TransferResult r = host_waits[i]->Wait();
    if (!r.ok())
      Log(LogLevel::kWarn, "store of {} blocks to G2 failed: {}", r.failed.size(),
          r.first_error ? r.first_error->ToString() : "unknown");
    std::vector<bool> failed(host_store_ops_[i].size(), false);
    for (uint32_t f : r.failed) failed[f] = true;
    std::lock_guard lock(mu_);
    for (size_t k = 0; k < failed.size(); ++k) host_valid_[host_store_ops_[i][k]] = failed[k] ? 0 : 1;
  }
  host_store_ops_.clear();
  for (auto& w : waits) w->Wait();
  std::vector<TransferOp> offloads;
  offloads.swap(pending_offloads_);
  for (const TransferOp& op : offloads) {
    if (op.kind == OpKind::kPromoteHost) StartPromotion(op);
    else if (op.kind == OpKind::kOffloadRemote) StartRemotePut(op);
    else StartDiskWrite(op, TransferPath::kH2D_Disk, host_mem_);
  }
  return {};
}

Status KvbmWorker::ConnectRemote(const RemoteTierOptions& options) {
  if (!host_) return MakeError(ErrorCode::kFailedPrecondition, "ConnectRemote: G4 needs a host tier (G2)");
  remote_options_ = options;
  remote_fingerprint_ = options.Fingerprint(rank_);
  RedisClusterOptions ro;
  ro.seeds = options.seeds;
  ro.connect_timeout = ro.command_timeout = ro.call_timeout = options.timeout;
  auto client = RedisCluster::Connect(ro);
  if (!client) {
    metrics_->remote_errors++;
    if (options.required)
      return MakeError(client.error().code(),
                       fmt::format("rank {}: G4 (DYN_KVBM_REMOTE_URL) unreachable and DYN_KVBM_REMOTE_REQUIRED is set: {}",
                                   rank_, client.error().message()));
    Log(LogLevel::kWarn, "rank {}: G4 unreachable, running without it: {}", rank_, client.error().message());
    return {};
  }
  remote_ = std::move(*client);
  if (!remote_thread_.joinable()) remote_thread_ = std::thread([this] { RemoteLoop(); });
  return {};
}

void KvbmWorker::RemoteLoop() {
  while (true) {
    std::function<void()> task;
    {
      std::unique_lock lock(remote_mu_);
      remote_cv_.wait(lock, [&] { return remote_stop_ || !remote_tasks_.empty(); });
      if (remote_tasks_.empty()) return;  // stopping, and nothing left
      task = std::move(remote_tasks_.front());
      remote_tasks_.pop_front();
    }
    task();
  }
}

void KvbmWorker::RunRemote(std::function<void()> task) {
  {
    std::lock_guard lock(remote_mu_);
    remote_tasks_.push_back(std::move(task));
  }
  remote_cv_.notify_one();
}

void KvbmWorker::StartFetch(const TransferOp& op) {
  std::vector<uint32_t> slots;
  for (const BlockOp& b : op.blocks) slots.push_back(b.dst);
  WaitHostSlotsFree(op.blocks);
  auto gate = std::make_shared<TransferCompletion>();
  {
    std::lock_guard lock(mu_);
    for (uint32_t s : slots) {
      host_valid_[s] = 0;  // until the verified bytes have landed
      host_writes_[s] = gate;
    }
    ++transfers_in_flight_;
  }
  auto finish = [this, slots, gate](std::vector<uint8_t> ok, std::optional<Error> error) {
    TransferResult r;
    r.first_error = std::move(error);
    {
      std::lock_guard lock(mu_);
      for (size_t k = 0; k < slots.size(); ++k) {
        host_valid_[slots[k]] = ok[k];
        if (!ok[k]) r.failed.push_back(static_cast<uint32_t>(k));
      }
    }
    gate->Finish(r);
    std::lock_guard lock(mu_);
    --transfers_in_flight_;
    cv_.notify_all();
  };
  if (!remote_) {
    finish(std::vector<uint8_t>(slots.size(), 0), Error(ErrorCode::kUnavailable, "G4 is not connected"));
    return;
  }
  RunRemote([this, blocks = op.blocks, finish]() {
    const auto start = std::chrono::steady_clock::now();
    std::vector<std::string> keys;
    for (const BlockOp& b : blocks) keys.push_back(RemoteBlockKey(remote_options_->name_space, remote_fingerprint_, b.hash));
    std::vector<uint8_t> ok(blocks.size(), 0);
    const uint64_t bytes = host_layout_->dims().block_bytes();
    uint64_t landed = 0;
    // Each value is verified and copied into its G2 slot straight from the reply.
    auto got = remote_->GetEach(keys, [&](size_t k, std::optional<std::string_view> v) {
      if (!v) {
        metrics_->remote_verify_failures++;  // gone (evicted or lost) since the scheduler saw it
        return;
      }
      auto decoded = DecodeRemoteBlock(*v, remote_fingerprint_, blocks[k].hash, bytes);
      if (!decoded) {
        metrics_->remote_verify_failures++;
        Log(LogLevel::kWarn, "rank {}: G4 block {:016x}: {}", rank_, blocks[k].hash, decoded.error().message());
        return;
      }
      std::memcpy(host_mem_.ChunkAddress(blocks[k].dst, 0, 0), decoded->data(), bytes);
      ok[k] = 1;
      ++landed;
    });
    if (!got) {
      metrics_->remote_errors++;
      Log(LogLevel::kWarn, "rank {}: G4 fetch of {} blocks failed: {}", rank_, blocks.size(), got.error().ToString());
      finish(std::vector<uint8_t>(blocks.size(), 0), got.error());
      return;
    }
    auto p = static_cast<size_t>(TransferPath::kRemote2H);
    metrics_->blocks[p] += landed;
    metrics_->bytes[p] += landed * bytes;
    metrics_->latency[p].Observe(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    finish(std::move(ok), std::nullopt);
  });
}

void KvbmWorker::StartRemotePut(const TransferOp& op) {
  if (!remote_) return;  // no G4: nothing to offload to
  std::vector<BlockOp> readers = op.blocks;
  {
    std::lock_guard lock(mu_);
    for (const BlockOp& b : readers) ++host_readers_[b.src];
    ++transfers_in_flight_;
  }
  RunRemote([this, readers]() {
    const auto start = std::chrono::steady_clock::now();
    const uint64_t bytes = host_layout_->dims().block_bytes();
    std::vector<BlockOp> valid;
    {
      // Only slots whose store landed hold the block (the reader count keeps them so).
      std::lock_guard lock(mu_);
      for (const BlockOp& b : readers)
        if (host_valid_[b.src]) valid.push_back(b);
    }
    // Header and key per block; the bytes go out from the G2 slot itself (the reader count
    // keeps it), never copied into a value buffer.
    std::vector<std::string> keys;
    std::vector<RemoteBlockHeader> headers;
    keys.reserve(valid.size());
    headers.reserve(valid.size());
    std::vector<RedisSetItem> items;
    for (const BlockOp& b : valid) {
      std::span<const uint8_t> block(host_mem_.ChunkAddress(b.src, 0, 0), bytes);
      keys.push_back(RemoteBlockKey(remote_options_->name_space, remote_fingerprint_, b.hash));
      headers.push_back(EncodeRemoteBlockHeader(remote_fingerprint_, b.hash, block));
    }
    for (size_t k = 0; k < valid.size(); ++k)
      items.push_back({keys[k],
                       std::string_view(reinterpret_cast<const char*>(headers[k].data()), headers[k].size()),
                       std::string_view(reinterpret_cast<const char*>(host_mem_.ChunkAddress(valid[k].src, 0, 0)),
                                        bytes)});
    Status s = items.empty() ? Status{} : remote_->SetParts(items);
    auto p = static_cast<size_t>(TransferPath::kH2Remote);
    if (s) {
      metrics_->blocks[p] += items.size();
      metrics_->bytes[p] += items.size() * bytes;
    } else {
      metrics_->remote_errors++;
      metrics_->dropped_offloads[static_cast<size_t>(DropReason::kIoError)] += items.size();
      Log(LogLevel::kWarn, "rank {}: G4 offload of {} blocks failed: {}", rank_, items.size(), s.error().ToString());
    }
    metrics_->latency[p].Observe(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    ReleaseHostReaders(readers);
    std::lock_guard lock(mu_);
    --transfers_in_flight_;
    cv_.notify_all();
  });
}

std::pair<std::vector<std::string>, std::vector<std::string>> KvbmWorker::GetFinished() {
  std::lock_guard lock(mu_);
  std::pair<std::vector<std::string>, std::vector<std::string>> out;
  out.first.swap(done_sending_);
  out.second.swap(done_recving_);
  return out;
}

std::vector<uint32_t> KvbmWorker::TakeLoadErrors() {
  std::lock_guard lock(mu_);
  std::vector<uint32_t> out;
  out.swap(load_errors_);
  return out;
}

void KvbmWorker::WaitIdle() {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return transfers_in_flight_ == 0; });
}

void KvbmWorker::WaitForLoads() {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return loads_in_flight_.empty(); });
}

void KvbmWorker::WaitForRequestLoads(std::span<const std::string> request_ids) {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] {
    for (const std::string& r : request_ids)
      if (loads_in_flight_.count(r)) return false;
    return true;
  });
}

}  // namespace kvbm
