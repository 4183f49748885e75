#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>

#include "kvbm/log.h"
#include "kvbm/storage.h"
#include "kvbm/transfer.h"

namespace kvbm {
namespace {

using Clock = std::chrono::steady_clock;

// Results of one Submit, gathered over its batches.
struct Aggregate {
  std::mutex mu;
  size_t remaining = 0;     // GUARDED_BY(mu)
  TransferResult result;    // GUARDED_BY(mu)
  std::shared_ptr<TransferCompletion> completion = std::make_shared<TransferCompletion>();
};

struct Batch {
  TransferPath path;
  TierMemory src, dst;
  std::vector<BlockCopy> copies;
  uint32_t first_index = 0;  // index of copies[0] in the Submit
  std::shared_ptr<Aggregate> aggregate;
};

}  // namespace

struct TransferEngine::Impl {
  TransferEngineOptions options;
  std::shared_ptr<KvbmMetrics> metrics;
  std::vector<std::unique_ptr<CopyBackend>> backends;  // tried in order
  std::mutex mu;
  std::condition_variable idle_cv;
  std::deque<Batch> pending;  // GUARDED_BY(mu)
  uint32_t in_flight = 0;     // GUARDED_BY(mu)
  // Threads inside PumpLocked, which unlocks `mu` around Start and locks it again: the engine
  // may not be destroyed under them. GUARDED_BY(mu)
  uint32_t pumps = 0;

  // Nothing queued, running or about to touch *this: the destructor may free it.
  // REQUIRES: mu held.
  bool Idle() const { return in_flight == 0 && pending.empty() && pumps == 0; }

  CopyBackend* Find(MemoryKind src, MemoryKind dst) {
    for (auto& b : backends)
      if (b->Supports(src, dst)) return b.get();
    return nullptr;
  }

  void Pump() {
    std::unique_lock lock(mu);
    PumpLocked(lock);
  }

  // Starts pending batches while there is room. Notifies `idle_cv` with `mu` still held, so the
  // destructor, which waits for Idle() under `mu`, cannot free *this before this thread has
  // released `mu`, and this thread touches nothing of *this after that.
  void PumpLocked(std::unique_lock<std::mutex>& lock) {
    ++pumps;
    while (!pending.empty() && in_flight < options.max_concurrent_transfers) {
      Batch batch = std::move(pending.front());
      pending.pop_front();
      ++in_flight;
      lock.unlock();
      Start(std::move(batch));
      lock.lock();
    }
    --pumps;
    if (Idle()) idle_cv.notify_all();
  }

  void Start(Batch batch) {
    auto started = Clock::now();
    auto shared = std::make_shared<Batch>(std::move(batch));
    auto done = [this, shared, started](TransferResult r) { Finished(*shared, std::move(r), started); };
    const Batch& b = *shared;
    if (CopyBackend* direct = Find(b.src.kind, b.dst.kind)) {
      direct->Execute(b.src, b.dst, b.copies, std::move(done));
      return;
    }
    // Two stages through a host bounce buffer laid out like the disk (or host) side.
    bool from_disk = b.src.kind == MemoryKind::kDisk;
    const TierMemory& far = from_disk ? b.dst : b.src;
    CopyBackend* disk_stage = Find(from_disk ? MemoryKind::kDisk : MemoryKind::kHost,
                                   from_disk ? MemoryKind::kHost : MemoryKind::kDisk);
    CopyBackend* far_stage = Find(from_disk ? MemoryKind::kHost : far.kind, from_disk ? far.kind : MemoryKind::kHost);
    bool involves_disk = b.src.kind == MemoryKind::kDisk || b.dst.kind == MemoryKind::kDisk;
    if (!involves_disk || disk_stage == nullptr || far_stage == nullptr) {
      TransferResult r;
      for (uint32_t i = 0; i < b.copies.size(); ++i) r.failed.push_back(i);
      r.first_error = Error(ErrorCode::kUnavailable, "no copy backend for this pair of memory kinds");
      done(std::move(r));
      return;
    }
    const TierMemory& disk = from_disk ? b.src : b.dst;
    LayoutDims d = disk.layout->dims();
    d.num_blocks = b.copies.size();
    auto layout = std::make_shared<FullyContiguousLayout>(d, kDiskAlignment);
    auto buffer = std::make_shared<AlignedBuffer>(layout->allocation_bytes(0));
    TierMemory staging{TierId::kHost, MemoryKind::kHost, layout.get(), {buffer->data()}};
    std::vector<BlockCopy> first, second;
    for (uint32_t i = 0; i < b.copies.size(); ++i) {
      const BlockCopy& c = b.copies[i];
      first.push_back(BlockCopy{c.src, i, c.hash});
      second.push_back(BlockCopy{i, c.dst, c.hash, c.lineage});
    }
    CopyBackend* stage1 = from_disk ? disk_stage : far_stage;
    CopyBackend* stage2 = from_disk ? far_stage : disk_stage;
    TierMemory dst_mem = b.dst;
    auto second_shared = std::make_shared<std::vector<BlockCopy>>(std::move(second));
    stage1->Execute(b.src, staging, first,
                    [stage2, staging, dst_mem, second_shared, layout, buffer, done](TransferResult r1) mutable {
                      // Only blocks that made it through stage one go on; failures keep their index.
                      std::vector<BlockCopy> go;
                      std::vector<uint32_t> go_index;
                      std::vector<bool> failed(second_shared->size(), false);
                      for (uint32_t f : r1.failed) failed[f] = true;
                      for (uint32_t i = 0; i < second_shared->size(); ++i)
                        if (!failed[i]) {
                          go.push_back((*second_shared)[i]);
                          go_index.push_back(i);
                        }
                      if (go.empty()) {
                        done(std::move(r1));
                        return;
                      }
                      stage2->Execute(staging, dst_mem, go,
                                      [r1, go_index, layout, buffer, done](TransferResult r2) mutable {
                                        for (uint32_t f : r2.failed) r1.failed.push_back(go_index[f]);
                                        r1.corrupt += r2.corrupt;
                                        if (!r1.first_error) r1.first_error = r2.first_error;
                                        done(std::move(r1));
                                      });
                    });
  }

