// One queue through which every disk read and write passes: io_uring (liburing) first, a
// pread/pwrite fallback where io_uring is unavailable (old kernel, seccomp). Alignment checks
// (4096 for offset, length and buffer address on O_DIRECT files), byte counters and failpoints
// live here, in the one place every I/O passes.
//
// Thread safety: Submit() may be called from any thread; callbacks run on the queue's
// completion thread and must not block.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "kvbm/error.h"

namespace kvbm {

struct IoRequest {
  enum class Op : uint8_t { kRead, kWrite };
  Op op;
  int fd;
  uint64_t offset;
  uint8_t* buffer;
  uint64_t length;
};

struct IoStats {
  std::atomic<uint64_t> reads{0}, writes{0}, bytes_read{0}, bytes_written{0}, errors{0};
};

class IoQueue {
 public:
  enum class Kind { kAuto, kUring, kSync };
  // kAuto: io_uring when it can be set up, else the pread/pwrite fallback (logged once).
  // kUring: nullptr when io_uring cannot be set up here. kSync: always.
  static std::unique_ptr<IoQueue> Create(Kind kind = Kind::kAuto, uint32_t depth = 64);
  virtual ~IoQueue() = default;

  // Runs `requests` (any order, concurrently up to the queue depth) and calls `done` once, on
  // the completion thread, with the first error or success. Misaligned requests on an
  // O_DIRECT fd fail with InvalidArgument before touching the disk. Short reads/writes are
  // retried to completion.
  void Submit(std::vector<IoRequest> requests, std::function<void(Status)> done);
  // Several independent submissions, each with its own `done`, exactly as if each were passed to
  // Submit() in order, but handed to the backend in one go: io_uring gets them in one
  // io_uring_submit (one block-layer plug), where one submit per request costs a virtual disk
  // up to 3x its read bandwidth (docs/BENCHMARKS.md, "Disk: one submit per batch").
  struct Work {
    std::vector<IoRequest> requests;
    std::function<void(Status)> done;
  };
  void SubmitAll(std::vector<Work> work);
  // Blocking convenience for tests and setup code (never on the engine's threads, never from a
  // completion callback).
  Status RunSync(std::vector<IoRequest> requests);

  virtual const char* name() const = 0;
  const IoStats& stats() const { return stats_; }

  // Failpoints (tests): every I/O touching [offset, offset + length) of `fd` fails with EIO.
  void InjectFailure(int fd, uint64_t offset, uint64_t length);
  void ClearFailures();

 protected:
  // One request in flight, owned by its batch; the backends see only these. Backends call
  // Finish() exactly once per Op, from their completion thread, and never hold a lock of theirs
  // while doing so (the batch's callback may Submit again).
  struct Op;
  struct Batch;
  IoQueue();
  virtual void SubmitImpl(std::vector<Op*> ops) = 0;
  // `result`: 0 when the whole request is done, else -errno. Counts stats (the one place).
  void Finish(Op* op, int result);
  // Blocks until every submitted batch has called back. Backends call it first in their
  // destructor, while their threads still run.
  void Drain();

  IoStats stats_;
  struct Failpoints;
  std::shared_ptr<Failpoints> failpoints_;
  bool ShouldFail(const IoRequest& r) const;
  friend class IoQueueAccess;

 private:
  std::mutex drain_mu_;
  std::condition_variable drain_cv_;
  uint64_t outstanding_batches_ = 0;  // GUARDED_BY(drain_mu_)
};

}  // namespace kvbm
