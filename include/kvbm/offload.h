// Offload policy pieces: the disk admission filter and the priority-ordered offload queue.
//
// DiskAdmissionFilter (the reference's parameters): a count per sequence hash starts at 1 on
// first sight and doubles on each later sight; a block is admitted to disk when its count is
// >= 2. Every `decay_period` all counts are decremented by one and zeros pruned; at most
// `max_entries` hashes are tracked (when full, new hashes are not tracked and not admitted).
// It keeps blocks that are never reused off the SSD.
//
// OffloadQueue: higher priority first, first in first out within a priority; bounded.
//
// Thread safety: both are used by the leader's thread only (thread-compatible).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <unordered_map>

#include "kvbm/types.h"

namespace kvbm {

using SteadyClockFn = std::function<std::chrono::steady_clock::time_point()>;

class DiskAdmissionFilter {
 public:
  explicit DiskAdmissionFilter(std::chrono::seconds decay_period = std::chrono::seconds(600),
                               size_t max_entries = 1'000'000, SteadyClockFn clock = nullptr);
  // Records a sight of `hash`; true when the block should be admitted to disk.
  bool SeeAndAdmit(SequenceHash hash);
  // Current count (0 when untracked), for tests.
  uint32_t Count(SequenceHash hash) const;
  size_t size() const { return counts_.size(); }

 private:
  void MaybeDecay();
  std::chrono::seconds decay_period_;
  size_t max_entries_;
  SteadyClockFn clock_;
  std::chrono::steady_clock::time_point last_decay_;
  std::unordered_map<SequenceHash, uint32_t> counts_;
};

template <typename T>
class OffloadQueue {
 public:
  explicit OffloadQueue(size_t capacity) : capacity_(capacity) {}
  // False when full (the caller drops and counts the offload).
  bool Push(uint32_t priority, T item) {
    if (items_.size() >= capacity_) return false;
    items_.emplace(Key{priority, seq_++}, std::move(item));
    return true;
  }
  std::optional<T> Pop() {
    if (items_.empty()) return std::nullopt;
    auto it = items_.begin();
    T item = std::move(it->second);
    items_.erase(it);
    return item;
  }
  size_t size() const { return items_.size(); }
  bool empty() const { return items_.empty(); }

 private:
  struct Key {
    uint32_t priority;
    uint64_t seq;
    bool operator<(const Key& o) const {
      return priority != o.priority ? priority > o.priority : seq < o.seq;  // high first, then FIFO
    }
  };
  size_t capacity_;
  uint64_t seq_ = 0;
  std::map<Key, T> items_;
};

}  // namespace kvbm
