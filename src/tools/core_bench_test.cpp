#include "kvbm/core_bench.h"

#include <gtest/gtest.h>

#include "kvbm/error.h"

namespace kvbm {
namespace {

CoreBenchOptions Tiny() {
  CoreBenchOptions o;
  o.num_tokens = 4096;
  o.passes = 3;
  o.pool_cycles = 500;
  o.pool_blocks = 64;
  o.match_blocks = 256;
  return o;
}

// Every figure is timed over the work it names: the match pinned the whole chain, the leader
// stored every block of the miss and loaded every block but the last of the hit.
TEST(CoreBench, EachFigureTimesTheWorkItNames) {
  CoreBenchResult r = RunCoreBench(Tiny());
  EXPECT_EQ(r.blocks_matched, 256u);
  EXPECT_EQ(r.blocks_stored, 256u);
  EXPECT_EQ(r.blocks_loaded, 255u);
  for (double v : {r.hash_tokens_per_s, r.hash_request_us, r.pool_cycles_per_s, r.match_8192_blocks_us,
                   r.leader_request_miss_us, r.leader_request_hit_us})
    EXPECT_GT(v, 0);
  // The fastest pass is one of the passes, so it is no slower than their median.
  EXPECT_GT(r.match_8192_blocks_best_us, 0);
  EXPECT_LE(r.match_8192_blocks_best_us, r.match_8192_blocks_us);
  EXPECT_GT(r.hash_request_best_us, 0);
  EXPECT_LE(r.hash_request_best_us, r.hash_request_us);
}

TEST(CoreBench, RejectsDegenerateOptions) {
  CoreBenchOptions o = Tiny();
  o.block_size = 0;
  EXPECT_THROW(RunCoreBench(o), InvariantError);
  o = Tiny();
  o.num_tokens = 8;  // less than one block of 16
  EXPECT_THROW(RunCoreBench(o), InvariantError);
  o = Tiny();
  o.match_blocks = 1;  // a hit needs a block left for the engine
  EXPECT_THROW(RunCoreBench(o), InvariantError);
}

}  // namespace
}  // namespace kvbm
