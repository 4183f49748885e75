#include "kvbm/sim_engine.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>

#include <fmt/format.h>

namespace kvbm {
namespace {

uint64_t SplitMix(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

void SimulatedEngine::FillChunk(uint8_t* out, uint64_t length, uint64_t sequence_hash, uint64_t layer, uint64_t outer) {
  uint64_t state = sequence_hash ^ (layer * 0x100000001B3ull) ^ (outer << 61);
  uint64_t i = 0;
  for (; i + 8 <= length; i += 8) {
    uint64_t v = SplitMix(state);
    std::memcpy(out + i, &v, 8);
  }
  if (i < length) {
    uint64_t v = SplitMix(state);
    std::memcpy(out + i, &v, length - i);
  }
}

SimulatedEngine::SimulatedEngine(const KvbmConfig& config, const SimEngineOptions& options, LeaderOptions leader_options)
    : options_(options) {
  const uint64_t chunk = uint64_t{options.page_size} * options.inner_dim * options.dtype_bytes;
  std::vector<TensorShape> shapes;
  DeviceTensors t;
  int64_t nb = options.device_blocks, page = options.page_size, inner = options.inner_dim;
  for (uint32_t l = 0; l < options.num_layers; ++l) {
    tensors_.emplace_back(uint64_t{options.device_blocks} * 2 * chunk);
    TensorShape s;
    s.dtype_bytes = options.dtype_bytes;
    if (options.outer_first) {
      s.shape = {2, nb, page, inner};
      s.strides = {nb * page * inner, page * inner, inner, 1};
    } else {
      s.shape = {nb, 2, page, inner};
      s.strides = {2 * page * inner, page * inner, inner, 1};
    }
    t.layer_shapes.push_back(s);
    t.layer_pointers.push_back(reinterpret_cast<uintptr_t>(tensors_.back().data()));
  }
  t.num_blocks = options.device_blocks;
  t.page_size = options.page_size;
  t.kind = MemoryKind::kHost;
  worker_ = std::make_unique<KvbmWorker>(config, 0, 1);
  if (auto s = worker_->RegisterKvCaches(t); !s) throw ConfigError(s.error().ToString());
  leader_options.page_size = options.page_size;
  leader_options.bytes_per_block = worker_->bytes_per_block();
  leader_options.remote_descriptor = options.remote_descriptor;
  // The worker opens its tiers before the leader is built, as vLLM's workers do before its
  // scheduler exists: a persistent G3 has verified its blocks when the leader restores them.
  const TierChainOptions sizes =
      TierChainOptions::FromConfig(config, leader_options.bytes_per_block, leader_options.host_blocks,
                                   leader_options.disk_blocks, leader_options.policy, options.remote_descriptor, 1);
  leader_options.host_blocks = sizes.host_blocks;
  leader_options.disk_blocks = sizes.disk_blocks;
  if (options.leader_before_worker_tiers)
    leader_ = std::make_unique<ConnectorLeader>(config, leader_options, worker_->metrics());
  if (auto s = worker_->AllocateTiers(sizes.host_blocks, sizes.disk_blocks, options.remote_descriptor); !s)
    throw ConfigError(s.error().ToString());
  if (!leader_) leader_ = std::make_unique<ConnectorLeader>(config, leader_options, worker_->metrics());
  if (auto remote = RemoteTierOptions::FromConfig(config, options.remote_descriptor, 1))
    if (auto s = worker_->ConnectRemote(*remote); !s) throw ConfigError(s.error().ToString());
}

SimulatedEngine::~SimulatedEngine() {
  worker_->WaitIdle();
  leader_.reset();
}

uint64_t SimulatedEngine::bytes_per_block() const { return worker_->bytes_per_block(); }

Result<SimRequestOutcome> SimulatedEngine::RunRequest(const std::string& id, std::span<const Token> tokens) {
  const uint64_t bs = options_.page_size;
  SimRequestOutcome out;
  out.prompt_tokens = tokens.size();
  uint64_t nblocks = (tokens.size() + bs - 1) / bs;
  if (nblocks > options_.device_blocks)
    return MakeError(ErrorCode::kResourceExhausted, fmt::format("request {} needs {} device blocks, engine has {}", id,
                                                                nblocks, options_.device_blocks));
  leader_->AddRequest(id, tokens);
  auto match = leader_->GetNumNewMatchedTokens(id, 0);
  if (!match) return std::unexpected(match.error());
  // Device blocks: a rotating window so consecutive requests reuse (and must not see) old bytes.
  std::vector<uint32_t> blocks;
  for (uint64_t i = 0; i < nblocks; ++i) blocks.push_back(static_cast<uint32_t>(i));
  if (auto s = leader_->UpdateStateAfterAlloc(id, blocks, match->external_tokens); !s) return std::unexpected(s.error());
  out.loaded_tokens = match->external_tokens;
  out.host_blocks = match->host_blocks;
  out.disk_blocks = match->disk_blocks;
  out.remote_blocks = match->remote_blocks;

  // Step 1: loads.
  auto meta = leader_->BuildStepMetadata();
  if (auto s = worker_->BindStep(meta); !s) return std::unexpected(s.error());
  std::vector<std::string> recving, sending;
  if (match->external_tokens > 0) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (true) {
      auto [snd, rcv] = worker_->GetFinished();
      sending.insert(sending.end(), snd.begin(), snd.end());
      recving.insert(recving.end(), rcv.begin(), rcv.end());
      if (std::find(recving.begin(), recving.end(), id) != recving.end()) break;
      if (std::chrono::steady_clock::now() > deadline)
        return MakeError(ErrorCode::kTimeout, "load for " + id + " never finished");
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  (void)worker_->ForwardPassDone();  // step 1 had no stores; keeps the worker's step sequence
  std::vector<uint32_t> errors = worker_->TakeLoadErrors();
  out.load_errors = static_cast<uint32_t>(errors.size());
  leader_->OnWorkerOutput(recving, sending, errors);

  // Verify loaded blocks, then "compute" everything not loaded (and what failed to load).
  const std::vector<TokenBlock> hashed =
      *HashTokenBlocks(tokens, options_.page_size, ComputeSaltHash(std::nullopt, std::nullopt));
  const Layout& layout = *worker_->device_layout();
  const auto& mem = worker_->device_memory();
  std::vector<uint8_t> expect(layout.dims().chunk_bytes());
  uint64_t loaded_blocks = match->external_tokens / bs;
  for (uint64_t b = 0; b < nblocks; ++b) {
    bool failed = std::find(errors.begin(), errors.end(), blocks[b]) != errors.end();
    uint64_t hash = b < hashed.size() ? hashed[b].sequence_hash.value() : 0xFFFF'0000ull + b;
    for (uint64_t l = 0; l < layout.dims().num_layers; ++l)
      for (uint64_t o = 0; o < layout.dims().outer_dim; ++o) {
        uint8_t* chunk = mem.ChunkAddress(blocks[b], l, o);
        FillChunk(expect.data(), expect.size(), hash, l, o);
        if (b < loaded_blocks && !failed) {
          if (std::memcmp(chunk, expect.data(), expect.size()) != 0) {
            ++out.mismatched_blocks;
            l = layout.dims().num_layers;  // count each block once
            break;
          }
        } else {
          std::memcpy(chunk, expect.data(), expect.size());
        }
      }
  }
  // Step 2: the forward pass computed the rest; stores run after it.
  if (auto s = leader_->OnScheduled(id, blocks, match->external_tokens, tokens.size() - match->external_tokens); !s)
    return std::unexpected(s.error());
  meta = leader_->BuildStepMetadata();
  if (auto s = worker_->BindStep(meta); !s) return std::unexpected(s.error());
  if (auto s = worker_->ForwardPassDone(); !s) return std::unexpected(s.error());
  auto [snd, rcv] = worker_->GetFinished();
  leader_->OnWorkerOutput(rcv, snd, worker_->TakeLoadErrors());
  leader_->RequestFinished(id);
  // The engine reuses the blocks: scribble over them.
  for (uint64_t b = 0; b < nblocks; ++b)
    for (uint64_t l = 0; l < layout.dims().num_layers; ++l)
      for (uint64_t o = 0; o < layout.dims().outer_dim; ++o)
        std::memset(mem.ChunkAddress(blocks[b], l, o), 0xA5, layout.dims().chunk_bytes());
  return out;
}

}  // namespace kvbm
