#include <dlfcn.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <optional>
#include <utility>

#include "kvbm/storage.h"

namespace kvbm {
namespace {

TEST(HostStorage, AllocatesAlignedZeroedWritableMemory) {
  constexpr uint64_t kBytes = (96 << 20) + 123;  // several first-touch threads, odd tail
  auto host = HostStorage::Allocate(kBytes, /*try_pin=*/false);
  ASSERT_TRUE(host.has_value()) << host.error().ToString();
  HostStorage& h = **host;
  EXPECT_EQ(h.size(), kBytes);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(h.data()) % kDiskAlignment, 0u);
  EXPECT_FALSE(h.pinned());
  EXPECT_GE(h.allocation_seconds(), 0.0);
  for (uint64_t i = 0; i < kBytes; i += 4096) ASSERT_EQ(h.data()[i], 0) << i;
  EXPECT_EQ(h.data()[kBytes - 1], 0);
  std::memset(h.data(), 0x5A, kBytes);
  EXPECT_EQ(h.data()[kBytes - 1], 0x5A);
}

TEST(HostStorage, ImpossibleSizeIsResourceExhaustedNamingTheSize) {
  auto host = HostStorage::Allocate(uint64_t{1} << 60);
  ASSERT_FALSE(host.has_value());
  EXPECT_EQ(host.error().code(), ErrorCode::kResourceExhausted);
  EXPECT_NE(host.error().message().find("1152921504606846976"), std::string::npos)
      << host.error().message();
  EXPECT_EQ(HostStorage::Allocate(0).error().code(), ErrorCode::kInvalidArgument);
}

// Where a CUDA runtime and a GPU exist, the memory must come back pinned; without either it
// must still work, as plain memory.
TEST(HostStorage, PinsThroughCudaRuntimeWhenAvailable) {
  auto host = HostStorage::Allocate(8 << 20);
  ASSERT_TRUE(host.has_value());
  void* cudart = dlopen("libcudart.so", RTLD_NOW | RTLD_LOCAL);
  if (cudart == nullptr) cudart = dlopen("libcudart.so.12", RTLD_NOW | RTLD_LOCAL);
  if (cudart == nullptr) cudart = dlopen("libcudart.so.13", RTLD_NOW | RTLD_LOCAL);
  int devices = 0;
  if (cudart != nullptr) {
    auto count = reinterpret_cast<int (*)(int*)>(dlsym(cudart, "cudaGetDeviceCount"));
    if (count == nullptr || count(&devices) != 0) devices = 0;
  }
  if (devices == 0) {
    EXPECT_FALSE((*host)->pinned());
    GTEST_SKIP() << "no CUDA runtime or GPU: allocated as plain memory";
  }
  EXPECT_TRUE((*host)->pinned());
  std::memset((*host)->data(), 1, (*host)->size());
}

// The NUMA policy of the page at `addr` (get_mempolicy, MPOL_F_ADDR): (mode, node mask word 0),
// or nullopt when the kernel does not tell (no NUMA support, a seccomp filter).
std::optional<std::pair<int, unsigned long>> PolicyAt(void* addr) {
  int mode = -1;
  unsigned long mask[1024 / (8 * sizeof(unsigned long))] = {};
  constexpr unsigned long kMpolFAddr = 2;
  if (syscall(SYS_get_mempolicy, &mode, mask, 1024UL + 1, addr, kMpolFAddr) != 0) return std::nullopt;
  return std::make_pair(mode, mask[0]);
}

}  // namespace

// True when this kernel lets a process bind memory to `node` (a scratch mapping, mbind
// MPOL_PREFERRED): where it does, kvbm's allocations must come back bound.
bool KernelAllowsMbind(int node) {
  void* p = mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return false;
  unsigned long mask[1024 / (8 * sizeof(unsigned long))] = {};
  mask[node / (8 * sizeof(unsigned long))] |= 1UL << (node % (8 * sizeof(unsigned long)));
  bool ok = syscall(SYS_mbind, p, 4096, 1 /* MPOL_PREFERRED */, mask, 1024UL + 1, 0) == 0;
  munmap(p, 4096);
  return ok;
}

namespace {

TEST(HostStorage, BindsToTheRequestedNumaNodeWhereTheKernelAllows) {
  const int node = CurrentNumaNode();
  if (node < 0) GTEST_SKIP() << "getcpu does not report a NUMA node here";
  if (node >= 64) GTEST_SKIP() << "node " << node << " beyond the first mask word this test reads";
  HostStorageOptions o;
  o.try_pin = false;
  o.numa_node = node;
  auto host = HostStorage::Allocate(4 << 20, o);
  ASSERT_TRUE(host.has_value()) << host.error().ToString();
  auto policy = PolicyAt((*host)->data());
  if (!policy) GTEST_SKIP() << "get_mempolicy refused here (" << std::strerror(errno) << "): cannot check";
  if (!KernelAllowsMbind(node)) GTEST_SKIP() << "this kernel refuses mbind (no NUMA support or a seccomp filter)";
  EXPECT_EQ((*host)->numa_node(), node);
  constexpr int kMpolPreferred = 1;
  EXPECT_EQ(policy->first, kMpolPreferred);
  EXPECT_EQ(policy->second, 1UL << node);
  // The last page too: the whole range is bound.
  auto last = PolicyAt((*host)->data() + (*host)->size() - 1);
  ASSERT_TRUE(last.has_value());
  EXPECT_EQ(last->first, kMpolPreferred);
  (*host)->data()[0] = 1;

  // Without a node: the default policy (placement by first touch).
  auto plain = HostStorage::Allocate(1 << 20, /*try_pin=*/false);
  ASSERT_TRUE(plain.has_value());
  EXPECT_EQ((*plain)->numa_node(), kNoNumaNode);
  auto def = PolicyAt((*plain)->data());
  ASSERT_TRUE(def.has_value());
  EXPECT_NE(def->first, kMpolPreferred);
}

TEST(HostStorage, ANodeTheKernelRefusesIsLoggedNotAnError) {
  HostStorageOptions o;
  o.try_pin = false;
  o.numa_node = 1000;  // no machine has it
  auto host = HostStorage::Allocate(1 << 20, o);
  ASSERT_TRUE(host.has_value()) << host.error().ToString();
  EXPECT_EQ((*host)->numa_node(), kNoNumaNode);
  (*host)->data()[(1 << 20) - 1] = 7;  // usable
}

TEST(AlignedBuffer, AlignedAndMovable) {
  AlignedBuffer a(5000);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a.data()) % kDiskAlignment, 0u);
  EXPECT_EQ(a.size(), 5000u);
  uint8_t* p = a.data();
  AlignedBuffer b(std::move(a));
  EXPECT_EQ(b.data(), p);
  EXPECT_EQ(a.data(), nullptr);
  AlignedBuffer c(64, 64);
  c = std::move(b);
  EXPECT_EQ(c.data(), p);
  EXPECT_EQ(AlignedBuffer().data(), nullptr);
}

}  // namespace
}  // namespace kvbm
