#include "kvbm/core_bench.h"

#include <algorithm>
#include <chrono>
#include <vector>

#include <fmt/format.h>

#include "kvbm/block_pool.h"
#include "kvbm/leader.h"
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

// Cycles with parent links and hits, so that a policy's leaf bookkeeping and hit path count.
double PolicyCyclesPerSecond(const CoreBenchOptions& o, EvictionPolicy policy) {
  auto pool = BlockPool::Create(TierId::kHost, o.pool_blocks, policy);
  constexpr uint64_t kChain = 8;
  uint64_t n = 0;
  std::vector<BlockKey> recent(4);
  auto cycles = [&](uint64_t count) {
    for (uint64_t i = 0; i < count; ++i) {
      ++n;
      auto blocks = pool->Allocate(1);
      Check(blocks.has_value() && blocks->size() == 1, "core bench: allocate failed");
      std::optional<SequenceHash> parent;
      if (n % kChain != 0) parent = SequenceHash((n - 1) * 0x9E3779B97F4A7C15ull);
      BlockKey key{SequenceHash(n * 0x9E3779B97F4A7C15ull), n, parent};
      key.position = static_cast<uint32_t>(n % kChain);
      Check((*blocks)[0].Complete(key).has_value(), "core bench: complete failed");
      auto handle = pool->Register(std::move((*blocks)[0]));
      Check(handle.has_value(), "core bench: register failed");
      KeepAlive(handle->id());
      recent[n % 4] = key;
      if (n % 4 == 0 && n > 2) {
        const BlockKey& again = recent[(n - 2) % 4];
        BlockRun hit = pool->MatchPrefix(std::span<const BlockKey>(&again, 1));
        KeepAlive(hit.size());
      }
    }
  };
  cycles(o.pool_blocks);
  std::vector<double> rates;
  for (uint32_t p = 0; p < o.passes; ++p) {
    auto start = Clock::now();
    cycles(o.pool_cycles);
    rates.push_back(static_cast<double>(o.pool_cycles) / SecondsSince(start));
  }
  return Median(rates);
}

// The median pass; `best` gets the fastest.
double MatchMicros(const CoreBenchOptions& o, uint64_t& matched_blocks, double& best) {
  std::vector<Token> tokens = MakeTokens(o.match_blocks * o.block_size);
  auto hashed = HashTokenBlocks(tokens, o.block_size, o.salt_hash);
  Check(hashed.has_value(), "core bench: hashing failed");
  std::vector<BlockKey> keys;
  keys.reserve(hashed->size());
  for (const TokenBlock& b : *hashed) keys.push_back(KeyOf(b));

  auto pool = BlockPool::Create(TierId::kHost, o.match_blocks, EvictionPolicy::kLeafFirst);
  {
    auto stored = pool->StoreRun(keys, 0);
    Check(stored.run.size() == keys.size(), "core bench: storing the match chain failed");
  }  // released: the chain is inactive, matchable and evictable, as in a warm cache
  std::vector<double> micros;
  for (uint32_t p = 0; p < o.passes; ++p) {
    auto start = Clock::now();
    {
      BlockRun matched = pool->MatchPrefix(keys);
      matched_blocks = matched.size();
      Check(matched.size() == keys.size(),
            fmt::format("core bench: matched {} of {} blocks", matched.size(), keys.size()));
    }
    micros.push_back(SecondsSince(start) * 1e6);
  }
  best = *std::min_element(micros.begin(), micros.end());
  return Median(micros);
}

