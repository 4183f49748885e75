#include "kvbm/metrics.h"

namespace kvbm {

const char* TransferPathLabel(TransferPath path) {
  switch (path) {
    case TransferPath::kD2H: return "d2h";
    case TransferPath::kH2D_Disk: return "h2disk";
    case TransferPath::kD2D: return "d2disk";
    case TransferPath::kH2Dev: return "h2d";
    case TransferPath::kDisk2Dev: return "disk2d";
    case TransferPath::kDisk2H: return "disk2h";
    case TransferPath::kH2Remote: return "h2remote";
    case TransferPath::kRemote2H: return "remote2h";
    case TransferPath::kCount: break;
  }
  return "unknown";
}

const char* DropReasonLabel(DropReason reason) {
  switch (reason) {
    case DropReason::kTargetFull: return "target_full";
    case DropReason::kFilter: return "admission_filter";
    case DropReason::kPriority: return "priority";
    case DropReason::kIoError: return "io_error";
    case DropReason::kQueueFull: return "queue_full";
    case DropReason::kCount: break;
  }
  return "unknown";
}

const char* BypassReasonLabel(BypassReason reason) {
  switch (reason) {
    case BypassReason::kMultimodal: return "multimodal";
    case BypassReason::kPromptEmbeds: return "prompt_embeds";
    case BypassReason::kUnknownInput: return "unknown_input";
    case BypassReason::kCount: break;
  }
  return "unknown";
}

std::optional<BypassReason> BypassReasonFromLabel(std::string_view label) {
  for (size_t r = 0; r < kNumBypassReasons; ++r) {
    if (label == BypassReasonLabel(static_cast<BypassReason>(r))) return static_cast<BypassReason>(r);
  }
  return std::nullopt;
}

const char* DiskRecoveryResultLabel(DiskRecoveryResult result) {
  switch (result) {
    case DiskRecoveryResult::kVerified: return "verified";
    case DiskRecoveryResult::kTorn: return "torn";
    case DiskRecoveryResult::kCorrupt: return "corrupt";
    case DiskRecoveryResult::kOtherLayout: return "other_layout";
    case DiskRecoveryResult::kDuplicate: return "duplicate";
    case DiskRecoveryResult::kCount: break;
  }
  return "unknown";
}

void LatencyHistogram::Observe(double seconds) {
  std::lock_guard lock(mu_);
  size_t i = 0;
  while (i < kBounds.size() && seconds > kBounds[i]) ++i;
  ++data_.counts[i];
  ++data_.count;
  data_.sum += seconds;
}

void LatencyHistogram::Add(const Snapshot& other) {
  std::lock_guard lock(mu_);
  for (size_t i = 0; i < data_.counts.size(); ++i) data_.counts[i] += other.counts[i];
  data_.count += other.count;
  data_.sum += other.sum;
}

LatencyHistogram::Snapshot LatencyHistogram::Read() const {
  std::lock_guard lock(mu_);
  return data_;
}

void WindowedHitRate::Record(uint64_t queried, uint64_t hit) {
  std::lock_guard lock(mu_);
  window_.emplace_back(queried, hit);
  queried_ += queried;
  hit_ += hit;
  while (window_.size() > max_requests_) {
    queried_ -= window_.front().first;
    hit_ -= window_.front().second;
    window_.pop_front();
  }
}

double WindowedHitRate::Rate() const {
  std::lock_guard lock(mu_);
  return queried_ == 0 ? 0.0 : static_cast<double>(hit_) / static_cast<double>(queried_);
}

}  // namespace kvbm
