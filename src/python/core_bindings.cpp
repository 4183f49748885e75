// Python bindings of the core: hashing, token sequences, layouts, block pools, the registry,
// configuration and the native core benchmark. See bindings.h for the error and GIL rules.
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
namespace {

using Release = nb::call_guard<nb::gil_scoped_release>;
using Tokens = std::vector<Token>;
using OptHash = std::optional<uint64_t>;

// ---------------------------------------------------------------------------------------------
// Errors

const char* PythonClassName(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument: return "InvalidArgumentError";
    case ErrorCode::kNotFound: return "NotFoundError";
    case ErrorCode::kResourceExhausted: return "ResourceExhaustedError";
    case ErrorCode::kIoError: return "IoError";
    case ErrorCode::kCorrupt: return "CorruptError";
    case ErrorCode::kTimeout: return "TimeoutError";
    case ErrorCode::kUnavailable: return "UnavailableError";
    case ErrorCode::kCancelled: return "CancelledError";
    case ErrorCode::kFailedPrecondition: return "FailedPreconditionError";
    case ErrorCode::kInternal: return "InternalError";
  }
  return "InternalError";
}

// Sets the Python error to kvbm.errors.<class_name>(message) with `.code` = code. Falls back
// to `fallback` when kvbm.errors cannot be imported (the extension used on its own).
void SetPythonError(const char* class_name, const char* code, const std::string& message,
                    PyObject* fallback) {
  try {
    nb::object cls = nb::module_::import_("kvbm.errors").attr(class_name);
    nb::object exc = cls(message);
    exc.attr("code") = code;
    PyErr_SetObject(cls.ptr(), exc.ptr());
  } catch (nb::python_error&) {
    PyErr_SetString(fallback, message.c_str());
  }
}

// ---------------------------------------------------------------------------------------------
// Conversions

nb::object OptionalHash(const std::optional<SequenceHash>& h) {
  return h ? nb::int_(h->value()) : nb::none();
}

std::optional<SequenceHash> ToSequenceHash(const OptHash& h) {
  return h ? std::optional(SequenceHash(*h)) : std::nullopt;
}

nb::tuple KeyTuple(const BlockKey& k) {
  return nb::make_tuple(k.sequence_hash.value(), k.block_hash, OptionalHash(k.parent));
}

const char* StateName(BlockState s) {
  switch (s) {
    case BlockState::kReset: return "reset";
    case BlockState::kPartial: return "partial";
    case BlockState::kComplete: return "complete";
    case BlockState::kRegistered: return "registered";
  }
  return "unknown";
}


// An event sink held by the C++ registry. The callable is a strong reference that is dropped
// under the GIL whichever thread destroys the last copy of the sink.
class PythonSink {
 public:
  explicit PythonSink(nb::callable fn)
      : fn_(fn.release().ptr(), [](PyObject* o) {
          if (PyGILState_Check()) {
            Py_DECREF(o);
            return;
          }
          // Another thread at exit cannot take the GIL any more: leak rather than hang.
          if (InterpreterFinalizing()) return;
          nb::gil_scoped_acquire gil;
          Py_DECREF(o);
        }) {}

  // Called from whichever thread changed a pool, with the pool and registry mutexes held.
  void operator()(const KvEvent& event) const {
    if (InterpreterFinalizing() && !PyGILState_Check()) return;  // see the deleter above
    nb::gil_scoped_acquire gil;
    try {
      nb::handle(fn_.get())(nb::cast(event, nb::rv_policy::copy));
    } catch (nb::python_error& e) {
      // The pool operation that fired the event must not fail because a sink did.
      e.discard_as_unraisable("kvbm event sink");
    } catch (const std::exception& e) {
      PyErr_WarnFormat(PyExc_RuntimeWarning, 1, "kvbm event sink failed: %s", e.what());
    }
  }

 private:
  std::shared_ptr<PyObject> fn_;
};

// ---------------------------------------------------------------------------------------------
// Binding groups

void BindErrorsAndIds(nb::module_& m) {
  nb::enum_<TierId>(m, "Tier", "Tiers numbered as in the reference: G1 device .. G4 remote.")
      .value("DEVICE", TierId::kDevice)
      .value("HOST", TierId::kHost)
      .value("DISK", TierId::kDisk)
      .value("REMOTE", TierId::kRemote);
  m.def("error_class_name", [](const std::string& code_name) -> std::string {
    for (ErrorCode c : {ErrorCode::kInvalidArgument, ErrorCode::kNotFound, ErrorCode::kResourceExhausted,
                        ErrorCode::kIoError, ErrorCode::kCorrupt, ErrorCode::kTimeout, ErrorCode::kUnavailable,
                        ErrorCode::kCancelled, ErrorCode::kFailedPrecondition, ErrorCode::kInternal})
      if (ErrorCodeName(c) == code_name) return PythonClassName(c);
    throw StatusException(Error(ErrorCode::kNotFound, fmt::format("no error code '{}'", code_name)));
  }, "code"_a, "The kvbm.errors class raised for an ErrorCode name (e.g. 'ResourceExhausted').");
  m.def("_raise_error", [](const std::string& code_name, const std::string& message) {
    for (ErrorCode c : {ErrorCode::kInvalidArgument, ErrorCode::kNotFound, ErrorCode::kResourceExhausted,
                        ErrorCode::kIoError, ErrorCode::kCorrupt, ErrorCode::kTimeout, ErrorCode::kUnavailable,
                        ErrorCode::kCancelled, ErrorCode::kFailedPrecondition, ErrorCode::kInternal})
      if (ErrorCodeName(c) == code_name) throw StatusException(Error(c, message));
    if (code_name == "Config") throw ConfigError(message);
    if (code_name == "Invariant") throw InvariantError(message);
    throw StatusException(Error(ErrorCode::kNotFound, fmt::format("no error code '{}'", code_name)));
  }, "code"_a, "message"_a, "Raises the error a C++ failure with this code raises (for tests).");
}

void BindHashing(nb::module_& m) {
  nb::class_<TokenBlock>(m, "TokenBlock", "One full block of a token sequence and its hashes.")
      .def(nb::init<>())
      .def("__init__",
           [](TokenBlock* b, uint64_t block_hash, uint64_t sequence_hash, OptHash parent, uint32_t index) {
             new (b) TokenBlock{block_hash, SequenceHash(sequence_hash), ToSequenceHash(parent), index};
           },
           "block_hash"_a, "sequence_hash"_a, "parent"_a = nb::none(), "index"_a = 0)
      .def_rw("block_hash", &TokenBlock::block_hash)
      .def_prop_ro("sequence_hash", [](const TokenBlock& b) { return b.sequence_hash.value(); })
      .def_prop_ro("parent", [](const TokenBlock& b) { return OptionalHash(b.parent); })
      .def_rw("index", &TokenBlock::index)
      .def_prop_ro("key", [](const TokenBlock& b) { return KeyTuple(KeyOf(b)); },
                   "(sequence_hash, block_hash, parent) as match_prefix takes it")
      .def("__eq__", [](const TokenBlock& a, const TokenBlock& b) {
        return a.block_hash == b.block_hash && a.sequence_hash == b.sequence_hash && a.parent == b.parent &&
               a.index == b.index;
      })
      .def("__repr__", [](const TokenBlock& b) {
        return fmt::format("TokenBlock(index={}, block_hash={}, sequence_hash={}, parent={})", b.index, b.block_hash,
                           b.sequence_hash.value(), b.parent ? fmt::format("{}", b.parent->value()) : "None");
      });

  m.attr("DEFAULT_SALT_HASH") = ComputeSaltHash(std::nullopt, std::nullopt);
  m.def("compute_salt_hash", &ComputeSaltHash, "salt"_a = nb::none(), "lora_name"_a = nb::none(),
        "XXH3_64(compact JSON {\"salt\":..,\"lora_name\":..}, seed 0); absent fields are left out.");
  m.def("salt_json", &SaltJson, "salt"_a = nb::none(), "lora_name"_a = nb::none());
  m.def("compute_block_hash", [](const Tokens& tokens, uint64_t salt_hash) { return ComputeBlockHash(tokens, salt_hash); },
        "tokens"_a, "salt_hash"_a, Release());
  m.def("chain_sequence_hash",
        [](OptHash parent, uint64_t block_hash, uint64_t salt_hash) {
          return ChainSequenceHash(ToSequenceHash(parent), block_hash, salt_hash).value();
        },
        "parent"_a.none(), "block_hash"_a, "salt_hash"_a);
  m.def("hash_token_blocks",
        [](const Tokens& tokens, uint32_t block_size, uint64_t salt_hash) {
          return ThrowIfError(HashTokenBlocks(tokens, block_size, salt_hash));
        },
        "tokens"_a, "block_size"_a, "salt_hash"_a, Release(),
        "Hashes of the full blocks of `tokens`; a partial tail is ignored.");

  nb::class_<TokenBlockSequence>(m, "TokenBlockSequence",
                                 "A token sequence whose full blocks are hashed as they complete.")
      .def(nb::init<uint32_t, uint64_t>(), "block_size"_a, "salt_hash"_a = ComputeSaltHash(std::nullopt, std::nullopt))
      .def("append", &TokenBlockSequence::Append, "token"_a)
      .def("extend", [](TokenBlockSequence& s, const Tokens& t) { s.Extend(t); }, "tokens"_a, Release())
      .def("truncate", [](TokenBlockSequence& s, size_t n) { ThrowIfError(s.Truncate(n)); }, "num_tokens"_a)
      .def_prop_ro("tokens", [](const TokenBlockSequence& s) { return s.tokens(); })
      .def_prop_ro("blocks", [](const TokenBlockSequence& s) { return s.blocks(); })
      .def_prop_ro("tail", [](const TokenBlockSequence& s) { return Tokens(s.tail().begin(), s.tail().end()); })
      .def_prop_ro("num_tokens", &TokenBlockSequence::num_tokens)
      .def_prop_ro("block_size", &TokenBlockSequence::block_size)
      .def_prop_ro("salt_hash", &TokenBlockSequence::salt_hash)
      .def("block_tokens",
           [](const TokenBlockSequence& s, size_t i) {
             if (i >= s.blocks().size())
               throw nb::index_error(fmt::format("block {} of {}", i, s.blocks().size()).c_str());
             auto t = s.block_tokens(i);
             return Tokens(t.begin(), t.end());
           },
           "index"_a)
      .def("__len__", &TokenBlockSequence::num_tokens);
}

void BindLayouts(nb::module_& m) {
  nb::class_<LayoutDims>(m, "LayoutDims")
      .def("__init__",
           [](LayoutDims* d, uint64_t num_blocks, uint64_t num_layers, uint64_t outer_dim, uint64_t page_size,
              uint64_t inner_dim, uint64_t dtype_bytes) {
             new (d) LayoutDims{num_blocks, num_layers, outer_dim, page_size, inner_dim, dtype_bytes};
           },
           "num_blocks"_a = 0, "num_layers"_a = 0, "outer_dim"_a = 0, "page_size"_a = 0, "inner_dim"_a = 0,
           "dtype_bytes"_a = 0)
      .def_rw("num_blocks", &LayoutDims::num_blocks)
      .def_rw("num_layers", &LayoutDims::num_layers)
      .def_rw("outer_dim", &LayoutDims::outer_dim)
      .def_rw("page_size", &LayoutDims::page_size)
      .def_rw("inner_dim", &LayoutDims::inner_dim)
      .def_rw("dtype_bytes", &LayoutDims::dtype_bytes)
      .def("validate", &LayoutDims::Validate)
      .def_prop_ro("chunk_bytes", &LayoutDims::chunk_bytes)
      .def_prop_ro("block_bytes", &LayoutDims::block_bytes)
      .def("__repr__", &LayoutDims::ToString);

  nb::class_<Layout>(m, "Layout", "Where the bytes of (block, layer, outer) live.")
      .def_prop_ro("dims", [](const Layout& l) { return l.dims(); })
      .def_prop_ro("kind", [](const Layout& l) {
        return l.kind() == LayoutKind::kFullyContiguous ? "fully-contiguous" : "layer-separate";
      })
      .def_prop_ro("num_allocations", &Layout::num_allocations)
      .def("allocation_bytes", &Layout::allocation_bytes, "allocation"_a)
      .def("chunk",
           [](const Layout& l, uint64_t block, uint64_t layer, uint64_t outer) {
             MemoryRange r = l.Chunk(block, layer, outer);
             return std::make_tuple(r.allocation, r.offset, r.length);
           },
           "block"_a, "layer"_a, "outer"_a, "(allocation, offset, length) of one (block, layer, outer).")
      .def_prop_ro("block_is_contiguous", &Layout::block_is_contiguous)
      .def_prop_ro("block_stride", &Layout::block_stride)
      .def("describe", &Layout::Describe)
      .def("__repr__", &Layout::Describe);

  nb::class_<FullyContiguousLayout, Layout>(m, "FullyContiguousLayout")
      .def(nb::init<const LayoutDims&, uint64_t>(), "dims"_a, "block_alignment"_a = 1)
      .def_prop_ro("block_alignment", &FullyContiguousLayout::block_alignment);
  nb::class_<LayerSeparateLayout, Layout>(m, "LayerSeparateLayout")
      .def(nb::init<const LayoutDims&, bool>(), "dims"_a, "outer_first"_a)
      .def_prop_ro("outer_first", &LayerSeparateLayout::outer_first);

  m.def("layout_from_tensor_shapes",
        [](const std::vector<std::tuple<std::vector<int64_t>, std::vector<int64_t>, uint64_t>>& layers,
           uint64_t num_blocks, uint64_t page_size) {
          std::vector<TensorShape> shapes;
          shapes.reserve(layers.size());
          for (const auto& [shape, strides, dtype_bytes] : layers) shapes.push_back({shape, strides, dtype_bytes});
          return ThrowIfError(LayoutFromTensorShapes(shapes, num_blocks, page_size));
        },
        "layers"_a, "num_blocks"_a, "page_size"_a,
        "The device-tier layout from the engine's per-layer (shape, strides, dtype_bytes).");
}

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

