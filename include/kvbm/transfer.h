// The transfer engine: turns "copy these blocks from tier A to tier B" into batched copy
// operations executed by backends, and reports completion without blocking the caller.
//
// Backends (one folder each under src/transfer/): memcpy on worker threads (host <-> host,
// including an engine's CPU KV tensors), file I/O through the IoQueue (host <-> disk), and
// CUDA (device <-> pinned host; src/transfer/cuda/, loaded at run time). Disk <-> device goes
// through host bounce buffers unless a backend supports it directly.
//
// Every disk block carries side data (its sequence hash and an XXH3 checksum of its bytes
// seeded with that hash), written with the block and verified on every read: a block that does
// not verify fails with kCorrupt for exactly that block.
//
// Thread safety: Submit() may be called from any thread; completions run on backend threads.
// Ownership: TierMemory only describes memory; the storage objects outlive every transfer.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kvbm/error.h"
#include "kvbm/io_queue.h"
#include "kvbm/layout.h"
#include "kvbm/metrics.h"
#include "kvbm/storage.h"
#include "kvbm/types.h"

namespace kvbm {

enum class MemoryKind : uint8_t { kHost, kDevice, kDisk };

// Per-slot side data of a disk tier, written with each block and checked on each read.
// With `records` (a persistent disk tier, DiskStorage::slot_records()) every Invalidate and Set
// is also written through to the slot's record, and the entries start from the blocks that
// `recovery` verified at open; both must outlive this object.
class DiskSideData {
 public:
  explicit DiskSideData(uint64_t num_blocks) : entries_(num_blocks) {}
  DiskSideData(uint64_t num_blocks, DiskSlotRecords* records, const DiskRecovery& recovery);
  // Invalidate runs before a slot's data write is submitted, Set after it completed. `lineage`
  // goes into the slot's persistent record (the leader matches the block by it after a restart).
  void Set(uint32_t slot, SequenceHash hash, uint64_t checksum, const DiskBlockLineage& lineage = {});
  void Invalidate(uint32_t slot);
  // kCorrupt when the slot holds another hash, nothing valid, or bytes whose checksum differs.
  Status Verify(uint32_t slot, SequenceHash expected, const uint8_t* bytes, uint64_t length) const;
  static uint64_t Checksum(SequenceHash hash, const uint8_t* bytes, uint64_t length);

 private:
  struct Entry {
    uint64_t hash = 0;
    uint64_t checksum = 0;
    bool valid = false;
  };
  mutable std::mutex mu_;
  std::vector<Entry> entries_;  // GUARDED_BY(mu_)
  DiskSlotRecords* records_ = nullptr;
  std::atomic<uint64_t> record_errors_{0};
};

// A tier's memory as the transfer engine sees it.
struct TierMemory {
  TierId tier = TierId::kHost;
  MemoryKind kind = MemoryKind::kHost;
  const Layout* layout = nullptr;
  std::vector<uint8_t*> bases;  // per allocation of `layout` (memory kinds)
  int fd = -1;                  // disk
  DiskSideData* side = nullptr; // disk
  int device_index = -1;        // CUDA device for kDevice

  // Address of a chunk (memory kinds).
  uint8_t* ChunkAddress(uint64_t block, uint64_t layer, uint64_t outer) const {
    MemoryRange r = layout->Chunk(block, layer, outer);
    return bases[r.allocation] + r.offset;
  }
};

struct BlockCopy {
  uint32_t src = 0;
  uint32_t dst = 0;
  SequenceHash hash;  // the block's sequence hash (disk side data)
  DiskBlockLineage lineage;  // disk writes: the rest of its key, for a persistent slot record
};

// Outcome of one transfer: indices (into the submitted copies) of blocks that failed, and the
// first error. ok() when nothing failed.
struct TransferResult {
  std::vector<uint32_t> failed;
  uint32_t corrupt = 0;  // of the failed, blocks whose bytes did not verify (kvbm_corrupt_blocks)
  std::optional<Error> first_error;
  bool ok() const { return failed.empty(); }
};

// Pollable, waitable completion of one submitted transfer.
class TransferCompletion {
 public:
  bool done() const { return done_.load(std::memory_order_acquire); }
  // Blocks until done (tests, and the worker's wait_for_save gate). Never on a scheduler thread.
  TransferResult Wait() const;  // by value: the completion may be a temporary
  // Runs `fn` once done (immediately when already done), on the completing thread.
  void OnDone(std::function<void(const TransferResult&)> fn);
  // Backends call this once.
  void Finish(TransferResult result);

 private:
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  std::atomic<bool> done_{false};
  TransferResult result_;                                  // GUARDED_BY(mu_)
  std::vector<std::function<void(const TransferResult&)>> callbacks_;  // GUARDED_BY(mu_)
};

// A backend moves the bytes of whole blocks between two TierMemory of kinds it supports.
// `done` is called exactly once.
class CopyBackend {
 public:
  virtual ~CopyBackend() = default;
  virtual const char* name() const = 0;
  virtual bool Supports(MemoryKind src, MemoryKind dst) const = 0;
  virtual void Execute(const TierMemory& src, const TierMemory& dst, std::span<const BlockCopy> copies,
                       std::function<void(TransferResult)> done) = 0;
};

// Copies the chunks of one block between two memory layouts of equal dims (gather/scatter
// between LayerSeparate and FullyContiguous). Contiguous-to-contiguous is one memcpy.
void CopyBlockBytes(const TierMemory& src, uint32_t src_block, const TierMemory& dst, uint32_t dst_block);

std::unique_ptr<CopyBackend> MakeMemcpyBackend(uint32_t threads);
std::unique_ptr<CopyBackend> MakeFileBackend(std::shared_ptr<IoQueue> queue);

struct TransferEngineOptions {
  uint32_t max_concurrent_transfers = 4;  // DYN_KVBM_MAX_CONCURRENT_TRANSFERS
  uint32_t max_batch_size = 16;           // DYN_KVBM_MAX_TRANSFER_BATCH_SIZE
  uint32_t memcpy_threads = 2;
  IoQueue::Kind io_kind = IoQueue::Kind::kAuto;
};

class TransferEngine {
 public:
  TransferEngine(const TransferEngineOptions& options, std::shared_ptr<KvbmMetrics> metrics);
  ~TransferEngine();  // waits for transfers in flight

  // A backend tried before the built-in ones (the CUDA backend registers here).
  void AddBackend(std::unique_ptr<CopyBackend> backend);
  // Starts copying; returns at once. Batches of max_batch_size blocks, at most
  // max_concurrent_transfers batches in flight (further batches queue). `path` labels metrics.
  std::shared_ptr<TransferCompletion> Submit(TransferPath path, const TierMemory& src, const TierMemory& dst,
                                             std::vector<BlockCopy> copies);
  IoQueue& io_queue() { return *io_; }
  std::shared_ptr<IoQueue> shared_io_queue() { return io_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::shared_ptr<IoQueue> io_;
};

}  // namespace kvbm
