#include <cstring>

#include <xxhash.h>

#include "kvbm/log.h"
#include "kvbm/storage.h"
#include "kvbm/transfer.h"

namespace kvbm {

void CopyBlockBytes(const TierMemory& src, uint32_t src_block, const TierMemory& dst, uint32_t dst_block) {
  const LayoutDims& d = src.layout->dims();
  if (src.layout->block_is_contiguous() && dst.layout->block_is_contiguous()) {
    std::memcpy(dst.ChunkAddress(dst_block, 0, 0), src.ChunkAddress(src_block, 0, 0), d.block_bytes());
    return;
  }
  // Gather/scatter chunk by chunk; chunks are contiguous in every layout.
  for (uint64_t l = 0; l < d.num_layers; ++l)
    for (uint64_t o = 0; o < d.outer_dim; ++o)
      std::memcpy(dst.ChunkAddress(dst_block, l, o), src.ChunkAddress(src_block, l, o), d.chunk_bytes());
}

DiskSideData::DiskSideData(uint64_t num_blocks, DiskSlotRecords* records, const DiskRecovery& recovery)
    : entries_(num_blocks), records_(records) {
  for (const RecoveredDiskBlock& b : recovery.blocks)
    if (b.slot < entries_.size()) entries_[b.slot] = {b.sequence_hash, b.checksum, true};
}

namespace {
// A record that could not be written only costs the block after a restart (its record stays
// "writing", so it is dropped as torn); the running process keeps serving it from memory.
void ReportRecordError(std::atomic<uint64_t>& errors, const Status& st) {
  if (st) return;
  if (errors.fetch_add(1, std::memory_order_relaxed) == 0)
    Log(LogLevel::kWarn, "persistent disk tier: a slot record was not written ({}); such blocks are not "
                         "recovered after a restart", st.error().message());
}
}  // namespace

void DiskSideData::Set(uint32_t slot, SequenceHash hash, uint64_t checksum, const DiskBlockLineage& lineage) {
  std::lock_guard lock(mu_);
  // Persisted before the in-memory entry turns valid; the data write has completed already.
  if (records_ != nullptr)
    ReportRecordError(record_errors_, records_->MarkValid(slot, hash.value(), checksum, lineage));
  entries_.at(slot) = {hash.value(), checksum, true};
}

void DiskSideData::Invalidate(uint32_t slot) {
  std::lock_guard lock(mu_);
  entries_.at(slot).valid = false;
  if (records_ != nullptr) ReportRecordError(record_errors_, records_->MarkWriting(slot));
}

uint64_t DiskSideData::Checksum(SequenceHash hash, const uint8_t* bytes, uint64_t length) {
  return DiskBlockChecksum(hash.value(), bytes, length);
}

Status DiskSideData::Verify(uint32_t slot, SequenceHash expected, const uint8_t* bytes, uint64_t length) const {
  Entry e;
  {
    std::lock_guard lock(mu_);
    if (slot >= entries_.size())
      return MakeError(ErrorCode::kInvalidArgument, "disk slot out of range");
    e = entries_[slot];
  }
  if (!e.valid) return MakeError(ErrorCode::kCorrupt, "disk slot " + std::to_string(slot) + " holds no verified block");
  if (e.hash != expected.value())
    return MakeError(ErrorCode::kCorrupt, "disk slot " + std::to_string(slot) + " holds another block");
  if (Checksum(expected, bytes, length) != e.checksum)
    return MakeError(ErrorCode::kCorrupt, "disk slot " + std::to_string(slot) + " checksum mismatch (overwritten or torn)");
  return {};
}

TransferResult TransferCompletion::Wait() const {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return done_.load(std::memory_order_acquire); });
  return result_;
}

void TransferCompletion::OnDone(std::function<void(const TransferResult&)> fn) {
  {
    std::lock_guard lock(mu_);
    if (!done_.load(std::memory_order_acquire)) {
      callbacks_.push_back(std::move(fn));
      return;
    }
  }
  fn(result_);
}

void TransferCompletion::Finish(TransferResult result) {
  std::vector<std::function<void(const TransferResult&)>> callbacks;
  {
    std::lock_guard lock(mu_);
    if (done_.load()) return;
    result_ = std::move(result);
    done_.store(true, std::memory_order_release);
    callbacks.swap(callbacks_);
  }
  cv_.notify_all();
  for (auto& cb : callbacks) cb(result_);
}

}  // namespace kvbm