void BindConfig(nb::module_& m) {
  nb::class_<KvbmConfig>(m, "KvbmConfig", "Every DYN_KVBM_* setting, parsed and validated.")
      .def_static("from_environment", []() { return KvbmConfig::FromEnvironment(); },
                  "Reads os.environ; ConfigError names a variable that does not parse.")
      .def_static("from_map", &KvbmConfig::FromMap, "env"_a)
      .def("validate", &KvbmConfig::Validate)
      .def("host_blocks", &KvbmConfig::HostBlocks, "bytes_per_block"_a)
      .def("disk_blocks", &KvbmConfig::DiskBlocks, "bytes_per_block"_a)
      .def_ro("cpu_cache_gb", &KvbmConfig::cpu_cache_gb)
      .def_ro("cpu_cache_num_blocks", &KvbmConfig::cpu_cache_num_blocks)
      .def_ro("disk_cache_gb", &KvbmConfig::disk_cache_gb)
      .def_ro("disk_cache_num_blocks", &KvbmConfig::disk_cache_num_blocks)
      .def_ro("disk_cache_dir", &KvbmConfig::disk_cache_dir)
      .def_ro("disk_zerofill_fallback", &KvbmConfig::disk_zerofill_fallback)
      .def_ro("disk_disable_o_direct", &KvbmConfig::disk_disable_o_direct)
      .def_prop_ro("disk_allocator",
                   [](const KvbmConfig& c) {
                     return c.disk_allocator == DiskAllocatorType::kOpenDirect ? "open-direct" : "default";
                   })
      .def_ro("disable_disk_offload_filter", &KvbmConfig::disable_disk_offload_filter)
      .def_ro("host_offload_prefix_min_priority", &KvbmConfig::host_offload_prefix_min_priority)
      .def_ro("max_concurrent_transfers", &KvbmConfig::max_concurrent_transfers)
      .def_ro("max_transfer_batch_size", &KvbmConfig::max_transfer_batch_size)
      .def_ro("leader_worker_init_timeout_secs", &KvbmConfig::leader_worker_init_timeout_secs)
      .def_ro("leader_zmq_host", &KvbmConfig::leader_zmq_host)
      .def_ro("leader_zmq_pub_port", &KvbmConfig::leader_zmq_pub_port)
      .def_ro("leader_zmq_ack_port", &KvbmConfig::leader_zmq_ack_port)
      .def_ro("metrics", &KvbmConfig::metrics)
      .def_ro("metrics_port", &KvbmConfig::metrics_port)
      .def_ro("metrics_host", &KvbmConfig::metrics_host)
      .def_ro("cache_stats_max_requests", &KvbmConfig::cache_stats_max_requests)
      .def_ro("cache_stats_log_interval_secs", &KvbmConfig::cache_stats_log_interval_secs)
      .def_ro("events_endpoint", &KvbmConfig::events_endpoint);
}

