#include "transfer/cuda/cuda_backend.h"

#include <algorithm>
#include <chrono>
#include <numeric>

#ifdef KVBM_HAVE_CUDA_KERNELS
// Generated at build time from kernels.cu (cmake/cuda_kernels.cmake).
extern "C" const unsigned char kvbm_cuda_fatbin[];
extern "C" const unsigned long long kvbm_cuda_fatbin_size;
#endif

namespace kvbm::cuda {
namespace {

constexpr const char* kKernelName = "kvbm_copy_descriptors";

TransferResult FailAll(size_t copies, Error error) {
  TransferResult result;
  result.failed.resize(copies);
  std::iota(result.failed.begin(), result.failed.end(), 0u);
  result.first_error = std::move(error);
  return result;
}

Error CudaError(const char* what, CUresult r) {
  return Error(ErrorCode::kInternal, CallError(what, r));
}

}  // namespace

std::span<const unsigned char> EmbeddedKernels() {
#ifdef KVBM_HAVE_CUDA_KERNELS
  return {kvbm_cuda_fatbin, static_cast<size_t>(kvbm_cuda_fatbin_size)};
#else
  return {};
#endif
}

Result<std::unique_ptr<CudaCopyBackend>> CudaCopyBackend::Create(
    int device, const CudaBackendOptions& options) {
  if (Driver() == nullptr)
    return MakeError(ErrorCode::kUnavailable, "CUDA copy backend unavailable: " + DriverError());
  if (options.streams_per_direction == 0 || options.kernel_threads == 0 ||
      options.kernel_threads > 1024 || options.kernel_threads % 32 != 0 ||
      options.kernel_blocks_per_sm == 0 || options.kernel_piece_bytes < 16)
    return MakeError(
        ErrorCode::kInvalidArgument,
        "CUDA backend options: streams_per_direction and kernel_blocks_per_sm must be > 0, "
        "kernel_threads a multiple of 32 up to 1024, kernel_piece_bytes >= 16");
  std::string why;
  PrimaryContext context = PrimaryContext::Retain(device, &why);
  if (context.context() == nullptr)
    return MakeError(ErrorCode::kUnavailable, "CUDA copy backend unavailable: " + why);
  std::unique_ptr<CudaCopyBackend> backend(new CudaCopyBackend(std::move(context), options));
  if (auto s = backend->Init(); !s) return std::unexpected(s.error());
  return backend;
}

CudaCopyBackend::CudaCopyBackend(PrimaryContext context, const CudaBackendOptions& options)
    : context_(std::move(context)), options_(options) {}

Status CudaCopyBackend::Init() {
  const DriverApi* d = Driver();
  ScopedContext scope(context_.context());
  if (!scope.ok())
    return MakeError(ErrorCode::kUnavailable, "cannot make the CUDA primary context current");
  d->cuDeviceGetAttribute(&sm_count_, kAttrMultiprocessorCount, context_.device());
  sm_count_ = std::max(sm_count_, 1);
  int unified = 0;
  d->cuDeviceGetAttribute(&unified, kAttrUnifiedAddressing, context_.device());

  stream_mu_ = std::make_unique<std::mutex[]>(2 * options_.streams_per_direction);
  for (auto& direction : streams_)
    for (uint32_t i = 0; i < options_.streams_per_direction; ++i) {
      CUstream s = nullptr;
      // Non-blocking: no implicit ordering with the legacy default stream the engine may use.
      if (CUresult r = d->cuStreamCreate(&s, kStreamNonBlocking); r != kSuccess)
        return std::unexpected(CudaError("cuStreamCreate", r));
      direction.push_back(s);
    }

  // Without unified addressing, device-mapped host pointers differ per context; keep to DMA.
  std::span<const unsigned char> image = EmbeddedKernels();
  if (!image.empty() && unified != 0) {
    if (CUresult r = d->cuModuleLoadData(&module_, image.data()); r != kSuccess) {
      CudaLog(1,
              "CUDA copy kernel not loaded, using DMA only: " + CallError("cuModuleLoadData", r));
      module_ = nullptr;
    } else if (CUresult r2 = d->cuModuleGetFunction(&function_, module_, kKernelName);
               r2 != kSuccess) {
      CudaLog(
          1, "CUDA copy kernel not found, using DMA only: " + CallError("cuModuleGetFunction", r2));
      function_ = nullptr;
    }
  }
  completion_thread_ = std::thread([this] { CompletionLoop(); });
  char name[128] = {};
  d->cuDeviceGetName(name, sizeof(name) - 1, context_.device());
  CudaLog(2, std::string("CUDA copy backend on device ") + std::to_string(context_.device()) +
                 " (" + name + ", " + std::to_string(sm_count_) + " SMs, driver " +
                 std::to_string(Driver()->driver_version) + "): kernel " +
                 (function_ ? "loaded" : "absent") + ", batch copy API " +
                 (d->cuMemcpyBatchAsync ? "present" : "absent"));
  return {};
}

CudaCopyBackend::~CudaCopyBackend() {
  {
    std::lock_guard<std::mutex> lock(pending_mu_);
    stopping_ = true;
  }
  pending_cv_.notify_all();
  if (completion_thread_.joinable()) completion_thread_.join();
  const DriverApi* d = Driver();
  ScopedContext scope(context_.context());
  // Everything enqueued has completed (the completion thread drained it), so freeing here
  // cannot pull memory from under a copy.
  for (auto& direction : streams_)
    for (CUstream s : direction) d->cuStreamDestroy(s);
  std::lock_guard<std::mutex> lock(slots_mu_);
  for (auto& slot : all_slots_) {
    if (slot->event) d->cuEventDestroy(slot->event);
    if (slot->host_descriptors) d->cuMemFreeHost(slot->host_descriptors);
    if (slot->device_descriptors) d->cuMemFree(slot->device_descriptors);
  }
  for (auto& [host, dev] : retired_) {
    d->cuMemFreeHost(host);
    d->cuMemFree(dev);
  }
  if (module_) d->cuModuleUnload(module_);
}

bool CudaCopyBackend::Supports(MemoryKind src, MemoryKind dst) const {
  return (src == MemoryKind::kDevice && dst == MemoryKind::kHost) ||
         (src == MemoryKind::kHost && dst == MemoryKind::kDevice);
}

CudaCopyBackend::Stats CudaCopyBackend::stats() const {
  return {dma_batches_.load(),    batch_api_batches_.load(),
          kernel_batches_.load(), descriptors_.load(),
          bytes_.load(),          failed_batches_.load()};
}

std::optional<std::vector<uint8_t*>> CudaCopyBackend::MappedBases(const TierMemory& host) const {
  // Asked every time, never cached: a plain allocation can later reuse the address of a
  // pinned one, and a stale "mapped" answer would send the kernel to unmapped memory.
  std::vector<uint8_t*> out;
  out.reserve(host.bases.size());
  for (uint8_t* base : host.bases) {
    CUdeviceptr p = 0;
    if (Driver()->cuMemHostGetDevicePointer(&p, base, 0) != kSuccess || p == 0) return std::nullopt;
    out.push_back(reinterpret_cast<uint8_t*>(p));
  }
  return out;
}

Status CudaCopyBackend::EnsureCapacity(Slot* slot, size_t descriptors) {
  if (slot->capacity >= descriptors) return {};
  const DriverApi* d = Driver();
  size_t capacity = std::max<size_t>({descriptors, 2 * slot->capacity, 1024});
  void* host = nullptr;
  CUdeviceptr dev = 0;
  if (CUresult r = d->cuMemHostAlloc(&host, capacity * sizeof(CopyDescriptor), kHostAllocPortable);
      r != kSuccess)
    return std::unexpected(CudaError("cuMemHostAlloc (descriptor staging)", r));
  if (CUresult r = d->cuMemAlloc(&dev, capacity * sizeof(CopyDescriptor)); r != kSuccess) {
    d->cuMemFreeHost(host);
    return std::unexpected(CudaError("cuMemAlloc (descriptors)", r));
  }
  // cuMemFree may synchronise the device; old buffers wait for the destructor instead.
  std::lock_guard<std::mutex> lock(slots_mu_);
  if (slot->host_descriptors != nullptr)
    retired_.emplace_back(slot->host_descriptors, slot->device_descriptors);
  slot->host_descriptors = static_cast<CopyDescriptor*>(host);
  slot->device_descriptors = dev;
  slot->capacity = capacity;
  return {};
}

Result<CudaCopyBackend::Slot*> CudaCopyBackend::AcquireSlot(size_t descriptors) {
  Slot* slot = nullptr;
  {
    std::lock_guard<std::mutex> lock(slots_mu_);
    if (!free_slots_.empty()) {
      slot = free_slots_.back();
      free_slots_.pop_back();
    }
  }
  if (slot == nullptr) {
    auto fresh = std::make_unique<Slot>();
    if (CUresult r = Driver()->cuEventCreate(&fresh->event, kEventDisableTiming); r != kSuccess)
      return std::unexpected(CudaError("cuEventCreate", r));
    slot = fresh.get();
    std::lock_guard<std::mutex> lock(slots_mu_);
    all_slots_.push_back(std::move(fresh));
  }
  if (descriptors > 0) {
    if (auto s = EnsureCapacity(slot, descriptors); !s) {
      std::lock_guard<std::mutex> lock(slots_mu_);
      free_slots_.push_back(slot);
      return std::unexpected(s.error());
    }
  }
  return slot;
}

Status CudaCopyBackend::Enqueue(Path path, bool d2h, std::span<const CopyDescriptor> plan,
                                Slot* slot, CUstream stream) {
  const DriverApi* d = Driver();
  switch (path) {
    case Path::kDma:
      for (const CopyDescriptor& c : plan) {
        CUresult r =
            d2h ? d->cuMemcpyDtoHAsync(reinterpret_cast<void*>(c.dst), c.src, c.bytes, stream)
                : d->cuMemcpyHtoDAsync(c.dst, reinterpret_cast<const void*>(c.src), c.bytes,
                                       stream);
        if (r != kSuccess)
          return std::unexpected(CudaError(d2h ? "cuMemcpyDtoHAsync" : "cuMemcpyHtoDAsync", r));
      }
      return {};
    case Path::kBatchApi: {
      std::vector<CUdeviceptr> srcs(plan.size()), dsts(plan.size());
      std::vector<size_t> sizes(plan.size());
      for (size_t i = 0; i < plan.size(); ++i) {
        srcs[i] = plan[i].src;
        dsts[i] = plan[i].dst;
        sizes[i] = plan[i].bytes;
      }
      const MemLocation device{1, context_.device()};
      const MemLocation host{2, 0};
      MemcpyAttributes attrs{1 /* in stream order */, d2h ? device : host, d2h ? host : device, 0};
      size_t attr_index = 0;
      size_t fail_index = 0;
      CUresult r = d->cuMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), plan.size(),
                                         &attrs, &attr_index, 1, &fail_index, stream);
      if (r == kSuccess) return {};
      // Copying the same bytes again is harmless, so a refused batch falls back to plain DMA.
      CudaLog(1, CallError("cuMemcpyBatchAsync", r) + " at copy " + std::to_string(fail_index) +
                     "; falling back to one copy per range");
      return Enqueue(Path::kDma, d2h, plan, slot, stream);
    }
    case Path::kKernel: {
      std::vector<CopyDescriptor> pieces = SplitDescriptors(plan, options_.kernel_piece_bytes);
      if (auto s = EnsureCapacity(slot, pieces.size()); !s) return s;
      std::copy(pieces.begin(), pieces.end(), slot->host_descriptors);
      if (CUresult r = d->cuMemcpyHtoDAsync(slot->device_descriptors, slot->host_descriptors,
                                            pieces.size() * sizeof(CopyDescriptor), stream);
          r != kSuccess)
        return std::unexpected(CudaError("cuMemcpyHtoDAsync (descriptors)", r));
      unsigned long long count = pieces.size();
      CUdeviceptr descriptors = slot->device_descriptors;
      void* params[] = {&descriptors, &count};
      const uint64_t grid = std::min<uint64_t>(
          count, static_cast<uint64_t>(sm_count_) * options_.kernel_blocks_per_sm);
      if (CUresult r = d->cuLaunchKernel(function_, static_cast<unsigned>(grid), 1, 1,
                                         options_.kernel_threads, 1, 1, 0, stream, params, nullptr);
          r != kSuccess)
        return std::unexpected(CudaError("cuLaunchKernel", r));
      return {};
    }
  }
  return {};
}

