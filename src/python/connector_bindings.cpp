// Bindings of the connector core: the leader side (KvBlockManager + ConnectorLeader) and the
// worker side (KvbmWorker). Engine adapters in python/kvbm/*_integration are thin layers over
// these. Every call that can block releases the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <map>
#include <mutex>

#include "bindings.h"
#include "kvbm/leader.h"
#include "stats_bindings.h"
#include "kvbm/manager.h"
#include "kvbm/remote_tier.h"
#include "kvbm/observability.h"
#include "kvbm/worker.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvbm::python {
namespace {

// One metrics object per process, shared by the leader and worker of a single-process engine
// so that one endpoint shows both sides.
std::shared_ptr<KvbmMetrics> ProcessMetrics(size_t window) {
  static std::mutex mu;
  static std::shared_ptr<KvbmMetrics> metrics;
  std::lock_guard lock(mu);
  if (!metrics) metrics = std::make_shared<KvbmMetrics>(window);
  return metrics;
}

KvbmConfig ConfigFrom(const std::optional<std::map<std::string, std::string>>& env) {
  if (env) return KvbmConfig::FromMap(*env);
  KvbmConfig config = KvbmConfig::FromEnvironment();
  config.LogNoticesOnce();  // the process's own settings: say which of them do nothing here
  return config;
}


nb::dict MetricsDict(const KvbmMetrics& m) {
  nb::dict d;
  for (size_t p = 0; p < kNumTransferPaths; ++p) {
    std::string label = TransferPathLabel(static_cast<TransferPath>(p));
    d[("blocks_" + label).c_str()] = m.blocks[p].load();
    d[("bytes_" + label).c_str()] = m.bytes[p].load();
  }
  for (size_t r = 0; r < kNumDropReasons; ++r)
    d[(std::string("dropped_") + DropReasonLabel(static_cast<DropReason>(r))).c_str()] = m.dropped_offloads[r].load();
  for (size_t r = 0; r < kNumBypassReasons; ++r)
    d[(std::string("bypassed_") + BypassReasonLabel(static_cast<BypassReason>(r))).c_str()] =
        m.bypassed_requests[r].load();
  d["read_skipped_requests"] = m.read_skipped_requests.load();
  d["matched_tokens"] = m.matched_tokens.load();
  d["requested_tokens"] = m.requested_tokens.load();
  d["load_errors"] = m.load_errors.load();
  d["corrupt_blocks"] = m.corrupt_blocks.load();
  d["remote_hit_blocks"] = m.remote_hit_blocks.load();
  d["remote_miss_blocks"] = m.remote_miss_blocks.load();
  d["remote_verify_failures"] = m.remote_verify_failures.load();
  d["remote_errors"] = m.remote_errors.load();
  d["disk_writes_avoided"] = m.disk_writes_avoided.load();
  d["disk_restored_blocks"] = m.disk_restored_blocks.load();
  for (size_t r = 0; r < kNumDiskRecoveryResults; ++r)
    d[(std::string("disk_recovery_") + DiskRecoveryResultLabel(static_cast<DiskRecoveryResult>(r))).c_str()] =
        m.disk_recovery_blocks[r].load();
  d["host_hit_rate"] = m.host_hit_rate.Rate();
  d["disk_hit_rate"] = m.disk_hit_rate.Rate();
  return d;
}

// A pool's counters and its eviction policy's name ("policy"); empty when the tier is off.
nb::dict PoolDict(BlockPool* pool) {
  if (!pool) return nb::dict();
  nb::dict d = PoolStatsDict(pool->stats());
  d["policy"] = std::string(pool->policy_name());
  return d;
}

class PyLeader {
 public:
  PyLeader(uint32_t page_size, uint64_t bytes_per_block, std::optional<std::string> policy,
           std::optional<uint64_t> host_blocks, std::optional<uint64_t> disk_blocks,
           std::optional<std::map<std::string, std::string>> env, bool shared_metrics,
           const std::string& remote_descriptor, uint32_t world_size, bool sync_loads) {
    KvbmConfig config = ConfigFrom(env);
    if (page_size == 0) throw ConfigError("kvbm leader: page_size (engine block size) must be > 0");
    std::optional<EvictionPolicy> p;
    if (policy) p = PolicyFromName(*policy);
    auto tiers =
        TierChainOptions::FromConfig(config, bytes_per_block, host_blocks, disk_blocks, p, remote_descriptor, world_size);
    auto metrics = shared_metrics ? ProcessMetrics(config.cache_stats_max_requests)
                                  : std::make_shared<KvbmMetrics>(config.cache_stats_max_requests);
    manager_ = std::make_unique<KvBlockManager>(config, tiers, page_size, metrics);
    leader_ = std::make_unique<ConnectorLeader>(manager_->chain(), config, page_size, metrics);
    // DYN_KVBM_SYNC_LOAD_MAX_MB is per rank: the ranks copy their shards in parallel.
    const uint64_t per_rank = world_size ? bytes_per_block / world_size : 0;
    if (sync_loads && per_rank) leader_->SetSyncLoadMaxBlocks(config.sync_load_max_mb * 1'000'000 / per_rank);
  }
  ~PyLeader() {
    leader_.reset();  // its pins go before the manager's observability
    manager_.reset();
  }
  ConnectorLeader& leader() { return *leader_; }
  KvBlockManager& manager() { return *manager_; }

