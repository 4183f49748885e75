#include <dirent.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "kvbm/io_queue.h"
#include "kvbm/storage.h"

namespace kvbm {
namespace {

// A fresh directory under /tmp, removed with whatever is left in it.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/kvbm-disk-test-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::vector<std::string> CacheFilesIn(const std::string& dir) {
  std::vector<std::string> out;
  for (auto& e : std::filesystem::directory_iterator(dir))
    if (e.path().filename().string().starts_with("dynamo-kvbm-disk-cache-"))
      out.push_back(e.path());
  return out;
}

// A file system mounted on a fresh directory for one test, unmounted (lazily, so that a
// descriptor still open cannot keep it) in the destructor. `error` is set when mounting is
// impossible (not root, no loop devices, no mkfs): the test then skips with that reason.
class ScopedMount {
 public:
  // `source`: "tmpfs"/"ramfs" or an image file to loop-mount.
  ScopedMount(const std::string& type, const std::string& options, const std::string& image = "") {
    if (image.empty()) {
      if (mount(type.c_str(), dir_.path().c_str(), type.c_str(), 0, options.c_str()) != 0)
        error_ = fmt::format("mount -t {}: {}", type, std::strerror(errno));
    } else {
      const std::string cmd = fmt::format("mount -t {} -o loop{} {} {} 2>&1", type,
                                          options.empty() ? "" : "," + options, image, dir_.path());
      if (std::system(cmd.c_str()) != 0) error_ = "cannot loop-mount (" + cmd + ")";
    }
    mounted_ = error_.empty();
  }
  ~ScopedMount() {
    if (mounted_) umount2(dir_.path().c_str(), MNT_DETACH);
  }
  const std::string& path() const { return dir_.path(); }
  const std::string& error() const { return error_; }

 private:
  TempDir dir_;
  bool mounted_ = false;
  std::string error_;
};

// An ext2 image (ext2 has no fallocate, but does O_DIRECT): the zero-fill fallback's home.
class Ext2Image {
 public:
  explicit Ext2Image(uint64_t mib) : image_(dir_.path() + "/ext2.img") {
    const std::string cmd = fmt::format("truncate -s {}M {} && mkfs.ext2 -q -F {} >/dev/null 2>&1",
                                        mib, image_, image_);
    if (std::system(cmd.c_str()) != 0) error_ = "mkfs.ext2 unavailable (install e2fsprogs)";
  }
  const std::string& path() const { return image_; }
  const std::string& error() const { return error_; }

