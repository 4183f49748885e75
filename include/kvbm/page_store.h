// PageStore: blocks by key in kvbm's G2 (host memory) and G3 (disk file) tiers, for engines
// that hand kvbm pages under their own keys instead of requests with tokens (SGLang's HiCache
// storage backends: keys are SGLang's page hashes, data is its host pool).
//
// A block is `block_bytes` in kvbm's tier format ([layer][K|V][chunk], as in G2/G3 of the
// connector core); callers gather it from / scatter it to `segments_per_block` equal segments
// in that order. `block_format` is the layout fingerprint of those bytes (KvbmWorker::
// block_format()); the store holds blocks of exactly one format.
//
// Placement: Put fills a free host slot, or evicts the least recently used host block to the
// disk tier (or drops it when there is none; G3 evicts its LRU block the same way). Get reads
// host or disk; a disk read is verified (XXH3 of the bytes seeded with the key) and a block that
// does not verify is reported as missing, never served. Keys are content addresses: a Put of a
// key already held only refreshes it.
//
// Thread safety: every method may be called from any thread; one mutex serialises them (copies
// included). Ownership: the store owns its host allocation and its disk file.
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "kvbm/config.h"
#include "kvbm/error.h"
#include "kvbm/storage.h"

namespace kvbm {

struct PageStoreStats {
  uint64_t puts = 0, put_existing = 0, gets = 0, host_hits = 0, disk_hits = 0, misses = 0;
  uint64_t host_to_disk = 0, dropped = 0, corrupt = 0;
};

class PageStore {
 public:
  // Sizes G2/G3 from `config` (DYN_KVBM_CPU_CACHE_*, DYN_KVBM_DISK_CACHE_*) for this block
  // size. ConfigError when block_bytes is 0 or no tier is sized; IoError / ResourceExhausted
  // from the tiers, naming the setting.
  static Result<std::unique_ptr<PageStore>> Create(const KvbmConfig& config, uint64_t block_bytes,
                                                   std::string block_format);
  ~PageStore();

  uint64_t block_bytes() const { return block_bytes_; }
  const std::string& block_format() const { return format_; }
  uint64_t host_blocks() const { return host_blocks_; }
  uint64_t disk_blocks() const { return disk_blocks_; }

  // Stores each key's block, gathered from segments [i * per_block, (i + 1) * per_block) of
  // `addresses`, each `segment_bytes` long (per_block * segment_bytes must be block_bytes).
  // InvalidArgument on a size mismatch. Per key: true when the store holds it afterwards.
  Result<std::vector<bool>> Put(std::span<const uint64_t> keys, std::span<const uint64_t> addresses,
                                uint64_t segment_bytes);
  // Scatters each key's block into its segments. Per key: true when it was held and verified.
  Result<std::vector<bool>> Get(std::span<const uint64_t> keys, std::span<const uint64_t> addresses,
                                uint64_t segment_bytes);
  bool Contains(uint64_t key) const;
  // How many keys from the start are all held.
  size_t PrefixHits(std::span<const uint64_t> keys) const;
  void Clear();
  PageStoreStats stats() const;

 private:
  enum class Tier { kHost, kDisk };
  struct Entry {
    Tier tier;
    uint64_t slot;
    std::list<uint64_t>::iterator lru;
    uint64_t checksum = 0;  // disk only
  };
  PageStore(uint64_t block_bytes, std::string format) : block_bytes_(block_bytes), format_(std::move(format)) {}
  uint8_t* HostSlot(uint64_t slot) const { return host_->data() + slot * stride_; }
  // A free host slot, evicting to disk when none is free. REQUIRES mu_ held.
  std::optional<uint64_t> TakeHostSlot();
  std::optional<uint64_t> TakeDiskSlot();
  void Erase(uint64_t key);  // REQUIRES mu_ held

  const uint64_t block_bytes_;
  const std::string format_;
  uint64_t stride_ = 0;  // block_bytes_ rounded up to kDiskAlignment
  uint64_t host_blocks_ = 0, disk_blocks_ = 0;
  std::unique_ptr<HostStorage> host_;
  std::unique_ptr<DiskStorage> disk_;
  uint8_t* bounce_ = nullptr;  // one aligned block for disk reads

  mutable std::mutex mu_;
  std::unordered_map<uint64_t, Entry> entries_;   // GUARDED_BY(mu_)
  std::list<uint64_t> host_lru_, disk_lru_;       // GUARDED_BY(mu_) front = least recent
  std::vector<uint64_t> free_host_, free_disk_;   // GUARDED_BY(mu_)
  PageStoreStats stats_;                          // GUARDED_BY(mu_)
};

}  // namespace kvbm
