// Bindings of the block layer: pools, handles, the registry and its event sinks.
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <fmt/format.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include "kvbm/block_pool.h"
#include "kvbm/config.h"
#include "kvbm/core_bench.h"
#include "kvbm/error.h"
#include "kvbm/layout.h"
#include "kvbm/tokens.h"
#include "python/bindings.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvbm::python {

void BindPools(nb::module_& m) {
  nb::class_<KvEvent>(m, "KvEvent", "A hash entered its first tier (stored) or left its last (removed).")
      .def_prop_ro("kind", [](const KvEvent& e) { return e.kind == KvEvent::Kind::kStored ? "stored" : "removed"; })
      .def_ro("tier", &KvEvent::tier)
      .def_prop_ro("sequence_hash", [](const KvEvent& e) { return e.key.sequence_hash.value(); })
      .def_prop_ro("block_hash", [](const KvEvent& e) { return e.key.block_hash; })
      .def_prop_ro("parent", [](const KvEvent& e) { return OptionalHash(e.key.parent); })
      .def_ro("tokens", &KvEvent::tokens)
      .def_ro("event_id", &KvEvent::event_id)
      .def("__repr__", [](const KvEvent& e) {
        return fmt::format("KvEvent({}, tier={}, sequence_hash={}, event_id={})",
                           e.kind == KvEvent::Kind::kStored ? "stored" : "removed", TierName(e.tier),
                           e.key.sequence_hash.value(), e.event_id);
      });

  nb::class_<BlockRegistry>(m, "BlockRegistry",
                            "Presence of sequence hashes across tiers; one stored and one removed event per hash.")
      .def(nb::init<>())
      .def("add_sink", [](BlockRegistry& r, nb::callable fn) { r.AddSink(PythonSink(std::move(fn))); }, "sink"_a,
           "Calls sink(KvEvent) from whichever thread changed a pool, with the GIL taken. The sink must not "
           "call into a pool (the pool's mutex is held). The registry keeps the sink alive; a sink that "
           "references the registry or its pools (a module-level function does, through its globals) forms "
           "a cycle through C++ that Python's GC cannot see, so they live until the interpreter exits.")
      .def("tiers_holding", [](const BlockRegistry& r, uint64_t h) { return r.TiersHolding(SequenceHash(h)); },
           "sequence_hash"_a, Release())
      .def("__len__", &BlockRegistry::size, Release());

  nb::class_<PyMutableBlock>(m, "MutableBlock", "An exclusively owned block; dropping it returns it to Reset.")
      .def_prop_ro("valid", [](const PyMutableBlock& b) { return b.block.valid(); })
      .def_prop_ro("id", [](const PyMutableBlock& b) { return b.block.id().value(); })
      .def_prop_ro("tier", [](const PyMutableBlock& b) { return b.block.tier(); })
      .def_prop_ro("state", [](const PyMutableBlock& b) { return StateName(b.block.state()); }, Release())
      .def("complete",
           [](PyMutableBlock& b, uint64_t sequence_hash, uint64_t block_hash, OptHash parent, const Tokens& tokens,
              uint32_t priority) {
             ThrowIfError(b.block.Complete({SequenceHash(sequence_hash), block_hash, ToSequenceHash(parent)},
                                           tokens, priority));
           },
           "sequence_hash"_a, "block_hash"_a, "parent"_a.none(), "tokens"_a = Tokens{}, "priority"_a = 0, Release())
      .def("complete",
           [](PyMutableBlock& b, const TokenBlock& tb, const Tokens& tokens, uint32_t priority) {
             ThrowIfError(b.block.Complete(KeyOf(tb), tokens, priority));
           },
           "block"_a, "tokens"_a = Tokens{}, "priority"_a = 0, Release())
      .def("mark_partial", [](PyMutableBlock& b) { ThrowIfError(b.block.MarkPartial()); }, Release())
      .def("release", [](PyMutableBlock& b) { ReleaseWithoutGil(b.block); })
      .def("__enter__", [](nb::handle self) { return self; })
      .def("__exit__", [](PyMutableBlock& b, nb::args) { ReleaseWithoutGil(b.block); })
      .def("__repr__", [](const PyMutableBlock& b) {
        return b.block.valid() ? fmt::format("MutableBlock(id={}, tier={})", b.block.id().value(), TierName(b.block.tier()))
                               : std::string("MutableBlock(released)");
      });

  nb::class_<PyImmutableBlock>(m, "ImmutableBlock",
                               "A shared reference to a registered block; the last one dropped makes it inactive.")
      .def_prop_ro("valid", [](const PyImmutableBlock& b) { return b.block.valid(); })
      .def_prop_ro("id", [](const PyImmutableBlock& b) { return b.block.id().value(); })
      .def_prop_ro("tier", [](const PyImmutableBlock& b) { return b.block.tier(); })
      .def_prop_ro("sequence_hash", [](const PyImmutableBlock& b) { return b.block.sequence_hash().value(); })
      .def_prop_ro("block_hash", [](const PyImmutableBlock& b) { return b.block.key().block_hash; })
      .def_prop_ro("parent", [](const PyImmutableBlock& b) { return OptionalHash(b.block.key().parent); })
      .def_prop_ro("priority", [](const PyImmutableBlock& b) { return b.block.priority(); })
      .def_prop_ro("key", [](const PyImmutableBlock& b) { return KeyTuple(b.block.key()); })
      .def("clone", [](const PyImmutableBlock& b) { return PyImmutableBlock(ImmutableBlock(b.block)); }, Release(),
           "Another reference to the same block.")
      .def("release", [](PyImmutableBlock& b) { ReleaseWithoutGil(b.block); })
      .def("__enter__", [](nb::handle self) { return self; })
      .def("__exit__", [](PyImmutableBlock& b, nb::args) { ReleaseWithoutGil(b.block); })
      .def("__repr__", [](const PyImmutableBlock& b) {
        return b.block.valid() ? fmt::format("ImmutableBlock(id={}, tier={}, sequence_hash={})", b.block.id().value(),
                                             TierName(b.block.tier()), b.block.sequence_hash().value())
                               : std::string("ImmutableBlock(released)");
      });

  nb::class_<BlockPool>(m, "BlockPool", "One tier's pool of blocks (see include/kvbm/block_pool.h).")
      .def_static("create",
                  [](nb::handle tier, uint64_t num_blocks, const std::string& policy,
                     std::shared_ptr<BlockRegistry> registry) {
                    return BlockPool::Create(TierFromPython(tier), num_blocks, PolicyFromName(policy),
                                             std::move(registry));
                  },
                  "tier"_a, "num_blocks"_a, "policy"_a = "leaf-first", "registry"_a.none() = nb::none())
      .def_prop_ro("tier", &BlockPool::tier)
      .def_prop_ro("num_blocks", &BlockPool::num_blocks)
      .def_prop_ro("policy", [](const BlockPool& p) { return std::string(p.policy_name()); })
      .def("allocate",
           [](BlockPool& p, size_t count) {
             std::vector<MutableBlock> blocks = ThrowIfError(p.Allocate(count));
             std::vector<PyMutableBlock> out;
             out.reserve(blocks.size());
             for (auto& b : blocks) out.emplace_back(std::move(b));
             return out;
           },
           "count"_a, Release(), "All or nothing; ResourceExhaustedError when free + evictable < count.")
      .def("register",
           [](BlockPool& p, PyMutableBlock& b) { return PyImmutableBlock(ThrowIfError(p.Register(std::move(b.block)))); },
           "block"_a, Release(),
           "Registers a complete block (the MutableBlock is consumed). A hash already held returns the existing "
           "block; the same hash with other content raises FailedPreconditionError.")
      .def("match_prefix",
           [](BlockPool& p, nb::handle keys) {
             std::vector<BlockKey> parsed = KeysFromPython(keys);
             std::vector<PyImmutableBlock> out;
             {
               nb::gil_scoped_release release;
               BlockRun matched = p.MatchPrefix(parsed);
               out.reserve(matched.size());
               for (size_t i = 0; i < matched.size(); ++i) out.emplace_back(matched.Share(i));
             }
             return out;
           },
           "keys"_a, "Longest held prefix of keys (TokenBlocks or (sequence_hash, block_hash, parent) tuples), pinned.")
      .def("count_prefix",
           [](const BlockPool& p, nb::handle keys) {
             std::vector<BlockKey> parsed = KeysFromPython(keys);
             nb::gil_scoped_release release;
             return p.CountPrefix(parsed);
           },
           "keys"_a)
      .def("contains",
           [](const BlockPool& p, nb::handle key) {
             BlockKey k = KeyFromPython(key);
             nb::gil_scoped_release release;
             return p.Contains(k);
           },
           "key"_a)
      .def("touch",
           [](BlockPool& p, const std::vector<uint64_t>& hashes) {
             std::vector<SequenceHash> h(hashes.begin(), hashes.end());
             p.Touch(h);
           },
           "sequence_hashes"_a, Release())
      .def("reset", [](BlockPool& p) { ThrowIfError(p.Reset()); }, Release(),
           "Drops every registered block; FailedPreconditionError while any block is held.")
      .def("stats",
           [](const BlockPool& p) {
             BlockPoolStats s;
             {
               nb::gil_scoped_release release;
               s = p.stats();
             }
             return PoolStatsDict(s);
           })
      .def("child_count", [](const BlockPool& p, uint64_t h) { return p.ChildCount(SequenceHash(h)); },
           "sequence_hash"_a, Release())
      .def("eviction_order",
           [](const BlockPool& p) {
             std::vector<uint64_t> out;
             for (SequenceHash h : p.EvictionOrder()) out.push_back(h.value());
             return out;
           },
           Release(), "Sequence hashes of the inactive blocks, next victim first.");
}



