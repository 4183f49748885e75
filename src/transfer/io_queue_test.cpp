#include "kvbm/io_queue.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <future>
#include <random>
#include <thread>

#include "kvbm/storage.h"

namespace kvbm {
namespace {

constexpr uint64_t kBlock = 16 * 1024;
constexpr uint64_t kBlocks = 64;

void FillRandom(uint8_t* p, uint64_t n, uint32_t seed) {
  std::mt19937_64 rng(seed);
  for (uint64_t i = 0; i + 8 <= n; i += 8) {
    const uint64_t v = rng();
    std::memcpy(p + i, &v, 8);
  }
}

std::vector<IoRequest> Blocks(IoRequest::Op op, int fd, uint8_t* base, uint64_t first,
                              uint64_t count) {
  std::vector<IoRequest> out;
  for (uint64_t b = first; b < first + count; ++b)
    out.push_back({op, fd, b * kBlock, base + b * kBlock, kBlock});
  return out;
}

struct QueueParam {
  IoQueue::Kind kind;
  DiskAllocatorType allocator;
};

// A real O_DIRECT file in /tmp (ext4 here) and a real queue of each kind.
class IoQueueTest : public ::testing::TestWithParam<QueueParam> {
 protected:
  void SetUp() override {
    // Depth 8 against 64-request batches: the queue must hold back the rest, not deadlock.
    queue_ = IoQueue::Create(GetParam().kind, 8);
    if (queue_ == nullptr) GTEST_SKIP() << "io_uring cannot be set up on this kernel";
    DiskStorageOptions options;
    options.allocator = GetParam().allocator;
    auto disk = DiskStorage::Create(options, kBlock * kBlocks);
    ASSERT_TRUE(disk.has_value()) << disk.error().ToString();
    disk_ = std::move(*disk);
    ASSERT_TRUE(disk_->o_direct());
  }
  std::unique_ptr<IoQueue> queue_;
  std::unique_ptr<DiskStorage> disk_;
};

TEST_P(IoQueueTest, ODirectRoundTripIsByteExact) {
  AlignedBuffer out(kBlock * kBlocks), in(kBlock * kBlocks);
  FillRandom(out.data(), out.size(), 42);
  std::memset(in.data(), 0xAB, in.size());
  ASSERT_TRUE(queue_->RunSync(Blocks(IoRequest::Op::kWrite, disk_->fd(), out.data(), 0, kBlocks))
                  .has_value());
  // Read back in reverse order of blocks, in two batches, to not depend on submission order.
  auto reads = Blocks(IoRequest::Op::kRead, disk_->fd(), in.data(), 0, kBlocks);
  std::reverse(reads.begin(), reads.end());
  std::vector<IoRequest> second(reads.begin() + 20, reads.end());
  reads.resize(20);
  ASSERT_TRUE(queue_->RunSync(reads).has_value());
  ASSERT_TRUE(queue_->RunSync(second).has_value());
  EXPECT_EQ(std::memcmp(out.data(), in.data(), out.size()), 0);
  EXPECT_EQ(queue_->stats().writes, kBlocks);
  EXPECT_EQ(queue_->stats().reads, kBlocks);
  EXPECT_EQ(queue_->stats().bytes_written, kBlock * kBlocks);
  EXPECT_EQ(queue_->stats().bytes_read, kBlock * kBlocks);
  EXPECT_EQ(queue_->stats().errors, 0u);
}

TEST_P(IoQueueTest, MisalignedIoOnODirectIsRefusedNamingTheField) {
  AlignedBuffer buf(2 * kBlock);
  const int fd = disk_->fd();
  struct Case {
    IoRequest request;
    const char* names;
  } cases[] = {
      {{IoRequest::Op::kWrite, fd, 512, buf.data(), kBlock}, "offset"},
      {{IoRequest::Op::kRead, fd, 0, buf.data(), 1000}, "length"},
      {{IoRequest::Op::kWrite, fd, 0, buf.data() + 8, kBlock}, "buffer address"},
  };
  for (const Case& c : cases) {
    // The aligned request in the same batch must not run either: the batch is refused whole.
    auto st = queue_->RunSync({{IoRequest::Op::kWrite, fd, kBlock, buf.data(), kBlock}, c.request});
    ASSERT_FALSE(st.has_value());
    EXPECT_EQ(st.error().code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(st.error().message().find(c.names), std::string::npos) << st.error().message();
  }
  EXPECT_EQ(queue_->stats().writes, 0u);
  EXPECT_EQ(queue_->stats().errors, 3u);
}

TEST_P(IoQueueTest, InjectedFailureReachesCallbackAsIoError) {
  AlignedBuffer buf(kBlock * 8);
  FillRandom(buf.data(), buf.size(), 7);
  queue_->InjectFailure(disk_->fd(), 3 * kBlock + 100, 1);  // overlaps block 3 only
  std::promise<Status> result;
  std::atomic<int> calls{0};
  queue_->Submit(Blocks(IoRequest::Op::kWrite, disk_->fd(), buf.data(), 0, 8), [&](Status s) {
    if (calls.fetch_add(1) == 0) result.set_value(std::move(s));
  });
  Status st = result.get_future().get();
  ASSERT_FALSE(st.has_value());
  EXPECT_EQ(st.error().code(), ErrorCode::kIoError);
  EXPECT_NE(st.error().message().find("offset 49152"), std::string::npos) << st.error().message();
  EXPECT_EQ(queue_->stats().errors, 1u);
  EXPECT_EQ(queue_->stats().writes, 7u);
  queue_->ClearFailures();
  EXPECT_TRUE(
      queue_->RunSync(Blocks(IoRequest::Op::kRead, disk_->fd(), buf.data(), 3, 1)).has_value());
  EXPECT_EQ(calls.load(), 1);
}

TEST_P(IoQueueTest, SubmitAllReportsEachWorkOnItsOwn) {
  // 12 submissions in one hand-off, more than the depth (8): 9 one-block writes, one write
  // that hits a failpoint, one misaligned write (refused whole), one empty.
  AlignedBuffer out(kBlock * kBlocks), in(kBlock * kBlocks);
  FillRandom(out.data(), out.size(), 11);
  std::memset(in.data(), 0, in.size());
  const int fd = disk_->fd();
  queue_->InjectFailure(fd, 9 * kBlock, 1);
  std::vector<IoQueue::Work> work;
  std::vector<std::promise<Status>> results(12);
  std::vector<std::atomic<int>> calls(12);
  auto done = [&](size_t i) {
    return [&, i](Status s) {
      if (calls[i].fetch_add(1) == 0) results[i].set_value(std::move(s));
    };
  };
  for (size_t i = 0; i < 10; ++i) work.push_back({Blocks(IoRequest::Op::kWrite, fd, out.data(), i, 1), done(i)});
  work.push_back({{{IoRequest::Op::kWrite, fd, 512, out.data(), kBlock}}, done(10)});
  work.push_back({{}, done(11)});
  queue_->SubmitAll(std::move(work));
  for (size_t i = 0; i < 12; ++i) {
    Status st = results[i].get_future().get();
    if (i == 9) {
      ASSERT_FALSE(st.has_value());
      EXPECT_EQ(st.error().code(), ErrorCode::kIoError);
    } else if (i == 10) {
      ASSERT_FALSE(st.has_value());
      EXPECT_EQ(st.error().code(), ErrorCode::kInvalidArgument);
    } else {
      EXPECT_TRUE(st.has_value()) << i << ": " << st.error().ToString();
    }
  }
  queue_->ClearFailures();
  ASSERT_TRUE(queue_->RunSync(Blocks(IoRequest::Op::kRead, fd, in.data(), 0, 9)).has_value());
  EXPECT_EQ(std::memcmp(out.data(), in.data(), 9 * kBlock), 0);
  queue_.reset();  // drains; a second callback of any submission would show up here
  for (size_t i = 0; i < 12; ++i) EXPECT_EQ(calls[i].load(), 1) << i;
}

TEST_P(IoQueueTest, EmptyBatchCallsBackOnce) {
  std::atomic<int> calls{0};
  std::promise<void> called;
  queue_->Submit({}, [&](Status s) {
    EXPECT_TRUE(s.has_value());
    if (calls.fetch_add(1) == 0) called.set_value();
  });
  called.get_future().get();
  queue_.reset();  // drains; a second callback would show up here
  EXPECT_EQ(calls.load(), 1);
}

TEST_P(IoQueueTest, ConcurrentSubmittersAndReentrantCallbacks) {
  constexpr int kThreads = 4, kPerThread = 25;
  AlignedBuffer buf(kBlock * kBlocks), scratch(kBlock * kThreads * kPerThread);
  FillRandom(buf.data(), buf.size(), 3);
  std::atomic<int> callbacks{0};
  IoQueue* q = queue_.get();
  const int fd = disk_->fd();
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        const uint64_t first = (t * 16 + i) % (kBlocks - 4);
        // Each callback submits a follow-up read from the completion thread.
        uint8_t* slot = scratch.data() + (t * kPerThread + i) * kBlock;  // one reader per slot
        q->Submit(
            Blocks(IoRequest::Op::kWrite, fd, buf.data(), first, 4), [&, first, slot](Status s) {
              EXPECT_TRUE(s.has_value());
              callbacks.fetch_add(1);
              q->Submit({{IoRequest::Op::kRead, fd, first * kBlock, slot, kBlock}}, [&](Status s2) {
                EXPECT_TRUE(s2.has_value());
                callbacks.fetch_add(1);
              });
            });
      }
    });
  for (auto& t : threads) t.join();
  queue_.reset();  // the destructor waits for every batch, follow-ups included
  EXPECT_EQ(callbacks.load(), 2 * kThreads * kPerThread);
}

