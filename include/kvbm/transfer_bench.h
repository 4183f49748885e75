// Native single passes of kvbm's data path and of its anchors, for `kvbm bench transfer`.
//
// A TransferBench owns one G1 (host memory in a vLLM-like LayerSeparate layout, as on a CPU
// engine), one G2 (FullyContiguous, 4 KiB-aligned blocks), one G3 (kvbm's unlinked O_DIRECT
// file) and a TransferEngine. `Pass` times one pass of kvbm (G1 -> G2, G2 -> G1, G2 -> G3,
// G3 -> G2) or of the memcpy anchor over the SAME buffers (G1's tensors to G2's bytes and back,
// split over 1 or N threads). The caller interleaves passes into pairs (python/kvbm/bench/
// _pairs.py); the fio anchor runs on the same file through `disk_fd()` (/proc/<pid>/fd/<fd>).
// `Verify` runs G1 -> G2 -> G3 -> G2 -> G1 and counts blocks that came back wrong.
//
// Thread safety: none; one caller at a time (the engine's and memcpy's threads are internal).
// Ownership: the bench owns its buffers, file and engine; nothing is borrowed.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "kvbm/error.h"

namespace kvbm {

struct TransferBenchOptions {
  uint64_t block_bytes = 2 << 20;   // one block, all layers
  uint64_t num_blocks = 256;
  std::string disk_dir = "/tmp/";
  uint32_t max_concurrent_transfers = 4;
  uint32_t max_batch_size = 16;
  uint32_t memcpy_threads = 0;      // kvbm's memcpy backend threads; 0 = the engine's default
};

// What one pass moves. The memcpy anchors copy the same bytes between the same buffers as
// kvbm's G1 <-> G2 passes, as large contiguous ranges split evenly over `threads`.
enum class TransferBenchPass : uint8_t {
  kG1ToG2,
  kG2ToG1,
  kG2ToG3,
  kG3ToG2,
  kMemcpyG1ToG2,
  kMemcpyG2ToG1,
};

// "g1_to_g2", "g2_to_g1", "g2_to_g3", "g3_to_g2", "memcpy_g1_to_g2", "memcpy_g2_to_g1".
Result<TransferBenchPass> ParseTransferBenchPass(std::string_view name);

class TransferBench {
 public:
  // Errors: a block size that is not a multiple of the G1 chunk pair, or the disk tier's own
  // errors (O_DIRECT refused, no space).
  static Result<std::unique_ptr<TransferBench>> Create(const TransferBenchOptions& options);
  ~TransferBench();
  TransferBench(const TransferBench&) = delete;
  TransferBench& operator=(const TransferBench&) = delete;

  // Seconds of one pass. `threads` is used by the memcpy anchors only (0 = memcpy_threads()).
  // A failed transfer (I/O error, a G3 block whose checksum does not match) is an error.
  Result<double> Pass(TransferBenchPass pass, uint32_t threads = 0);
  // G1 refilled with its seeded bytes, then G1 -> G2 -> G3 -> G2 (G2 cleared first) -> G1
  // (G1 scribbled first); returns the number of blocks whose bytes differ from the seed.
  Result<uint64_t> Verify();

  uint64_t bytes() const;            // moved by every pass
  uint64_t disk_bytes() const;       // the G3 file's size (fio's --size)
  int disk_fd() const;               // the G3 file, for an anchor run on the same file
  uint32_t memcpy_threads() const;   // threads of kvbm's memcpy backend
  uint32_t io_depth() const;         // kvbm's I/O queue depth
  std::string io_queue() const;      // "io_uring" or the fallback's name

 private:
  struct Impl;
  explicit TransferBench(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvbm
