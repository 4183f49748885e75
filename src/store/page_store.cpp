#include "kvbm/page_store.h"

#include <fmt/format.h>
#include <unistd.h>
#include <xxhash.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <optional>

namespace kvbm {

Result<std::unique_ptr<PageStore>> PageStore::Create(const KvbmConfig& config, uint64_t block_bytes,
                                                     std::string block_format) {
  if (block_bytes == 0) throw ConfigError("PageStore: block_bytes must be > 0");
  config.Validate();
  std::unique_ptr<PageStore> s(new PageStore(block_bytes, std::move(block_format)));
  s->stride_ = (block_bytes + kDiskAlignment - 1) / kDiskAlignment * kDiskAlignment;
  s->host_blocks_ = config.HostBlocks(block_bytes);
  s->disk_blocks_ = config.DiskBlocks(block_bytes);
  if (s->host_blocks_ == 0 && s->disk_blocks_ == 0)
    throw ConfigError("PageStore: neither G2 (DYN_KVBM_CPU_CACHE_*) nor G3 (DYN_KVBM_DISK_CACHE_*) is sized");
  if (s->host_blocks_ == 0) {
    // Every Put stages through host memory; without G2 keep one slot as the staging area.
    s->host_blocks_ = 1;
  }
  auto host = HostStorage::Allocate(s->host_blocks_ * s->stride_);
  if (!host)
    return MakeError(host.error().code(), fmt::format("PageStore G2 ({} blocks, from DYN_KVBM_CPU_CACHE_*): {}",
                                                      s->host_blocks_, host.error().message()));
  s->host_ = std::move(*host);
  if (s->disk_blocks_ > 0) {
    auto disk = DiskStorage::Create(DiskStorageOptions::FromConfig(config), s->disk_blocks_ * s->stride_);
    if (!disk)
      return MakeError(disk.error().code(), fmt::format("PageStore G3 ({} blocks, from DYN_KVBM_DISK_CACHE_*): {}",
                                                        s->disk_blocks_, disk.error().message()));
    s->disk_ = std::move(*disk);
    s->bounce_ = static_cast<uint8_t*>(std::aligned_alloc(kDiskAlignment, s->stride_));
    if (!s->bounce_) return MakeError(ErrorCode::kResourceExhausted, "PageStore: no memory for the disk bounce buffer");
  }
  for (uint64_t i = s->host_blocks_; i-- > 0;) s->free_host_.push_back(i);
  for (uint64_t i = s->disk_blocks_; i-- > 0;) s->free_disk_.push_back(i);
  return s;
}

PageStore::~PageStore() { std::free(bounce_); }

std::optional<uint64_t> PageStore::TakeDiskSlot() {
  if (!disk_) return std::nullopt;
  if (free_disk_.empty()) {
    if (disk_lru_.empty()) return std::nullopt;
    uint64_t victim = disk_lru_.front();
    ++stats_.dropped;
    Erase(victim);
  }
  uint64_t slot = free_disk_.back();
  free_disk_.pop_back();
  return slot;
}

std::optional<uint64_t> PageStore::TakeHostSlot() {
  if (free_host_.empty()) {
    if (host_lru_.empty()) return std::nullopt;
    uint64_t victim = host_lru_.front();
    Entry& e = entries_.at(victim);
    std::optional<uint64_t> dslot = TakeDiskSlot();
    bool moved = false;
    if (dslot) {
      const uint8_t* src = HostSlot(e.slot);
      ssize_t n = ::pwrite(disk_->fd(), src, stride_, static_cast<off_t>(*dslot * stride_));
      if (n == static_cast<ssize_t>(stride_)) {
        uint64_t host_slot = e.slot;
        host_lru_.erase(e.lru);
        disk_lru_.push_back(victim);
        e = Entry{Tier::kDisk, *dslot, std::prev(disk_lru_.end()), XXH3_64bits_withSeed(src, block_bytes_, victim)};
        free_host_.push_back(host_slot);
        ++stats_.host_to_disk;
        moved = true;
      } else {
        free_disk_.push_back(*dslot);
      }
    }
    if (!moved) {
      ++stats_.dropped;
      Erase(victim);
    }
  }
  uint64_t slot = free_host_.back();
  free_host_.pop_back();
  return slot;
}

void PageStore::Erase(uint64_t key) {
  auto it = entries_.find(key);
  if (it == entries_.end()) return;
  if (it->second.tier == Tier::kHost) {
    host_lru_.erase(it->second.lru);
    free_host_.push_back(it->second.slot);
  } else {
    disk_lru_.erase(it->second.lru);
    free_disk_.push_back(it->second.slot);
  }
  entries_.erase(it);
}

namespace {

Status CheckSegments(size_t keys, size_t addresses, uint64_t segment_bytes, uint64_t block_bytes) {
  if (keys == 0) return {};
  if (segment_bytes == 0 || addresses % keys != 0 || (addresses / keys) * segment_bytes != block_bytes)
    return MakeError(ErrorCode::kInvalidArgument,
                     fmt::format("PageStore: {} keys with {} segments of {} bytes do not make blocks of {} bytes", keys,
                                 addresses, segment_bytes, block_bytes));
  return {};
}

}  // namespace

Result<std::vector<bool>> PageStore::Put(std::span<const uint64_t> keys, std::span<const uint64_t> addresses,
                                         uint64_t segment_bytes) {
  if (auto st = CheckSegments(keys.size(), addresses.size(), segment_bytes, block_bytes_); !st)
    return std::unexpected(st.error());
  std::vector<bool> out(keys.size(), false);
  const size_t per = keys.empty() ? 0 : addresses.size() / keys.size();
  std::lock_guard lock(mu_);
  for (size_t i = 0; i < keys.size(); ++i) {
    ++stats_.puts;
    auto it = entries_.find(keys[i]);
    if (it != entries_.end()) {
      ++stats_.put_existing;
      auto& lru = it->second.tier == Tier::kHost ? host_lru_ : disk_lru_;
      lru.splice(lru.end(), lru, it->second.lru);
      out[i] = true;
      continue;
    }
    std::optional<uint64_t> slot = TakeHostSlot();
    if (!slot) continue;
    uint8_t* dst = HostSlot(*slot);
    for (size_t s = 0; s < per; ++s)
      std::memcpy(dst + s * segment_bytes, reinterpret_cast<const void*>(addresses[i * per + s]), segment_bytes);
    host_lru_.push_back(keys[i]);
    entries_[keys[i]] = Entry{Tier::kHost, *slot, std::prev(host_lru_.end())};
    out[i] = true;
  }
  return out;
}

Result<std::vector<bool>> PageStore::Get(std::span<const uint64_t> keys, std::span<const uint64_t> addresses,
                                         uint64_t segment_bytes) {
  if (auto st = CheckSegments(keys.size(), addresses.size(), segment_bytes, block_bytes_); !st)
    return std::unexpected(st.error());
  std::vector<bool> out(keys.size(), false);
  const size_t per = keys.empty() ? 0 : addresses.size() / keys.size();
  std::lock_guard lock(mu_);
  for (size_t i = 0; i < keys.size(); ++i) {
    ++stats_.gets;
    auto it = entries_.find(keys[i]);
    if (it == entries_.end()) {
      ++stats_.misses;
      continue;
    }
    const uint8_t* src;
    if (it->second.tier == Tier::kHost) {
      src = HostSlot(it->second.slot);
      host_lru_.splice(host_lru_.end(), host_lru_, it->second.lru);
      ++stats_.host_hits;
    } else {
      ssize_t n = ::pread(disk_->fd(), bounce_, stride_, static_cast<off_t>(it->second.slot * stride_));
      if (n != static_cast<ssize_t>(stride_) ||
          XXH3_64bits_withSeed(bounce_, block_bytes_, keys[i]) != it->second.checksum) {
        ++stats_.corrupt;
        Erase(keys[i]);  // never served, and not found again
        continue;
      }
      src = bounce_;
      disk_lru_.splice(disk_lru_.end(), disk_lru_, it->second.lru);
      ++stats_.disk_hits;
    }
    for (size_t s = 0; s < per; ++s)
      std::memcpy(reinterpret_cast<void*>(addresses[i * per + s]), src + s * segment_bytes, segment_bytes);
    out[i] = true;
  }
  return out;
}

bool PageStore::Contains(uint64_t key) const {
  std::lock_guard lock(mu_);
  return entries_.contains(key);
}

size_t PageStore::PrefixHits(std::span<const uint64_t> keys) const {
  std::lock_guard lock(mu_);
  size_t n = 0;
  while (n < keys.size() && entries_.contains(keys[n])) ++n;
  return n;
}

void PageStore::Clear() {
  std::lock_guard lock(mu_);
  while (!entries_.empty()) Erase(entries_.begin()->first);
}

PageStoreStats PageStore::stats() const {
  std::lock_guard lock(mu_);
  return stats_;
}

}  // namespace kvbm
