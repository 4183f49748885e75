// Private to the I/O queue: what the backends (io_uring, pread/pwrite) share with the base.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "kvbm/io_queue.h"

namespace kvbm {

struct IoQueue::Op {
  IoRequest request;
  Batch* batch = nullptr;
  uint64_t done_bytes = 0;  // progress, so that short reads/writes resume where they stopped
  bool nop = false;         // completes without I/O: an empty or refused batch, a 0-byte request
  int forced_errno = 0;     // failpoint: completes with -forced_errno without I/O

  bool NeedsIo() const { return !nop && forced_errno == 0; }
  int ImmediateResult() const { return -forced_errno; }
};

// Lives until its last Op finishes: `self` keeps it alive while the backends hold raw Op*.
struct IoQueue::Batch {
  std::vector<Op> ops;
  std::atomic<size_t> remaining{0};
  std::mutex mu;
  std::optional<Error> first_error;  // GUARDED_BY(mu)
  std::optional<Error> refused;      // set before submission: the batch never touches the disk
  std::function<void(Status)> done;
  std::shared_ptr<Batch> self;
};

// io_uring and pread/pwrite cap one call at this; longer requests continue as short I/O.
inline constexpr uint64_t kMaxIoChunk = uint64_t{1} << 30;

std::unique_ptr<IoQueue> MakeUringIoQueue(uint32_t depth, std::string* why);
std::unique_ptr<IoQueue> MakeSyncIoQueue(uint32_t depth);

}  // namespace kvbm
