// Warm restart of the disk tier (DYN_KVBM_DISK_PERSISTENT): a process SIGKILLed in the middle of
// its offload loop, then the tier reopened. Real files, the real write path (FileBackend through
// the IoQueue, O_DIRECT where the file system allows it), a real kill.
#include <fcntl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <future>
#include <random>
#include <set>

#include "kvbm/io_queue.h"
#include "kvbm/layout.h"
#include "kvbm/storage.h"
#include "kvbm/transfer.h"

namespace kvbm {
namespace {

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/kvbm-persist-test-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// 64 slots of 8320 bytes (not a multiple of 4096: the stride pads to 12288).
constexpr uint64_t kSlots = 64;
constexpr uint64_t kBatch = 8;
constexpr uint32_t kTornSlot = 13;  // cut off mid-write on purpose, then never rewritten
const LayoutDims kDims{kSlots, 2, 2, 16, 65, 2};
constexpr uint64_t kFingerprint = 0x6b76626d'74657374ull;

uint64_t HashOf(uint64_t round, uint64_t slot) { return round * 1000 + slot + 1; }

void Fill(uint8_t* p, uint64_t n, uint64_t hash) {
  std::mt19937_64 rng(hash);
  for (uint64_t i = 0; i < n; i += 8) {
    const uint64_t v = rng();
    std::memcpy(p + i, &v, std::min<uint64_t>(8, n - i));
  }
}

Result<std::unique_ptr<DiskStorage>> Open(const std::string& dir, uint64_t slots = kSlots) {
  FullyContiguousLayout layout(LayoutDims{slots, 2, 2, 16, 65, 2}, kDiskAlignment);
  DiskSlotGeometry geometry{slots, layout.dims().block_bytes(), layout.block_stride()};
  DiskStorageOptions options;
  options.directory = dir;
  options.persistent = true;
  auto s = DiskStorage::OpenPersistent(options, geometry, kFingerprint);
  if (!s && s.error().message().find("O_DIRECT") != std::string::npos) {
    options.disable_o_direct = true;  // a file system without O_DIRECT: buffered I/O
    s = DiskStorage::OpenPersistent(options, geometry, kFingerprint);
  }
  return s;
}

Status Write(CopyBackend& backend, const TierMemory& host, const TierMemory& disk,
             std::vector<BlockCopy> copies) {
  std::promise<TransferResult> done;
  backend.Execute(host, disk, copies, [&](TransferResult r) { done.set_value(std::move(r)); });
  TransferResult r = done.get_future().get();
  if (r.ok()) return {};
  return std::unexpected(*r.first_error);
}

// The child: offloads every slot round after round (8 blocks in flight per batch) and reports
// each finished batch with a 'b' on `out`. In round 1 it starts rewriting kTornSlot, writes
// only its first 4096 bytes, says 'T', and never finishes that block.
[[noreturn]] void OffloadForever(const std::string& dir, int out) {
  auto storage = Open(dir);
  if (!storage) _exit(3);
  FullyContiguousLayout layout(kDims, kDiskAlignment);
  AlignedBuffer host(layout.allocation_bytes(0));
  TierMemory hm{TierId::kHost, MemoryKind::kHost, &layout, {host.data()}};
  DiskSideData side(kSlots, (*storage)->slot_records(), (*storage)->recovery());
  TierMemory dm{TierId::kDisk, MemoryKind::kDisk, &layout, {}, (*storage)->fd(), &side};
  auto backend = MakeFileBackend(std::shared_ptr<IoQueue>(IoQueue::Create()));
  for (uint64_t round = 0;; ++round) {
    for (uint64_t start = 0; start < kSlots; start += kBatch) {
      std::vector<BlockCopy> copies;
      for (uint64_t s = start; s < start + kBatch; ++s) {
        if (round > 0 && s == kTornSlot) continue;
        Fill(hm.ChunkAddress(s, 0, 0), kDims.block_bytes(), HashOf(round, s));
        copies.push_back(
            {static_cast<uint32_t>(s), static_cast<uint32_t>(s), SequenceHash(HashOf(round, s))});
      }
      if (!Write(*backend, hm, dm, copies)) _exit(4);
      if (write(out, "b", 1) != 1) _exit(5);
      if (round == 1 && start == 0) {
        // The same protocol as FileBackend (invalidate, then write), cut off after one page.
        side.Invalidate(kTornSlot);
        AlignedBuffer page(kDiskAlignment);
        Fill(page.data(), page.size(), HashOf(round, kTornSlot));
        if (pwrite((*storage)->fd(), page.data(), page.size(), kTornSlot * layout.block_stride()) !=
            4096)
          _exit(6);
        if (write(out, "T", 1) != 1) _exit(5);
      }
    }
  }
}

uint64_t WrongBytes(const DiskStorage& storage, const RecoveredDiskBlock& b) {
  FullyContiguousLayout layout(kDims, kDiskAlignment);
  AlignedBuffer got(layout.block_stride()), want(layout.block_stride());
  if (pread(storage.fd(), got.data(), got.size(), b.slot * layout.block_stride()) !=
      static_cast<ssize_t>(got.size()))
    return kDims.block_bytes();
  Fill(want.data(), kDims.block_bytes(), b.sequence_hash);
  uint64_t wrong = 0;
  for (uint64_t i = 0; i < kDims.block_bytes(); ++i) wrong += got.data()[i] != want.data()[i];
  return wrong;
}

TEST(DiskPersistent, SigkillMidOffloadThenRestartServesOnlyVerifiedBlocks) {
  TempDir dir;
  int pipe_fds[2];
  ASSERT_EQ(pipe(pipe_fds), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    close(pipe_fds[0]);
    OffloadForever(dir.path(), pipe_fds[1]);
  }
  close(pipe_fds[1]);
  // Kill it a while after the deliberate tear, in the middle of its loop.
  bool torn_seen = false;
  int batches_after = 0;
  char c;
  while (batches_after < 21 && read(pipe_fds[0], &c, 1) == 1) {
    if (c == 'T')
      torn_seen = true;
    else if (torn_seen)
      ++batches_after;
  }
  ASSERT_EQ(kill(child, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  close(pipe_fds[0]);
  ASSERT_TRUE(torn_seen && batches_after == 21)
      << "the child stopped early: " << (WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);

  auto storage = Open(dir.path());
  ASSERT_TRUE(storage) << storage.error().ToString();
  const DiskRecovery& rec = (*storage)->recovery();
  EXPECT_FALSE(rec.reset) << rec.reset_reason;
  EXPECT_EQ(rec.corrupt, 0u);
  EXPECT_GE(rec.torn, 1u) << "the block cut off on purpose must be counted";
  EXPECT_LE(rec.torn, 1 + kBatch) << "at most one batch was in flight at the kill";
  EXPECT_EQ(rec.blocks.size() + rec.torn, kSlots);
  uint64_t wrong = 0;
  for (const auto& b : rec.blocks) {
    EXPECT_NE(b.slot, kTornSlot);
    EXPECT_EQ(b.sequence_hash % 1000, b.slot + 1u)
        << "slot " << b.slot << " recovered another slot's block";
    wrong += WrongBytes(**storage, b);
  }
  EXPECT_EQ(wrong, 0u);

  // Hits after the restart through the real read path; the torn slot is never served.
  FullyContiguousLayout layout(kDims, kDiskAlignment);
  AlignedBuffer host(layout.allocation_bytes(0));
  TierMemory hm{TierId::kHost, MemoryKind::kHost, &layout, {host.data()}};
  DiskSideData side(kSlots, (*storage)->slot_records(), rec);
  TierMemory dm{TierId::kDisk, MemoryKind::kDisk, &layout, {}, (*storage)->fd(), &side};
  auto backend = MakeFileBackend(std::shared_ptr<IoQueue>(IoQueue::Create()));
  std::vector<BlockCopy> reads;
  for (const auto& b : rec.blocks) reads.push_back({b.slot, b.slot, SequenceHash(b.sequence_hash)});
  reads.push_back({kTornSlot, kTornSlot, SequenceHash(HashOf(0, kTornSlot))});
  std::promise<TransferResult> done;
  backend->Execute(dm, hm, reads, [&](TransferResult r) { done.set_value(std::move(r)); });
  const TransferResult r = done.get_future().get();
  ASSERT_EQ(r.failed, std::vector<uint32_t>{static_cast<uint32_t>(reads.size() - 1)});
  EXPECT_EQ(r.first_error->code(), ErrorCode::kCorrupt);
  AlignedBuffer want(layout.block_stride());
  for (const auto& b : rec.blocks) {
    Fill(want.data(), kDims.block_bytes(), b.sequence_hash);
    EXPECT_EQ(std::memcmp(hm.ChunkAddress(b.slot, 0, 0), want.data(), kDims.block_bytes()), 0)
        << b.slot;
  }

  // A second process (a second open file description) is refused while this one holds it.
  auto second = Open(dir.path());
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error().code(), ErrorCode::kFailedPrecondition);
  EXPECT_NE(second.error().message().find("locked by another process"), std::string::npos);
  const size_t recovered = rec.blocks.size();
  storage->reset();

  // Dropped blocks were forgotten: a second restart finds the same blocks and nothing torn.
  auto again = Open(dir.path());
  ASSERT_TRUE(again) << again.error().ToString();
  EXPECT_EQ((*again)->recovery().torn, 0u);
  EXPECT_EQ((*again)->recovery().blocks.size(), recovered);
}

TEST(DiskPersistent, CorruptedBytesAndAnotherGeometryAreNeverServed) {
  TempDir dir;
  FullyContiguousLayout layout(kDims, kDiskAlignment);
  {
    auto storage = Open(dir.path());
    ASSERT_TRUE(storage) << storage.error().ToString();
    EXPECT_TRUE((*storage)->recovery().reset);
    EXPECT_EQ((*storage)->recovery().reset_reason, "new file");
    AlignedBuffer host(layout.allocation_bytes(0));
    TierMemory hm{TierId::kHost, MemoryKind::kHost, &layout, {host.data()}};
    DiskSideData side(kSlots, (*storage)->slot_records(), (*storage)->recovery());
    TierMemory dm{TierId::kDisk, MemoryKind::kDisk, &layout, {}, (*storage)->fd(), &side};
    auto backend = MakeFileBackend(std::shared_ptr<IoQueue>(IoQueue::Create()));
    std::vector<BlockCopy> copies;
    for (uint32_t s = 0; s < 4; ++s) {
      Fill(hm.ChunkAddress(s, 0, 0), kDims.block_bytes(), HashOf(7, s));
      copies.push_back({s, s, SequenceHash(HashOf(7, s))});
    }
    ASSERT_TRUE(Write(*backend, hm, dm, copies));
  }
  // Flip one byte of slot 2's block behind kvbm's back.
  const std::string bin = fmt::format("{}/kvbm-disk-cache-{:016x}.bin", dir.path(), kFingerprint);
  {
    int fd = open(bin.c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    uint8_t byte;
    const off_t at = static_cast<off_t>(2 * layout.block_stride() + 5000);
    ASSERT_EQ(pread(fd, &byte, 1, at), 1);
    byte ^= 0x40;
    ASSERT_EQ(pwrite(fd, &byte, 1, at), 1);
    close(fd);
  }
  {
    auto storage = Open(dir.path());
    ASSERT_TRUE(storage) << storage.error().ToString();
    const DiskRecovery& rec = (*storage)->recovery();
    EXPECT_EQ(rec.corrupt, 1u);
    EXPECT_EQ(rec.torn, 0u);
    std::set<uint32_t> slots;
    for (const auto& b : rec.blocks) slots.insert(b.slot);
    EXPECT_EQ(slots, (std::set<uint32_t>{0, 1, 3}));
  }
  // Another geometry (more slots): the old records describe other offsets, start empty.
  auto bigger = Open(dir.path(), kSlots * 2);
  ASSERT_TRUE(bigger) << bigger.error().ToString();
  EXPECT_TRUE((*bigger)->recovery().reset);
  EXPECT_TRUE((*bigger)->recovery().blocks.empty());
  EXPECT_NE((*bigger)->recovery().reset_reason.find("not 128"), std::string::npos)
      << (*bigger)->recovery().reset_reason;
}

TEST(DiskPersistent, TempModeRefusesThePersistentSettingAndStaysUnlinked) {
  TempDir dir;
  DiskStorageOptions options;
  options.directory = dir.path();
  options.persistent = true;
  auto refused = DiskStorage::Create(options, 1 << 20);
  ASSERT_FALSE(refused);
  EXPECT_NE(refused.error().message().find("DYN_KVBM_DISK_PERSISTENT"), std::string::npos);
  options.persistent = false;
  options.disable_o_direct = true;
  auto temp = DiskStorage::Create(options, 1 << 20);
  ASSERT_TRUE(temp) << temp.error().ToString();
  EXPECT_FALSE((*temp)->persistent());
  EXPECT_EQ((*temp)->slot_records(), nullptr);
  EXPECT_TRUE(std::filesystem::is_empty(dir.path())) << "the temp-mode file must be unlinked";
}

}  // namespace
}  // namespace kvbm
