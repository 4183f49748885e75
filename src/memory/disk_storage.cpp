#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
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
  return o;
}

Result<std::unique_ptr<DiskStorage>> DiskStorage::Create(const DiskStorageOptions& options,
                                                         uint64_t bytes) {
  if (bytes == 0)
    return MakeError(ErrorCode::kInvalidArgument, "disk storage of 0 bytes requested");
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

}  // namespace kvbm
