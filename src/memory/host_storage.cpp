#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>
#include <vector>

#include "kvbm/log.h"
#include "kvbm/storage.h"
#include "memory/cuda_host_register.h"

namespace kvbm {
namespace {

// Faults every page in with several threads: the kernel zeroes pages on first touch, and one
// thread doing that for hundreds of GB takes minutes. Pinning afterwards then only locks pages.
void FirstTouch(uint8_t* data, uint64_t bytes) {
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t pages = (bytes + page - 1) / page;
  constexpr uint64_t kPagesPerThreadMin = 16384;  // 64 MiB: below that a thread is not worth it
  const uint64_t hw = std::max(1u, std::thread::hardware_concurrency());
  const uint64_t threads =
      std::clamp<uint64_t>(pages / kPagesPerThreadMin, 1, std::min<uint64_t>(hw, 16));
  auto touch = [&](uint64_t first, uint64_t last) {
    for (uint64_t p = first; p < last; ++p) data[p * page] = 0;
  };
  std::vector<std::thread> workers;
  const uint64_t per = (pages + threads - 1) / threads;
  for (uint64_t t = 1; t < threads; ++t)
    workers.emplace_back(touch, std::min(pages, t * per), std::min(pages, (t + 1) * per));
  touch(0, std::min(pages, per));
  for (auto& w : workers) w.join();
}

// MPOL_PREFERRED through the raw syscall (no libnuma at link or run time): the pages go to
// `node` while it has room. Empty when bound, else why not (errno of the kernel).
std::string BindToNode(void* addr, uint64_t bytes, int node) {
  constexpr int kMpolPreferred = 1;
  constexpr unsigned long kBits = 8 * sizeof(unsigned long);
  constexpr unsigned long kMaxNodes = 1024;
  if (node < 0 || static_cast<unsigned long>(node) >= kMaxNodes) return fmt::format("node {} out of range", node);
  unsigned long mask[kMaxNodes / kBits] = {};
  mask[node / kBits] |= 1UL << (node % kBits);
  // The kernel reads maxnode - 1 bits.
  if (syscall(SYS_mbind, addr, bytes, kMpolPreferred, mask, kMaxNodes + 1, 0) == 0) return {};
  return std::strerror(errno);
}

}  // namespace

int CurrentNumaNode() {
  unsigned cpu = 0, node = 0;
  if (syscall(SYS_getcpu, &cpu, &node, nullptr) != 0) return kNoNumaNode;
  return static_cast<int>(node);
}

Result<std::unique_ptr<HostStorage>> HostStorage::Allocate(uint64_t bytes, const HostStorageOptions& options) {
  if (bytes == 0)
    return MakeError(ErrorCode::kInvalidArgument, "host storage of 0 bytes requested");
  const auto start = std::chrono::steady_clock::now();
  // Anonymous mappings are page-aligned, which covers the 4096 bytes O_DIRECT needs.
  void* mapped = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapped == MAP_FAILED)
    return MakeError(
        ErrorCode::kResourceExhausted,
        fmt::format("cannot map {} bytes ({:.2f} GB) of host memory for the host tier: {}", bytes,
                    bytes / 1e9, std::strerror(errno)));
  auto* data = static_cast<uint8_t*>(mapped);
  if (options.huge_pages) madvise(mapped, bytes, MADV_HUGEPAGE);
  int node = kNoNumaNode;
  if (options.numa_node != kNoNumaNode) {
    // Before the first touch: that is when the pages are placed.
    std::string why = BindToNode(mapped, bytes, options.numa_node);
    if (why.empty()) node = options.numa_node;
    else Log(LogLevel::kWarn, "host memory not bound to NUMA node {}: {}; placed by first touch", options.numa_node, why);
  }
  FirstTouch(data, bytes);
  bool pinned = false;
  if (options.try_pin) {
    std::string why;
    pinned = cuda::HostRegister(data, bytes, &why);
    if (!pinned) Log(LogLevel::kInfo, "host tier memory is not pinned: {}", why);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  Log(LogLevel::kInfo, "allocated {} bytes ({:.2f} GB) of {} host memory (NUMA node {}) in {:.3f} s", bytes,
      bytes / 1e9, pinned ? "pinned" : "plain", node, seconds);
  return std::unique_ptr<HostStorage>(new HostStorage(data, bytes, pinned, node, seconds));
}

HostStorage::~HostStorage() {
  if (pinned_) cuda::HostUnregister(data_);
  munmap(data_, size_);
}

AlignedBuffer::AlignedBuffer(uint64_t bytes, uint64_t alignment) : size_(bytes) {
  if (bytes == 0) return;
  // aligned_alloc wants a size that is a multiple of the alignment; the tail is never exposed.
  const uint64_t rounded = (bytes + alignment - 1) / alignment * alignment;
  data_ = static_cast<uint8_t*>(std::aligned_alloc(alignment, rounded));
  if (data_ == nullptr) throw std::bad_alloc();
}

AlignedBuffer::AlignedBuffer(AlignedBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& other) noexcept {
  if (this != &other) {
    std::free(data_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

AlignedBuffer::~AlignedBuffer() { std::free(data_); }

}  // namespace kvbm
