// The fallback backend: pread/pwrite on a few worker threads, so that Submit never blocks.
#include <unistd.h>

#include <cerrno>
#include <deque>
#include <thread>

#include "transfer/io_queue_internal.h"

namespace kvbm {
namespace {

class SyncIoQueue final : public IoQueue {
 public:
  explicit SyncIoQueue(uint32_t depth) {
    // Each worker has one request in flight; a few suffice to keep a disk busy without io_uring.
    const uint32_t workers = std::clamp<uint32_t>(depth, 1, 4);
    for (uint32_t i = 0; i < workers; ++i) workers_.emplace_back([this] { Work(); });
  }
  ~SyncIoQueue() override {
    Drain();
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
  }
  const char* name() const override { return "sync"; }

 protected:
  void SubmitImpl(std::vector<Op*> ops) override {
    {
      std::lock_guard lock(mu_);
      pending_.insert(pending_.end(), ops.begin(), ops.end());
    }
    cv_.notify_all();
  }

 private:
  // 0 when the whole request is done, else -errno (-ENODATA: end of file on a read).
  static int Execute(Op* op) {
    const IoRequest& r = op->request;
    while (op->done_bytes < r.length) {
      const uint64_t n = std::min(kMaxIoChunk, r.length - op->done_bytes);
      uint8_t* buf = r.buffer + op->done_bytes;
      const off_t off = static_cast<off_t>(r.offset + op->done_bytes);
      ssize_t done =
          r.op == IoRequest::Op::kRead ? pread(r.fd, buf, n, off) : pwrite(r.fd, buf, n, off);
      if (done < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (done < 0) return -errno;
      if (done == 0) return r.op == IoRequest::Op::kRead ? -ENODATA : -EIO;
      op->done_bytes += static_cast<uint64_t>(done);
    }
    return 0;
  }

  void Work() {
    while (true) {
      Op* op;
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [&] { return stopping_ || !pending_.empty(); });
        if (pending_.empty()) return;  // stopping, and drained
        op = pending_.front();
        pending_.pop_front();
      }
      Finish(op, op->NeedsIo() ? Execute(op) : op->ImmediateResult());
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Op*> pending_;  // GUARDED_BY(mu_)
  bool stopping_ = false;    // GUARDED_BY(mu_)
  std::vector<std::thread> workers_;
};

}  // namespace

std::unique_ptr<IoQueue> MakeSyncIoQueue(uint32_t depth) {
  return std::make_unique<SyncIoQueue>(depth);
}

}  // namespace kvbm
