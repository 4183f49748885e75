#include "kvbm/offload.h"

namespace kvbm {

DiskAdmissionFilter::DiskAdmissionFilter(std::chrono::seconds decay_period, size_t max_entries, SteadyClockFn clock)
    : decay_period_(decay_period), max_entries_(max_entries),
      clock_(clock ? std::move(clock) : [] { return std::chrono::steady_clock::now(); }),
      last_decay_(clock_()) {}

void DiskAdmissionFilter::MaybeDecay() {
  auto now = clock_();
  while (now - last_decay_ >= decay_period_) {
    last_decay_ += decay_period_;
    for (auto it = counts_.begin(); it != counts_.end();) {
      if (--it->second == 0) it = counts_.erase(it);
      else ++it;
    }
  }
}

bool DiskAdmissionFilter::SeeAndAdmit(SequenceHash hash) {
  MaybeDecay();
  auto it = counts_.find(hash);
  if (it == counts_.end()) {
    if (counts_.size() >= max_entries_) return false;
    counts_.emplace(hash, 1);
    return false;
  }
  // Doubling saturates well below overflow; the threshold is 2.
  if (it->second < (1u << 30)) it->second *= 2;
  return it->second >= 2;
}

uint32_t DiskAdmissionFilter::Count(SequenceHash hash) const {
  auto it = counts_.find(hash);
  return it == counts_.end() ? 0 : it->second;
}

}  // namespace kvbm