EvictionPolicy PolicyFromName(const std::string& name) {
  if (auto p = ParseEvictionPolicy(name)) return *p;
  throw StatusException(Error(ErrorCode::kInvalidArgument,
                              fmt::format("eviction policy '{}': expected 'leaf-first', 'lru', 'reuse' or 'adaptive'", name)));
}

nb::dict PoolStatsDict(const BlockPoolStats& s) {
  nb::dict d;
  d["num_blocks"] = s.num_blocks;
  d["free"] = s.free;
  d["inactive"] = s.inactive;
  d["evictable"] = s.evictable;
  d["active"] = s.active;
  d["registered"] = s.registered;
  d["evictions"] = s.evictions;
  return d;
}

BlockKey KeyFromPython(nb::handle item) {
  if (nb::isinstance<TokenBlock>(item)) return KeyOf(nb::cast<const TokenBlock&>(item));
  if (nb::isinstance<PyImmutableBlock>(item)) return nb::cast<const PyImmutableBlock&>(item).block.key();
  try {
    auto [seq, block_hash, parent] = nb::cast<std::tuple<uint64_t, uint64_t, OptHash>>(item);
    return {SequenceHash(seq), block_hash, ToSequenceHash(parent)};
  } catch (const nb::cast_error&) {
    throw nb::type_error(
        fmt::format("a block key is a TokenBlock or a (sequence_hash, block_hash, parent|None) tuple of "
                    "unsigned 64-bit ints, not {}",
                    nb::str(nb::repr(item)).c_str())
            .c_str());
  }
}