// One request of o.match_blocks blocks through the leader, as an engine drives it, first on an
// empty G2 (every block stored), then again (every block but the last loaded).
void LeaderMicros(const CoreBenchOptions& o, CoreBenchResult& r) {
  std::vector<Token> tokens = MakeTokens(o.match_blocks * o.block_size);
  std::vector<uint32_t> device(o.match_blocks);
  for (uint32_t i = 0; i < device.size(); ++i) device[i] = i;
  std::vector<double> miss, hit;
  for (uint32_t p = 0; p < o.passes; ++p) {
    KvbmConfig config;
    LeaderOptions lo;
    lo.page_size = o.block_size;
    lo.bytes_per_block = 1;
    lo.host_blocks = o.match_blocks;
    lo.disk_blocks = 0;
    ConnectorLeader leader(config, lo);
    auto start = Clock::now();
    leader.AddRequest("a", tokens);
    auto m = leader.GetNumNewMatchedTokens("a", 0);
    Check(m.has_value() && m->external_tokens == 0, "core bench: an empty G2 matched");
    Check(leader.UpdateStateAfterAlloc("a", device, 0).has_value(), "core bench: alloc failed");
    Check(leader.OnScheduled("a", device, 0, tokens.size()).has_value(), "core bench: schedule failed");
    StepMetadata meta = leader.BuildStepMetadata();
    leader.RequestFinished("a");
    miss.push_back(SecondsSince(start) * 1e6);
    r.blocks_stored = meta.ops.empty() ? 0 : meta.ops[0].blocks.size();
    Check(r.blocks_stored == o.match_blocks, "core bench: the leader did not store every block");
    for (int k = 0; k < 4; ++k) leader.BuildStepMetadata();  // store pins age out

    start = Clock::now();
    leader.AddRequest("b", tokens);
    m = leader.GetNumNewMatchedTokens("b", 0);
    Check(m.has_value(), "core bench: match failed");
    Check(leader.UpdateStateAfterAlloc("b", device, m->external_tokens).has_value(), "core bench: alloc failed");
    meta = leader.BuildStepMetadata();
    std::string id = "b";
    leader.OnWorkerOutput(std::span<const std::string>(&id, 1), {}, {});
    leader.RequestFinished("b");
    hit.push_back(SecondsSince(start) * 1e6);
    r.blocks_loaded = meta.ops.empty() ? 0 : meta.ops[0].blocks.size();
    Check(r.blocks_loaded + 1 == o.match_blocks, "core bench: the leader did not load the prompt");
  }
  r.leader_request_miss_us = Median(miss);
  r.leader_request_hit_us = Median(hit);
}

}  // namespace

CoreBenchResult RunCoreBench(const CoreBenchOptions& o) {
  Check(o.block_size > 0 && o.num_tokens >= o.block_size && o.passes > 0 && o.pool_blocks > 0 &&
            o.pool_cycles > 0 && o.match_blocks > 1,
        "core bench: every option must be positive, num_tokens >= block_size and match_blocks > 1");
  CoreBenchResult r;
  r.options = o;

  std::vector<Token> tokens = MakeTokens(o.num_tokens);
  const uint64_t full_tokens = o.num_tokens / o.block_size * o.block_size;
  std::vector<double> hash_rates;
  // The output vector is reused across passes, as a TokenBlockSequence reuses its own: the
  // figure is hashing, not first-touch page faults of a fresh result list.
  std::vector<TokenBlock> blocks;
  for (uint32_t p = 0; p < o.passes + 1; ++p) {
    auto start = Clock::now();
    auto status = HashTokenBlocksInto(tokens, o.block_size, o.salt_hash, blocks);
    double hash_s = SecondsSince(start);
    Check(status.has_value() && blocks.size() == full_tokens / o.block_size, "core bench: hashing failed");
    KeepAlive(blocks.back().sequence_hash);
    if (p == 0) continue;  // warm-up pass: page faults, caches
    hash_rates.push_back(static_cast<double>(full_tokens) / hash_s);
  }
  r.hash_tokens_per_s = Median(hash_rates);

  std::vector<Token> request = MakeTokens(o.match_blocks * o.block_size);
  std::vector<double> seq_us;
  for (uint32_t p = 0; p < o.passes; ++p) {
    auto start = Clock::now();
    TokenBlockSequence seq(o.block_size, o.salt_hash);
    seq.Extend(request);
    Check(seq.blocks().size() == o.match_blocks, "core bench: the sequence hashed the wrong number of blocks");
    KeepAlive(seq.blocks().back().sequence_hash);
    seq_us.push_back(SecondsSince(start) * 1e6);
  }
  r.hash_request_us = Median(seq_us);
  r.hash_request_best_us = *std::min_element(seq_us.begin(), seq_us.end());
  r.pool_cycles_per_s = PoolCyclesPerSecond(o);
  for (EvictionPolicy p : {EvictionPolicy::kLru, EvictionPolicy::kLeafFirst, EvictionPolicy::kReuse, EvictionPolicy::kAdaptive})
    r.policy_cycles_per_s.emplace_back(std::string(EvictionPolicyName(p)), PolicyCyclesPerSecond(o, p));
  r.match_8192_blocks_us = MatchMicros(o, r.blocks_matched, r.match_8192_blocks_best_us);
  LeaderMicros(o, r);
  return r;
}

}  // namespace kvbm
