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

TEST(CoreBench, ReportsEveryFigure) {
  CoreBenchResult r = RunCoreBench(Tiny());
  EXPECT_GT(r.hash_tokens_per_s, 0);
  EXPECT_GT(r.xxh3_raw_tokens_per_s, 0);
  EXPECT_DOUBLE_EQ(r.hash_vs_raw, r.hash_tokens_per_s / r.xxh3_raw_tokens_per_s);
  EXPECT_GT(r.pool_cycles_per_s, 0);
  EXPECT_GT(r.match_8192_blocks_us, 0);
  EXPECT_EQ(r.options.match_blocks, 256u);
}

TEST(CoreBench, RejectsDegenerateOptions) {
  CoreBenchOptions o = Tiny();
  o.block_size = 0;
  EXPECT_THROW(RunCoreBench(o), InvariantError);
  o = Tiny();
  o.num_tokens = 8;  // less than one block of 16
  EXPECT_THROW(RunCoreBench(o), InvariantError);
}

}  // namespace
}  // namespace kvbm