void BindBench(nb::module_& m) {
  CoreBenchOptions d;
  m.def("bench_core",
        [](uint64_t num_tokens, uint32_t block_size, uint32_t passes, uint64_t pool_cycles, uint64_t match_blocks) {
          CoreBenchOptions o;
          o.num_tokens = num_tokens;
          o.block_size = block_size;
          o.passes = passes;
          o.pool_cycles = pool_cycles;
          o.match_blocks = match_blocks;
          CoreBenchResult r;
          {
            nb::gil_scoped_release release;
            r = RunCoreBench(o);
          }
          nb::dict out;
          out["hash_tokens_per_s"] = r.hash_tokens_per_s;
          out["hash_request_us"] = r.hash_request_us;
          out["pool_cycles_per_s"] = r.pool_cycles_per_s;
          nb::dict by_policy;
          for (const auto& [name, rate] : r.policy_cycles_per_s) by_policy[name.c_str()] = rate;
          out["policy_cycles_per_s"] = by_policy;
          out["match_8192_blocks_us"] = r.match_8192_blocks_us;
          out["leader_request_miss_us"] = r.leader_request_miss_us;
          out["leader_request_hit_us"] = r.leader_request_hit_us;
          out["blocks_matched"] = r.blocks_matched;
          out["blocks_stored"] = r.blocks_stored;
          out["blocks_loaded"] = r.blocks_loaded;
          nb::dict opts;
          opts["num_tokens"] = r.options.num_tokens;
          opts["block_size"] = r.options.block_size;
          opts["salt_hash"] = r.options.salt_hash;
          opts["passes"] = r.options.passes;
          opts["pool_cycles"] = r.options.pool_cycles;
          opts["pool_blocks"] = r.options.pool_blocks;
          opts["match_blocks"] = r.options.match_blocks;
          out["options"] = opts;
          return out;
        },
        "num_tokens"_a = d.num_tokens, "block_size"_a = d.block_size, "passes"_a = d.passes,
        "pool_cycles"_a = d.pool_cycles, "match_blocks"_a = d.match_blocks,
        "Runs the native core timings (medians of `passes`) and returns them as a dict.");
}

}  // namespace

EvictionPolicy PolicyFromName(const std::string& name) {
  if (auto p = ParseEvictionPolicy(name)) return *p;
  throw StatusException(Error(ErrorCode::kInvalidArgument,
                              fmt::format("eviction policy '{}': expected 'reuse', 'leaf-first' or 'lru'", name)));
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

void RegisterErrorTranslator() {
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const StatusException& e) {
      PyObject* fallback = PyExc_RuntimeError;
      switch (e.error().code()) {
        case ErrorCode::kInvalidArgument: fallback = PyExc_ValueError; break;
        case ErrorCode::kNotFound: fallback = PyExc_KeyError; break;
        case ErrorCode::kIoError: fallback = PyExc_OSError; break;
        case ErrorCode::kTimeout: fallback = PyExc_TimeoutError; break;
        default: break;
      }
      SetPythonError(PythonClassName(e.error().code()), std::string(ErrorCodeName(e.error().code())).c_str(),
                     e.error().message(), fallback);
    } catch (const ConfigError& e) {
      SetPythonError("ConfigError", "Config", e.what(), PyExc_ValueError);
    } catch (const InvariantError& e) {
      SetPythonError("InvariantError", "Invariant", e.what(), PyExc_RuntimeError);
    }
  });
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

void BindCore(nb::module_& m) {
  using namespace kvbm::python;
  // nanobind reports objects still alive when it shuts down. Registry sinks (see add_sink) can
  // legitimately keep pools alive until then, so the report is opt-in, for debugging bindings.
  const char* leaks = std::getenv("KVBM_NB_LEAK_WARNINGS");
  nb::set_leak_warnings(leaks != nullptr && leaks[0] != '\0' && leaks[0] != '0');
  RegisterErrorTranslator();
  BindErrorsAndIds(m);
  BindHashing(m);
  BindLayouts(m);
  BindPools(m);
  BindConfig(m);
  BindBench(m);
}
