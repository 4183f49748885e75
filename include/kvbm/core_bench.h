// Native timings of the control plane (hashing, block pools, the leader) behind
// `kvbm bench core --json`, which puts them beside vLLM's own prefix cache measured in the same
// run (python/kvbm/bench/core.py).
//
// The loops run in C++ so that the figures measure kvbm, not the Python interpreter. Each
// figure is the median of several timed passes. Every timed operation is checked to have done
// its work (blocks matched, blocks stored), so a figure never measures a failure path.
//
// Thread safety: RunCoreBench is reentrant; it builds its own pools and touches no globals.
// It runs on the calling thread only (single-threaded figures).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

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
  double hash_request_us = 0;         // a TokenBlockSequence of match_blocks * block_size tokens
                                      // (the leader's path), in microseconds
  double hash_request_best_us = 0;    // the fastest of those passes
  double pool_cycles_per_s = 0;       // one block: allocate, complete, register, drop
  // Per eviction policy (lru, leaf-first, reuse), steady state with eviction: blocks in
  // chains of 8 (parent links), one block allocated, completed, registered and dropped per
  // cycle, and every 4th cycle a hit (MatchPrefix) on the block registered 2 cycles earlier.
  std::vector<std::pair<std::string, double>> policy_cycles_per_s;
  double match_8192_blocks_us = 0;    // MatchPrefix of a fully hit chain + releasing it
  double match_8192_blocks_best_us = 0;  // the fastest of those passes
  double leader_request_miss_us = 0;  // one request of match_blocks blocks through the leader:
                                      // add (hashing), match (miss), alloc, every store, finish
  double leader_request_hit_us = 0;   // the same request again: add, match (hit), load pins,
                                      // load finished, finish
  uint64_t blocks_matched = 0;        // per match pass (== match_blocks)
  uint64_t blocks_stored = 0;         // per leader miss pass (== match_blocks)
  uint64_t blocks_loaded = 0;         // per leader hit pass (== match_blocks - 1)
  CoreBenchOptions options;
};

// Runs every timing once. Throws InvariantError when a timed operation does not do what it
// must (an allocation fails, a match is short), so a figure never measures a failure path.
CoreBenchResult RunCoreBench(const CoreBenchOptions& options = {});

}  // namespace kvbm
