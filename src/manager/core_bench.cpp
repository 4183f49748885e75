#include "kvbm/core_bench.h"

#include <algorithm>
#include <chrono>
#include <vector>

#include <fmt/format.h>

// Same inlining as src/tokens/sequence_hash.cpp, so the baseline is not handicapped by a call
// into the shared library that the hash itself avoids.
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "kvbm/block_pool.h"
#include "kvbm/error.h"
#include "kvbm/tokens.h"

namespace kvbm {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// Keeps a value alive without a volatile store in the hot loop.
template <typename T>
void KeepAlive(const T& value) {
  asm volatile("" : : "r,m"(value) : "memory");
}

std::vector<Token> MakeTokens(uint64_t n) {
  std::vector<Token> tokens(n);
  // A multiplicative sequence: looks like token ids, costs nothing to make.
  for (uint64_t i = 0; i < n; ++i) tokens[i] = static_cast<Token>((i * 2654435761u) % 152064);
  return tokens;
}

double PoolCyclesPerSecond(const CoreBenchOptions& o) {
  auto pool = BlockPool::Create(TierId::kHost, o.pool_blocks, EvictionPolicy::kLeafFirst);
  uint64_t n = 0;
  auto cycles = [&](uint64_t count) {
    for (uint64_t i = 0; i < count; ++i) {
      ++n;
      auto blocks = pool->Allocate(1);
      Check(blocks.has_value() && blocks->size() == 1, "core bench: allocate failed");
      BlockKey key{SequenceHash(n * 0x9E3779B97F4A7C15ull), n, std::nullopt};
      Check((*blocks)[0].Complete(key).has_value(), "core bench: complete failed");
      auto handle = pool->Register(std::move((*blocks)[0]));
      Check(handle.has_value(), "core bench: register failed");
      KeepAlive(handle->id());
    }  // the handle drops here: the block goes to the inactive set
  };
  // Fill the pool first so that every timed cycle is the steady state (allocation evicts).
  cycles(o.pool_blocks);
  std::vector<double> rates;
  for (uint32_t p = 0; p < o.passes; ++p) {
    auto start = Clock::now();
    cycles(o.pool_cycles);
    rates.push_back(static_cast<double>(o.pool_cycles) / SecondsSince(start));
  }
  return Median(rates);
}

double MatchMicros(const CoreBenchOptions& o) {
  std::vector<Token> tokens = MakeTokens(o.match_blocks * o.block_size);
  auto hashed = HashTokenBlocks(tokens, o.block_size, o.salt_hash);
  Check(hashed.has_value(), "core bench: hashing failed");
  std::vector<BlockKey> keys;
  keys.reserve(hashed->size());
  for (const TokenBlock& b : *hashed) keys.push_back(KeyOf(b));

  auto pool = BlockPool::Create(TierId::kHost, o.match_blocks, EvictionPolicy::kLeafFirst);
  {
    auto blocks = pool->Allocate(keys.size());
    Check(blocks.has_value(), "core bench: allocate for the match chain failed");
    std::vector<ImmutableBlock> held;
    held.reserve(keys.size());
    for (size_t i = 0; i < keys.size(); ++i) {
      Check((*blocks)[i].Complete(keys[i]).has_value(), "core bench: complete failed");
      auto h = pool->Register(std::move((*blocks)[i]));
      Check(h.has_value(), "core bench: register failed");
      held.push_back(std::move(*h));
    }
  }  // every handle drops: the chain is inactive, matchable and evictable, as in a warm cache
  std::vector<double> micros;
  for (uint32_t p = 0; p < o.passes; ++p) {
    auto start = Clock::now();
    {
      auto matched = pool->MatchPrefix(keys);
      Check(matched.size() == keys.size(),
            fmt::format("core bench: matched {} of {} blocks", matched.size(), keys.size()));
    }
    micros.push_back(SecondsSince(start) * 1e6);
  }
  return Median(micros);
}

}  // namespace

CoreBenchResult RunCoreBench(const CoreBenchOptions& o) {
  Check(o.block_size > 0 && o.num_tokens >= o.block_size && o.passes > 0 && o.pool_blocks > 0 &&
            o.pool_cycles > 0 && o.match_blocks > 0,
        "core bench: every option must be positive and num_tokens >= block_size");
  CoreBenchResult r;
  r.options = o;

  std::vector<Token> tokens = MakeTokens(o.num_tokens);
  const uint64_t full_tokens = o.num_tokens / o.block_size * o.block_size;
  const size_t chunk_bytes = size_t{o.block_size} * sizeof(Token);
  std::vector<double> hash_rates, raw_rates;
  // The output vector is reused across passes, as a TokenBlockSequence reuses its own: the
  // figure is hashing, not first-touch page faults of a fresh result list.
  std::vector<TokenBlock> blocks;
  for (uint32_t p = 0; p < o.passes + 1; ++p) {
    auto start = Clock::now();
    auto status = HashTokenBlocksInto(tokens, o.block_size, o.salt_hash, blocks);
    double hash_s = SecondsSince(start);
    Check(status.has_value() && blocks.size() == full_tokens / o.block_size, "core bench: hashing failed");
    KeepAlive(blocks.back().sequence_hash);

    start = Clock::now();
    uint64_t acc = 0;
    for (uint64_t i = 0; i + o.block_size <= o.num_tokens; i += o.block_size)
      acc ^= XXH3_64bits_withSeed(tokens.data() + i, chunk_bytes, o.salt_hash);
    double raw_s = SecondsSince(start);
    KeepAlive(acc);
    if (p == 0) continue;  // warm-up pass: page faults, caches
    hash_rates.push_back(static_cast<double>(full_tokens) / hash_s);
    raw_rates.push_back(static_cast<double>(full_tokens) / raw_s);
  }
  r.hash_tokens_per_s = Median(hash_rates);
  r.xxh3_raw_tokens_per_s = Median(raw_rates);
  r.hash_vs_raw = r.hash_tokens_per_s / r.xxh3_raw_tokens_per_s;
  r.pool_cycles_per_s = PoolCyclesPerSecond(o);
  r.match_8192_blocks_us = MatchMicros(o);
  return r;
}

}  // namespace kvbm
