#include "kvbm/tier_chain.h"

#include <fmt/format.h>

#include "kvbm/log.h"
#include "kvbm/storage.h"

namespace kvbm {
namespace {

// A G3 write of `key`: its lineage travels with it for the persistent slot record.
BlockOp DiskWrite(uint32_t src, uint32_t dst, const BlockKey& key) {
  BlockOp op{src, dst, key.sequence_hash.value()};
  op.has_lineage = true;
  op.block_hash = key.block_hash;
  if (key.parent) op.parent = key.parent->value();
  op.position = key.position;
  return op;
}

}  // namespace

TierChainOptions TierChainOptions::FromConfig(const KvbmConfig& config, uint64_t bytes_per_block,
                                              std::optional<uint64_t> host_blocks,
                                              std::optional<uint64_t> disk_blocks,
                                              std::optional<EvictionPolicy> policy,
                                              const std::string& remote_descriptor, uint32_t world_size) {
  TierChainOptions o;
  if (!host_blocks || !disk_blocks) {
    config.Validate();
    if (bytes_per_block == 0) throw ConfigError("kvbm: bytes per block must be > 0 to size tiers in GB");
  }
  o.host_blocks = host_blocks ? *host_blocks : config.HostBlocks(bytes_per_block);
  o.disk_blocks = disk_blocks ? *disk_blocks : config.DiskBlocks(bytes_per_block);
  if (o.host_blocks == 0 && o.disk_blocks == 0)
    throw ConfigError(fmt::format("kvbm: the configured sizes give 0 blocks of {} bytes in G2 and G3 "
                                  "(DYN_KVBM_CPU_CACHE_GB / DYN_KVBM_DISK_CACHE_GB too small)",
                                  bytes_per_block));
  auto pick = [&](const char* name, const std::string& setting) {
    if (policy) return *policy;
    if (setting.empty()) return kDefaultEvictionPolicy;
    auto p = ParseEvictionPolicy(setting);
    if (!p)
      throw ConfigError(
          fmt::format("{}={}: unknown eviction policy (expected leaf-first, lru, reuse or adaptive)", name, setting));
    return *p;
  };
  o.host_policy = pick("DYN_KVBM_HOST_EVICTION_POLICY", config.host_eviction_policy);
  o.disk_policy = pick("DYN_KVBM_DISK_EVICTION_POLICY", config.disk_eviction_policy);
  o.promote_disk_hits = config.promote_disk_hits;
  if (config.disk_persistent && o.disk_blocks > 0) {
    if (remote_descriptor.empty())
      throw ConfigError(
          "DYN_KVBM_DISK_PERSISTENT=true: this engine adapter gives no model descriptor (model, KV dtype, block "
          "size) to name the persistent disk files by, so a restarted engine could not tell its blocks from another "
          "model's; unset DYN_KVBM_DISK_PERSISTENT for this engine");
    o.persistent_disk = TierChainOptions::PersistentDisk{config.disk_cache_dir, remote_descriptor, world_size};
  }
  if (!config.remote_url.empty()) {
    if (remote_descriptor.empty())
      throw ConfigError("DYN_KVBM_REMOTE_URL is set but this engine adapter gives no model descriptor for G4 keys");
    o.remote = RemoteTierOptions::FromConfig(config, remote_descriptor, world_size);
  }
  return o;
}

TierChain::TierChain(const KvbmConfig& config, const TierChainOptions& options, std::shared_ptr<KvbmMetrics> metrics,
                     std::shared_ptr<BlockRegistry> registry)
    : config_(config), options_(options),
      metrics_(metrics ? std::move(metrics) : std::make_shared<KvbmMetrics>(config.cache_stats_max_requests)),
      registry_(std::move(registry)), disk_queue_(options.offload_queue_capacity) {
  if (options.host_blocks == 0 && options.disk_blocks == 0)
    throw ConfigError("kvbm: no tier below G1 is sized (set DYN_KVBM_CPU_CACHE_GB or DYN_KVBM_DISK_CACHE_GB)");
  if (options.pin_steps == 0) throw ConfigError("kvbm tier chain: pin_steps must be >= 1");
  auto make = [&](TierId tier, uint64_t blocks, EvictionPolicy policy) {
    std::unique_ptr<Evictor> custom = options.make_evictor ? options.make_evictor(tier, blocks) : nullptr;
    return custom ? BlockPool::Create(tier, blocks, std::move(custom), registry_)
                  : BlockPool::Create(tier, blocks, policy, registry_);
  };
  if (options.host_blocks > 0) host_ = make(TierId::kHost, options.host_blocks, options.host_policy);
  if (options.disk_blocks > 0) disk_ = make(TierId::kDisk, options.disk_blocks, options.disk_policy);
  if (options.remote) {
    if (!host_)
      throw ConfigError("DYN_KVBM_REMOTE_URL: the remote tier (G4) needs a host tier (set DYN_KVBM_CPU_CACHE_GB)");
    auto index = RemoteIndex::Connect(*options.remote, metrics_);
    if (index) {
      remote_ = std::move(*index);
    } else if (options.remote->required) {
      throw ConfigError(fmt::format("DYN_KVBM_REMOTE_URL: G4 is unreachable and DYN_KVBM_REMOTE_REQUIRED is set: {}",
                                    index.error().message()));
    } else {
      metrics_->remote_errors++;
      Log(LogLevel::kWarn, "kvbm: G4 is unreachable, running without it (DYN_KVBM_REMOTE_REQUIRED=true makes this an error): {}",
          index.error().message());
    }
  }
  metrics_->pool_capacity[static_cast<size_t>(TierId::kHost)] = options.host_blocks;
  metrics_->pool_capacity[static_cast<size_t>(TierId::kDisk)] = options.disk_blocks;
  if (disk_ && options.persistent_disk) RestoreDisk(*options.persistent_disk);
}

void TierChain::RestoreDisk(const TierChainOptions::PersistentDisk& persistent) {
  const uint64_t slots = disk_->num_blocks();
  const uint32_t ranks = std::max<uint32_t>(persistent.world_size, 1);
  // agreed[slot]: rank 0's claim, kept while every later rank makes the same one.
  std::vector<std::optional<PersistedDiskSlot>> agreed(slots);
  uint64_t claimed = 0, disagreed = 0;
  for (uint32_t rank = 0; rank < ranks; ++rank) {
    const uint64_t key = PersistentDiskFileKey(persistent.model_descriptor, rank, ranks);
    auto found = ReadPersistedDiskSlots(persistent.directory, key, slots);
    if (!found) {
      Log(found.error().code() == ErrorCode::kNotFound ? LogLevel::kInfo : LogLevel::kWarn,
          "kvbm: persistent G3: nothing to restore (rank {} of {}: {})", rank, ranks, found.error().message());
      return;
    }
    if (rank == 0) {
      for (PersistedDiskSlot& s : *found) agreed[s.slot] = std::move(s);
      claimed = found->size();
      continue;
    }
    std::vector<uint8_t> seen(slots, 0);
    for (const PersistedDiskSlot& s : *found) {
      std::optional<PersistedDiskSlot>& a = agreed[s.slot];
      seen[s.slot] = 1;
      if (a && (a->sequence_hash != s.sequence_hash || a->lineage != s.lineage)) {
        a.reset();
        ++disagreed;
      }
    }
    for (uint64_t i = 0; i < slots; ++i)
      if (agreed[i] && !seen[i]) {
        agreed[i].reset();
        ++disagreed;
      }
  }
  std::vector<std::pair<BlockId, BlockKey>> blocks;
  for (uint64_t i = 0; i < slots; ++i) {
    if (!agreed[i]) continue;
    const DiskBlockLineage& l = agreed[i]->lineage;
    BlockKey key{SequenceHash(agreed[i]->sequence_hash), l.block_hash,
                 l.parent ? std::optional<SequenceHash>(SequenceHash(*l.parent)) : std::nullopt, l.position};
    blocks.emplace_back(BlockId(static_cast<uint32_t>(i)), key);
  }
  const size_t restored = disk_->Restore(blocks);
  stats_.restored_disk_blocks += restored;
  metrics_->disk_restored_blocks += restored;
  metrics_->pool_used[static_cast<size_t>(TierId::kDisk)] = disk_->stats().registered;
  Log(LogLevel::kInfo,
      "kvbm: persistent G3: restored {} blocks into the disk pool ({} claimed by rank 0, {} not held alike by all {} "
      "ranks, {} not taken)",
      restored, claimed, disagreed, ranks, blocks.size() - restored);
}

TierChain::~TierChain() {
  // Every handle goes before the pools it references (members die in reverse order).
  step_pins_.clear();
  current_pins_.clear();
  current_single_pins_.clear();
  while (disk_queue_.Pop()) {
  }
}

BlockPool* TierChain::pool(TierId tier) const {
  switch (tier) {
    case TierId::kHost: return host_.get();
    case TierId::kDisk: return disk_.get();
    default: return nullptr;
  }
}

ChainMatch TierChain::Count(std::span<const BlockKey> keys) const {
  ChainMatch m;
  if (host_) m.host = static_cast<uint32_t>(host_->CountPrefix(keys));
  if (disk_ && m.host < keys.size()) m.disk = static_cast<uint32_t>(disk_->CountPrefix(keys.subspan(m.host)));
  // G4 only past the local run, and no more than G2 can stage: a G4 hit is fetched into fresh
  // G2 blocks, and one promised without a slot would be a load error and a recompute.
  if (remote_ && m.host + m.disk < keys.size()) {
    const BlockPoolStats g2 = host_->stats();
    const uint64_t obtainable = g2.free + g2.inactive;  // host hits become referenced
    const uint64_t room = obtainable > m.host ? obtainable - m.host : 0;
    if (room > 0) {
      const size_t ask = std::min<uint64_t>(keys.size() - m.host - m.disk, room);
      m.remote = static_cast<uint32_t>(remote_->CountPrefix(keys.subspan(m.host + m.disk, ask)));
    }
  }
  return m;
}

void TierChain::CountDropped(uint64_t blocks) {
  if (blocks == 0) return;
  stats_.dropped_full += blocks;
  metrics_->dropped_offloads[static_cast<size_t>(DropReason::kTargetFull)] += blocks;
}

void TierChain::SeeForDisk(const BlockRun& host_run, size_t index, const BlockKey& key, uint32_t priority) {
  if (!disk_) return;
  bool admit = config_.disable_disk_offload_filter || filter_.SeeAndAdmit(key.sequence_hash);
  if (!admit) {
    ++stats_.dropped_filter;
    metrics_->disk_writes_avoided++;
    return;
  }
  if (disk_->Contains(key)) return;
  if (!disk_queue_.Push(priority, DiskOffload{host_run.Share(index), key})) {
    ++stats_.dropped_queue;
    metrics_->dropped_offloads[static_cast<size_t>(DropReason::kQueueFull)]++;
  }
}

OnboardPins TierChain::Onboard(const std::string& request_id, std::span<const BlockKey> keys,
                               const ChainMatch& expected, std::span<const uint32_t> device_blocks, uint32_t priority,
                               std::vector<TransferOp>& ops, uint64_t& next_op_id) {
  OnboardPins pins;
  const size_t n = std::min<size_t>({expected.total(), keys.size(), device_blocks.size()});
  BlockRun host_hits, disk_hits, remote_run;
  if (host_) host_hits = host_->MatchPrefix(keys.first(std::min<size_t>(expected.host, n)));
  if (disk_ && host_hits.size() < n)
    disk_hits = disk_->MatchPrefix(keys.subspan(host_hits.size(), std::min<size_t>(expected.disk, n - host_hits.size())));
  const size_t local = host_hits.size() + disk_hits.size();
  // G4: fetched into fresh G2 blocks, then loaded G2 -> G1 (the load waits for the fetch). Only
  // when the local run is still whole: G4's run was counted as continuing it.
  std::vector<uint8_t> fresh;
  if (remote_ && expected.remote > 0 && host_hits.size() == expected.host && disk_hits.size() == expected.disk &&
      local < n) {
    StoreRunResult fetched = host_->StoreRun(keys.subspan(local, n - local), priority);
    remote_run = std::move(fetched.run);
    fresh = std::move(fetched.fresh);
  }
  TransferOp fetch_op{next_op_id++, OpKind::kFetchRemote, request_id, {}};
  TransferOp host_op{next_op_id++, OpKind::kLoadHost, request_id, {}};
  TransferOp disk_op{next_op_id++, OpKind::kLoadDisk, request_id, {}};
  for (size_t i = 0; i < n; ++i) {
    uint32_t dev = device_blocks[i];
    uint64_t hash = keys[i].sequence_hash.value();
    if (i < host_hits.size()) {
      host_op.blocks.push_back({host_hits.id(i).value(), dev, hash});
    } else if (i < local) {
      disk_op.blocks.push_back({disk_hits.id(i - host_hits.size()).value(), dev, hash});
    } else if (i - local < remote_run.size()) {
      uint32_t slot = remote_run.id(i - local).value();
      if (fresh[i - local]) fetch_op.blocks.push_back({0, slot, hash});
      host_op.blocks.push_back({slot, dev, hash});
    } else {
      // Promised but gone: the worker reports it as a load error and the engine recomputes.
      host_op.blocks.push_back({kNoBlock, dev, hash});
      ++pins.missing;
    }
  }
  pins.host = static_cast<uint32_t>(host_hits.size());
  pins.disk = static_cast<uint32_t>(disk_hits.size());
  pins.remote = static_cast<uint32_t>(remote_run.size());
  stats_.onboard_host_blocks += pins.host;
  stats_.onboard_disk_blocks += pins.disk;
  stats_.onboard_remote_blocks += pins.remote;
  stats_.onboard_missing_blocks += pins.missing;
  // A G2 hit is a reuse: it counts toward disk (and G4) admission, so reused prefixes go down.
  for (size_t i = 0; i < host_hits.size(); ++i) {
    SeeForDisk(host_hits, i, keys[i], priority);
    SeeForRemote(host_hits, i, keys[i]);
  }
  if (options_.promote_disk_hits && host_ && !disk_hits.empty()) {
    auto disk_keys = keys.subspan(host_hits.size(), disk_hits.size());
    StoreRunResult up = host_->StoreRun(disk_keys, priority);
    for (size_t k = 0; k < up.run.size(); ++k) {
      if (!up.fresh[k]) continue;
      step_promote_host_.push_back({disk_hits.id(k).value(), up.run.id(k).value(), disk_keys[k].sequence_hash.value()});
      ++stats_.promote_host_blocks;
    }
    CountDropped(disk_keys.size() - up.run.size());
    current_pins_.push_back(std::move(up.run));
  }
  // Fetches first: the worker registers their slots before the load that reads them.
  if (!fetch_op.blocks.empty()) ops.push_back(std::move(fetch_op));
  if (!host_op.blocks.empty()) ops.push_back(std::move(host_op));
  if (!disk_op.blocks.empty()) ops.push_back(std::move(disk_op));
  if (!host_hits.empty()) pins.runs.push_back(std::move(host_hits));
  if (!disk_hits.empty()) pins.runs.push_back(std::move(disk_hits));
  if (!remote_run.empty()) pins.runs.push_back(std::move(remote_run));
  return pins;
}

void TierChain::SeeForRemote(const BlockRun& host_run, size_t index, const BlockKey& key) {
  if (!remote_ || remote_->options().admission != RemoteAdmission::kReuse) return;
  if (!remote_filter_.SeeAndAdmit(key.sequence_hash)) return;
  step_offload_remote_.push_back({host_run.id(index).value(), 0, key.sequence_hash.value()});
  ++stats_.offload_remote_blocks;
}

void TierChain::Store(std::span<const BlockKey> keys, std::span<const std::span<const Token>> tokens,
                      std::span<const uint32_t> device_blocks, uint32_t priority,
                      std::span<const BlockInputs> inputs) {
  if (keys.empty()) return;
  Check(device_blocks.size() >= keys.size() && (tokens.empty() || tokens.size() == keys.size()),
        "TierChain::Store: one device block (and token list) per key");
  // With G2 sized blocks go G1 -> G2 (and later G2 -> G3); with only G3, G1 -> G3 directly.
  BlockPool& target = host_ ? *host_ : *disk_;
  StoreRunResult stored = target.StoreRun(keys, priority, tokens, inputs);
  for (size_t i = 0; i < stored.run.size(); ++i) {
    const BlockKey& key = keys[i];
    if (!stored.fresh[i]) {
      ++stats_.skipped_cached_blocks;
      // A repeat sight counts toward disk (and G4) admission.
      if (host_ && disk_ && !disk_->Contains(key)) SeeForDisk(stored.run, i, key, priority);
      if (host_) SeeForRemote(stored.run, i, key);
      continue;
    }
    BlockOp op{device_blocks[i], stored.run.id(i).value(), key.sequence_hash.value()};
    if (host_) {
      step_store_host_.push_back(op);
      ++stats_.store_host_blocks;
      SeeForDisk(stored.run, i, key, priority);
      if (remote_ && remote_->options().admission == RemoteAdmission::kStore) {
        step_offload_remote_.push_back({op.dst, 0, op.hash});
        ++stats_.offload_remote_blocks;
      } else {
        SeeForRemote(stored.run, i, key);
      }
    } else {
      step_store_disk_.push_back(DiskWrite(op.src, op.dst, key));
      ++stats_.store_disk_blocks;
    }
  }
  CountDropped(keys.size() - stored.run.size());
  current_pins_.push_back(std::move(stored.run));
}

void TierChain::LoadFailed(TierId tier, const BlockKey& key) {
  if (BlockPool* p = pool(tier)) p->Invalidate(key);
  ++stats_.load_errors;
  metrics_->load_errors++;
}

void TierChain::DrainDiskQueue() {
  size_t budget = options_.disk_offloads_per_step;
  while (budget-- > 0) {
    auto item = disk_queue_.Pop();
    if (!item) break;
    if (disk_->Contains(item->key)) {
      if (host_) host_->MarkCopiedBelow(item->key);
      continue;
    }
    StoreRunResult r = disk_->StoreRun(std::span<const BlockKey>(&item->key, 1), item->host_block.priority());
    if (r.run.empty()) {
      CountDropped(1);
      continue;
    }
    if (host_) host_->MarkCopiedBelow(item->key);  // cost-aware G2 policies evict it first
    if (r.fresh[0]) {
      step_offload_disk_.push_back(DiskWrite(item->host_block.id().value(), r.run.id(0).value(), item->key));
      ++stats_.offload_disk_blocks;
    }
    current_pins_.push_back(std::move(r.run));
    current_single_pins_.push_back(std::move(item->host_block));
  }
}

void TierChain::EndStep(std::vector<TransferOp>& ops, uint64_t& next_op_id) {
  if (disk_) DrainDiskQueue();
  // Order matters to the worker only per kind: loads start now, stores run after the forward
  // pass, offloads and promotions after the stores.
  auto emit = [&](OpKind kind, std::vector<BlockOp>& blocks) {
    if (blocks.empty()) return;
    ops.push_back({next_op_id++, kind, "", std::move(blocks)});
    blocks.clear();
  };
  emit(OpKind::kStoreHost, step_store_host_);
  emit(OpKind::kStoreDisk, step_store_disk_);
  emit(OpKind::kOffloadDisk, step_offload_disk_);
  emit(OpKind::kPromoteHost, step_promote_host_);
  emit(OpKind::kOffloadRemote, step_offload_remote_);
  step_pins_.emplace_back(std::move(current_pins_), std::move(current_single_pins_));
  current_pins_.clear();
  current_single_pins_.clear();
  while (step_pins_.size() > options_.pin_steps) step_pins_.pop_front();
  if (host_) metrics_->pool_used[static_cast<size_t>(TierId::kHost)] = host_->stats().registered;
  if (disk_) metrics_->pool_used[static_cast<size_t>(TierId::kDisk)] = disk_->stats().registered;
}

std::vector<std::optional<TierId>> TierChain::Locate(std::span<const BlockKey> keys) const {
  std::vector<std::optional<TierId>> where(keys.size());
  std::vector<BlockKey> elsewhere;
  std::vector<size_t> at;
  for (size_t i = 0; i < keys.size(); ++i) {
    if (host_ && host_->Contains(keys[i])) where[i] = TierId::kHost;
    else if (disk_ && disk_->Contains(keys[i])) where[i] = TierId::kDisk;
    else {
      elsewhere.push_back(keys[i]);
      at.push_back(i);
    }
  }
  if (remote_ && !elsewhere.empty()) {
    size_t n = remote_->CountPrefix(elsewhere);
    for (size_t k = 0; k < n; ++k) where[at[k]] = TierId::kRemote;
  }
  return where;
}

void TierChain::ReleaseStepPins() {
  step_pins_.clear();
  current_pins_.clear();
  current_single_pins_.clear();
}

}  // namespace kvbm