 private:
  TempDir dir_;
  std::string image_;
  std::string error_;
};

DiskStorageOptions In(const std::string& dir) {
  DiskStorageOptions o;
  o.directory = dir;
  return o;
}

TEST(DiskStorage, FileIsPrivateUnlinkedPreallocatedAndODirect) {
  TempDir dir;
  for (auto allocator : {DiskAllocatorType::kDefault, DiskAllocatorType::kOpenDirect}) {
    for (const std::string& d : {dir.path(), dir.path() + "/"}) {
      DiskStorageOptions o = In(d);
      o.allocator = allocator;
      auto disk = DiskStorage::Create(o, 10000);
      ASSERT_TRUE(disk.has_value()) << disk.error().ToString();
      struct stat st {};
      ASSERT_EQ(fstat((*disk)->fd(), &st), 0);
      EXPECT_EQ(st.st_mode & 07777, 0600u);
      EXPECT_EQ(st.st_nlink, 0u) << "unlinked once open";
      EXPECT_EQ(st.st_size, 12288) << "rounded up to 4096";
      EXPECT_GE(static_cast<uint64_t>(st.st_blocks) * 512, 12288u) << "space reserved";
      EXPECT_EQ((*disk)->size(), 12288u);
      EXPECT_TRUE((*disk)->o_direct());
      EXPECT_NE(fcntl((*disk)->fd(), F_GETFL) & O_DIRECT, 0);
      EXPECT_EQ((*disk)->path().rfind(dir.path() + "/dynamo-kvbm-disk-cache-", 0), 0u)
          << (*disk)->path();
      EXPECT_EQ((*disk)->path().find("//"), std::string::npos);
      EXPECT_TRUE(CacheFilesIn(dir.path()).empty());
    }
  }
  DiskStorageOptions o = In(dir.path());
  o.disable_o_direct = true;
  auto buffered = DiskStorage::Create(o, 4096);
  ASSERT_TRUE(buffered.has_value());
  EXPECT_FALSE((*buffered)->o_direct());
  EXPECT_EQ(fcntl((*buffered)->fd(), F_GETFL) & O_DIRECT, 0);
}

TEST(DiskStorage, MissingDirectoryIsAClearError) {
  auto disk = DiskStorage::Create(In("/nonexistent-kvbm-dir/"), 4096);
  ASSERT_FALSE(disk.has_value());
  EXPECT_EQ(disk.error().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(disk.error().message().find("/nonexistent-kvbm-dir/"), std::string::npos);
  EXPECT_NE(disk.error().message().find("DYN_KVBM_DISK_CACHE_DIR"), std::string::npos);
}

// ramfs refuses O_DIRECT (EINVAL) with both allocators and has no fallocate.
TEST(DiskStorage, RamfsRefusesODirectAndFallocate) {
  ScopedMount ramfs("ramfs", "");
  if (!ramfs.error().empty()) GTEST_SKIP() << ramfs.error();
  for (auto allocator : {DiskAllocatorType::kDefault, DiskAllocatorType::kOpenDirect}) {
    DiskStorageOptions o = In(ramfs.path());
    o.allocator = allocator;
    auto disk = DiskStorage::Create(o, 1 << 20);
    ASSERT_FALSE(disk.has_value());
    EXPECT_EQ(disk.error().code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(disk.error().message().find(ramfs.path()), std::string::npos)
        << disk.error().message();
    EXPECT_NE(disk.error().message().find("DYN_KVBM_DISK_DISABLE_O_DIRECT=true"),
              std::string::npos);
    EXPECT_TRUE(CacheFilesIn(ramfs.path()).empty()) << "no file left behind";
  }
  DiskStorageOptions o = In(ramfs.path());
  o.disable_o_direct = true;
  auto no_fallback = DiskStorage::Create(o, 1 << 20);
  ASSERT_FALSE(no_fallback.has_value());
  EXPECT_NE(no_fallback.error().message().find("DYN_KVBM_DISK_ZEROFILL_FALLBACK=true"),
            std::string::npos);
  o.zerofill_fallback = true;
  auto filled = DiskStorage::Create(o, (1 << 20) + 1);
  ASSERT_TRUE(filled.has_value()) << filled.error().ToString();
  struct stat st {};
  ASSERT_EQ(fstat((*filled)->fd(), &st), 0);
  EXPECT_EQ(st.st_size, (1 << 20) + 4096);
  EXPECT_TRUE(CacheFilesIn(ramfs.path()).empty());
}

// tmpfs accepts O_DIRECT since Linux 6.6; before, it must be the clear error.
TEST(DiskStorage, TmpfsWithAndWithoutODirect) {
  ScopedMount tmpfs("tmpfs", "size=8m");
  if (!tmpfs.error().empty()) GTEST_SKIP() << tmpfs.error();
  auto direct = DiskStorage::Create(In(tmpfs.path()), 1 << 20);
  if (!direct.has_value()) {
    EXPECT_EQ(direct.error().code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(direct.error().message().find("DYN_KVBM_DISK_DISABLE_O_DIRECT=true"),
              std::string::npos);
  }
  DiskStorageOptions o = In(tmpfs.path());
  o.disable_o_direct = true;
  auto buffered = DiskStorage::Create(o, 1 << 20);
  ASSERT_TRUE(buffered.has_value()) << buffered.error().ToString();
  EXPECT_FALSE((*buffered)->o_direct());
}

TEST(DiskStorage, NoSpaceIsResourceExhaustedNamingDirectoryAndSize) {
  ScopedMount tmpfs("tmpfs", "size=1m");
  if (!tmpfs.error().empty()) GTEST_SKIP() << tmpfs.error();
  DiskStorageOptions o = In(tmpfs.path());
  o.disable_o_direct = true;
  auto disk = DiskStorage::Create(o, 4 << 20);
  ASSERT_FALSE(disk.has_value());
  EXPECT_EQ(disk.error().code(), ErrorCode::kResourceExhausted);
  EXPECT_NE(disk.error().message().find(tmpfs.path()), std::string::npos) << disk.error().message();
  EXPECT_NE(disk.error().message().find("4194304"), std::string::npos) << disk.error().message();
  EXPECT_TRUE(CacheFilesIn(tmpfs.path()).empty());
}

// ext2: O_DIRECT works but fallocate does not, so the file is zero-filled through O_DIRECT.
TEST(DiskStorage, Ext2ZeroFillFallbackWithODirect) {
  Ext2Image image(32);
  if (!image.error().empty()) GTEST_SKIP() << image.error();
  ScopedMount ext2("ext2", "", image.path());
  if (!ext2.error().empty()) GTEST_SKIP() << ext2.error();

  DiskStorageOptions o = In(ext2.path());
  auto refused = DiskStorage::Create(o, 4 << 20);
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(refused.error().message().find("DYN_KVBM_DISK_ZEROFILL_FALLBACK=true"),
            std::string::npos);

  o.zerofill_fallback = true;
  auto too_big = DiskStorage::Create(o, 64 << 20);
  ASSERT_FALSE(too_big.has_value());
  EXPECT_EQ(too_big.error().code(), ErrorCode::kResourceExhausted) << too_big.error().ToString();

  constexpr uint64_t kSize = 4 << 20;
  for (auto allocator : {DiskAllocatorType::kDefault, DiskAllocatorType::kOpenDirect}) {
    o.allocator = allocator;
    auto disk = DiskStorage::Create(o, kSize);
    ASSERT_TRUE(disk.has_value()) << disk.error().ToString();
    ASSERT_TRUE((*disk)->o_direct());
    struct stat st {};
    ASSERT_EQ(fstat((*disk)->fd(), &st), 0);
    EXPECT_GE(static_cast<uint64_t>(st.st_blocks) * 512, kSize) << "blocks really written";
    bool fresh = true;
    for (auto kind : {IoQueue::Kind::kAuto, IoQueue::Kind::kSync}) {
      auto queue = IoQueue::Create(kind);
      AlignedBuffer out(kSize), in(kSize);
      for (uint64_t i = 0; i < kSize; ++i) out.data()[i] = static_cast<uint8_t>(i * 131 + 7);
      std::memset(in.data(), 0xFF, kSize);
      ASSERT_TRUE(
          queue->RunSync({{IoRequest::Op::kRead, (*disk)->fd(), 0, in.data(), 65536}}).has_value());
      if (fresh) {  // zero-filled, never stale bytes of the image
        EXPECT_EQ(in.data()[0], 0);
        EXPECT_EQ(in.data()[65535], 0);
        fresh = false;
      }
      std::vector<IoRequest> writes, reads;
      for (uint64_t off = 0; off < kSize; off += 65536) {
        writes.push_back({IoRequest::Op::kWrite, (*disk)->fd(), off, out.data() + off, 65536});
        reads.push_back({IoRequest::Op::kRead, (*disk)->fd(), off, in.data() + off, 65536});
      }
      ASSERT_TRUE(queue->RunSync(writes).has_value());
      ASSERT_TRUE(queue->RunSync(reads).has_value());
      EXPECT_EQ(std::memcmp(out.data(), in.data(), kSize), 0) << queue->name();
    }
  }
  EXPECT_TRUE(CacheFilesIn(ext2.path()).empty());
}

TEST(DiskStorage, FromConfigCopiesTheDiskSettings) {
  auto c = KvbmConfig::FromMap({{"DYN_KVBM_DISK_CACHE_DIR", "/var/tmp"},
                                {"DYN_KVBM_DISK_DISABLE_O_DIRECT", "true"},
                                {"DYN_KVBM_DISK_ZEROFILL_FALLBACK", "true"},
                                {"DYN_KVBM_DISK_ALLOCATOR_TYPE", "open-direct"}});
  auto o = DiskStorageOptions::FromConfig(c);
  EXPECT_EQ(o.directory, "/var/tmp");
  EXPECT_TRUE(o.disable_o_direct);
  EXPECT_TRUE(o.zerofill_fallback);
  EXPECT_EQ(o.allocator, DiskAllocatorType::kOpenDirect);
}

}  // namespace
}  // namespace kvbm
