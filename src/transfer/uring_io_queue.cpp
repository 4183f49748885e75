// The io_uring backend. Lock order: mu_ only; Finish() (and so user callbacks) runs with no
// lock held. Any thread submits under mu_; one completion thread reaps the CQ. At most `depth`
// requests are in the ring; the rest wait in pending_ and are pushed as completions free room,
// so a batch larger than the depth never blocks the caller nor deadlocks.
#include <liburing.h>

#include <cerrno>
#include <cstring>
#include <deque>
#include <thread>

#include "kvbm/log.h"
#include "transfer/io_queue_internal.h"

namespace kvbm {
namespace {

constexpr uint64_t kShutdownTag = 0;  // user_data of the NOP that stops the completion thread

class UringIoQueue final : public IoQueue {
 public:
  static std::unique_ptr<IoQueue> Make(uint32_t depth, std::string* why) {
    std::unique_ptr<UringIoQueue> q(new UringIoQueue(depth));
    // The CQ (twice the SQ by default) can never overflow: at most depth + 1 entries are out.
    const int rc = io_uring_queue_init(depth, &q->ring_, 0);
    if (rc < 0) {
      *why = fmt::format("io_uring_queue_init({}) failed: {}", depth, std::strerror(-rc));
      return nullptr;
    }
    q->ring_ready_ = true;
    q->reaper_ = std::thread([p = q.get()] { p->Reap(); });
    return q;
  }

  ~UringIoQueue() override {
    if (!ring_ready_) return;
    Drain();
    {
      std::lock_guard lock(mu_);
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);  // in_flight_ is 0 after Drain: there is room
      io_uring_prep_nop(sqe);
      io_uring_sqe_set_data64(sqe, kShutdownTag);
      SubmitRing();
    }
    reaper_.join();
    io_uring_queue_exit(&ring_);
  }

  const char* name() const override { return "io_uring"; }

 protected:
  void SubmitImpl(std::vector<Op*> ops) override {
    std::lock_guard lock(mu_);
    pending_.insert(pending_.end(), ops.begin(), ops.end());
    Pump();
  }

 private:
  explicit UringIoQueue(uint32_t depth) : depth_(depth) {}

  // REQUIRES: mu_ held. Moves pending requests into the ring up to the depth.
  void Pump() {
    bool queued = false;
    while (in_flight_ < depth_ && !pending_.empty()) {
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
      if (sqe == nullptr) break;
      Op* op = pending_.front();
      pending_.pop_front();
      const IoRequest& r = op->request;
      if (!op->NeedsIo()) {
        io_uring_prep_nop(sqe);
      } else {
        const unsigned n = static_cast<unsigned>(std::min(kMaxIoChunk, r.length - op->done_bytes));
        const uint64_t off = r.offset + op->done_bytes;
        if (r.op == IoRequest::Op::kRead)
          io_uring_prep_read(sqe, r.fd, r.buffer + op->done_bytes, n, off);
        else
          io_uring_prep_write(sqe, r.fd, r.buffer + op->done_bytes, n, off);
      }
      io_uring_sqe_set_data(sqe, op);
      ++in_flight_;
      queued = true;
    }
    if (queued) SubmitRing();
  }

  // REQUIRES: mu_ held. Entries the kernel did not take stay in the SQ for the next call.
  void SubmitRing() {
    int rc;
    do rc = io_uring_submit(&ring_);
    while (rc == -EINTR);
    if (rc < 0) Log(LogLevel::kError, "io_uring_submit failed: {}", std::strerror(-rc));
  }

  // REQUIRES: mu_ held. Returns the op's final result, or nullopt when it was resubmitted.
  std::optional<int> Complete(Op* op, int res) {
    --in_flight_;
    const IoRequest& r = op->request;
    if (!op->NeedsIo()) return op->ImmediateResult();
    if (res == -EAGAIN || res == -EINTR) {
      pending_.push_front(op);
      return std::nullopt;
    }
    if (res < 0) return res;
    if (res == 0) return r.op == IoRequest::Op::kRead ? -ENODATA : -EIO;
    op->done_bytes += static_cast<uint64_t>(res);
    if (op->done_bytes >= r.length) return 0;
    pending_.push_front(op);  // short read/write: the remainder goes next
    return std::nullopt;
  }

  void Reap() {
    std::vector<std::pair<Op*, int>> finished;
    bool stop = false;
    while (!stop) {
      io_uring_cqe* cqe = nullptr;
      const int rc = io_uring_wait_cqe(&ring_, &cqe);
      if (rc < 0) {
        if (rc != -EINTR && rc != -EAGAIN)
          Log(LogLevel::kError, "io_uring_wait_cqe failed: {}", std::strerror(-rc));
        continue;
      }
      {
        std::lock_guard lock(mu_);
        unsigned head, seen = 0;
        io_uring_for_each_cqe(&ring_, head, cqe) {
          ++seen;
          if (cqe->user_data == kShutdownTag) {
            stop = true;
            continue;
          }
          Op* op = static_cast<Op*>(io_uring_cqe_get_data(cqe));
          if (auto result = Complete(op, cqe->res)) finished.emplace_back(op, *result);
        }
        io_uring_cq_advance(&ring_, seen);
        Pump();
      }
      for (auto [op, result] : finished) Finish(op, result);
      finished.clear();
    }
  }

  const uint32_t depth_;
  io_uring ring_{};
  bool ring_ready_ = false;
  std::thread reaper_;
  std::mutex mu_;            // guards the SQ side of ring_ and the members below
  std::deque<Op*> pending_;  // GUARDED_BY(mu_)
  uint32_t in_flight_ = 0;   // GUARDED_BY(mu_)
};

}  // namespace

std::unique_ptr<IoQueue> MakeUringIoQueue(uint32_t depth, std::string* why) {
  return UringIoQueue::Make(depth, why);
}

}  // namespace kvbm
