// Storage regions of the tiers kvbm owns: host memory (G2) and one disk file per worker (G3).
// Device memory (G1) belongs to the engine and is described by `DeviceRegion`s.
//
// Ownership: each storage object owns its memory or file descriptor (RAII, move-only through
// unique_ptr). Thread safety: data()/fd() are immutable after construction; reads and writes
// of distinct blocks may run concurrently; the transfer layer orders conflicting accesses.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kvbm/config.h"
#include "kvbm/error.h"

namespace kvbm {

inline constexpr uint64_t kDiskAlignment = 4096;

// Host memory for G2: one allocation, 4096-aligned, page-locked through the CUDA runtime when
// one is present at run time (loaded dynamically), plain otherwise. First touch runs in
// parallel before pinning; the time is logged.
class HostStorage {
 public:
  // ResourceExhausted when the memory cannot be had; the message names the size.
  static Result<std::unique_ptr<HostStorage>> Allocate(uint64_t bytes, bool try_pin = true);
  ~HostStorage();
  HostStorage(const HostStorage&) = delete;
  HostStorage& operator=(const HostStorage&) = delete;

  uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  bool pinned() const { return pinned_; }
  double allocation_seconds() const { return allocation_seconds_; }

 private:
  HostStorage(uint8_t* data, uint64_t size, bool pinned, double seconds)
      : data_(data), size_(size), pinned_(pinned), allocation_seconds_(seconds) {}
  uint8_t* data_;
  uint64_t size_;
  bool pinned_;
  double allocation_seconds_;
};

// Where the disk tier's file goes and how it is opened (from KvbmConfig).
struct DiskStorageOptions {
  std::string directory = "/tmp/";
  bool disable_o_direct = false;
  DiskAllocatorType allocator = DiskAllocatorType::kDefault;
  bool zerofill_fallback = false;
  bool persistent = false;  // DYN_KVBM_DISK_PERSISTENT: open through DiskStorage::OpenPersistent
  // Persistent mode: how long to wait for the file's lock before refusing. A killed process's
  // io_uring is torn down by the kernel after the process is gone and holds the file until
  // then, so a restart right after a crash briefly finds it locked. FromConfig: 10 s.
  uint32_t lock_wait_ms = 0;

  static DiskStorageOptions FromConfig(const KvbmConfig& config);
};

// The checksum of a disk block's bytes, as persisted in its slot record and checked on every
// read: XXH3-64 seeded with the block's sequence hash (a block moved to another hash fails too).
uint64_t DiskBlockChecksum(uint64_t sequence_hash, const uint8_t* bytes, uint64_t length);

// The rest of a disk block's identity beside its sequence hash (block_pool.h BlockKey: its own
// token hash, its parent's sequence hash, its position), kept in a persistent slot record so that
// a restarted leader can register the block under its full key and match it again. `known` is
// false when the writer had no key to give (then the block is verified but never matched).
struct DiskBlockLineage {
  uint64_t block_hash = 0;
  std::optional<uint64_t> parent;
  uint32_t position = 0;
  bool known = false;
  friend bool operator==(const DiskBlockLineage&, const DiskBlockLineage&) = default;
};

// The key that names rank `rank`'s persistent disk files: the engine's model descriptor (model,
// KV dtype, block size, as the engine adapter builds it) and the tensor-parallel layout. The
// leader and every worker compute it alike, so the leader finds each rank's side file.
uint64_t PersistentDiskFileKey(std::string_view model_descriptor, uint32_t rank, uint32_t world_size);
// The layout fingerprint of that rank's blocks: the file key's inputs plus the block format
// (layers, K/V split, page size, elements per token, element size and order) and the bytes of a
// block. A file whose blocks were written under another fingerprint is reset at open.
uint64_t PersistentDiskLayoutFingerprint(std::string_view model_descriptor, uint32_t rank,
                                         uint32_t world_size, std::string_view block_format,
                                         uint64_t block_bytes);
// `<dir>/kvbm-disk-cache-<key as 16 hex>` (".bin" and ".idx" are appended).
std::string PersistentDiskFileStem(const std::string& directory, uint64_t file_key);

// How the persistent disk file is cut into slots: slot i holds `block_bytes` bytes at offset
// i * block_stride (a FullyContiguous layout; block_stride a multiple of kDiskAlignment).
struct DiskSlotGeometry {
  uint64_t num_slots = 0;
  uint64_t block_bytes = 0;
  uint64_t block_stride = 0;
};

// The persistent side data of a disk tier: one 64-byte record per slot in
// `<dir>/kvbm-disk-cache-<file key>.idx` {state, record check, sequence hash, checksum, layout
// fingerprint, lineage}. The write protocol that makes a crash safe: MarkWriting(slot) before the
// slot's data write is submitted, MarkValid(...) after it completed; a record left in the
// writing state by a crash is a torn block. Records are written with pwrite on a buffered
// descriptor, so they survive the death of the process (SIGKILL) at once; after a power loss
// the checksum check at open still refuses any block whose bytes did not reach the disk.
//
// Thread safety: the Mark* calls may run concurrently for distinct slots (one pwrite each);
// calls for the same slot must be ordered by the caller (the transfer layer orders conflicting
// accesses to a slot). Owned by its DiskStorage.
class DiskSlotRecords {
 public:
  ~DiskSlotRecords();
  DiskSlotRecords(const DiskSlotRecords&) = delete;
  DiskSlotRecords& operator=(const DiskSlotRecords&) = delete;

