#include "kvbm/leader.h"

#include <fmt/format.h>

#include "kvbm/log.h"

namespace kvbm {

ConnectorLeader::ConnectorLeader(const KvbmConfig& config, const LeaderOptions& options,
                                 std::shared_ptr<KvbmMetrics> metrics, std::shared_ptr<BlockRegistry> registry)
    : config_(config), options_(options),
      metrics_(metrics ? std::move(metrics) : std::make_shared<KvbmMetrics>(config.cache_stats_max_requests)),
      registry_(registry ? std::move(registry) : std::make_shared<BlockRegistry>()),
      disk_queue_(options.offload_queue_capacity) {
  if (options.page_size == 0) throw ConfigError("kvbm leader: page_size (engine block size) must be > 0");
  uint64_t host_n = options.host_blocks ? *options.host_blocks : 0;
  uint64_t disk_n = options.disk_blocks ? *options.disk_blocks : 0;
  if (!options.host_blocks || !options.disk_blocks) {
    config.Validate();
    if (options.bytes_per_block == 0) throw ConfigError("kvbm leader: bytes_per_block must be > 0 to size tiers in GB");
    if (!options.host_blocks) host_n = config.HostBlocks(options.bytes_per_block);
    if (!options.disk_blocks) disk_n = config.DiskBlocks(options.bytes_per_block);
  }
  if (host_n == 0 && disk_n == 0)
    throw ConfigError(fmt::format("kvbm: the configured sizes give 0 blocks of {} bytes in G2 and G3 "
                                  "(DYN_KVBM_CPU_CACHE_GB / DYN_KVBM_DISK_CACHE_GB too small)",
                                  options.bytes_per_block));
  if (host_n > 0) host_ = BlockPool::Create(TierId::kHost, host_n, options.policy, registry_);
  if (disk_n > 0) disk_ = BlockPool::Create(TierId::kDisk, disk_n, options.policy, registry_);
  metrics_->pool_capacity[static_cast<size_t>(TierId::kHost)] = host_n;
  metrics_->pool_capacity[static_cast<size_t>(TierId::kDisk)] = disk_n;
  Log(LogLevel::kInfo, "kvbm leader: G2 {} blocks, G3 {} blocks of {} bytes, page {} tokens", host_n, disk_n,
      options.bytes_per_block, options.page_size);
}

ConnectorLeader::~ConnectorLeader() {
  // Handles go before the pools (members are destroyed in reverse order, pools first
  // otherwise): release every pin explicitly.
  slots_.clear();
  step_pins_.clear();
  current_pins_.clear();
  while (disk_queue_.Pop()) {
  }
}

ConnectorLeader::Slot* ConnectorLeader::Find(const std::string& request_id) {
  auto it = slots_.find(request_id);
  return it == slots_.end() ? nullptr : &it->second;
}

void ConnectorLeader::AddRequest(const std::string& request_id, std::span<const Token> tokens,
                                 const std::optional<std::string>& salt, const std::optional<std::string>& lora_name,
                                 uint32_t priority) {
  if (slots_.count(request_id)) return;
  Slot slot;
  slot.id = request_id;
  slot.seq = std::make_unique<TokenBlockSequence>(options_.page_size, ComputeSaltHash(salt, lora_name));
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

std::vector<BlockKey> ConnectorLeader::KeysFrom(const Slot& slot, size_t first, size_t last) const {
  std::vector<BlockKey> keys;
  const auto& blocks = slot.seq->blocks();
  last = std::min(last, blocks.size());
  for (size_t i = first; i < last; ++i) keys.push_back(KeyOf(blocks[i]));
  return keys;
}

Result<MatchResult> ConnectorLeader::GetNumNewMatchedTokens(const std::string& request_id, uint64_t num_computed_tokens) {
  Slot* slot = Find(request_id);
  if (!slot) return MakeError(ErrorCode::kNotFound, "get_num_new_matched_tokens: unknown request " + request_id);
  const uint64_t bs = options_.page_size;
  const uint64_t num_tokens = slot->seq->num_tokens();
  MatchResult r;
  slot->pending_match.reset();
  if (num_tokens == 0 || num_computed_tokens % bs != 0) return r;
  uint64_t start = num_computed_tokens / bs;
  // Leave at least one token for the engine to compute.
  uint64_t cap_blocks = (num_tokens - 1) / bs;
  if (start >= cap_blocks) return r;
  auto keys = KeysFrom(*slot, start, cap_blocks);
  size_t host_n = host_ ? host_->CountPrefix(keys) : 0;
  size_t disk_n = 0;
  if (disk_ && host_n < keys.size()) {
    std::span<const BlockKey> rest(keys.begin() + host_n, keys.end());
    disk_n = disk_->CountPrefix(rest);
  }
  r.host_blocks = static_cast<uint32_t>(host_n);
  r.disk_blocks = static_cast<uint32_t>(disk_n);
  r.external_tokens = (host_n + disk_n) * bs;
  r.async = r.external_tokens > 0;
  slot->pending_match = r;
  slot->pending_match_start = start;
  return r;
}

Status ConnectorLeader::UpdateStateAfterAlloc(const std::string& request_id, std::span<const uint32_t> block_ids,
                                              uint64_t num_external_tokens) {
  Slot* slot = Find(request_id);
  if (!slot) return MakeError(ErrorCode::kNotFound, "update_state_after_alloc: unknown request " + request_id);
  const uint64_t bs = options_.page_size;
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
  auto keys = KeysFrom(*slot, start, start + n);
  std::vector<ImmutableBlock> host_hits, disk_hits;
  if (host_) {
    std::span<const BlockKey> want(keys.begin(), keys.begin() + std::min<size_t>(slot->pending_match->host_blocks, n));
    host_hits = host_->MatchPrefix(want);
  }
  if (disk_ && host_hits.size() < n) {
    std::span<const BlockKey> want(keys.begin() + host_hits.size(), keys.end());
    disk_hits = disk_->MatchPrefix(want);
  }
  TransferOp host_op{next_op_id_++, OpKind::kLoadHost, request_id, {}};
  TransferOp disk_op{next_op_id_++, OpKind::kLoadDisk, request_id, {}};
  for (size_t i = 0; i < n; ++i) {
    uint32_t dev = slot->device_blocks[start + i];
    uint64_t hash = keys[i].sequence_hash.value();
    if (i < host_hits.size()) {
      host_op.blocks.push_back({host_hits[i].id().value(), dev, hash});
      slot->loading_into[dev] = {TierId::kHost, keys[i]};
    } else if (i - host_hits.size() < disk_hits.size()) {
      disk_op.blocks.push_back({disk_hits[i - host_hits.size()].id().value(), dev, hash});
      slot->loading_into[dev] = {TierId::kDisk, keys[i]};
    } else {
      // Promised but gone: the worker reports it as a load error and the engine recomputes.
      host_op.blocks.push_back({kNoBlock, dev, hash});
    }
  }
  stats_.onboard_host_blocks += host_hits.size();
  stats_.onboard_disk_blocks += disk_hits.size();
  stats_.matched_tokens += n * bs;
  metrics_->matched_tokens += n * bs;
  // A G2 hit is a reuse: it counts toward disk admission, so reused prefixes reach G3.
  if (disk_)
    for (size_t i = 0; i < host_hits.size(); ++i) MaybeQueueDiskOffload(host_hits[i], keys[i], slot->priority);
  for (auto& h : host_hits) slot->pinned.push_back(std::move(h));
  for (auto& h : disk_hits) slot->pinned.push_back(std::move(h));
  if (!host_op.blocks.empty()) ops_.push_back(std::move(host_op));
  if (!disk_op.blocks.empty()) ops_.push_back(std::move(disk_op));
  slot->loading = true;
  // Blocks the engine had cached or kvbm just onboarded are not stored again.
  slot->offload_cursor = std::max<size_t>(slot->offload_cursor, start + n);
  slot->pending_match.reset();
  return {};
}

void ConnectorLeader::MaybeQueueDiskOffload(const ImmutableBlock& host_block, const BlockKey& key, uint32_t priority) {
  if (!disk_) return;
  bool admit = config_.disable_disk_offload_filter || filter_.SeeAndAdmit(key.sequence_hash);
  if (!admit) {
    ++stats_.dropped_filter;
    metrics_->disk_writes_avoided++;
    return;
  }
  if (disk_->Contains(key)) return;
  if (!disk_queue_.Push(priority, DiskOffload{host_block, key})) {
    ++stats_.dropped_queue;
    metrics_->dropped_offloads[static_cast<size_t>(DropReason::kQueueFull)]++;
  }
}

std::optional<ImmutableBlock> ConnectorLeader::AllocateRegistered(BlockPool& pool, const BlockKey& key,
                                                                  std::span<const Token> tokens, uint32_t priority) {
  auto blocks = pool.Allocate(1);
  if (!blocks) {
    ++stats_.dropped_full;
    metrics_->dropped_offloads[static_cast<size_t>(DropReason::kTargetFull)]++;
    return std::nullopt;
  }
  MutableBlock& b = (*blocks)[0];
  (void)b.Complete(key, tokens, priority);
  auto reg = pool.Register(std::move(b));
  if (!reg) {
    ++stats_.dropped_full;
    return std::nullopt;
  }
  return std::move(*reg);
}

void ConnectorLeader::StoreBlock(Slot& slot, size_t index) {
  const TokenBlock& tb = slot.seq->blocks()[index];
  BlockKey key = KeyOf(tb);
  uint32_t dev = slot.device_blocks[index];
  auto tokens = slot.seq->block_tokens(index);
  // With G2 sized blocks go G1 -> G2 (and later G2 -> G3); with only G3, G1 -> G3 directly.
  BlockPool& target = host_ ? *host_ : *disk_;
  if (target.Contains(key)) {
    ++stats_.skipped_cached_blocks;
    // A repeat sight counts toward disk admission.
    if (host_ && disk_ && !disk_->Contains(key)) {
      auto held = host_->MatchPrefix(std::span<const BlockKey>(&key, 1));
      if (!held.empty()) MaybeQueueDiskOffload(held[0], key, slot.priority);
    }
    return;
  }
  auto reg = AllocateRegistered(target, key, tokens, slot.priority);
  if (!reg) return;
  BlockOp op{dev, reg->id().value(), key.sequence_hash.value()};
  if (host_) {
    step_store_host_.push_back(op);
    ++stats_.store_host_blocks;
    MaybeQueueDiskOffload(*reg, key, slot.priority);
  } else {
    step_store_disk_.push_back(op);
    ++stats_.store_disk_blocks;
  }
  current_pins_.push_back(std::move(*reg));
}

Status ConnectorLeader::OnScheduled(const std::string& request_id, std::span<const uint32_t> block_ids,
                                    uint64_t num_computed_tokens, uint64_t num_scheduled_tokens) {
  Slot* slot = Find(request_id);
  if (!slot) return MakeError(ErrorCode::kNotFound, "scheduled request unknown to kvbm: " + request_id);
  slot->device_blocks.assign(block_ids.begin(), block_ids.end());
  if (slot->offload_stopped) return {};
  const uint64_t bs = options_.page_size;
  uint64_t computed_after = std::min<uint64_t>(num_computed_tokens + num_scheduled_tokens, slot->seq->num_tokens());
  size_t full = std::min<size_t>({computed_after / bs, slot->seq->blocks().size(), slot->device_blocks.size()});
  for (size_t i = slot->offload_cursor; i < full; ++i) StoreBlock(*slot, i);
  slot->offload_cursor = std::max(slot->offload_cursor, full);
  return {};
}

void ConnectorLeader::OnPreempted(const std::string& request_id) {
  if (Slot* slot = Find(request_id)) slot->device_blocks.clear();
}

void ConnectorLeader::DrainDiskQueue() {
  size_t budget = options_.disk_offloads_per_step;
  while (budget-- > 0) {
    auto item = disk_queue_.Pop();
    if (!item) break;
    if (disk_->Contains(item->key)) continue;
    auto reg = AllocateRegistered(*disk_, item->key, {}, item->host_block.priority());
    if (!reg) continue;
    step_offload_disk_.push_back({item->host_block.id().value(), reg->id().value(), item->key.sequence_hash.value()});
    ++stats_.offload_disk_blocks;
    current_pins_.push_back(std::move(*reg));
    current_pins_.push_back(std::move(item->host_block));
  }
}

StepMetadata ConnectorLeader::BuildStepMetadata() {
  DrainDiskQueue();
  StepMetadata meta;
  meta.step = step_++;
  meta.host_blocks = host_blocks();
  meta.disk_blocks = disk_blocks();
  meta.ops = std::move(ops_);
  ops_.clear();
  // Order matters to the worker only per kind: loads start now, stores run after the forward
  // pass, disk offloads after the stores.
  if (!step_store_host_.empty()) meta.ops.push_back({next_op_id_++, OpKind::kStoreHost, "", std::move(step_store_host_)});
  if (!step_store_disk_.empty()) meta.ops.push_back({next_op_id_++, OpKind::kStoreDisk, "", std::move(step_store_disk_)});
  if (!step_offload_disk_.empty())
    meta.ops.push_back({next_op_id_++, OpKind::kOffloadDisk, "", std::move(step_offload_disk_)});
  step_store_host_.clear();
  step_store_disk_.clear();
  step_offload_disk_.clear();
  meta.finished_while_loading = std::move(finished_while_loading_);
  finished_while_loading_.clear();
  // Keep this step's written blocks referenced for two more steps (a worker may run one step
  // behind the scheduler).
  step_pins_.push_back(std::move(current_pins_));
  current_pins_.clear();
  while (step_pins_.size() > 3) step_pins_.pop_front();
  if (host_) metrics_->pool_used[static_cast<size_t>(TierId::kHost)] = host_->stats().registered;
  if (disk_) metrics_->pool_used[static_cast<size_t>(TierId::kDisk)] = disk_->stats().registered;
  return meta;
}

void ConnectorLeader::OnWorkerOutput(std::span<const std::string> finished_recving,
                                     std::span<const std::string> finished_sending,
                                     std::span<const uint32_t> invalid_device_blocks) {
  for (uint32_t dev : invalid_device_blocks) {
    for (auto& [id, slot] : slots_) {
      auto it = slot.loading_into.find(dev);
      if (it == slot.loading_into.end()) continue;
      BlockPool* pool = it->second.tier == TierId::kHost ? host_.get() : disk_.get();
      if (pool) pool->Invalidate(it->second.key);
      ++stats_.load_errors;
      metrics_->load_errors++;
      break;
    }
  }
  for (const std::string& r : finished_recving) {
    if (Slot* slot = Find(r)) {
      slot->loading = false;
      slot->pinned.clear();
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