std::vector<BlockKey> KeysFromPython(nb::handle items) {
  std::vector<BlockKey> keys;
  if (PySequence_Check(items.ptr())) keys.reserve(static_cast<size_t>(nb::len(items)));
  for (nb::handle item : items) keys.push_back(KeyFromPython(item));
  return keys;
}

TierId TierFromPython(nb::handle tier) {
  if (nb::isinstance<TierId>(tier)) return nb::cast<TierId>(tier);
  if (nb::isinstance<nb::str>(tier)) {
    std::string s = nb::cast<std::string>(tier);
    for (TierId t : {TierId::kDevice, TierId::kHost, TierId::kDisk, TierId::kRemote})
      if (s == TierName(t) || s == fmt::format("G{}", static_cast<int>(t)) ||
          s == fmt::format("g{}", static_cast<int>(t)))
        return t;
    throw StatusException(Error(ErrorCode::kInvalidArgument,
                                fmt::format("tier '{}': expected device, host, disk, remote or G1..G4", s)));
  }
  if (nb::isinstance<nb::int_>(tier)) {
    long v = nb::cast<long>(tier);
    if (v >= 1 && v <= 4) return static_cast<TierId>(v);
    throw StatusException(Error(ErrorCode::kInvalidArgument, fmt::format("tier {}: expected 1..4", v)));
  }
  throw nb::type_error("tier must be a kvbm.Tier, a name such as 'host', or 1..4");
}

}  // namespace kvbm::python
