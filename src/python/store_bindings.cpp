// `kvbm._core.PageStore`: kvbm's G2/G3 tiers addressed by key (include/kvbm/page_store.h), for
// engine adapters that pass pages by their own keys (python/kvbm/sglang_integration). Keys are
// strings, hashed to 64 bits (XXH3) here; segment addresses come as a 1-D uint64 array.
// Every call that copies releases the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>
#include <xxhash.h>

#include <map>

#include "bindings.h"
#include "kvbm/page_store.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using Addresses = nb::ndarray<const uint64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

std::vector<uint64_t> HashKeys(const std::vector<std::string>& keys) {
  std::vector<uint64_t> out;
  out.reserve(keys.size());
  for (const auto& k : keys) out.push_back(XXH3_64bits(k.data(), k.size()));
  return out;
}

// PageStore holds a mutex (not movable): Python holds it through this owner.
struct PyPageStore {
  PyPageStore(uint64_t block_bytes, const std::string& block_format,
              std::optional<std::map<std::string, std::string>> env) {
    kvbm::KvbmConfig config = env ? kvbm::KvbmConfig::FromMap(*env) : kvbm::KvbmConfig::FromEnvironment();
    store = kvbm::python::ThrowIfError(kvbm::PageStore::Create(config, block_bytes, block_format));
  }
  std::unique_ptr<kvbm::PageStore> store;
};

}  // namespace

void BindStore(nb::module_& m) {
  using namespace kvbm;
  using namespace kvbm::python;
  nb::class_<PyPageStore>(m, "PageStore", "kvbm's G2/G3 tiers addressed by key (see include/kvbm/page_store.h).")
      .def(nb::init<uint64_t, const std::string&, std::optional<std::map<std::string, std::string>>>(),
           "block_bytes"_a, "block_format"_a, "env"_a = nb::none())
      .def_prop_ro("block_bytes", [](PyPageStore& p) { return p.store->block_bytes(); })
      .def_prop_ro("block_format", [](PyPageStore& p) { return p.store->block_format(); })
      .def_prop_ro("host_blocks", [](PyPageStore& p) { return p.store->host_blocks(); })
      .def_prop_ro("disk_blocks", [](PyPageStore& p) { return p.store->disk_blocks(); })
      .def("put",
           [](PyPageStore& p, const std::vector<std::string>& keys, Addresses addresses, uint64_t segment_bytes) {
             PageStore& s = *p.store;
             std::vector<uint64_t> h = HashKeys(keys);
             std::span<const uint64_t> a(addresses.data(), addresses.shape(0));
             nb::gil_scoped_release release;
             return ThrowIfError(s.Put(h, a, segment_bytes));
           },
           "keys"_a, "addresses"_a, "segment_bytes"_a,
           "Stores each key's block gathered from its segments; per key, whether the store holds it.")
      .def("get",
           [](PyPageStore& p, const std::vector<std::string>& keys, Addresses addresses, uint64_t segment_bytes) {
             PageStore& s = *p.store;
             std::vector<uint64_t> h = HashKeys(keys);
             std::span<const uint64_t> a(addresses.data(), addresses.shape(0));
             nb::gil_scoped_release release;
             return ThrowIfError(s.Get(h, a, segment_bytes));
           },
           "keys"_a, "addresses"_a, "segment_bytes"_a,
           "Scatters each key's block into its segments; per key, whether it was held and verified.")
      .def("contains", [](PyPageStore& p, const std::string& key) { return p.store->Contains(XXH3_64bits(key.data(), key.size())); })
      .def("prefix_hits", [](PyPageStore& p, const std::vector<std::string>& keys) { return p.store->PrefixHits(HashKeys(keys)); })
      .def("clear", [](PyPageStore& p) { p.store->Clear(); }, nb::call_guard<nb::gil_scoped_release>())
      .def("stats", [](PyPageStore& p) {
        PageStoreStats st = p.store->stats();
        nb::dict d;
        d["puts"] = st.puts;
        d["put_existing"] = st.put_existing;
        d["gets"] = st.gets;
        d["host_hits"] = st.host_hits;
        d["disk_hits"] = st.disk_hits;
        d["misses"] = st.misses;
        d["host_to_disk"] = st.host_to_disk;
        d["dropped"] = st.dropped;
        d["corrupt"] = st.corrupt;
        return d;
      });
}
