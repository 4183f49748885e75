#include <dlfcn.h>
#include <gtest/gtest.h>

#include <cstring>

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