void CudaCopyBackend::Execute(const TierMemory& src, const TierMemory& dst,
                              std::span<const BlockCopy> copies,
                              std::function<void(TransferResult)> done) {
  const size_t n = copies.size();
  if (n == 0) {
    done(TransferResult{});
    return;
  }
  if (!Supports(src.kind, dst.kind)) {
    done(
        FailAll(n, Error(ErrorCode::kInvalidArgument, "CUDA backend copies only device <-> host")));
    return;
  }
  const bool d2h = src.kind == MemoryKind::kDevice;
  const TierMemory& device_side = d2h ? src : dst;
  const TierMemory& host_side = d2h ? dst : src;
  if (device_side.device_index >= 0 && device_side.device_index != context_.device()) {
    done(FailAll(
        n, Error(ErrorCode::kInvalidArgument,
                 "device memory of CUDA device " + std::to_string(device_side.device_index) +
                     " given to the backend of device " + std::to_string(context_.device()))));
    return;
  }
  auto plan = BuildCopyPlan(src, dst, copies);
  if (!plan) {
    done(FailAll(n, plan.error()));
    return;
  }
  if (plan->empty()) {
    done(TransferResult{});
    return;
  }

  ScopedContext scope(context_.context());
  if (!scope.ok()) {
    done(
        FailAll(n, Error(ErrorCode::kUnavailable, "cannot make the CUDA primary context current")));
    return;
  }
  const uint64_t total = PlanBytes(*plan);
  const uint64_t mean = total / plan->size();
  std::optional<std::vector<uint8_t*>> mapped;
  const bool want_kernel =
      function_ != nullptr && (options_.mode == CudaCopyMode::kKernel ||
                               (options_.mode == CudaCopyMode::kAuto && plan->size() > 1 &&
                                mean < options_.kernel_max_mean_bytes));
  if (want_kernel) mapped = MappedBases(host_side);
  Path path = Path::kDma;
  if (want_kernel && mapped) {
    path = Path::kKernel;
    if (*mapped != host_side.bases) {
      // Device-visible host addresses differ from the host's: plan again with them.
      TierMemory translated = host_side;
      translated.bases = *mapped;
      plan = d2h ? BuildCopyPlan(src, translated, copies) : BuildCopyPlan(translated, dst, copies);
      if (!plan) {
        done(FailAll(n, plan.error()));
        return;
      }
    }
  } else if (options_.mode == CudaCopyMode::kBatchDma && Driver()->cuMemcpyBatchAsync != nullptr) {
    path = Path::kBatchApi;
  }

  auto slot = AcquireSlot(0);
  if (!slot) {
    done(FailAll(n, slot.error()));
    return;
  }
  const uint32_t index =
      next_stream_.fetch_add(1, std::memory_order_relaxed) % options_.streams_per_direction;
  const uint32_t direction = d2h ? 0 : 1;
  CUstream stream = streams_[direction][index];
  Pending pending;
  pending.slot = *slot;
  pending.copies = n;
  pending.done = std::move(done);
  {
    std::lock_guard<std::mutex> lock(
        stream_mu_[direction * options_.streams_per_direction + index]);
    Status s = Enqueue(path, d2h, *plan, *slot, stream);
    if (!s) pending.error = s.error();
    // The event is recorded even after a failed enqueue: work that did get enqueued may still
    // read the slot's descriptors, so the slot is reused only after that work has finished.
    if (CUresult r = Driver()->cuEventRecord((*slot)->event, stream); r != kSuccess) {
      Error e = CudaError("cuEventRecord", r);
      failed_batches_.fetch_add(1, std::memory_order_relaxed);
      // No event to wait on: the slot is abandoned (never reused) rather than risk reuse.
      std::function<void(TransferResult)> cb = std::move(pending.done);
      cb(FailAll(n, pending.error.value_or(e)));
      return;
    }
  }
  (path == Path::kKernel     ? kernel_batches_
   : path == Path::kBatchApi ? batch_api_batches_
                             : dma_batches_)
      .fetch_add(1, std::memory_order_relaxed);
  descriptors_.fetch_add(plan->size(), std::memory_order_relaxed);
  bytes_.fetch_add(total, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(pending_mu_);
    pending_.push_back(std::move(pending));
  }
  pending_cv_.notify_one();
}

