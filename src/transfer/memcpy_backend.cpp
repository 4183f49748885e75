// memcpy backend: host <-> host copies (G2, and an engine's CPU KV tensors as G1) on a small
// pool of worker threads, so the caller never blocks.
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "kvbm/transfer.h"

namespace kvbm {
namespace {

class MemcpyBackend final : public CopyBackend {
 public:
  explicit MemcpyBackend(uint32_t threads) {
    for (uint32_t i = 0; i < std::max(1u, threads); ++i) workers_.emplace_back([this] { Run(); });
  }
  ~MemcpyBackend() override {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  const char* name() const override { return "memcpy"; }
  bool Supports(MemoryKind src, MemoryKind dst) const override {
    return src == MemoryKind::kHost && dst == MemoryKind::kHost;
  }
  void Execute(const TierMemory& src, const TierMemory& dst, std::span<const BlockCopy> copies,
               std::function<void(TransferResult)> done) override {
    std::vector<BlockCopy> owned(copies.begin(), copies.end());
    {
      std::lock_guard lock(mu_);
      queue_.push_back([src, dst, owned = std::move(owned), done = std::move(done)] {
        for (const BlockCopy& c : owned) CopyBlockBytes(src, c.src, dst, c.dst);
        done(TransferResult{});
      });
    }
    cv_.notify_one();
  }

 private:
  void Run() {
    while (true) {
      std::function<void()> task;
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      task();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;  // GUARDED_BY(mu_)
  bool stop_ = false;                        // GUARDED_BY(mu_)
  std::vector<std::thread> workers_;
};

}  // namespace

std::unique_ptr<CopyBackend> MakeMemcpyBackend(uint32_t threads) { return std::make_unique<MemcpyBackend>(threads); }

}  // namespace kvbm
