// PageConnector: the connector core for engines that hand kvbm pages under their own keys
// instead of requests with tokens. SGLang's HiCache storage interface is one: SGLang passes a
// storage backend its page keys (a SHA-256 chain over token ids, as hex strings) and host-pool
// addresses, never the tokens (python/kvbm/sglang_integration, docs/ENGINES.md).
//
// It runs on the same core as the vLLM and TensorRT-LLM paths, not beside it:
//  - a KvBlockManager: the TierChain (tier_chain.h) with its pools and eviction policies
//    (DYN_KVBM_{HOST,DISK}_EVICTION_POLICY), write-through, the G3 admission filter,
//    promotion (DYN_KVBM_PROMOTE_DISK_HITS) and G4 (DYN_KVBM_REMOTE_*), plus the metrics
//    endpoint, cache-statistics line and KV events the settings ask for;
//  - a KvbmWorker (worker.h): G2 memory, the G3 file, the transfer engine, the G4 client, and
//    every ordering and verification rule of the worker.
// The worker's G1 is a staging area of `staging_pages` blocks in kvbm's block format
// ([layer][K|V][chunk]). Put gathers the caller's pages into it and hands them to the chain as
// a step's stores; Get plans the chain's loads into it, then scatters the pages that loaded
// and verified to the caller. Every call is one or more chain steps (at most `chunk_pages()`
// pages each) run to completion before it returns: nothing is in flight between calls.
//
// Keys. A page key (any byte string) is identified by XXH3-128 of its bytes (seed
// kPageKeySeed): the block's sequence hash is the low 64 bits, its block hash the high 64; no
// parent (pages are independent: under leaf-first every page is a leaf), position 0. Pools
// match on both halves, so two keys whose 64-bit sequence hashes collide are still different
// keys: a Get of one is a miss, never the other's page, and a Put of the second is refused
// (false) while the first is held. The G3 side data and G4 carry the 64-bit sequence hash and
// a checksum; G3 slots are only reached through the pool (which checked all 128 bits).
//
// Thread safety: every method may be called from any thread; one mutex serialises them, copies
// included. Ownership: owns its manager (chain), worker and staging memory. The caller's page
// memory is read (Put) or written (Get) only during the call.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvbm/block_pool.h"
#include "kvbm/config.h"
#include "kvbm/error.h"
#include "kvbm/layout.h"
#include "kvbm/manager.h"
#include "kvbm/metrics.h"
#include "kvbm/storage.h"
#include "kvbm/worker.h"

namespace kvbm {

inline constexpr uint64_t kPageKeySeed = 0x6b76626d70616765ULL;  // "kvbmpage"

// The BlockKey a page key is stored under (see above).
BlockKey PageKey(std::string_view key);

struct PageConnectorOptions {
  // One page: num_layers, outer_dim (2: K and V; 1), page_size (tokens), inner_dim (elements
  // per token per outer), dtype_bytes. num_blocks is ignored.
  LayoutDims page;
  std::string element_order;      // how a chunk's elements are ordered ("token,head,dim")
  std::string remote_descriptor;  // G4 key descriptor; required when DYN_KVBM_REMOTE_URL is set
  uint32_t staging_pages = 0;     // G1 staging blocks; 0 = min(64, 256 MiB / page bytes), >= 1
  // Test seam: how a page key becomes a BlockKey (default PageKey). Tests use it to make two
  // keys collide on 64 bits.
  std::function<BlockKey(std::string_view)> key_of;
};

struct PageConnectorStats {
  uint64_t put_pages = 0;       // pages asked to Put
  uint64_t put_refused = 0;     // of which not held afterwards (tiers full of pinned blocks, a collision)
  uint64_t get_pages = 0;       // pages asked to Get
  uint64_t get_missing = 0;     // of which held nowhere
  uint64_t get_failed = 0;      // of which held but failed to load or verify (now invalidated)
};

class PageConnector {
 public:
  // Sizes G2/G3 from `config` for one page (DYN_KVBM_CPU_CACHE_*, DYN_KVBM_DISK_CACHE_*).
  // ConfigError for bad dims, no tier sized, a bad policy or G4 setting (naming the setting);
  // IoError / ResourceExhausted from allocating the tiers.
  static Result<std::unique_ptr<PageConnector>> Create(const KvbmConfig& config, PageConnectorOptions options,
                                                       std::shared_ptr<KvbmMetrics> metrics = nullptr);
  ~PageConnector();
  PageConnector(const PageConnector&) = delete;
  PageConnector& operator=(const PageConnector&) = delete;