 private:
  std::unique_ptr<KvBlockManager> manager_;
  std::unique_ptr<ConnectorLeader> leader_;
};

class PyWorker {
 public:
  PyWorker(uint32_t rank, uint32_t world_size, std::optional<std::map<std::string, std::string>> env, bool shared_metrics) {
    config_ = ConfigFrom(env);
    world_size_ = world_size;
    auto metrics = shared_metrics ? ProcessMetrics(config_.cache_stats_max_requests) : nullptr;
    worker_ = std::make_unique<KvbmWorker>(config_, rank, world_size, metrics);
  }
  KvbmWorker& w() { return *worker_; }
  const KvbmConfig& config() const { return config_; }
  uint32_t world_size() const { return world_size_; }

 private:
  KvbmConfig config_;
  uint32_t world_size_ = 1;
  std::unique_ptr<KvbmWorker> worker_;
};

}  // namespace
}  // namespace kvbm::python

void BindConnector(nb::module_& m) {
  using namespace kvbm;
  using namespace kvbm::python;

  nb::class_<PyLeader>(m, "Leader",
                       "Leader side of the connector core (scheduler process): pools, policy, per-request slots.")
      .def(nb::init<uint32_t, uint64_t, std::optional<std::string>, std::optional<uint64_t>, std::optional<uint64_t>,
                    std::optional<std::map<std::string, std::string>>, bool, const std::string&, uint32_t, bool>(),
           "page_size"_a, "bytes_per_block"_a, "policy"_a = nb::none(), "host_blocks"_a = nb::none(),
           "disk_blocks"_a = nb::none(), "env"_a = nb::none(), "shared_metrics"_a = true,
           "remote_descriptor"_a = "", "world_size"_a = 1, "sync_loads"_a = false,
           "sync_loads: the engine can take synchronous loads (G2-only, up to DYN_KVBM_SYNC_LOAD_MAX_MB per rank); "
           "get_num_new_matched_tokens then answers async=False for them.")
      .def_prop_rw(
          "sync_load_max_blocks", [](PyLeader& l) { return l.leader().sync_load_max_blocks(); },
          [](PyLeader& l, uint64_t n) { l.leader().SetSyncLoadMaxBlocks(n); },
          "G2-only loads of at most this many blocks are synchronous (0: none); set from "
          "DYN_KVBM_SYNC_LOAD_MAX_MB when the engine takes synchronous loads")
      .def_prop_ro("has_remote", [](PyLeader& l) { return l.leader().chain().remote() != nullptr; })
      .def_prop_ro("host_blocks", [](PyLeader& l) { return l.leader().host_blocks(); })
      .def_prop_ro("disk_blocks", [](PyLeader& l) { return l.leader().disk_blocks(); })
      .def_prop_ro("page_size", [](PyLeader& l) { return l.leader().page_size(); })
      .def_prop_ro("metrics_port", [](PyLeader& l) { return l.manager().metrics_port(); })
      .def_prop_ro("events_endpoint", [](PyLeader& l) { return l.manager().events_endpoint(); })
      .def("add_request",
           [](PyLeader& l, const std::string& id, const std::vector<Token>& tokens, std::optional<std::string> salt,
              std::optional<std::string> lora, uint32_t priority, const BlockExtraKeys* extra) {
             l.leader().AddRequest(id, tokens, salt, lora, priority, extra ? *extra : BlockExtraKeys{});
           },
           "request_id"_a, "tokens"_a, "salt"_a = nb::none(), "lora_name"_a = nb::none(), "priority"_a = 0,
           "extra_keys"_a = nb::none())
      .def("count_bypass",
           [](PyLeader& l, const std::string& reason) {
             auto r = BypassReasonFromLabel(reason);
             if (!r) throw nb::value_error(("kvbm: unknown bypass reason '" + reason + "'").c_str());
             ++l.leader().metrics()->bypassed_requests[static_cast<size_t>(*r)];
           },
           "reason"_a, "Counts a request left alone (kvbm_bypassed_requests{reason}): 'multimodal', "
           "'prompt_embeds' or 'unknown_input'")
      .def("count_read_skipped", [](PyLeader& l) { ++l.leader().metrics()->read_skipped_requests; },
           "Counts a request that must not read cached KV (kvbm_read_skipped_requests)")
      .def("has_request", [](PyLeader& l, const std::string& id) { return l.leader().HasRequest(id); })
      .def("num_tokens", [](PyLeader& l, const std::string& id) { return l.leader().NumTokens(id); })
      .def("extend_tokens", [](PyLeader& l, const std::string& id, const std::vector<Token>& tokens) {
        ThrowIfError(l.leader().ExtendTokens(id, tokens));
      })
      .def("get_num_new_matched_tokens",
           [](PyLeader& l, const std::string& id, uint64_t num_computed) {
             MatchResult r = ThrowIfError(l.leader().GetNumNewMatchedTokens(id, num_computed));
             return nb::make_tuple(r.external_tokens, r.async, r.host_blocks, r.disk_blocks);
           },
           "request_id"_a, "num_computed_tokens"_a,
           "(external_tokens, async, host_blocks, disk_blocks); no side effects on the pools.")
      .def("update_state_after_alloc",
           [](PyLeader& l, const std::string& id, const std::vector<uint32_t>& blocks, uint64_t n) {
             ThrowIfError(l.leader().UpdateStateAfterAlloc(id, blocks, n));
           },
           "request_id"_a, "block_ids"_a, "num_external_tokens"_a)
      .def("on_scheduled",
           [](PyLeader& l, const std::string& id, const std::vector<uint32_t>& blocks, uint64_t computed, uint64_t scheduled) {
             ThrowIfError(l.leader().OnScheduled(id, blocks, computed, scheduled));
           },
           "request_id"_a, "block_ids"_a, "num_computed_tokens"_a, "num_scheduled_tokens"_a)
      .def("skip_stores",
           [](PyLeader& l, const std::string& id, uint64_t first_block) {
             ThrowIfError(l.leader().SkipStores(id, first_block));
           },
           "request_id"_a, "first_block"_a,
           "Blocks before first_block are never stored for the request (a sliding-window group's blocks "
           "outside the window of every later hit).")
      .def("on_preempted", [](PyLeader& l, const std::string& id) { l.leader().OnPreempted(id); })
      .def("build_step_metadata",
           [](PyLeader& l) {
             std::string bytes = l.leader().BuildStepMetadataBytes();
             return nb::bytes(bytes.data(), bytes.size());
           })
      .def("on_worker_output",
           [](PyLeader& l, const std::vector<std::string>& recving, const std::vector<std::string>& sending,
              const std::vector<uint32_t>& invalid) { l.leader().OnWorkerOutput(recving, sending, invalid); },
           "finished_recving"_a, "finished_sending"_a, "invalid_block_ids"_a)
      .def("request_finished", [](PyLeader& l, const std::string& id) { return l.leader().RequestFinished(id); })
      .def("is_loading", [](PyLeader& l, const std::string& id) { return l.leader().IsLoading(id); })
      .def("num_slots", [](PyLeader& l) { return l.leader().num_slots(); })
      .def("pool_stats",
           [](PyLeader& l, const std::string& tier) {
             if (tier == "host") return PoolDict(l.leader().host_pool());
             if (tier == "disk") return PoolDict(l.leader().disk_pool());
             throw ConfigError("tier must be 'host' or 'disk'");
           })
      .def("stats",
           [](PyLeader& l) {
             const LeaderStats& r = l.leader().stats();
             const TierChainStats& s = l.leader().chain().stats();
             nb::dict d;
             d["requests"] = r.requests;
             d["matched_tokens"] = r.matched_tokens;
             d["requested_tokens"] = r.requested_tokens;
             d["promote_host_blocks"] = s.promote_host_blocks;
             d["onboard_remote_blocks"] = s.onboard_remote_blocks;
             d["offload_remote_blocks"] = s.offload_remote_blocks;
             d["onboard_host_blocks"] = s.onboard_host_blocks;
             d["onboard_disk_blocks"] = s.onboard_disk_blocks;
             d["store_host_blocks"] = s.store_host_blocks;
             d["store_disk_blocks"] = s.store_disk_blocks;
             d["offload_disk_blocks"] = s.offload_disk_blocks;
             d["skipped_cached_blocks"] = s.skipped_cached_blocks;
             d["dropped_full"] = s.dropped_full;
             d["dropped_filter"] = s.dropped_filter;
             d["dropped_queue"] = s.dropped_queue;
             d["load_errors"] = s.load_errors;
             d["onboard_missing_blocks"] = s.onboard_missing_blocks;
             d["restored_disk_blocks"] = s.restored_disk_blocks;
             return d;
           })
      .def("metrics", [](PyLeader& l) { return MetricsDict(*l.manager().metrics()); })
      .def("add_worker_counters", [](PyLeader& l, const nb::dict& c) { AddTransferCounters(*l.manager().metrics(), c); },
           "counters"_a,
           "Folds a worker process's transfer counters (Worker.transfer_counters(), or a difference of two) "
           "into this leader's metrics, so that its endpoint shows the workers' offloads and onboards.")
      .def("prometheus_text", [](PyLeader& l) { return RenderPrometheusText(*l.manager().metrics()); });

  nb::class_<PyWorker>(m, "Worker", "Worker side of the connector core: owns G2/G3 memory and moves bytes.")
      .def(nb::init<uint32_t, uint32_t, std::optional<std::map<std::string, std::string>>, bool>(), "rank"_a = 0,
           "world_size"_a = 1, "env"_a = nb::none(), "shared_metrics"_a = true)
      .def("register_kv_caches",
           [](PyWorker& w, const std::vector<uintptr_t>& pointers, const std::vector<std::vector<int64_t>>& shapes,
              const std::vector<std::vector<int64_t>>& strides, uint64_t dtype_bytes, uint64_t num_blocks,
              uint64_t page_size, bool on_device, int device_index, bool pool, const std::string& element_order) {
             if (shapes.size() != strides.size()) throw ConfigError("register_kv_caches: shapes and strides differ in length");
             DeviceTensors t;
             t.pool = pool;
             t.element_order = element_order;
             t.layer_pointers = pointers;
             for (size_t i = 0; i < shapes.size(); ++i) t.layer_shapes.push_back({shapes[i], strides[i], dtype_bytes});
             t.num_blocks = num_blocks;
             t.page_size = page_size;
             t.kind = on_device ? MemoryKind::kDevice : MemoryKind::kHost;
             t.device_index = device_index;
             ThrowIfError(w.w().RegisterKvCaches(t));
           },
           "layer_pointers"_a, "shapes"_a, "strides"_a, "dtype_bytes"_a, "num_blocks"_a, "page_size"_a,
           "on_device"_a = false, "device_index"_a = -1, "pool"_a = false, "element_order"_a = "",
           "pool=True: one tensor [num_blocks, num_layers, kv_factor, ...] holding every layer (TensorRT-LLM). "
           "element_order: how a chunk's elements are ordered (part of the layout fingerprint).")
      .def_prop_ro("block_format", [](PyWorker& w) { return w.w().block_format(); })
      .def_prop_ro("tier_block_format", [](PyWorker& w) { return w.w().tier_block_format(); })
      .def_prop_ro("bytes_per_block", [](PyWorker& w) { return w.w().bytes_per_block(); })
      .def_prop_ro("device_blocks", [](PyWorker& w) { return w.w().device_blocks(); })
      .def_prop_ro("host_blocks", [](PyWorker& w) { return w.w().host_blocks(); })
      .def_prop_ro("disk_blocks", [](PyWorker& w) { return w.w().disk_blocks(); })
      .def_prop_ro("layout", [](PyWorker& w) {
        return w.w().device_layout() ? w.w().device_layout()->Describe() : std::string();
      })
      .def("allocate_tiers",
           [](PyWorker& w, uint64_t host, uint64_t disk, const std::string& descriptor) {
             ThrowIfError(w.w().AllocateTiers(host, disk, descriptor));
           },
           "host_blocks"_a, "disk_blocks"_a, "descriptor"_a = "", nb::call_guard<nb::gil_scoped_release>(),
           "Allocates G2/G3. `descriptor`: the model description the leader was given (model, KV dtype, block "
           "size); with DYN_KVBM_DISK_PERSISTENT it names this rank's G3 file and is required.")
      .def("connect_remote",
           [](PyWorker& w, const std::string& descriptor) {
             auto o = RemoteTierOptions::FromConfig(w.config(), descriptor, w.world_size());
             if (!o) return false;
             Status s;
             {
               nb::gil_scoped_release release;
               s = w.w().ConnectRemote(*o);
             }
             ThrowIfError(s);
             return w.w().has_remote();
           },
           "descriptor"_a,
           "Connects this rank to G4 when DYN_KVBM_REMOTE_URL is set (False when it is not, or when G4 is "
           "unreachable and DYN_KVBM_REMOTE_REQUIRED is not set). `descriptor`: the same model description the "
           "leader was given.")
      .def_prop_ro("has_remote", [](PyWorker& w) { return w.w().has_remote(); })
      .def("bind_step",
           [](PyWorker& w, nb::bytes meta) {
             std::span<const uint8_t> bytes(reinterpret_cast<const uint8_t*>(meta.c_str()), meta.size());
             Status s;
             {
               nb::gil_scoped_release release;
               s = w.w().BindStep(bytes);
             }
             ThrowIfError(s);
           })
      .def("has_pending_stores", [](PyWorker& w) { return w.w().HasPendingStores(); })
      .def("forward_pass_done", [](PyWorker& w) { ThrowIfError(w.w().ForwardPassDone()); },
           nb::call_guard<nb::gil_scoped_release>())
      .def("get_finished", [](PyWorker& w) { return w.w().GetFinished(); }, "(done_sending, done_recving)")
      .def("take_load_errors", [](PyWorker& w) { return w.w().TakeLoadErrors(); })
      .def("wait_idle", [](PyWorker& w) { w.w().WaitIdle(); }, nb::call_guard<nb::gil_scoped_release>())
      .def("wait_for_loads", [](PyWorker& w) { w.w().WaitForLoads(); }, nb::call_guard<nb::gil_scoped_release>(),
           "Blocks until every load started so far finished (synchronous loading engines).")
      .def("wait_for_request_loads",
           [](PyWorker& w, const std::vector<std::string>& ids) { w.w().WaitForRequestLoads(ids); },
           "request_ids"_a, nb::call_guard<nb::gil_scoped_release>(),
           "Blocks until these requests' loads finished (a synchronous load, before the forward pass); "
           "other requests' loads may still run.")
      .def("set_load_delay_for_testing",
           [](PyWorker& w, int64_t ms) {
             if (ms < 0) throw ConfigError("set_load_delay_for_testing: the delay must be >= 0 ms");
             w.w().SetLoadDelayForTesting(std::chrono::milliseconds(ms));
           },
           "milliseconds"_a,
           "Test seam: holds back the completion of every load started from now on, as a slow tier would.")
      .def("inject_disk_failure_for_testing",
           [](PyWorker& w, uint64_t offset, uint64_t length) {
             int fd = w.w().disk_memory().fd;
             if (fd < 0) throw ConfigError("inject_disk_failure_for_testing: this worker has no disk tier (G3)");
             if (length == 0) throw ConfigError("inject_disk_failure_for_testing: the length must be > 0 bytes");
             w.w().transfer_engine().io_queue().InjectFailure(fd, offset, length);
           },
           "offset"_a, "length"_a,
           "Test seam (the I/O queue's failpoint): every read and write of the G3 file touching "
           "[offset, offset + length) fails with EIO until clear_disk_failures_for_testing().")
      .def("clear_disk_failures_for_testing", [](PyWorker& w) { w.w().transfer_engine().io_queue().ClearFailures(); })
      .def("disk_io_stats",
           [](PyWorker& w) {
             const IoStats& s = w.w().transfer_engine().io_queue().stats();
             nb::dict d;
             d["reads"] = s.reads.load();
             d["writes"] = s.writes.load();
             d["bytes_read"] = s.bytes_read.load();
             d["bytes_written"] = s.bytes_written.load();
             d["errors"] = s.errors.load();
             return d;
           },
           "The G3 I/O queue's counters (cumulative): reads, writes, bytes, and failed I/Os (errors).")
      .def("metrics", [](PyWorker& w) { return MetricsDict(*w.w().metrics()); })
      .def("transfer_counters", [](PyWorker& w) { return TransferCounters(*w.w().metrics()); },
           "Every counter this worker updates (cumulative), for Leader.add_worker_counters.");

  m.def("size_tiers",
        [](uint64_t bytes_per_block, std::optional<std::map<std::string, std::string>> env) {
          KvbmConfig c = ConfigFrom(env);
          c.Validate();
          return nb::make_tuple(c.HostBlocks(bytes_per_block), c.DiskBlocks(bytes_per_block));
        },
        "bytes_per_block"_a, "env"_a = nb::none(),
        "(host_blocks, disk_blocks) the configuration gives for this many bytes per block (all ranks).");
}
