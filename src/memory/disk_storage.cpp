#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>
#include <unordered_set>
#include <utility>

#include "kvbm/log.h"
#include "kvbm/storage.h"

namespace kvbm {
namespace {

constexpr const char* kFilePrefix = "dynamo-kvbm-disk-cache-";
constexpr uint64_t kZeroFillChunk = 1 << 20;

// Closes the descriptor on every error path of Create; released to DiskStorage on success.
class UniqueFd {
 public:
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() {
    if (fd_ >= 0) close(fd_);
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

std::string ODirectRefused(const std::string& dir) {
  return fmt::format(
      "the file system of the disk cache directory '{}' (DYN_KVBM_DISK_CACHE_DIR) refuses O_DIRECT "
      "(ramfs, and tmpfs before Linux 6.6, do); use a directory on a disk, or set "
      "DYN_KVBM_DISK_DISABLE_O_DIRECT=true",
      dir);
}

Status NoSpace(const std::string& dir, uint64_t bytes) {
  return MakeError(
      ErrorCode::kResourceExhausted,
      fmt::format("no space left in the disk cache directory '{}' (DYN_KVBM_DISK_CACHE_DIR) for "
                  "{} bytes ({:.2f} GB) requested; lower DYN_KVBM_DISK_CACHE_GB",
                  dir, bytes, bytes / 1e9));
}

// fallocate's stand-in on file systems without it: 4096-aligned zero writes, so that it also
// works on an O_DIRECT descriptor.
Status ZeroFill(int fd, uint64_t size, const std::string& dir) {
  AlignedBuffer zeros(kZeroFillChunk);
  std::memset(zeros.data(), 0, zeros.size());
  uint64_t offset = 0;
  while (offset < size) {
    const uint64_t n = std::min(kZeroFillChunk, size - offset);
    ssize_t written = pwrite(fd, zeros.data(), n, static_cast<off_t>(offset));
    if (written < 0 && errno == EINTR) continue;
    if (written < 0 && (errno == ENOSPC || errno == EDQUOT)) return NoSpace(dir, size);
    if (written <= 0)
      return MakeError(
          ErrorCode::kIoError,
          fmt::format("zero-filling the disk cache file in '{}' failed at "
                      "offset {}: {}",
                      dir, offset, written < 0 ? std::strerror(errno) : "no progress"));
    offset += static_cast<uint64_t>(written);
  }
  return {};
}

Status Reserve(int fd, uint64_t size, const DiskStorageOptions& options) {
  int rc;
  do rc = fallocate(fd, 0, 0, static_cast<off_t>(size));
  while (rc != 0 && errno == EINTR);
  if (rc == 0) return {};
  const int err = errno;
  if (err == EOPNOTSUPP || err == ENOTSUP || err == ENOSYS) {
    if (!options.zerofill_fallback)
      return MakeError(
          ErrorCode::kInvalidArgument,
          fmt::format(
              "the file system of the disk cache directory '{}' does not support fallocate; "
              "set DYN_KVBM_DISK_ZEROFILL_FALLBACK=true to zero-fill the file instead",
              options.directory));
    Log(LogLevel::kInfo, "fallocate unsupported in '{}': zero-filling {} bytes", options.directory,
        size);
    return ZeroFill(fd, size, options.directory);
  }
  if (err == ENOSPC || err == EDQUOT) return NoSpace(options.directory, size);
  return MakeError(ErrorCode::kIoError, fmt::format("fallocate of {} bytes in '{}' failed: {}",
                                                    size, options.directory, std::strerror(err)));
}

}  // namespace

DiskStorageOptions DiskStorageOptions::FromConfig(const KvbmConfig& config) {
  DiskStorageOptions o;
  o.directory = config.disk_cache_dir;
  o.disable_o_direct = config.disk_disable_o_direct;
  o.allocator = config.disk_allocator;
  o.zerofill_fallback = config.disk_zerofill_fallback;
  o.persistent = config.disk_persistent;
  o.lock_wait_ms = 10'000;
  return o;
}

Result<std::unique_ptr<DiskStorage>> DiskStorage::Create(const DiskStorageOptions& options,
                                                         uint64_t bytes) {
  if (bytes == 0)
    return MakeError(ErrorCode::kInvalidArgument, "disk storage of 0 bytes requested");
  if (options.persistent)
    return MakeError(
        ErrorCode::kInvalidArgument,
        "DYN_KVBM_DISK_PERSISTENT=true needs the slot geometry and a layout fingerprint: "
        "open the disk tier with DiskStorage::OpenPersistent");
  if (options.directory.empty())
    return MakeError(ErrorCode::kInvalidArgument,
                     "the disk cache directory (DYN_KVBM_DISK_CACHE_DIR) is empty");
  const uint64_t size = (bytes + kDiskAlignment - 1) / kDiskAlignment * kDiskAlignment;
  const std::string& dir = options.directory;
  std::string path = dir + (dir.back() == '/' ? "" : "/") + kFilePrefix + "XXXXXX";
  const std::string template_path = path;
  const bool direct_at_open =
      !options.disable_o_direct && options.allocator == DiskAllocatorType::kOpenDirect;

  // mkostemp creates the file with mode 0600 and O_EXCL, and writes the name into `path`.
  UniqueFd fd(mkostemp(path.data(), O_CLOEXEC | (direct_at_open ? O_DIRECT : 0)));
  if (fd.get() < 0) {
    const int err = errno;
    // O_DIRECT is checked after the file is created, so a refusal leaves a file behind.
    if (err == EINVAL && direct_at_open && path != template_path) unlink(path.c_str());
    if (err == EINVAL && direct_at_open)
      return MakeError(ErrorCode::kInvalidArgument, ODirectRefused(dir));
    return MakeError(
        err == ENOENT || err == EACCES || err == ENOTDIR || err == EROFS
            ? ErrorCode::kInvalidArgument
            : ErrorCode::kIoError,
        fmt::format("cannot create the disk cache file in '{}' (DYN_KVBM_DISK_CACHE_DIR): {}", dir,
                    std::strerror(err)));
  }
  // Unlinked at once: the space is freed when the descriptor closes, even if the process dies.
  if (unlink(path.c_str()) != 0)
    return MakeError(ErrorCode::kIoError, fmt::format("cannot unlink the disk cache file '{}': {}",
                                                      path, std::strerror(errno)));

  if (!options.disable_o_direct && !direct_at_open) {
    const int flags = fcntl(fd.get(), F_GETFL);
    if (flags < 0 || fcntl(fd.get(), F_SETFL, flags | O_DIRECT) != 0) {
      if (errno == EINVAL) return MakeError(ErrorCode::kInvalidArgument, ODirectRefused(dir));
      return MakeError(ErrorCode::kIoError,
                       fmt::format("cannot set O_DIRECT on the disk cache file in '{}': {}", dir,
                                   std::strerror(errno)));
    }
  }
  if (auto st = Reserve(fd.get(), size, options); !st) return std::unexpected(st.error());

  const bool o_direct = !options.disable_o_direct;
  Log(LogLevel::kInfo, "disk tier file {} (unlinked): {} bytes, O_DIRECT {}", path, size,
      o_direct ? "on" : "off");
  return std::unique_ptr<DiskStorage>(
      new DiskStorage(fd.release(), size, o_direct, std::move(path)));
}

DiskStorage::~DiskStorage() { close(fd_); }

// ---- Persistent mode -------------------------------------------------------------------------
//
// Side file layout (`.idx`, little-endian as the host writes it; kvbm runs on x86-64/aarch64):
//   [0, 64)      header {magic, version, record bytes, num_slots, block_bytes, block_stride,
//                layout fingerprint, XXH3 of the preceding 56 bytes}
//   [4096, ...)  one SlotRecord per slot
namespace {

constexpr const char* kPersistentPrefix = "kvbm-disk-cache-";
constexpr uint64_t kIndexMagic = 0x58493347'4d42564bull;  // "KVBMG3IX"
constexpr uint32_t kIndexVersion = 2;
constexpr uint64_t kRecordsOffset = 4096;

enum SlotState : uint32_t { kSlotEmpty = 0, kSlotWriting = 1, kSlotValid = 2 };

struct IndexHeader {
  uint64_t magic;
  uint32_t version;
  uint32_t record_bytes;
  uint64_t num_slots;
  uint64_t block_bytes;
  uint64_t block_stride;
  uint64_t layout_fingerprint;
  uint64_t reserved;
  uint64_t check;  // XXH3 of the 56 bytes before it
};
static_assert(sizeof(IndexHeader) == 64);

// Version 2: the record carries the block's lineage (its token hash, parent, position), so the
// leader can register the block under its full key after a restart.
enum RecordFlags : uint32_t { kLineageKnown = 1, kHasParent = 2 };

struct SlotRecord {
  uint32_t state;
  uint32_t check;  // low 32 bits of XXH3 over {slot, the record}: a torn or misplaced record fails
  uint64_t sequence_hash;
  uint64_t checksum;
  uint64_t layout_fingerprint;
  uint64_t block_hash;
  uint64_t parent;
  uint32_t position;
  uint32_t flags;
  uint64_t reserved;
};
static_assert(sizeof(SlotRecord) == 64);

uint32_t RecordCheck(uint32_t slot, const SlotRecord& r) {
  SlotRecord copy = r;
  copy.check = 0;
  uint8_t bytes[sizeof(uint64_t) + sizeof(SlotRecord)];
  const uint64_t s = slot;
  std::memcpy(bytes, &s, sizeof(s));
  std::memcpy(bytes + sizeof(s), &copy, sizeof(copy));
  return static_cast<uint32_t>(XXH3_64bits(bytes, sizeof(bytes)));
}

DiskBlockLineage LineageOf(const SlotRecord& r) {
  DiskBlockLineage l;
  l.known = (r.flags & kLineageKnown) != 0;
  if (!l.known) return l;
  l.block_hash = r.block_hash;
  if (r.flags & kHasParent) l.parent = r.parent;
  l.position = r.position;
  return l;
}

uint64_t HeaderCheck(const IndexHeader& h) { return XXH3_64bits(&h, offsetof(IndexHeader, check)); }

Status WriteAll(int fd, const void* data, uint64_t length, uint64_t offset,
                const std::string& path) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (length > 0) {
    const ssize_t n = pwrite(fd, p, length, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0)
      return MakeError(ErrorCode::kIoError,
                       fmt::format("writing {} bytes at offset {} of '{}' failed: {}", length,
                                   offset, path, n < 0 ? std::strerror(errno) : "no progress"));
    p += n;
    length -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return {};
}

// Bytes read (short only at end of file), or -errno.
int64_t ReadAll(int fd, void* data, uint64_t length, uint64_t offset) {
  auto* p = static_cast<uint8_t*>(data);
  uint64_t done = 0;
  while (done < length) {
    const ssize_t n = pread(fd, p + done, length - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -errno;
    if (n == 0) break;
    done += static_cast<uint64_t>(n);
  }
  return static_cast<int64_t>(done);
}

}  // namespace

uint64_t DiskBlockChecksum(uint64_t sequence_hash, const uint8_t* bytes, uint64_t length) {
  return XXH3_64bits_withSeed(bytes, length, sequence_hash);
}

DiskSlotRecords::~DiskSlotRecords() { close(fd_); }

Status DiskSlotRecords::Write(uint32_t slot, uint32_t state, uint64_t sequence_hash,
                              uint64_t checksum, const DiskBlockLineage& lineage) {
  if (slot >= geometry_.num_slots)
    return MakeError(
        ErrorCode::kInvalidArgument,
        fmt::format("disk slot {} out of range ({} slots)", slot, geometry_.num_slots));
  SlotRecord r{};
  if (state != kSlotEmpty) {
    r.state = state;
    r.sequence_hash = sequence_hash;
    r.checksum = checksum;
    r.layout_fingerprint = fingerprint_;
    if (lineage.known) {
      r.flags = kLineageKnown | (lineage.parent ? uint32_t{kHasParent} : 0u);
      r.block_hash = lineage.block_hash;
      r.parent = lineage.parent.value_or(0);
      r.position = lineage.position;
    }
    r.check = RecordCheck(slot, r);
  }
  return WriteAll(fd_, &r, sizeof(r), kRecordsOffset + uint64_t{slot} * sizeof(SlotRecord), path_);
}

Status DiskSlotRecords::MarkWriting(uint32_t slot) { return Write(slot, kSlotWriting, 0, 0, {}); }
Status DiskSlotRecords::MarkValid(uint32_t slot, uint64_t sequence_hash, uint64_t checksum,
                                  const DiskBlockLineage& lineage) {
  return Write(slot, kSlotValid, sequence_hash, checksum, lineage);
}
Status DiskSlotRecords::MarkEmpty(uint32_t slot) { return Write(slot, kSlotEmpty, 0, 0, {}); }

uint64_t PersistentDiskFileKey(std::string_view model_descriptor, uint32_t rank,
                               uint32_t world_size) {
  const std::string name = fmt::format("kvbm-g3|{}|tp={}|rank={}", model_descriptor, world_size, rank);
  return XXH3_64bits(name.data(), name.size());
}

uint64_t PersistentDiskLayoutFingerprint(std::string_view model_descriptor, uint32_t rank,
                                         uint32_t world_size, std::string_view block_format,
                                         uint64_t block_bytes) {
  const std::string layout = fmt::format("kvbm-g3-layout|{}|tp={}|rank={}|{}|bytes={}", model_descriptor,
                                         world_size, rank, block_format, block_bytes);
  return XXH3_64bits(layout.data(), layout.size());
}

std::string PersistentDiskFileStem(const std::string& directory, uint64_t file_key) {
  return fmt::format("{}{}{}{:016x}", directory,
                     !directory.empty() && directory.back() == '/' ? "" : "/", kPersistentPrefix,
                     file_key);
}

Result<std::vector<PersistedDiskSlot>> ReadPersistedDiskSlots(const std::string& directory,
                                                              uint64_t file_key, uint64_t num_slots) {
  const std::string path = PersistentDiskFileStem(directory, file_key) + ".idx";
  UniqueFd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    const int err = errno;
    return MakeError(err == ENOENT ? ErrorCode::kNotFound : ErrorCode::kIoError,
                     fmt::format("cannot open the disk cache side file '{}': {}", path,
                                 std::strerror(err)));
  }
  IndexHeader h{};
  if (ReadAll(fd.get(), &h, sizeof(h), 0) != static_cast<int64_t>(sizeof(h)) ||
      h.magic != kIndexMagic || h.check != HeaderCheck(h) || h.version != kIndexVersion ||
      h.record_bytes != sizeof(SlotRecord))
    return MakeError(ErrorCode::kFailedPrecondition,
                     fmt::format("the disk cache side file '{}' has no readable header of "
                                 "version {}",
                                 path, kIndexVersion));
  if (h.num_slots != num_slots)
    return MakeError(ErrorCode::kFailedPrecondition,
                     fmt::format("the disk cache side file '{}' describes {} slots, not {}", path,
                                 h.num_slots, num_slots));
  const uint64_t bytes = num_slots * sizeof(SlotRecord);
  std::vector<SlotRecord> records(num_slots);
  if (ReadAll(fd.get(), records.data(), bytes, kRecordsOffset) != static_cast<int64_t>(bytes))
    return MakeError(ErrorCode::kFailedPrecondition,
                     fmt::format("the disk cache side file '{}' is shorter than its {} records",
                                 path, num_slots));
  std::vector<PersistedDiskSlot> out;
  for (uint32_t s = 0; s < num_slots; ++s) {
    const SlotRecord& r = records[s];
    if (r.state != kSlotValid || r.check != RecordCheck(s, r) ||
        r.layout_fingerprint != h.layout_fingerprint || !(r.flags & kLineageKnown))
      continue;
    out.push_back({s, r.sequence_hash, r.layout_fingerprint, LineageOf(r)});
  }
  return out;
}

Result<std::unique_ptr<DiskStorage>> DiskStorage::OpenPersistent(const DiskStorageOptions& options,
                                                                 const DiskSlotGeometry& geometry,
                                                                 uint64_t layout_fingerprint,
                                                                 std::optional<uint64_t> file_key) {
  if (geometry.num_slots == 0 || geometry.block_bytes == 0 ||
      geometry.block_stride < geometry.block_bytes || geometry.block_stride % kDiskAlignment != 0 ||
      geometry.num_slots > (1ull << 32))
    return MakeError(
        ErrorCode::kInvalidArgument,
        fmt::format("persistent disk tier: bad slot geometry ({} slots of {} bytes, stride {}; the "
                    "stride must be a multiple of {} and at least the block size)",
                    geometry.num_slots, geometry.block_bytes, geometry.block_stride,
                    kDiskAlignment));
  if (options.directory.empty())
    return MakeError(ErrorCode::kInvalidArgument,
                     "the disk cache directory (DYN_KVBM_DISK_CACHE_DIR) is empty");
  const auto t0 = std::chrono::steady_clock::now();
  const std::string& dir = options.directory;
  const std::string stem = PersistentDiskFileStem(dir, file_key.value_or(layout_fingerprint));
  const std::string data_path = stem + ".bin", index_path = stem + ".idx";
  const uint64_t size = geometry.num_slots * geometry.block_stride;
  const bool direct_at_open =
      !options.disable_o_direct && options.allocator == DiskAllocatorType::kOpenDirect;

  UniqueFd fd(open(data_path.c_str(),
                   O_RDWR | O_CREAT | O_CLOEXEC | (direct_at_open ? O_DIRECT : 0), 0600));
  if (fd.get() < 0) {
    const int err = errno;
    if (err == EINVAL && direct_at_open)
      return MakeError(ErrorCode::kInvalidArgument, ODirectRefused(dir));
    return MakeError(
        err == ENOENT || err == EACCES || err == ENOTDIR || err == EROFS
            ? ErrorCode::kInvalidArgument
            : ErrorCode::kIoError,
        fmt::format("cannot open the persistent disk cache file '{}' (DYN_KVBM_DISK_CACHE_DIR): {}",
                    data_path, std::strerror(err)));
  }
  // The lock lives as long as the descriptor: a killed process releases it with its descriptors
  // (its io_uring's, torn down after it is reaped, included: hence the bounded wait).
  const auto lock_deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(options.lock_wait_ms);
  int err = 0;
  while (flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    err = errno;
    if (err != EWOULDBLOCK || std::chrono::steady_clock::now() >= lock_deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    err = 0;
  }
  if (err != 0) {
    if (err == EWOULDBLOCK)
      return MakeError(
          ErrorCode::kFailedPrecondition,
          fmt::format(
              "the persistent disk cache file '{}' is locked by another process (another kvbm "
              "worker of the same model and rank with the same DYN_KVBM_DISK_CACHE_DIR, still "
              "running after {} ms); give each engine its own directory",
              data_path, options.lock_wait_ms));
    return MakeError(ErrorCode::kIoError,
                     fmt::format("cannot lock '{}': {}", data_path, std::strerror(err)));
  }
  if (!options.disable_o_direct && !direct_at_open) {
    const int flags = fcntl(fd.get(), F_GETFL);
    if (flags < 0 || fcntl(fd.get(), F_SETFL, flags | O_DIRECT) != 0) {
      if (errno == EINVAL) return MakeError(ErrorCode::kInvalidArgument, ODirectRefused(dir));
      return MakeError(ErrorCode::kIoError, fmt::format("cannot set O_DIRECT on '{}': {}",
                                                        data_path, std::strerror(errno)));
    }
  }
  if (auto st = Reserve(fd.get(), size, options); !st) return std::unexpected(st.error());

  UniqueFd index_fd(open(index_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (index_fd.get() < 0)
    return MakeError(ErrorCode::kIoError,
                     fmt::format("cannot open the disk cache side file '{}': {}", index_path,
                                 std::strerror(errno)));

  DiskRecovery recovery;
  IndexHeader want{kIndexMagic,
                   kIndexVersion,
                   sizeof(SlotRecord),
                   geometry.num_slots,
                   geometry.block_bytes,
                   geometry.block_stride,
                   layout_fingerprint,
                   0,
                   0};
  want.check = HeaderCheck(want);
  IndexHeader have{};
  const int64_t got = ReadAll(index_fd.get(), &have, sizeof(have), 0);
  const uint64_t records_bytes = geometry.num_slots * sizeof(SlotRecord);
  if (got != sizeof(have) || std::memcmp(&have, &want, sizeof(have)) != 0) {
    recovery.reset = true;
    recovery.reset_reason =
        got == 0 ? "new file"
        : got != static_cast<int64_t>(sizeof(have)) || have.magic != kIndexMagic ||
                have.check != HeaderCheck(have)
            ? "unreadable side file header"
        : have.version != kIndexVersion
            ? fmt::format("side file version {} (this kvbm writes {})", have.version, kIndexVersion)
        : have.num_slots != geometry.num_slots || have.block_bytes != geometry.block_bytes ||
                have.block_stride != geometry.block_stride
            ? fmt::format(
                  "the side file describes {} slots of {} bytes (stride {}), not {} of {} "
                  "(stride {})",
                  have.num_slots, have.block_bytes, have.block_stride, geometry.num_slots,
                  geometry.block_bytes, geometry.block_stride)
            : fmt::format("the blocks were written for another layout (fingerprint {:016x}, this "
                          "engine's is {:016x})",
                          have.layout_fingerprint, layout_fingerprint);
    // Records first (all empty), the header last: a crash in between leaves no valid header.
    if (ftruncate(index_fd.get(), 0) != 0 ||
        ftruncate(index_fd.get(), kRecordsOffset + records_bytes) != 0)
      return MakeError(ErrorCode::kIoError, fmt::format("cannot size the side file '{}': {}",
                                                        index_path, std::strerror(errno)));
    if (auto st = WriteAll(index_fd.get(), &want, sizeof(want), 0, index_path); !st)
      return std::unexpected(st.error());
    if (got != 0)
      Log(LogLevel::kWarn, "persistent disk tier {}: starting empty ({})", data_path,
          recovery.reset_reason);
  } else {
    std::vector<SlotRecord> records(geometry.num_slots);
    if (ReadAll(index_fd.get(), records.data(), records_bytes, kRecordsOffset) !=
        static_cast<int64_t>(records_bytes))
      return MakeError(ErrorCode::kIoError,
                       fmt::format("cannot read the slot records of '{}'", index_path));
    // Classify each record, then read back and checksum every block that claims to be valid.
    enum Verdict : uint8_t { kKeep, kEmpty, kTorn, kCorrupt, kOtherLayout, kDuplicate };
    std::vector<Verdict> verdict(geometry.num_slots, kEmpty);
    for (uint32_t s = 0; s < geometry.num_slots; ++s) {
      const SlotRecord& r = records[s];
      if (r.state == kSlotEmpty) continue;
      if (r.state != kSlotValid || r.check != RecordCheck(s, r))
        verdict[s] = kTorn;
      else if (r.layout_fingerprint != layout_fingerprint)
        verdict[s] = kOtherLayout;
      else
        verdict[s] = kKeep;
    }
    const unsigned threads = std::clamp(std::thread::hardware_concurrency(), 1u, 4u);
    std::vector<std::thread> workers;
    std::vector<int> read_errors(threads, 0);
    for (unsigned t = 0; t < threads; ++t) {
      workers.emplace_back([&, t] {
        AlignedBuffer buffer(geometry.block_stride);
        for (uint64_t s = t; s < geometry.num_slots; s += threads) {
          if (verdict[s] != kKeep) continue;
          const int64_t n =
              ReadAll(fd.get(), buffer.data(), geometry.block_stride, s * geometry.block_stride);
          if (n < static_cast<int64_t>(geometry.block_bytes)) {
            if (n < 0) read_errors[t] = static_cast<int>(-n);
            verdict[s] = kCorrupt;
            continue;
          }
          if (DiskBlockChecksum(records[s].sequence_hash, buffer.data(), geometry.block_bytes) !=
              records[s].checksum)
            verdict[s] = kCorrupt;
        }
      });
    }
    for (auto& w : workers) w.join();
    for (int err : read_errors)
      if (err != 0)
        Log(LogLevel::kWarn, "persistent disk tier {}: read error during recovery: {}", data_path,
            std::strerror(err));
    std::unordered_set<uint64_t> seen;
    bool dropped = false;
    for (uint32_t s = 0; s < geometry.num_slots; ++s) {
      if (verdict[s] == kKeep && !seen.insert(records[s].sequence_hash).second)
        verdict[s] = kDuplicate;
      switch (verdict[s]) {
        case kKeep:
          recovery.blocks.push_back(
              {s, records[s].sequence_hash, records[s].checksum, LineageOf(records[s])});
          continue;
        case kEmpty:
          continue;
        case kTorn:
          ++recovery.torn;
          break;
        case kCorrupt:
          ++recovery.corrupt;
          break;
        case kOtherLayout:
          ++recovery.other_layout;
          break;
        case kDuplicate:
          ++recovery.duplicates;
          break;
      }
      records[s] = SlotRecord{};
      dropped = true;
    }
    // Dropped blocks are forgotten on disk too, so that they are counted once.
    if (dropped)
      if (auto st =
              WriteAll(index_fd.get(), records.data(), records_bytes, kRecordsOffset, index_path);
          !st)
        return std::unexpected(st.error());
  }
  recovery.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const bool o_direct = !options.disable_o_direct;
  Log(LogLevel::kInfo,
      "persistent disk tier {}: {} bytes, O_DIRECT {}; recovered {} blocks, dropped {} torn, {} "
      "corrupt, {} of another "
      "layout, {} duplicates in {:.3f} s",
      data_path, size, o_direct ? "on" : "off", recovery.blocks.size(), recovery.torn,
      recovery.corrupt, recovery.other_layout, recovery.duplicates, recovery.seconds);
  std::unique_ptr<DiskStorage> storage(new DiskStorage(fd.release(), size, o_direct, data_path));
  storage->records_.reset(
      new DiskSlotRecords(index_fd.release(), index_path, geometry, layout_fingerprint));
  storage->recovery_ = std::move(recovery);
  return storage;
}

}  // namespace kvbm
