// `kvbm._core.PageConnector`: the connector core for engines that pass pages by their own keys
// (include/kvbm/page_connector.h), used by python/kvbm/sglang_integration. Keys are strings;
// segment addresses come as a 1-D uint64 array. Every call that copies or may ask G4 releases
// the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <map>

#include "bindings.h"
#include "kvbm/observability.h"
#include "kvbm/page_connector.h"
#include "stats_bindings.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using Addresses = nb::ndarray<const uint64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// PageConnector holds a mutex (not movable): Python holds it through this owner.
struct PyPageConnector {
  PyPageConnector(uint64_t layers, uint64_t page_size, uint64_t inner_dim, uint64_t dtype_bytes,
                  const std::string& element_order, uint64_t outer_dim,
                  std::optional<std::map<std::string, std::string>> env, const std::string& remote_descriptor,
                  uint32_t staging_pages) {
    kvbm::KvbmConfig config = env ? kvbm::KvbmConfig::FromMap(*env) : kvbm::KvbmConfig::FromEnvironment();
    kvbm::PageConnectorOptions o;
    o.page.num_layers = layers;
    o.page.outer_dim = outer_dim;
    o.page.page_size = page_size;
    o.page.inner_dim = inner_dim;
    o.page.dtype_bytes = dtype_bytes;
    o.element_order = element_order;
    o.remote_descriptor = remote_descriptor;
    o.staging_pages = staging_pages;
    nb::gil_scoped_release release;  // G4 may be asked at start
    connector = kvbm::python::ThrowIfError(kvbm::PageConnector::Create(config, std::move(o)));
  }
  std::unique_ptr<kvbm::PageConnector> connector;
};

std::span<const uint64_t> Span(const Addresses& a) { return {a.data(), a.shape(0)}; }

}  // namespace

