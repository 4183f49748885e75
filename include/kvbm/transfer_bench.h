// Native timings of kvbm's data path for `kvbm bench transfer`: G1 -> G2, G2 -> G1 (host
// memory standing in for G1 in a vLLM-like LayerSeparate layout, as on a CPU engine), G2 -> G3
// and G3 -> G2 (O_DIRECT through the IoQueue), plus the single-thread memcpy anchor of the same
// bytes measured in the same run. The fio anchor is run by the Python command.
#pragma once

#include <cstdint>
#include <string>

#include "kvbm/error.h"

namespace kvbm {

struct TransferBenchOptions {
  uint64_t block_bytes = 2 << 20;   // one block, all layers
  uint64_t num_blocks = 256;
  uint32_t passes = 3;              // the best pass is reported
  std::string disk_dir = "/tmp/";
  uint32_t max_concurrent_transfers = 4;
  uint32_t max_batch_size = 16;
};

struct TransferBenchResult {
  double memcpy_gbps = 0;  // single-thread memcpy of the same total bytes
  double g1_to_g2_gbps = 0, g2_to_g1_gbps = 0, g2_to_g3_gbps = 0, g3_to_g2_gbps = 0;
  uint64_t bytes = 0;
  std::string io_queue;  // "io_uring" or the fallback's name
  uint64_t mismatched_blocks = 0;  // after the round trips (must be 0)
};

Result<TransferBenchResult> RunTransferBench(const TransferBenchOptions& options);

}  // namespace kvbm