  // IoError naming the file on a failed write; InvalidArgument for a slot out of range.
  Status MarkWriting(uint32_t slot);
  Status MarkValid(uint32_t slot, uint64_t sequence_hash, uint64_t checksum,
                   const DiskBlockLineage& lineage = {});
  Status MarkEmpty(uint32_t slot);

  uint64_t num_slots() const { return geometry_.num_slots; }
  uint64_t layout_fingerprint() const { return fingerprint_; }
  const std::string& path() const { return path_; }

 private:
  friend class DiskStorage;
  DiskSlotRecords(int fd, std::string path, const DiskSlotGeometry& geometry, uint64_t fingerprint)
      : fd_(fd), path_(std::move(path)), geometry_(geometry), fingerprint_(fingerprint) {}
  Status Write(uint32_t slot, uint32_t state, uint64_t sequence_hash, uint64_t checksum,
               const DiskBlockLineage& lineage);
  int fd_;
  std::string path_;
  DiskSlotGeometry geometry_;
  uint64_t fingerprint_;
};

// A block found intact when a persistent disk tier was opened.
struct RecoveredDiskBlock {
  uint32_t slot = 0;
  uint64_t sequence_hash = 0;
  uint64_t checksum = 0;
  DiskBlockLineage lineage;
};

// What opening a persistent disk tier found. Every block in `blocks` was read back and its
// checksum matched; everything else was dropped (its record reset to empty) and counted.
struct DiskRecovery {
  std::vector<RecoveredDiskBlock> blocks;  // ascending slot
  uint64_t torn =
      0;  // a write cut off by a crash (writing state, or a record that does not verify)
  uint64_t corrupt = 0;       // a committed block whose bytes no longer match its checksum
  uint64_t other_layout = 0;  // a record carrying another layout fingerprint
  uint64_t duplicates = 0;    // a second valid slot for a sequence hash already recovered
  bool reset = false;  // the side file was missing or described another geometry: started empty
  std::string reset_reason;
  double seconds = 0;  // time spent verifying
};

// One pre-allocated file per worker: `<dir>/dynamo-kvbm-disk-cache-XXXXXX`, mode 0600,
// unlinked once open so it cannot outlive the process (the reference's behaviour); or, in
// persistent mode (OpenPersistent), `<dir>/kvbm-disk-cache-<file key>.bin`, never unlinked,
// locked against a second process, with its slot records beside it. O_DIRECT (set by fcntl after
// open for the `default` allocator, passed to open for `open-direct`) unless disabled; sized with
// fallocate, or zero-filled with 4096-aligned writes when fallocate is unsupported and the
// fallback is on. Every I/O through it must be 4096-aligned in offset, length and address.
class DiskStorage {
 public:
  // Errors name the directory and the reason: O_DIRECT refused (e.g. tmpfs) with a hint to set
  // DYN_KVBM_DISK_DISABLE_O_DIRECT, fallocate unsupported without the fallback
  // (DYN_KVBM_DISK_ZEROFILL_FALLBACK), ENOSPC, permissions.
  // REQUIRES: !options.persistent (InvalidArgument naming DYN_KVBM_DISK_PERSISTENT otherwise).
  static Result<std::unique_ptr<DiskStorage>> Create(const DiskStorageOptions& options,
                                                     uint64_t bytes);

