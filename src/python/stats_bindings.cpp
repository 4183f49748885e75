// TransferCounters / AddTransferCounters (stats_bindings.h) and `kvbm._core.record_settings`.
#include "stats_bindings.h"

#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>

#include <array>
#include <map>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "bindings.h"
#include "kvbm/config.h"

namespace nb = nanobind;

namespace kvbm::python {
namespace {

[[noreturn]] void BadCounter(const std::string& message) {
  throw StatusException(Error(ErrorCode::kInvalidArgument, "worker counters: " + message));
}

constexpr size_t kBuckets = LatencyHistogram::kBounds.size() + 1;

std::string Label(size_t path) { return TransferPathLabel(static_cast<TransferPath>(path)); }

// What one name refers to in a KvbmMetrics; built once, used by both directions.
struct CounterRef {
  enum Kind { kBlocks, kBytes, kLatencyBucket, kLatencyCount, kLatencySum, kDroppedIo, kCorrupt, kDiskRecovery } kind;
  size_t path = 0;
  size_t bucket = 0;
};

const std::map<std::string, CounterRef>& CounterNames() {
  static const std::map<std::string, CounterRef> names = [] {
    std::map<std::string, CounterRef> n;
    for (size_t p = 0; p < kNumTransferPaths; ++p) {
      n["blocks_" + Label(p)] = {CounterRef::kBlocks, p, 0};
      n["bytes_" + Label(p)] = {CounterRef::kBytes, p, 0};
      for (size_t b = 0; b < kBuckets; ++b)
        n[fmt::format("latency_{}_bucket{}", Label(p), b)] = {CounterRef::kLatencyBucket, p, b};
      n["latency_" + Label(p) + "_count"] = {CounterRef::kLatencyCount, p, 0};
      n["latency_" + Label(p) + "_sum"] = {CounterRef::kLatencySum, p, 0};
    }
    n["dropped_io_error"] = {CounterRef::kDroppedIo, 0, 0};
    n["corrupt_blocks"] = {CounterRef::kCorrupt, 0, 0};
    for (size_t r = 0; r < kNumDiskRecoveryResults; ++r)
      n[std::string("disk_recovery_") + DiskRecoveryResultLabel(static_cast<DiskRecoveryResult>(r))] = {
          CounterRef::kDiskRecovery, r, 0};
    return n;
  }();
  return names;
}

}  // namespace

nb::dict TransferCounters(const KvbmMetrics& m) {
  nb::dict d;
  for (size_t p = 0; p < kNumTransferPaths; ++p) {
    d[("blocks_" + Label(p)).c_str()] = m.blocks[p].load();
    d[("bytes_" + Label(p)).c_str()] = m.bytes[p].load();
    LatencyHistogram::Snapshot s = m.latency[p].Read();
    for (size_t b = 0; b < kBuckets; ++b) d[fmt::format("latency_{}_bucket{}", Label(p), b).c_str()] = s.counts[b];
    d[("latency_" + Label(p) + "_count").c_str()] = s.count;
    d[("latency_" + Label(p) + "_sum").c_str()] = s.sum;
  }
  d["dropped_io_error"] = m.dropped_offloads[static_cast<size_t>(DropReason::kIoError)].load();
  d["corrupt_blocks"] = m.corrupt_blocks.load();
  for (size_t r = 0; r < kNumDiskRecoveryResults; ++r)
    d[(std::string("disk_recovery_") + DiskRecoveryResultLabel(static_cast<DiskRecoveryResult>(r))).c_str()] =
        m.disk_recovery_blocks[r].load();
  return d;
}

void AddTransferCounters(KvbmMetrics& m, const nb::dict& counters) {
  const auto& names = CounterNames();
  struct Parsed {
    CounterRef ref;
    uint64_t count;
    double sum;
  };
  std::vector<Parsed> parsed;
  for (auto [key, value] : counters) {
    std::string name = nb::cast<std::string>(nb::str(key));
    auto it = names.find(name);
    if (it == names.end())
      BadCounter(fmt::format("unknown counter \"{}\"", name));
    Parsed p{it->second, 0, 0.0};
    if (p.ref.kind == CounterRef::kLatencySum) {
      p.sum = nb::cast<double>(value);
      if (!(p.sum >= 0))
        BadCounter(fmt::format("\"{}\" must be >= 0", name));
    } else {
      int64_t v = nb::cast<int64_t>(value);
      if (v < 0)
        BadCounter(fmt::format("\"{}\" is {} (must be >= 0)", name, v));
      p.count = static_cast<uint64_t>(v);
    }
    parsed.push_back(p);
  }
  std::array<LatencyHistogram::Snapshot, kNumTransferPaths> latency{};
  std::array<bool, kNumTransferPaths> has_latency{};
  for (const Parsed& p : parsed) {
    switch (p.ref.kind) {
      case CounterRef::kBlocks: m.blocks[p.ref.path] += p.count; break;
      case CounterRef::kBytes: m.bytes[p.ref.path] += p.count; break;
      case CounterRef::kLatencyBucket:
        latency[p.ref.path].counts[p.ref.bucket] = p.count;
        has_latency[p.ref.path] = true;
        break;
      case CounterRef::kLatencyCount:
        latency[p.ref.path].count = p.count;
        has_latency[p.ref.path] = true;
        break;
      case CounterRef::kLatencySum:
        latency[p.ref.path].sum = p.sum;
        has_latency[p.ref.path] = true;
        break;
      case CounterRef::kDroppedIo: m.dropped_offloads[static_cast<size_t>(DropReason::kIoError)] += p.count; break;
      case CounterRef::kCorrupt: m.corrupt_blocks += p.count; break;
      case CounterRef::kDiskRecovery: m.disk_recovery_blocks[p.ref.path] += p.count; break;
    }
  }
  for (size_t p = 0; p < kNumTransferPaths; ++p)
    if (has_latency[p]) m.latency[p].Add(latency[p]);
}

}  // namespace kvbm::python

void BindStats(nb::module_& m) {
  using namespace nb::literals;
  m.def("record_settings",
        []() {
          kvbm::KvbmConfig c = kvbm::KvbmConfig::FromEnvironment();
          return nb::make_tuple(c.enable_record, c.record_path);
        },
        "(enabled, path) from DYN_KVBM_ENABLE_RECORD / DYN_KVBM_RECORD_PATH (path empty: the default).");
}
