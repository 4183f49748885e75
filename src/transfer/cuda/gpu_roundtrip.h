// Private, GPU checks only (not library code): byte-exact round trips of the CUDA backend for
// every device layout and every path, and the data-path benchmark. Shared by kvbm_gpu_tests
// (GoogleTest) and kvbm_gpu_check (standalone, built by scripts/gpu_check.sh without kvbm's
// third-party dependencies), so it uses no fmt, gtest or logging library.
#pragma once

#include <string>
#include <vector>

namespace kvbm::cuda::gpucheck {

struct CheckResult {
  std::string name;
  bool ok = false;
  std::string detail;  // the first mismatch or error, or the paths that ran
};

// Round trips device -> host -> device for FullyContiguous, LayerSeparate outer-first and
// block-first device layouts x {auto, dma, batch, kernel} x {pinned, plain host} x two chunk
// sizes (one not a multiple of 16), plus file -> pinned bounce -> device. REQUIRES a device.
std::vector<CheckResult> RunRoundTrips(int device);

struct BenchFigure {
  std::string name;
  double gbps = 0;
  double ratio = 0;  // over the raw DMA peak of the same direction, 0 where not applicable
  std::string note;
};

// Throughputs (best of a few repetitions) and the pinned allocation time of `pinned_gib` GiB
// (skipped when 0). REQUIRES a device.
std::vector<BenchFigure> RunBenchmark(int device, double pinned_gib);

}  // namespace kvbm::cuda::gpucheck
