// Runs everywhere: on a machine without a driver or device every CUDA entry point must report
// "unavailable" with a reason, never crash; on a GPU machine the same calls must succeed.
#include "transfer/cuda/cuda_loader.h"

#include <gtest/gtest.h>

#include <cstring>

#include "kvbm/cuda.h"
#include "transfer/cuda/cuda_backend.h"

namespace kvbm {
namespace {

TEST(CudaLoader, AvailabilityIsConsistentAndExplained) {
  if (CudaAvailable()) {
    EXPECT_GT(CudaDeviceCount(), 0);
    EXPECT_TRUE(CudaUnavailableReason().empty());
  } else {
    EXPECT_EQ(CudaDeviceCount(), 0);
    EXPECT_FALSE(CudaUnavailableReason().empty());
    EXPECT_EQ(cuda::Driver(), nullptr);
    EXPECT_EQ(CudaDeviceNumaNode(0), -1);
  }
  // Loading twice is the same answer (loaded once).
  EXPECT_EQ(CudaAvailable(), CudaAvailable());
}

TEST(CudaLoader, MakeCudaBackendFailsCleanlyWithoutADevice) {
  if (CudaAvailable()) {
    auto missing = MakeCudaBackend(CudaDeviceCount() + 7);
    ASSERT_FALSE(missing.has_value());
    EXPECT_EQ(missing.error().code(), ErrorCode::kUnavailable);
    EXPECT_NE(missing.error().message().find("does not exist"), std::string::npos)
        << missing.error().message();
    return;
  }
  auto backend = MakeCudaBackend(0);
  ASSERT_FALSE(backend.has_value());
  EXPECT_EQ(backend.error().code(), ErrorCode::kUnavailable);
  EXPECT_NE(backend.error().message().find(CudaUnavailableReason()), std::string::npos)
      << backend.error().message();
}

TEST(CudaLoader, BadOptionsAreRejected) {
  CudaBackendOptions o;
  o.kernel_threads = 100;  // not a multiple of 32
  auto backend = MakeCudaBackend(0, o);
  ASSERT_FALSE(backend.has_value());
  EXPECT_EQ(backend.error().code(),
            CudaAvailable() ? ErrorCode::kInvalidArgument : ErrorCode::kUnavailable);
}

TEST(CudaLoader, PinnedHostFallsBackToPlainMemoryOrFailsWhenRequired) {
  PinnedHostOptions o;
  o.numa_node = kNumaNone;
  auto m = AllocatePinnedHost(3 << 20, o);
  ASSERT_TRUE(m.has_value()) << m.error().ToString();
  EXPECT_EQ(m->size(), 3u << 20);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(m->data()) % 4096, 0u);
  EXPECT_EQ(m->pinned(), CudaAvailable());
  EXPECT_EQ(m->numa_node(), -1);
  std::memset(m->data(), 0x5A, m->size());  // writable, all of it
  EXPECT_EQ(m->data()[m->size() - 1], 0x5A);

  PinnedHostMemory moved = std::move(*m);
  EXPECT_EQ(m->data(), nullptr);
  EXPECT_EQ(moved.data()[0], 0x5A);

  if (!CudaAvailable()) {
    o.require_pinned = true;
    auto r = AllocatePinnedHost(1 << 20, o);
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error().code(), ErrorCode::kUnavailable);
  }
  EXPECT_FALSE(AllocatePinnedHost(0).has_value());
}

TEST(CudaLoader, NumaBindingToNodeZeroWorksOnLinux) {
  PinnedHostOptions o;
  o.numa_node = 0;  // every Linux machine has node 0
  auto m = AllocatePinnedHost(8 << 20, o);
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->numa_node(), 0);
}

TEST(CudaLoader, KernelImageIsEmbeddedWhenBuiltWithNvcc) {
  auto image = cuda::EmbeddedKernels();
#ifdef KVBM_TEST_EXPECT_CUDA_KERNELS
  ASSERT_FALSE(image.empty());
  // A fatbin starts with its magic 0xBA55ED50 (little-endian).
  ASSERT_GE(image.size(), 4u);
  uint32_t magic = 0;
  std::memcpy(&magic, image.data(), 4);
  EXPECT_EQ(magic, 0xBA55ED50u);
#else
  (void)image;
  GTEST_SKIP() << "library built without nvcc";
#endif
}

}  // namespace
}  // namespace kvbm
