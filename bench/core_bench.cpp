// Google Benchmark microbenchmarks of the core (hashing, pools). `kvbm bench core --json`
// reports the headline figures through the Python package; this target is for profiling.
#include <benchmark/benchmark.h>

#include <xxhash.h>

#include "kvbm/block_pool.h"
#include "kvbm/tokens.h"

namespace kvbm {
namespace {

void BM_HashTokenBlocks(benchmark::State& state) {
  std::vector<Token> tokens(static_cast<size_t>(state.range(0)));
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<Token>(i * 2654435761u);
  for (auto _ : state) benchmark::DoNotOptimize(HashTokenBlocks(tokens, 16, 1337));
  state.SetItemsProcessed(state.iterations() * state.range(0));
}
BENCHMARK(BM_HashTokenBlocks)->Arg(1 << 16);

void BM_RawXxh3(benchmark::State& state) {
  std::vector<Token> tokens(static_cast<size_t>(state.range(0)));
  for (auto _ : state)
    for (size_t i = 0; i + 16 <= tokens.size(); i += 16)
      benchmark::DoNotOptimize(XXH3_64bits_withSeed(tokens.data() + i, 64, 1337));
  state.SetItemsProcessed(state.iterations() * state.range(0));
}
BENCHMARK(BM_RawXxh3)->Arg(1 << 16);

void BM_PoolCycle(benchmark::State& state) {
  auto pool = BlockPool::Create(TierId::kHost, 1024, EvictionPolicy::kLeafFirst);
  uint64_t n = 0;
  for (auto _ : state) {
    auto b = pool->Allocate(1);
    BlockKey key{SequenceHash(++n), n, std::nullopt};
    (void)(*b)[0].Complete(key);
    auto r = pool->Register(std::move((*b)[0]));
    benchmark::DoNotOptimize(r);
  }
}
BENCHMARK(BM_PoolCycle);

}  // namespace
}  // namespace kvbm
