#include "kvbm/leader.h"

#include <fmt/format.h>

#include "kvbm/log.h"

namespace kvbm {

ConnectorLeader::ConnectorLeader(std::shared_ptr<TierChain> chain, const KvbmConfig& config, uint32_t page_size,
                                 std::shared_ptr<KvbmMetrics> metrics)
    : config_(config), page_size_(page_size),
      metrics_(metrics ? std::move(metrics) : std::make_shared<KvbmMetrics>(config.cache_stats_max_requests)),
      chain_(std::move(chain)) {
  if (page_size == 0) throw ConfigError("kvbm leader: page_size (engine block size) must be > 0");
  if (!chain_) throw ConfigError("kvbm leader: no tier chain");
}

ConnectorLeader::ConnectorLeader(const KvbmConfig& config, const LeaderOptions& options,
                                 std::shared_ptr<KvbmMetrics> metrics, std::shared_ptr<BlockRegistry> registry)
    : config_(config), page_size_(options.page_size),
      metrics_(metrics ? std::move(metrics) : std::make_shared<KvbmMetrics>(config.cache_stats_max_requests)) {
  if (options.page_size == 0) throw ConfigError("kvbm leader: page_size (engine block size) must be > 0");
  auto chain_options = TierChainOptions::FromConfig(config, options.bytes_per_block, options.host_blocks,
                                                     options.disk_blocks, options.policy, options.remote_descriptor,
                                                     options.world_size);
  chain_ = std::make_shared<TierChain>(config, chain_options, metrics_,
                                       registry ? std::move(registry) : std::make_shared<BlockRegistry>());
  Log(LogLevel::kInfo, "kvbm leader: G2 {} blocks, G3 {} blocks of {} bytes, page {} tokens",
      chain_options.host_blocks, chain_options.disk_blocks, options.bytes_per_block, options.page_size);
}

ConnectorLeader::~ConnectorLeader() {
  // Pins go before the chain that may be destroyed with this leader.
  slots_.clear();
}

ConnectorLeader::Slot* ConnectorLeader::Find(const std::string& request_id) {
  auto it = slots_.find(request_id);
  return it == slots_.end() ? nullptr : &it->second;
}

void ConnectorLeader::AddRequest(const std::string& request_id, std::span<const Token> tokens,
                                 const std::optional<std::string>& salt, const std::optional<std::string>& lora_name,
                                 uint32_t priority, BlockExtraKeys extra) {
  if (slots_.count(request_id)) return;
  Slot slot;
  slot.id = request_id;
  slot.has_inputs = salt || lora_name || !extra.empty();
  slot.salt = salt;
  slot.lora_name = lora_name;
  slot.seq = std::make_unique<TokenBlockSequence>(page_size_, ComputeSaltHash(salt, lora_name), std::move(extra));
  slot.seq->Extend(tokens);
  slot.priority = priority;
  // Per request, only the leading run of blocks at or above the threshold is offloaded.
  if (priority < config_.host_offload_prefix_min_priority) slot.offload_stopped = true;
  slots_.emplace(request_id, std::move(slot));
  ++stats_.requests;
}

size_t ConnectorLeader::NumTokens(const std::string& request_id) const {
  auto it = slots_.find(request_id);
  return it == slots_.end() ? 0 : it->second.seq->num_tokens();
}

Status ConnectorLeader::ExtendTokens(const std::string& request_id, std::span<const Token> new_tokens) {
  Slot* slot = Find(request_id);
  if (!slot) return MakeError(ErrorCode::kNotFound, "unknown request " + request_id);
  slot->seq->Extend(new_tokens);
  return {};
}

bool ConnectorLeader::IsLoading(const std::string& request_id) const {
  auto it = slots_.find(request_id);
  return it != slots_.end() && it->second.loading;
}

void ConnectorLeader::KeysFrom(const Slot& slot, size_t first, size_t last, std::vector<BlockKey>& out) const {
  out.clear();
  const auto& blocks = slot.seq->blocks();
  last = std::min(last, blocks.size());
  if (first < last) out.reserve(last - first);
  for (size_t i = first; i < last; ++i) out.push_back(KeyOf(blocks[i]));
}

BlockInputs ConnectorLeader::InputsOf(const Slot& slot, size_t index) {
  BlockInputs in;
  in.lora_name = slot.lora_name;
  if (index == 0) in.cache_salt = slot.salt;
  const BlockExtraKeys& extra = slot.seq->extra_keys();
  for (const auto& [id, offset] : extra.MultimodalKeys(index)) in.multimodal.emplace_back(std::string(id), offset);
  if (const EmbedsDigest* e = extra.Embeds(index)) in.embeds = *e;
  return in;
}

Result<MatchResult> ConnectorLeader::GetNumNewMatchedTokens(const std::string& request_id, uint64_t num_computed_tokens) {
  Slot* slot = Find(request_id);
  if (!slot) return MakeError(ErrorCode::kNotFound, "get_num_new_matched_tokens: unknown request " + request_id);
  const uint64_t bs = page_size_;
  const uint64_t num_tokens = slot->seq->num_tokens();
  MatchResult r;
  slot->pending_match.reset();
  if (num_tokens == 0 || num_computed_tokens % bs != 0) return r;
  uint64_t start = num_computed_tokens / bs;
  // Leave at least one token for the engine to compute.
  uint64_t cap_blocks = (num_tokens - 1) / bs;
  if (start >= cap_blocks) return r;
  KeysFrom(*slot, start, cap_blocks, keys_);
  ChainMatch m = chain_->Count(keys_);
  r.host_blocks = m.host;
  r.disk_blocks = m.disk;
  r.remote_blocks = m.remote;
  r.external_tokens = uint64_t{m.total()} * bs;
  const bool from_host_only = m.disk == 0 && m.remote == 0 && m.host <= sync_load_max_blocks_;
  r.async = r.external_tokens > 0 && !from_host_only;
  slot->pending_match = r;
  slot->pending_match_start = start;
  return r;
}

Status ConnectorLeader::UpdateStateAfterAlloc(const std::string& request_id, std::span<const uint32_t> block_ids,
                                              uint64_t num_external_tokens) {
  Slot* slot = Find(request_id);
  if (!slot) return MakeError(ErrorCode::kNotFound, "update_state_after_alloc: unknown request " + request_id);
  const uint64_t bs = page_size_;
  slot->device_blocks.assign(block_ids.begin(), block_ids.end());
  uint64_t start = slot->pending_match ? slot->pending_match_start : 0;
  uint64_t n = num_external_tokens / bs;
  // Stats over the prompt part this request asked kvbm for.
  uint64_t queried = slot->seq->blocks().size() > start ? slot->seq->blocks().size() - start : 0;
  if (slot->pending_match) {
    metrics_->requested_tokens += slot->seq->num_tokens();
    stats_.requested_tokens += slot->seq->num_tokens();
    metrics_->host_hit_rate.Record(queried, std::min<uint64_t>(slot->pending_match->host_blocks, n));
    metrics_->disk_hit_rate.Record(queried, n > slot->pending_match->host_blocks ? n - slot->pending_match->host_blocks : 0);
  }
  if (n == 0 || !slot->pending_match) {
    slot->offload_cursor = std::max<size_t>(slot->offload_cursor, start);
    slot->pending_match.reset();
    return {};
  }
  if (num_external_tokens % bs != 0 || start + n > slot->device_blocks.size())
    return MakeError(ErrorCode::kInvalidArgument,
                     fmt::format("update_state_after_alloc({}): {} external tokens do not fit {} device blocks from block {}",
                                 request_id, num_external_tokens, slot->device_blocks.size(), start));
  KeysFrom(*slot, start, start + n, keys_);
  ChainMatch expected{slot->pending_match->host_blocks, slot->pending_match->disk_blocks,
                      slot->pending_match->remote_blocks};
  // The engine may take fewer tokens than offered: the run shrinks from its end.
  auto take = [&](uint32_t& part, uint64_t& left) {
    part = static_cast<uint32_t>(std::min<uint64_t>(part, left));
    left -= part;
  };
  uint64_t left = n;
  take(expected.host, left);
  take(expected.disk, left);
  take(expected.remote, left);
  // More than offered cannot be served: the rest is planned as loads from nothing (load errors).
  expected.remote += static_cast<uint32_t>(left);
  std::span<const uint32_t> devices(slot->device_blocks.data() + start, n);
  slot->pins = chain_->Onboard(request_id, keys_, expected, devices, slot->priority, ops_, next_op_id_);
  // Which tier each device block loads from (G4 blocks arrive through G2): a failed load
  // invalidates the block there.
  const OnboardPins& p = slot->pins;
  for (size_t i = 0; i < n; ++i) {
    if (i < p.host) slot->loading_into[devices[i]] = {TierId::kHost, keys_[i]};
    else if (i < size_t{p.host} + p.disk) slot->loading_into[devices[i]] = {TierId::kDisk, keys_[i]};
    else if (i < size_t{p.host} + p.disk + p.remote) slot->loading_into[devices[i]] = {TierId::kHost, keys_[i]};
  }
  stats_.matched_tokens += n * bs;
  metrics_->matched_tokens += n * bs;
  slot->loading = true;
  // Blocks the engine had cached or kvbm just onboarded are not stored again.
  slot->offload_cursor = std::max<size_t>(slot->offload_cursor, start + n);
  slot->pending_match.reset();
  return {};
}

Status ConnectorLeader::OnScheduled(const std::string& request_id, std::span<const uint32_t> block_ids,
                                    uint64_t num_computed_tokens, uint64_t num_scheduled_tokens) {
  Slot* slot = Find(request_id);
  if (!slot) return MakeError(ErrorCode::kNotFound, "scheduled request unknown to kvbm: " + request_id);
  slot->device_blocks.assign(block_ids.begin(), block_ids.end());
  if (slot->offload_stopped) return {};
  const uint64_t bs = page_size_;
  uint64_t computed_after = std::min<uint64_t>(num_computed_tokens + num_scheduled_tokens, slot->seq->num_tokens());
  size_t full = std::min<size_t>({computed_after / bs, slot->seq->blocks().size(), slot->device_blocks.size()});
  if (slot->offload_cursor < full) {
    KeysFrom(*slot, slot->offload_cursor, full, keys_);
    tokens_.clear();
    inputs_.clear();
    for (size_t i = slot->offload_cursor; i < full; ++i) {
      tokens_.push_back(slot->seq->block_tokens(i));
      if (slot->has_inputs) inputs_.push_back(InputsOf(*slot, i));
    }
    std::span<const uint32_t> devices(slot->device_blocks.data() + slot->offload_cursor, full - slot->offload_cursor);
    chain_->Store(keys_, tokens_, devices, slot->priority, inputs_);
  }
  slot->offload_cursor = std::max(slot->offload_cursor, full);
  return {};
}

Status ConnectorLeader::SkipStores(const std::string& request_id, uint64_t first_block) {
  Slot* slot = Find(request_id);
  if (!slot) return MakeError(ErrorCode::kNotFound, "skip_stores: unknown request " + request_id);
  slot->offload_cursor = std::max<size_t>(slot->offload_cursor, first_block);
  return {};
}

void ConnectorLeader::OnPreempted(const std::string& request_id) {
  if (Slot* slot = Find(request_id)) slot->device_blocks.clear();
}

StepMetadata ConnectorLeader::BuildStepMetadata() {
  StepMetadata meta;
  meta.step = step_++;
  meta.host_blocks = host_blocks();
  meta.disk_blocks = disk_blocks();
  meta.ops = std::move(ops_);
  ops_.clear();
  chain_->EndStep(meta.ops, next_op_id_);
  meta.finished_while_loading = std::move(finished_while_loading_);
  finished_while_loading_.clear();
  return meta;
}

void ConnectorLeader::OnWorkerOutput(std::span<const std::string> finished_recving,
                                     std::span<const std::string> finished_sending,
                                     std::span<const uint32_t> invalid_device_blocks) {
  for (uint32_t dev : invalid_device_blocks) {
    for (auto& [id, slot] : slots_) {
      auto it = slot.loading_into.find(dev);
      if (it == slot.loading_into.end()) continue;
      chain_->LoadFailed(it->second.tier, it->second.key);
      // The engine recomputes the block: store it again once that forward pass ran.
      slot.offload_cursor = std::min<size_t>(slot.offload_cursor, it->second.key.position);
      break;
    }
  }
  for (const std::string& r : finished_recving) {
    if (Slot* slot = Find(r)) {
      slot->loading = false;
      slot->pins = {};
      slot->loading_into.clear();
    }
  }
  for (const std::string& r : finished_sending) slots_.erase(r);
}

bool ConnectorLeader::RequestFinished(const std::string& request_id) {
  Slot* slot = Find(request_id);
  if (!slot) return false;
  if (slot->loading) {
    slot->finished = true;
    finished_while_loading_.push_back(request_id);
    return true;
  }
  slots_.erase(request_id);
  return false;
}

}  // namespace kvbm