  void Finished(const Batch& b, TransferResult r, Clock::time_point started) {
    double seconds = std::chrono::duration<double>(Clock::now() - started).count();
    if (metrics) {
      auto p = static_cast<size_t>(b.path);
      uint64_t ok_blocks = b.copies.size() - r.failed.size();
      metrics->blocks[p] += ok_blocks;
      metrics->bytes[p] += ok_blocks * b.src.layout->dims().block_bytes();
      metrics->latency[p].Observe(seconds);
      metrics->corrupt_blocks += r.corrupt;
    }
    std::shared_ptr<TransferCompletion> finish;
    TransferResult total;
    {
      std::lock_guard lock(b.aggregate->mu);
      auto& agg = b.aggregate->result;
      for (uint32_t f : r.failed) agg.failed.push_back(b.first_index + f);
      agg.corrupt += r.corrupt;
      if (!agg.first_error && r.first_error) agg.first_error = r.first_error;
      if (--b.aggregate->remaining == 0) {
        finish = b.aggregate->completion;
        total = std::move(agg);
      }
    }
    if (finish) {
      std::sort(total.failed.begin(), total.failed.end());
      finish->Finish(std::move(total));
    }
    std::unique_lock lock(mu);
    --in_flight;
    PumpLocked(lock);
  }
};

TransferEngine::TransferEngine(const TransferEngineOptions& options, std::shared_ptr<KvbmMetrics> metrics)
    : impl_(std::make_unique<Impl>()) {
  impl_->options = options;
  if (impl_->options.max_batch_size == 0) impl_->options.max_batch_size = 1;
  if (impl_->options.max_concurrent_transfers == 0) impl_->options.max_concurrent_transfers = 1;
  impl_->metrics = std::move(metrics);
  io_ = std::shared_ptr<IoQueue>(IoQueue::Create(options.io_kind));
  impl_->backends.push_back(MakeMemcpyBackend(options.memcpy_threads));
  impl_->backends.push_back(MakeFileBackend(io_));
}

TransferEngine::~TransferEngine() {
  std::unique_lock lock(impl_->mu);
  impl_->idle_cv.wait(lock, [&] { return impl_->Idle(); });
}

void TransferEngine::AddBackend(std::unique_ptr<CopyBackend> backend) {
  std::lock_guard lock(impl_->mu);
  impl_->backends.insert(impl_->backends.begin(), std::move(backend));
}

std::shared_ptr<TransferCompletion> TransferEngine::Submit(TransferPath path, const TierMemory& src,
                                                           const TierMemory& dst, std::vector<BlockCopy> copies) {
  auto agg = std::make_shared<Aggregate>();
  auto completion = agg->completion;
  if (copies.empty()) {
    completion->Finish(TransferResult{});
    return completion;
  }
  uint32_t batch = impl_->options.max_batch_size;
  size_t n_batches = (copies.size() + batch - 1) / batch;
  agg->remaining = n_batches;
  {
    std::lock_guard lock(impl_->mu);
    for (size_t i = 0; i < copies.size(); i += batch) {
      size_t end = std::min(copies.size(), i + batch);
      impl_->pending.push_back(Batch{path, src, dst, std::vector<BlockCopy>(copies.begin() + i, copies.begin() + end),
                                     static_cast<uint32_t>(i), agg});
    }
  }
  impl_->Pump();
  return completion;
}

}  // namespace kvbm
