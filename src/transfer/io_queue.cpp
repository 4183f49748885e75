#include <fcntl.h>

#include <cerrno>
#include <cstring>
#include <future>

#include "kvbm/log.h"
#include "kvbm/storage.h"
#include "transfer/io_queue_internal.h"

namespace kvbm {
namespace {

const char* OpName(IoRequest::Op op) { return op == IoRequest::Op::kRead ? "read" : "write"; }

// Refuses the batch when a request is malformed or, on an O_DIRECT fd, misaligned (the kernel
// would fail it with EINVAL, or worse, some file systems silently fall back to buffered I/O).
std::optional<Error> Validate(const std::vector<IoRequest>& requests) {
  std::vector<std::pair<int, bool>> direct;  // fd -> O_DIRECT, looked up once per batch
  for (const IoRequest& r : requests) {
    auto fail = [&](std::string what) {
      return Error(ErrorCode::kInvalidArgument,
                   fmt::format("{} of {} bytes at offset {} on fd {}: {}", OpName(r.op), r.length,
                               r.offset, r.fd, what));
    };
    if (r.fd < 0) return fail("invalid fd");
    if (r.length > 0 && r.buffer == nullptr) return fail("null buffer");
    if (r.offset + r.length < r.offset) return fail("offset + length overflows");
    auto it = std::find_if(direct.begin(), direct.end(), [&](auto& p) { return p.first == r.fd; });
    if (it == direct.end()) {
      const int flags = fcntl(r.fd, F_GETFL);
      if (flags < 0) return fail(fmt::format("fd is not usable: {}", std::strerror(errno)));
      it = direct.insert(direct.end(), {r.fd, (flags & O_DIRECT) != 0});
    }
    if (!it->second) continue;
    if (r.offset % kDiskAlignment != 0)
      return fail(fmt::format("offset is not a multiple of {} (O_DIRECT)", kDiskAlignment));
    if (r.length % kDiskAlignment != 0)
      return fail(fmt::format("length is not a multiple of {} (O_DIRECT)", kDiskAlignment));
    if (reinterpret_cast<uintptr_t>(r.buffer) % kDiskAlignment != 0)
      return fail(fmt::format("buffer address {} is not a multiple of {} (O_DIRECT)",
                              static_cast<void*>(r.buffer), kDiskAlignment));
  }
  return std::nullopt;
}

}  // namespace

struct IoQueue::Failpoints {
  struct Range {
    int fd;
    uint64_t offset, length;
  };
  mutable std::mutex mu;
  std::vector<Range> ranges;  // GUARDED_BY(mu)
};

IoQueue::IoQueue() : failpoints_(std::make_shared<Failpoints>()) {}

std::unique_ptr<IoQueue> IoQueue::Create(Kind kind, uint32_t depth) {
  depth = std::clamp<uint32_t>(depth, 1, 4096);
  if (kind == Kind::kSync) return MakeSyncIoQueue(depth);
  std::string why;
  auto uring = MakeUringIoQueue(depth, &why);
  if (uring != nullptr || kind == Kind::kUring) {
    if (uring == nullptr) Log(LogLevel::kWarn, "io_uring unavailable: {}", why);
    return uring;
  }
  static std::once_flag logged;
  std::call_once(logged, [&] {
    Log(LogLevel::kInfo, "io_uring unavailable ({}); disk I/O uses pread/pwrite", why);
  });
  return MakeSyncIoQueue(depth);
}

void IoQueue::Submit(std::vector<IoRequest> requests, std::function<void(Status)> done) {
  std::vector<Work> work;
  work.push_back(Work{std::move(requests), std::move(done)});
  SubmitAll(std::move(work));
}

void IoQueue::SubmitAll(std::vector<Work> work) {
  std::vector<Op*> ops;
  for (Work& w : work) {
    auto batch = std::make_shared<Batch>();
    batch->done = std::move(w.done);
    batch->refused = Validate(w.requests);
    if (batch->refused || w.requests.empty()) {
      // Still one Op, so that the callback runs on the completion thread like every other.
      batch->ops.push_back(Op{.request = {}, .nop = true});
    } else {
      batch->ops.reserve(w.requests.size());
      for (const IoRequest& r : w.requests)
        batch->ops.push_back(
            Op{.request = r, .nop = r.length == 0, .forced_errno = ShouldFail(r) ? EIO : 0});
    }
    for (Op& op : batch->ops) {
      op.batch = batch.get();
      ops.push_back(&op);
    }
    batch->remaining = batch->ops.size();
    batch->self = std::move(batch);
  }
  if (ops.empty()) return;
  {
    std::lock_guard lock(drain_mu_);
    outstanding_batches_ += work.size();
  }
  SubmitImpl(std::move(ops));
}

void IoQueue::Finish(Op* op, int result) {
  const IoRequest& r = op->request;
  Batch* batch = op->batch;
  if (!op->nop && result == 0) {
    auto& count = r.op == IoRequest::Op::kRead ? stats_.reads : stats_.writes;
    auto& bytes = r.op == IoRequest::Op::kRead ? stats_.bytes_read : stats_.bytes_written;
    count.fetch_add(1, std::memory_order_relaxed);
    bytes.fetch_add(r.length, std::memory_order_relaxed);
  } else if (result != 0) {
    stats_.errors.fetch_add(1, std::memory_order_relaxed);
    std::string why = result == -ENODATA ? "end of file" : std::strerror(-result);
    if (op->forced_errno != 0) why += " (injected failure)";
    std::lock_guard lock(batch->mu);
    if (!batch->first_error)
      batch->first_error =
          Error(ErrorCode::kIoError, fmt::format("{} of {} bytes at offset {} on fd {} failed: {}",
                                                 OpName(r.op), r.length, r.offset, r.fd, why));
  }
  if (batch->remaining.fetch_sub(1, std::memory_order_acq_rel) != 1) return;

  std::shared_ptr<Batch> keep = std::move(batch->self);
  Status status;
  if (batch->refused) {
    stats_.errors.fetch_add(1, std::memory_order_relaxed);
    status = std::unexpected(*batch->refused);
  } else if (batch->first_error) {
    status = std::unexpected(*batch->first_error);
  }
  try {
    batch->done(std::move(status));
  } catch (const std::exception& e) {
    Log(LogLevel::kError, "an I/O completion callback threw: {}", e.what());
  }
  keep.reset();
  std::lock_guard lock(drain_mu_);
  if (--outstanding_batches_ == 0) drain_cv_.notify_all();
}

void IoQueue::Drain() {
  std::unique_lock lock(drain_mu_);
  drain_cv_.wait(lock, [&] { return outstanding_batches_ == 0; });
}

Status IoQueue::RunSync(std::vector<IoRequest> requests) {
  std::promise<Status> promise;
  auto future = promise.get_future();
  Submit(std::move(requests), [&promise](Status s) { promise.set_value(std::move(s)); });
  return future.get();
}

void IoQueue::InjectFailure(int fd, uint64_t offset, uint64_t length) {
  std::lock_guard lock(failpoints_->mu);
  failpoints_->ranges.push_back({fd, offset, length});
}

void IoQueue::ClearFailures() {
  std::lock_guard lock(failpoints_->mu);
  failpoints_->ranges.clear();
}

bool IoQueue::ShouldFail(const IoRequest& r) const {
  std::lock_guard lock(failpoints_->mu);
  for (const auto& f : failpoints_->ranges)
    if (f.fd == r.fd && r.offset < f.offset + f.length && f.offset < r.offset + r.length)
      return true;
  return false;
}

}  // namespace kvbm