void BindPageConnector(nb::module_& m) {
  using namespace kvbm;
  using namespace kvbm::python;
  nb::class_<PyPageConnector>(m, "PageConnector",
                              "The tier chain for pages addressed by the engine's own keys (SGLang's HiCache "
                              "storage); see include/kvbm/page_connector.h.")
      .def(nb::init<uint64_t, uint64_t, uint64_t, uint64_t, const std::string&, uint64_t,
                    std::optional<std::map<std::string, std::string>>, const std::string&, uint32_t>(),
           "layers"_a, "page_size"_a, "inner_dim"_a, "dtype_bytes"_a, "element_order"_a, "outer_dim"_a = 2,
           "env"_a = nb::none(), "remote_descriptor"_a = "", "staging_pages"_a = 0)
      .def_prop_ro("block_bytes", [](PyPageConnector& p) { return p.connector->block_bytes(); })
      .def_prop_ro("block_format", [](PyPageConnector& p) { return p.connector->block_format(); })
      .def_prop_ro("host_blocks", [](PyPageConnector& p) { return p.connector->host_blocks(); })
      .def_prop_ro("disk_blocks", [](PyPageConnector& p) { return p.connector->disk_blocks(); })
      .def_prop_ro("has_remote", [](PyPageConnector& p) { return p.connector->has_remote(); })
      .def_prop_ro("chunk_pages", [](PyPageConnector& p) { return p.connector->chunk_pages(); })
      .def_prop_ro("metrics_port", [](PyPageConnector& p) { return p.connector->metrics_port(); })
      .def_prop_ro("disk_fd", [](PyPageConnector& p) { return p.connector->disk_fd(); },
                   "The G3 file's descriptor (-1 without G3), for tests that corrupt it behind kvbm's back.")
      .def("put",
           [](PyPageConnector& p, const std::vector<std::string>& keys, Addresses addresses, uint64_t segment_bytes) {
             PageConnector& c = *p.connector;
             std::span<const uint64_t> a = Span(addresses);
             nb::gil_scoped_release release;
             return ThrowIfError(c.Put(keys, a, segment_bytes));
           },
           "keys"_a, "addresses"_a, "segment_bytes"_a,
           "Stores each key's page gathered from its segments; per key, whether the chain holds it.")
      .def("get",
           [](PyPageConnector& p, const std::vector<std::string>& keys, Addresses addresses, uint64_t segment_bytes) {
             PageConnector& c = *p.connector;
             std::span<const uint64_t> a = Span(addresses);
             nb::gil_scoped_release release;
             return ThrowIfError(c.Get(keys, a, segment_bytes));
           },
           "keys"_a, "addresses"_a, "segment_bytes"_a,
           "Scatters each key's page into its segments; per key, whether it was held, loaded and verified.")
      .def("contains", [](PyPageConnector& p, const std::string& key) { return p.connector->Contains(key); },
           "key"_a, Release())
      .def("prefix_hits", [](PyPageConnector& p, const std::vector<std::string>& keys) { return p.connector->PrefixHits(keys); },
           "keys"_a, Release())
      .def("clear", [](PyPageConnector& p) { ThrowIfError(p.connector->Clear()); }, Release())
      .def("stats",
           [](PyPageConnector& p) {
             PageConnectorStats s = p.connector->stats();
             TierChainStats c = p.connector->chain_stats();
             nb::dict d;
             d["put_pages"] = s.put_pages;
             d["put_refused"] = s.put_refused;
             d["get_pages"] = s.get_pages;
             d["get_missing"] = s.get_missing;
             d["get_failed"] = s.get_failed;
             // The tier chain's own counters, as the vLLM leader reports them.
             d["store_host_blocks"] = c.store_host_blocks;
             d["store_disk_blocks"] = c.store_disk_blocks;
             d["offload_disk_blocks"] = c.offload_disk_blocks;
             d["promote_host_blocks"] = c.promote_host_blocks;
             d["onboard_host_blocks"] = c.onboard_host_blocks;
             d["onboard_disk_blocks"] = c.onboard_disk_blocks;
             d["onboard_remote_blocks"] = c.onboard_remote_blocks;
             d["offload_remote_blocks"] = c.offload_remote_blocks;
             d["skipped_cached_blocks"] = c.skipped_cached_blocks;
             d["dropped_full"] = c.dropped_full;
             d["dropped_filter"] = c.dropped_filter;
             d["dropped_queue"] = c.dropped_queue;
             d["load_errors"] = c.load_errors;
             return d;
           })
      .def("pool_stats",
           [](PyPageConnector& p, const std::string& tier) {
             if (tier == "host") return PoolStatsDict(p.connector->pool_stats(TierId::kHost));
             if (tier == "disk") return PoolStatsDict(p.connector->pool_stats(TierId::kDisk));
             throw ConfigError("tier must be 'host' or 'disk'");
           },
           "tier"_a)
      .def("metrics",
           [](PyPageConnector& p) {
             const KvbmMetrics& m = *p.connector->metrics();
             nb::dict d = TransferCounters(m);  // blocks/bytes/latency per path, I/O drops, corrupt blocks
             for (size_t r = 0; r < kNumDropReasons; ++r)
               d[(std::string("dropped_") + DropReasonLabel(static_cast<DropReason>(r))).c_str()] =
                   m.dropped_offloads[r].load();
             d["matched_tokens"] = m.matched_tokens.load();
             d["requested_tokens"] = m.requested_tokens.load();
             d["load_errors"] = m.load_errors.load();
             d["disk_writes_avoided"] = m.disk_writes_avoided.load();
             d["remote_hit_blocks"] = m.remote_hit_blocks.load();
             d["remote_miss_blocks"] = m.remote_miss_blocks.load();
             d["remote_verify_failures"] = m.remote_verify_failures.load();
             d["remote_errors"] = m.remote_errors.load();
             d["host_hit_rate"] = m.host_hit_rate.Rate();
             d["disk_hit_rate"] = m.disk_hit_rate.Rate();
             d["pool_used_host"] = m.pool_used[static_cast<size_t>(TierId::kHost)].load();
             d["pool_used_disk"] = m.pool_used[static_cast<size_t>(TierId::kDisk)].load();
             return d;
           })
      .def("prometheus_text", [](PyPageConnector& p) { return RenderPrometheusText(*p.connector->metrics()); },
           "The metrics as the Prometheus endpoint serves them.");
}