  uint64_t block_bytes() const { return options_.page.block_bytes(); }
  // The layout fingerprint of the pages (KvbmWorker::block_format).
  std::string block_format() const;
  uint64_t host_blocks() const;
  uint64_t disk_blocks() const;
  bool has_remote() const;
  // Pages per chain step: min(staging pages, G2 blocks (or G3 blocks without G2)).
  uint32_t chunk_pages() const;

  // Stores each key's page, gathered from segments [i * per_page, (i + 1) * per_page) of
  // `addresses`, each `segment_bytes` long (per_page * segment_bytes must be block_bytes()).
  // A key already held is not written again (it counts as a sight for G3 / G4 admission).
  // InvalidArgument on a size mismatch. Per key: true when the chain holds it afterwards.
  Result<std::vector<bool>> Put(std::span<const std::string> keys, std::span<const uint64_t> addresses,
                                uint64_t segment_bytes);
  // Loads each key's page and scatters it into its segments. Per key: true when it was held
  // and loaded (and, from G3 or G4, verified). A page that fails is invalidated: a miss from
  // then on.
  Result<std::vector<bool>> Get(std::span<const std::string> keys, std::span<const uint64_t> addresses,
                                uint64_t segment_bytes);
  bool Contains(std::string_view key);
  // How many keys from the start are held (G2, G3, or G4); recorded in the hit-rate metrics.
  size_t PrefixHits(std::span<const std::string> keys);
  // Drops every page of G2 and G3 (their pools are reset; the bytes stay until overwritten, and
  // are never served again). G4 is shared with other instances and left alone.
  Status Clear();

  PageConnectorStats stats() const;
  TierChainStats chain_stats() const;
  BlockPoolStats pool_stats(TierId tier) const;  // zeros for a tier that is off
  const std::shared_ptr<KvbmMetrics>& metrics() const { return metrics_; }
  uint16_t metrics_port() const;
  // Test access (the G3 file's descriptor, for corrupting it behind kvbm's back).
  int disk_fd() const;

 private:
  PageConnector(const KvbmConfig& config, PageConnectorOptions options, std::shared_ptr<KvbmMetrics> metrics);
  Status Build();  // at construction, under mu_
  BlockKey KeyOf(std::string_view key) const { return options_.key_of ? options_.key_of(key) : PageKey(key); }
  // Runs the chain's operations (plus `ops`) to completion on the worker. REQUIRES mu_ held.
  Result<std::vector<uint32_t>> RunStep(std::vector<TransferOp> ops);
  uint8_t* StagingPage(uint32_t i) const { return staging_->data() + uint64_t{i} * block_bytes(); }
  // What Put and Get share: each key's BlockKey and the pages per step (the staging area, at most
  // the first sized tier). REQUIRES mu_ held.
  struct Batch {
    std::vector<BlockKey> keys;
    size_t chunk = 1;
  };
  Batch PlanBatch(std::span<const std::string> keys) const;

  const KvbmConfig config_;
  const PageConnectorOptions options_;
  std::shared_ptr<KvbmMetrics> metrics_;
  uint32_t staging_pages_ = 1;

  mutable std::mutex mu_;
  std::unique_ptr<HostStorage> staging_;        // GUARDED_BY(mu_)
  std::unique_ptr<KvBlockManager> manager_;     // GUARDED_BY(mu_)
  std::unique_ptr<KvbmWorker> worker_;          // GUARDED_BY(mu_) declared after: destroyed first
  uint64_t step_ = 0;                           // GUARDED_BY(mu_)
  uint64_t next_op_id_ = 1;                     // GUARDED_BY(mu_)
  PageConnectorStats stats_;                    // GUARDED_BY(mu_)
};

}  // namespace kvbm
