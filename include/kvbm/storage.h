// Storage regions of the tiers kvbm owns: host memory (G2) and one disk file per worker (G3).
// Device memory (G1) belongs to the engine and is described by `DeviceRegion`s.
//
// Ownership: each storage object owns its memory or file descriptor (RAII, move-only through
// unique_ptr). Thread safety: data()/fd() are immutable after construction; reads and writes
// of distinct blocks may run concurrently; the transfer layer orders conflicting accesses.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
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

  static DiskStorageOptions FromConfig(const KvbmConfig& config);
};

// One pre-allocated file per worker: `<dir>/dynamo-kvbm-disk-cache-XXXXXX`, mode 0600,
// unlinked once open so it cannot outlive the process. O_DIRECT (set by fcntl after open for
// the `default` allocator, passed to open for `open-direct`) unless disabled; sized with
// fallocate, or zero-filled with 4096-aligned writes when fallocate is unsupported and the
// fallback is on. Every I/O through it must be 4096-aligned in offset, length and address.
class DiskStorage {
 public:
  // Errors name the directory and the reason: O_DIRECT refused (e.g. tmpfs) with a hint to set
  // DYN_KVBM_DISK_DISABLE_O_DIRECT, fallocate unsupported without the fallback
  // (DYN_KVBM_DISK_ZEROFILL_FALLBACK), ENOSPC, permissions.
  static Result<std::unique_ptr<DiskStorage>> Create(const DiskStorageOptions& options, uint64_t bytes);
  ~DiskStorage();
  DiskStorage(const DiskStorage&) = delete;
  DiskStorage& operator=(const DiskStorage&) = delete;

  int fd() const { return fd_; }
  uint64_t size() const { return size_; }  // the bytes asked for, rounded up to kDiskAlignment
  bool o_direct() const { return o_direct_; }
  const std::string& path() const { return path_; }  // the name it had before unlinking

 private:
  DiskStorage(int fd, uint64_t size, bool o_direct, std::string path)
      : fd_(fd), size_(size), o_direct_(o_direct), path_(std::move(path)) {}
  int fd_;
  uint64_t size_;
  bool o_direct_;
  std::string path_;
};

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
