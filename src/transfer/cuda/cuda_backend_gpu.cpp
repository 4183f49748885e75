// kvbm_gpu_tests (label "gpu", excluded from the default ctest run): byte-exact round trips of
// the CUDA backend on a real device. Skipped where no device is visible.
#include <gtest/gtest.h>

#include "kvbm/cuda.h"
#include "transfer/cuda/gpu_roundtrip.h"

namespace kvbm {
namespace {

TEST(CudaGpu, RoundTripsAreByteExactForEveryLayoutAndPath) {
  if (!CudaAvailable()) GTEST_SKIP() << "no CUDA device: " << CudaUnavailableReason();
  auto results = cuda::gpucheck::RunRoundTrips(0);
  ASSERT_FALSE(results.empty());
  for (const auto& r : results) EXPECT_TRUE(r.ok) << r.name << ": " << r.detail;
}

TEST(CudaGpu, PinnedHostMemoryIsPinnedAndNumaBound) {
  if (!CudaAvailable()) GTEST_SKIP() << "no CUDA device: " << CudaUnavailableReason();
  PinnedHostOptions o;
  o.require_pinned = true;
  auto m = AllocatePinnedHost(64 << 20, o);
  ASSERT_TRUE(m.has_value()) << m.error().ToString();
  EXPECT_TRUE(m->pinned());
  EXPECT_EQ(m->numa_node(), CudaDeviceNumaNode(0) >= 0 ? CudaDeviceNumaNode(0) : -1);
}

}  // namespace
}  // namespace kvbm
