// Private: the CUDA copy backend behind kvbm::MakeCudaBackend (see kvbm/cuda.h and README.md
// beside this file). Exposed here so the GPU checks can read which paths ran.
//
// Threads: Execute() from any thread (each stream has its own enqueue lock); one completion
// thread per backend polls the events of batches in flight and calls `done` in completion
// order. Lock order: stream_mu_[i] -> slots_mu_; pending_mu_ is never held while calling out.
// Ownership: the backend owns its streams, slots (event + descriptor staging), the loaded
// kernel module and a reference on the device's primary context. The destructor waits for the
// batches in flight.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "kvbm/cuda.h"
#include "transfer/cuda/copy_plan.h"
#include "transfer/cuda/cuda_loader.h"

namespace kvbm::cuda {

// The kernel fatbin built into this library (KVBM_HAVE_CUDA_KERNELS), or empty.
std::span<const unsigned char> EmbeddedKernels();

class CudaCopyBackend final : public CopyBackend {
 public:
  struct Stats {
    uint64_t dma_batches = 0;
    uint64_t batch_api_batches = 0;
    uint64_t kernel_batches = 0;
    uint64_t descriptors = 0;  // merged ranges (before kernel splitting)
    uint64_t bytes = 0;
    uint64_t failed_batches = 0;
  };

  static Result<std::unique_ptr<CudaCopyBackend>> Create(int device,
                                                         const CudaBackendOptions& options);
  ~CudaCopyBackend() override;

  const char* name() const override { return "cuda"; }
  bool Supports(MemoryKind src, MemoryKind dst) const override;
  void Execute(const TierMemory& src, const TierMemory& dst, std::span<const BlockCopy> copies,
               std::function<void(TransferResult)> done) override;

  Stats stats() const;
  bool has_kernel() const { return function_ != nullptr; }
  bool has_batch_api() const { return Driver()->cuMemcpyBatchAsync != nullptr; }
  int device() const { return context_.device(); }

 private:
  // Per batch in flight: the event recorded after its work and the descriptor staging buffers,
  // reused only once the event has completed.
  struct Slot {
    CUevent event = nullptr;
    CopyDescriptor* host_descriptors = nullptr;  // pinned (cuMemHostAlloc)
    CUdeviceptr device_descriptors = 0;
    size_t capacity = 0;
  };
  struct Pending {
    Slot* slot = nullptr;
    size_t copies = 0;
    std::optional<Error> error;
    std::function<void(TransferResult)> done;
  };
  enum class Path { kDma, kBatchApi, kKernel };

  CudaCopyBackend(PrimaryContext context, const CudaBackendOptions& options);
  Status Init();
  Result<Slot*> AcquireSlot(size_t descriptors);
  Status EnsureCapacity(Slot* slot, size_t descriptors);
  // Device-visible addresses of the host allocations, or nullopt when any is not pinned+mapped.
  std::optional<std::vector<uint8_t*>> MappedBases(const TierMemory& host) const;
  Status Enqueue(Path path, bool d2h, std::span<const CopyDescriptor> plan, Slot* slot,
                 CUstream stream);
  void CompletionLoop();

  PrimaryContext context_;
  CudaBackendOptions options_;
  int sm_count_ = 1;
  CUmodule module_ = nullptr;
  CUfunction function_ = nullptr;
  std::vector<CUstream> streams_[2];  // [0] device->host, [1] host->device
  std::unique_ptr<std::mutex[]> stream_mu_;
  std::atomic<uint32_t> next_stream_{0};

  std::mutex slots_mu_;
  std::vector<std::unique_ptr<Slot>> all_slots_;  // GUARDED_BY(slots_mu_)
  std::vector<Slot*> free_slots_;                 // GUARDED_BY(slots_mu_)
  std::vector<std::pair<CopyDescriptor*, CUdeviceptr>>
      retired_;  // GUARDED_BY(slots_mu_); freed at destruction

  std::mutex pending_mu_;
  std::condition_variable pending_cv_;
  std::deque<Pending> pending_;  // GUARDED_BY(pending_mu_)
  bool stopping_ = false;        // GUARDED_BY(pending_mu_)
  std::thread completion_thread_;

  std::atomic<uint64_t> dma_batches_{0}, batch_api_batches_{0}, kernel_batches_{0}, descriptors_{0},
      bytes_{0}, failed_batches_{0};
};

}  // namespace kvbm::cuda