INSTANTIATE_TEST_SUITE_P(
    Kinds, IoQueueTest,
    ::testing::Values(QueueParam{IoQueue::Kind::kUring, DiskAllocatorType::kDefault},
                      QueueParam{IoQueue::Kind::kUring, DiskAllocatorType::kOpenDirect},
                      QueueParam{IoQueue::Kind::kSync, DiskAllocatorType::kDefault},
                      QueueParam{IoQueue::Kind::kSync, DiskAllocatorType::kOpenDirect}),
    [](const auto& info) {
      return std::string(info.param.kind == IoQueue::Kind::kUring ? "Uring" : "Sync") +
             (info.param.allocator == DiskAllocatorType::kDefault ? "Default" : "OpenDirect");
    });

// Buffered file: a read that runs past the end comes back short, is resubmitted for the rest,
// and then fails with end of file rather than returning stale bytes as success.
TEST(IoQueue, ReadPastEndOfFileFails) {
  for (auto kind : {IoQueue::Kind::kUring, IoQueue::Kind::kSync}) {
    auto queue = IoQueue::Create(kind, 4);
    if (queue == nullptr) continue;
    DiskStorageOptions options;
    options.disable_o_direct = true;
    auto disk = DiskStorage::Create(options, 8192);
    ASSERT_TRUE(disk.has_value());
    std::vector<uint8_t> buf(3 * 4096);
    auto st = queue->RunSync({{IoRequest::Op::kRead, (*disk)->fd(), 100, buf.data(), buf.size()}});
    ASSERT_FALSE(st.has_value()) << queue->name();
    EXPECT_EQ(st.error().code(), ErrorCode::kIoError);
    EXPECT_NE(st.error().message().find("end of file"), std::string::npos) << st.error().message();
    // Unaligned I/O is fine without O_DIRECT.
    EXPECT_TRUE(queue->RunSync({{IoRequest::Op::kWrite, (*disk)->fd(), 3, buf.data() + 1, 1000}})
                    .has_value());
  }
}

TEST(IoQueue, AutoPrefersIoUring) {
  auto uring = IoQueue::Create(IoQueue::Kind::kUring);
  auto chosen = IoQueue::Create(IoQueue::Kind::kAuto);
  ASSERT_NE(chosen, nullptr);
  EXPECT_STREQ(chosen->name(), uring != nullptr ? "io_uring" : "sync");
  EXPECT_STREQ(IoQueue::Create(IoQueue::Kind::kSync)->name(), "sync");
}

}  // namespace
}  // namespace kvbm
