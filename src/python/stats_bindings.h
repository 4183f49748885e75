// Worker counters carried to the leader's process (internal to the extension).
//
// In an engine whose workers run in other processes than its scheduler (vLLM's OpenAI server:
// the engine core and each worker are processes of their own), the transfer counters a worker
// updates (blocks and bytes per path, transfer latency, I/O drops, corrupt blocks) live in the
// worker's KvbmMetrics, while the Prometheus endpoint serves the leader's. The engine adapter
// reads `TransferCounters` in the worker, sends the difference since its last report through
// the engine's own stats channel, and the leader folds it in with `AddTransferCounters`.
//
// The counters travel as a flat dict of str -> int (float for latency sums): plain data that
// every engine can serialise, and that sums key by key when reports are aggregated.
#pragma once

#include <nanobind/nanobind.h>

#include "kvbm/metrics.h"

namespace kvbm::python {

// Every counter of `metrics` that a worker updates, by name.
nanobind::dict TransferCounters(const KvbmMetrics& metrics);

// Adds `counters` (a TransferCounters dict or a difference of two) to `metrics`. Unknown keys
// and negative values raise InvalidArgumentError: a report that does not parse is not folded in
// part.
void AddTransferCounters(KvbmMetrics& metrics, const nanobind::dict& counters);

}  // namespace kvbm::python
