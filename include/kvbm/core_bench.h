// Native timings of the core (hashing, block pools) behind `kvbm bench core --json`.
//
// The loops run in C++ so that the figures measure kvbm, not the Python interpreter. Each
// figure is the median of several timed passes; hashing and the raw XXH3 baseline alternate
// pass by pass within one run so that both see the same machine state.
//
// Thread safety: RunCoreBench is reentrant; it builds its own pools and touches no globals.
// It runs on the calling thread only (single-threaded figures).
#pragma once

#include <cstdint>

namespace kvbm {

struct CoreBenchOptions {
  uint64_t num_tokens = uint64_t{1} << 20;  // tokens hashed per pass
  uint32_t block_size = 16;
  uint64_t salt_hash = 1337;
  uint32_t passes = 15;                 // timed passes per figure (median reported)
  uint64_t pool_cycles = 200'000;       // allocate+complete+register+drop cycles per pass
  uint64_t pool_blocks = 1024;          // pool size for the cycle figure (steady-state eviction)
  uint64_t match_blocks = 8192;         // chain length for the match figure
};

struct CoreBenchResult {
  double hash_tokens_per_s = 0;       // HashTokenBlocks: block hashes + chained sequence hashes
  double xxh3_raw_tokens_per_s = 0;   // XXH3_64 over the same bytes in the same block chunks
  double hash_vs_raw = 0;             // hash_tokens_per_s / xxh3_raw_tokens_per_s
  double pool_cycles_per_s = 0;       // one block: allocate, complete, register, drop
  double match_8192_blocks_us = 0;    // MatchPrefix of a fully hit chain + dropping the handles
  CoreBenchOptions options;
};

// Runs every timing once. Throws InvariantError when a timed operation does not do what it
// must (an allocation fails, a match is short), so a figure never measures a failure path.
CoreBenchResult RunCoreBench(const CoreBenchOptions& options = {});

}  // namespace kvbm