void CudaCopyBackend::CompletionLoop() {
  const DriverApi* d = Driver();
  ScopedContext scope(context_.context());
  std::vector<Pending> finished;
  std::unique_lock<std::mutex> lock(pending_mu_);
  while (true) {
    pending_cv_.wait(lock, [&] { return stopping_ || !pending_.empty(); });
    if (pending_.empty()) {
      if (stopping_) return;
      continue;
    }
    for (auto it = pending_.begin(); it != pending_.end();) {
      CUresult r = d->cuEventQuery(it->slot->event);
      if (r == kErrorNotReady) {
        ++it;
        continue;
      }
      if (r != kSuccess && !it->error) it->error = CudaError("copy batch (cuEventQuery)", r);
      finished.push_back(std::move(*it));
      it = pending_.erase(it);
    }
    if (finished.empty()) {
      // Short sleeps keep the completion latency in the tens of microseconds without a busy
      // core; cuLaunchHostFunc is avoided because its callbacks may not call CUDA.
      lock.unlock();
      std::this_thread::sleep_for(std::chrono::microseconds(20));
      lock.lock();
      continue;
    }
    lock.unlock();
    for (Pending& p : finished) {
      {
        std::lock_guard<std::mutex> slots_lock(slots_mu_);
        free_slots_.push_back(p.slot);
      }
      if (p.error) failed_batches_.fetch_add(1, std::memory_order_relaxed);
      p.done(p.error ? FailAll(p.copies, *p.error) : TransferResult{});
    }
    finished.clear();
    lock.lock();
  }
}

}  // namespace kvbm::cuda

namespace kvbm {

Result<std::unique_ptr<CopyBackend>> MakeCudaBackend(int device,
                                                     const CudaBackendOptions& options) {
  auto backend = cuda::CudaCopyBackend::Create(device, options);
  if (!backend) return std::unexpected(backend.error());
  return std::unique_ptr<CopyBackend>(std::move(*backend));
}

}  // namespace kvbm
