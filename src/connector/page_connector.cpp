#include "kvbm/page_connector.h"

#include <fmt/format.h>
#include <xxhash.h>

#include <algorithm>
#include <cstring>

#include "kvbm/connector_ops.h"
#include "kvbm/log.h"
#include "kvbm/tier_chain.h"

namespace kvbm {

BlockKey PageKey(std::string_view key) {
  XXH128_hash_t h = XXH3_128bits_withSeed(key.data(), key.size(), kPageKeySeed);
  BlockKey k;
  k.sequence_hash = SequenceHash(h.low64);
  k.block_hash = h.high64;
  return k;
}

namespace {

constexpr uint64_t kStagingBudgetBytes = 256ULL << 20;
constexpr uint32_t kMaxStagingPages = 64;

Status CheckSegments(size_t keys, size_t addresses, uint64_t segment_bytes, uint64_t block_bytes) {
  if (keys == 0 && addresses == 0) return {};
  if (keys == 0 || segment_bytes == 0 || addresses % keys != 0 || (addresses / keys) * segment_bytes != block_bytes)
    return MakeError(ErrorCode::kInvalidArgument,
                     fmt::format("page connector: {} keys with {} segments of {} bytes do not make pages of {} bytes",
                                 keys, addresses, segment_bytes, block_bytes));
  return {};
}

}  // namespace

PageConnector::PageConnector(const KvbmConfig& config, PageConnectorOptions options,
                             std::shared_ptr<KvbmMetrics> metrics)
    : config_(config), options_(std::move(options)),
      metrics_(metrics ? std::move(metrics) : std::make_shared<KvbmMetrics>(config.cache_stats_max_requests)) {}

Result<std::unique_ptr<PageConnector>> PageConnector::Create(const KvbmConfig& config, PageConnectorOptions options,
                                                             std::shared_ptr<KvbmMetrics> metrics) {
  LayoutDims page = options.page;
  page.num_blocks = 1;
  page.Validate();  // ConfigError naming the bad dimension
  options.page = page;
  if (options.element_order.empty()) throw ConfigError("page connector: element_order must be given (e.g. token,head,dim)");
  std::unique_ptr<PageConnector> c(new PageConnector(config, std::move(options), std::move(metrics)));
  const uint64_t bytes = c->block_bytes();
  c->staging_pages_ = c->options_.staging_pages > 0
                          ? c->options_.staging_pages
                          : static_cast<uint32_t>(std::clamp<uint64_t>(kStagingBudgetBytes / bytes, 1, kMaxStagingPages));
  std::lock_guard lock(c->mu_);
  if (auto s = c->Build(); !s) return std::unexpected(s.error());
  return c;
}

PageConnector::~PageConnector() {
  std::lock_guard lock(mu_);
  worker_.reset();  // waits for anything in flight (nothing is, between calls)
  manager_.reset();
}

Status PageConnector::Build() {
  const uint64_t bytes = block_bytes();
  // The tier chain's options from the settings: sizes, policies, promotion, G4.
  TierChainOptions tiers = TierChainOptions::FromConfig(config_, bytes, std::nullopt, std::nullopt, std::nullopt,
                                                        options_.remote_descriptor, 1);
  // Every step runs to completion before the next: a written block needs no pin past it.
  tiers.pin_steps = 1;
  auto staging = HostStorage::Allocate(uint64_t{staging_pages_} * bytes);
  if (!staging)
    return MakeError(staging.error().code(), fmt::format("page connector staging area ({} pages of {} bytes): {}",
                                                         staging_pages_, bytes, staging.error().message()));
  staging_ = std::move(*staging);
  worker_ = std::make_unique<KvbmWorker>(config_, 0, 1, metrics_);
  const LayoutDims& d = options_.page;
  DeviceTensors g1;
  g1.pool = true;
  g1.kind = MemoryKind::kHost;
  g1.num_blocks = staging_pages_;
  g1.page_size = d.page_size;
  g1.element_order = options_.element_order;
  g1.layer_pointers = {reinterpret_cast<uintptr_t>(staging_->data())};
  const auto i64 = [](uint64_t v) { return static_cast<int64_t>(v); };
  TensorShape shape;
  shape.shape = {i64(staging_pages_), i64(d.num_layers), i64(d.outer_dim), i64(d.page_size), i64(d.inner_dim)};
  shape.strides = {i64(d.num_layers * d.outer_dim * d.page_size * d.inner_dim), i64(d.outer_dim * d.page_size * d.inner_dim),
                   i64(d.page_size * d.inner_dim), i64(d.inner_dim), 1};
  shape.dtype_bytes = d.dtype_bytes;
  g1.layer_shapes = {shape};
  if (auto s = worker_->RegisterKvCaches(g1); !s) return s;
  // The worker opens its tiers before the chain is built: a persistent G3 (DYN_KVBM_DISK_PERSISTENT)
  // has verified its blocks when the chain restores them.
  if (auto s = worker_->AllocateTiers(tiers.host_blocks, tiers.disk_blocks, options_.remote_descriptor); !s) return s;
  manager_ = std::make_unique<KvBlockManager>(config_, tiers, static_cast<uint32_t>(options_.page.page_size), metrics_);
  const TierChain& chain = *manager_->chain();
  if (const auto& remote = chain.options().remote) {
    if (auto s = worker_->ConnectRemote(*remote); !s) return s;
  }
  Log(LogLevel::kInfo, "kvbm page connector: pages [{}], G2 {} / G3 {} blocks, G4 {}, {} staging pages",
      worker_->block_format(), chain.host_blocks(), chain.disk_blocks(), chain.remote() ? "on" : "off", staging_pages_);
  return {};
}

std::string PageConnector::block_format() const {
  std::lock_guard lock(mu_);
  return worker_->block_format();
}

uint64_t PageConnector::host_blocks() const {
  std::lock_guard lock(mu_);
  return manager_->chain()->host_blocks();
}

uint64_t PageConnector::disk_blocks() const {
  std::lock_guard lock(mu_);
  return manager_->chain()->disk_blocks();
}

bool PageConnector::has_remote() const {
  std::lock_guard lock(mu_);
  return manager_->chain()->remote() != nullptr && worker_->has_remote();
}

uint32_t PageConnector::chunk_pages() const {
  std::lock_guard lock(mu_);
  const TierChain& chain = *manager_->chain();
  uint64_t tier = chain.host_blocks() > 0 ? chain.host_blocks() : chain.disk_blocks();
  return static_cast<uint32_t>(std::min<uint64_t>(staging_pages_, tier));
}

Result<std::vector<uint32_t>> PageConnector::RunStep(std::vector<TransferOp> ops) {
  TierChain& chain = *manager_->chain();
  chain.EndStep(ops, next_op_id_);
  StepMetadata meta;
  meta.step = ++step_;
  meta.host_blocks = chain.host_blocks();
  meta.disk_blocks = chain.disk_blocks();
  // The worker starts fetches and loads in the order given: fetches (which fill the G2 slots
  // that loads read) first, then loads; stores and offloads run in ForwardPassDone.
  std::stable_partition(ops.begin(), ops.end(), [](const TransferOp& op) { return op.kind == OpKind::kFetchRemote; });
  meta.ops = std::move(ops);
  Status bound = worker_->BindStep(meta);
  Status done = bound ? worker_->ForwardPassDone() : Status{};
  worker_->WaitIdle();
  worker_->GetFinished();  // request bookkeeping only: every load has finished
  std::vector<uint32_t> failed = worker_->TakeLoadErrors();
  chain.ReleaseStepPins();
  if (!bound) return std::unexpected(bound.error());
  if (!done) return std::unexpected(done.error());
  return failed;
}

PageConnector::Batch PageConnector::PlanBatch(std::span<const std::string> keys) const {
  const TierChain& chain = *manager_->chain();
  const uint64_t tier = chain.host_blocks() > 0 ? chain.host_blocks() : chain.disk_blocks();
  Batch b;
  b.chunk = static_cast<size_t>(std::min<uint64_t>(staging_pages_, tier));
  b.keys.reserve(keys.size());
  for (const std::string& k : keys) b.keys.push_back(KeyOf(k));
  return b;
}

Result<std::vector<bool>> PageConnector::Put(std::span<const std::string> keys, std::span<const uint64_t> addresses,
                                             uint64_t segment_bytes) {
  const uint64_t bytes = block_bytes();
  if (auto st = CheckSegments(keys.size(), addresses.size(), segment_bytes, bytes); !st)
    return std::unexpected(st.error());
  std::vector<bool> out(keys.size(), false);
  if (keys.empty()) return out;
  const size_t per = addresses.size() / keys.size();
  std::lock_guard lock(mu_);
  TierChain& chain = *manager_->chain();
  auto [page_keys, chunk] = PlanBatch(keys);
  for (size_t begin = 0; begin < keys.size(); begin += chunk) {
    const size_t end = std::min(keys.size(), begin + chunk);
    for (size_t i = begin; i < end; ++i) {
      uint8_t* dst = StagingPage(static_cast<uint32_t>(i - begin));
      for (size_t s = 0; s < per; ++s)
        std::memcpy(dst + s * segment_bytes, reinterpret_cast<const void*>(addresses[i * per + s]), segment_bytes);
      // One key per store: a key that collides (or finds no block) fails alone.
      const uint32_t slot = static_cast<uint32_t>(i - begin);
      chain.Store(std::span<const BlockKey>(&page_keys[i], 1), {}, std::span<const uint32_t>(&slot, 1), 0);
    }
    auto failed = RunStep({});
    if (!failed) return std::unexpected(failed.error());
    for (size_t i = begin; i < end; ++i) {
      const BlockKey& k = page_keys[i];
      out[i] = (chain.host() && chain.host()->Contains(k)) || (chain.disk() && chain.disk()->Contains(k));
      ++stats_.put_pages;
      if (!out[i]) ++stats_.put_refused;
    }
  }
  return out;
}

Result<std::vector<bool>> PageConnector::Get(std::span<const std::string> keys, std::span<const uint64_t> addresses,
                                             uint64_t segment_bytes) {
  const uint64_t bytes = block_bytes();
  if (auto st = CheckSegments(keys.size(), addresses.size(), segment_bytes, bytes); !st)
    return std::unexpected(st.error());
  std::vector<bool> out(keys.size(), false);
  if (keys.empty()) return out;
  const size_t per = addresses.size() / keys.size();
  std::lock_guard lock(mu_);
  TierChain& chain = *manager_->chain();
  auto [page_keys, chunk] = PlanBatch(keys);
  const std::string request_id = "page-get";
  for (size_t begin = 0; begin < keys.size(); begin += chunk) {
    const size_t end = std::min(keys.size(), begin + chunk);
    std::span<const BlockKey> part(page_keys.data() + begin, end - begin);
    std::vector<std::optional<TierId>> where = chain.Locate(part);
    std::vector<TransferOp> ops;
    std::vector<OnboardPins> pins;
    std::vector<std::optional<TierId>> source(part.size());  // the tier a failed load invalidates
    for (size_t k = 0; k < part.size(); ++k) {
      ++stats_.get_pages;
      if (!where[k]) ++stats_.get_missing;
    }
    // G2 hits are pinned first: a promotion or a G4 fetch takes a G2 block and must not evict
    // a page this step is about to load from G2.
    for (TierId tier : {TierId::kHost, TierId::kDisk, TierId::kRemote}) {
      for (size_t k = 0; k < part.size(); ++k) {
        if (where[k] != tier) continue;
        ChainMatch m;
        if (tier == TierId::kHost) m.host = 1;
        else if (tier == TierId::kDisk) m.disk = 1;
        else m.remote = 1;
        const uint32_t slot = static_cast<uint32_t>(k);
        pins.push_back(chain.Onboard(request_id, part.subspan(k, 1), m, std::span<const uint32_t>(&slot, 1), 0, ops,
                                     next_op_id_));
        // A G4 page arrives through a fresh G2 block: a failure invalidates that one.
        source[k] = tier == TierId::kDisk ? TierId::kDisk : TierId::kHost;
      }
    }
    auto failed = RunStep(std::move(ops));
    pins.clear();
    if (!failed) return std::unexpected(failed.error());
    std::vector<bool> bad(part.size(), false);
    for (uint32_t slot : *failed)
      if (slot < bad.size()) bad[slot] = true;
    uint64_t loaded = 0;
    for (size_t k = 0; k < part.size(); ++k) {
      if (!source[k]) continue;
      if (bad[k]) {
        chain.LoadFailed(*source[k], part[k]);
        ++stats_.get_failed;
        continue;
      }
      const uint8_t* src = StagingPage(static_cast<uint32_t>(k));
      const size_t i = begin + k;
      for (size_t s = 0; s < per; ++s)
        std::memcpy(reinterpret_cast<void*>(addresses[i * per + s]), src + s * segment_bytes, segment_bytes);
      out[i] = true;
      ++loaded;
    }
    metrics_->matched_tokens += loaded * options_.page.page_size;
  }
  return out;
}

bool PageConnector::Contains(std::string_view key) {
  const BlockKey k = KeyOf(key);
  std::lock_guard lock(mu_);
  return manager_->chain()->Locate(std::span<const BlockKey>(&k, 1))[0].has_value();
}

size_t PageConnector::PrefixHits(std::span<const std::string> keys) {
  std::vector<BlockKey> page_keys;
  page_keys.reserve(keys.size());
  for (const std::string& k : keys) page_keys.push_back(KeyOf(k));
  std::lock_guard lock(mu_);
  std::vector<std::optional<TierId>> where = manager_->chain()->Locate(page_keys);
  size_t n = 0, host = 0;
  while (n < where.size() && where[n]) {
    if (*where[n] == TierId::kHost) ++host;
    ++n;
  }
  // As the leader records a match: queried pages, of which G2 hits and hits further down.
  metrics_->requested_tokens += keys.size() * options_.page.page_size;
  metrics_->host_hit_rate.Record(keys.size(), host);
  metrics_->disk_hit_rate.Record(keys.size(), n - host);
  return n;
}

Status PageConnector::Clear() {
  std::lock_guard lock(mu_);
  // Between calls no block is referenced (every step ran to completion and dropped its pins).
  TierChain& chain = *manager_->chain();
  for (BlockPool* pool : {chain.host(), chain.disk()})
    if (pool)
      if (auto s = pool->Reset(); !s) return s;
  return {};
}

PageConnectorStats PageConnector::stats() const {
  std::lock_guard lock(mu_);
  return stats_;
}

TierChainStats PageConnector::chain_stats() const {
  std::lock_guard lock(mu_);
  return manager_->chain()->stats();
}

BlockPoolStats PageConnector::pool_stats(TierId tier) const {
  std::lock_guard lock(mu_);
  BlockPool* p = manager_->chain()->pool(tier);
  return p ? p->stats() : BlockPoolStats{};
}

uint16_t PageConnector::metrics_port() const {
  std::lock_guard lock(mu_);
  return manager_->metrics_port();
}

int PageConnector::disk_fd() const {
  std::lock_guard lock(mu_);
  return worker_->disk_memory().fd;
}

}  // namespace kvbm