  // Persistent mode. Opens (or creates) `<dir>/kvbm-disk-cache-<file key as 16 hex>.bin` (the
  // key defaults to the fingerprint; workers pass PersistentDiskFileKey) and its `.idx` side file, takes an exclusive flock on the data file (FailedPrecondition
  // naming the file when another process holds it), sizes it to num_slots * block_stride, then
  // rebuilds the index: every valid record's block is read back and checked against its
  // checksum (see recovery()). `layout_fingerprint` must change whenever the bytes of a block
  // would mean something else (model, layout, dtype, rank, block size): a side file written
  // under another fingerprint (or geometry) is reset and the tier starts empty.
  // Same errors as Create for the directory, O_DIRECT and space.
  static Result<std::unique_ptr<DiskStorage>> OpenPersistent(
      const DiskStorageOptions& options, const DiskSlotGeometry& geometry,
      uint64_t layout_fingerprint, std::optional<uint64_t> file_key = std::nullopt);
  ~DiskStorage();
  DiskStorage(const DiskStorage&) = delete;
  DiskStorage& operator=(const DiskStorage&) = delete;

  int fd() const { return fd_; }
  uint64_t size() const { return size_; }  // the bytes asked for, rounded up to kDiskAlignment
  bool o_direct() const { return o_direct_; }
  const std::string& path() const { return path_; }  // the name it had before unlinking
  bool persistent() const { return records_ != nullptr; }
  // Persistent mode: the slot records to keep up to date (nullptr otherwise).
  DiskSlotRecords* slot_records() const { return records_.get(); }
  // Persistent mode: what was found at open (empty otherwise).
  const DiskRecovery& recovery() const { return recovery_; }

 private:
  DiskStorage(int fd, uint64_t size, bool o_direct, std::string path)
      : fd_(fd), size_(size), o_direct_(o_direct), path_(std::move(path)) {}
  int fd_;
  uint64_t size_;
  bool o_direct_;
  std::string path_;
  std::unique_ptr<DiskSlotRecords> records_;
  DiskRecovery recovery_;
};

// A slot that a persistent disk tier's side file says holds a complete block, as a process
// that does not own the file (the leader) reads it: read-only, without the lock.
struct PersistedDiskSlot {
  uint32_t slot = 0;
  uint64_t sequence_hash = 0;
  uint64_t layout_fingerprint = 0;
  DiskBlockLineage lineage;
};

// Reads the side file `<dir>/kvbm-disk-cache-<file key>.idx` without locking or changing it and
// returns its slots in the valid state whose record verifies and whose lineage is known
// (ascending slot). NotFound when there is no such file; FailedPrecondition when its header is
// unreadable or describes another number of slots than `num_slots`. It does not read the blocks:
// what it returns is a claim, which the owning worker verifies (checksum) on every read.
Result<std::vector<PersistedDiskSlot>> ReadPersistedDiskSlots(const std::string& directory,
                                                              uint64_t file_key, uint64_t num_slots);

// 4096-aligned heap memory for bounce buffers and tests (RAII).
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(uint64_t bytes, uint64_t alignment = kDiskAlignment);
  AlignedBuffer(AlignedBuffer&& other) noexcept;
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept;
  ~AlignedBuffer();
  uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }

 private:
  uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
};

}  // namespace kvbm
