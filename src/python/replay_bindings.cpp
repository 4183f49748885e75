// Python bindings of the trace replay (include/kvbm/replay.h), for `kvbm replay`.
// The replay runs with the GIL released; the progress callback takes it back for each call.
// An exception raised by the callback (KeyboardInterrupt from a progress bar) stops the replay
// and is re-raised as it was.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <string>

#include "kvbm/replay.h"
#include "python/bindings.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvbm::python {
namespace {

// A replay tier policy: "opt" (Belady's MIN, replay only) or a pool policy.
struct TierPolicy {
  std::optional<EvictionPolicy> policy;
  bool opt = false;
};
TierPolicy ReplayPolicy(const std::string& name) {
  if (name == "opt") return {std::nullopt, true};
  if (auto p = ParseEvictionPolicy(name)) return {*p, false};
  throw StatusException(Error(ErrorCode::kInvalidArgument,
                              "eviction policy '" + name + "': expected 'adaptive', 'reuse', 'leaf-first', 'lru' or 'opt'"));
}

nb::dict ResultDict(const ReplayResult& r, uint32_t page, bool with_g4 = false) {
  auto rate = [](uint64_t num, uint64_t den) {
    return den ? static_cast<double>(num) / static_cast<double>(den) : 0.0;
  };
  nb::dict d;
  d["requests"] = r.requests;
  d["rejected_requests"] = r.rejected;
  d["block_refs"] = r.block_refs;
  d["page_refs"] = r.page_refs;
  d["input_tokens"] = r.input_tokens;
  d["block_size"] = page;
  d["g1_blocks"] = r.g1_blocks;
  d["g2_blocks"] = r.g2_blocks;
  d["g3_blocks"] = r.g3_blocks;
  d["g1_hit_blocks"] = r.g1_hit_blocks;
  d["g2_hit_blocks"] = r.g2_hit_blocks;
  d["g3_hit_blocks"] = r.g3_hit_blocks;
  d["g1_token_hit_rate"] = rate(r.g1_hit_blocks * page, r.input_tokens);
  d["g2_token_hit_rate"] = rate(r.g2_hit_blocks * page, r.input_tokens);
  d["g3_token_hit_rate"] = rate(r.g3_hit_blocks * page, r.input_tokens);
  d["token_hit_rate"] = rate(r.hit_tokens(page), r.input_tokens);
  d["hit_tokens"] = r.hit_tokens(page);  // prefill tokens saved
  d["g1_block_hit_rate"] = rate(r.g1_hit_blocks, r.page_refs);
  d["g2_block_hit_rate"] = rate(r.g2_hit_blocks, r.page_refs);
  d["g3_block_hit_rate"] = rate(r.g3_hit_blocks, r.page_refs);
  d["block_hit_rate"] = rate(r.g1_hit_blocks + r.g2_hit_blocks + r.g3_hit_blocks, r.page_refs);
  nb::dict onboard;
  onboard["g2_to_g1"] = r.g2_hit_blocks;
  onboard["g3_to_g1"] = r.g3_hit_blocks;
  if (with_g4) onboard["g4_to_g1"] = r.g4_hit_blocks;
  d["onboard_blocks"] = onboard;
  nb::dict offload;
  offload["g1_to_g2"] = r.store_g1_g2;
  offload["g2_to_g3"] = r.offload_g2_g3;
  offload["g1_to_g3"] = r.store_g1_g3;
  if (with_g4) offload["g2_to_g4"] = r.g4_put_blocks;
  d["offload_blocks"] = offload;
  d["disk_writes_avoided"] = r.disk_writes_avoided;
  d["offloads_dropped_full"] = r.dropped_full;
  d["stores_skipped_cached"] = r.skipped_cached;
  nb::dict ev;
  ev["g1"] = r.g1_evictions;
  ev["g2"] = r.g2_evictions;
  ev["g3"] = r.g3_evictions;
  d["evictions"] = ev;
  d["max_waiting"] = r.max_waiting;
  d["max_running"] = r.max_running;
  d["trace_seconds"] = r.trace_seconds;
  d["seconds"] = r.seconds;
  d["requests_per_s"] = r.seconds > 0 ? static_cast<double>(r.requests) / r.seconds : 0.0;
  d["block_refs_per_s"] = r.seconds > 0 ? static_cast<double>(r.block_refs) / r.seconds : 0.0;
  d["bytes_loaded"] = r.bytes_loaded;
  d["bytes_stored"] = r.bytes_stored;
  d["blocks_verified"] = r.blocks_verified;
  d["mismatched_blocks"] = r.mismatched_blocks;
  d["load_errors"] = r.load_errors;
  d["metrics_port"] = r.metrics_port;
  if (with_g4) {
    // Local: the instance's own tiers (G1 + G2 + G3); global: local plus the shared G4.
    const uint64_t local = r.g1_hit_blocks + r.g2_hit_blocks + r.g3_hit_blocks;
    d["g4_hit_blocks"] = r.g4_hit_blocks;
    d["g4_put_blocks"] = r.g4_put_blocks;
    d["g4_token_hit_rate"] = rate(r.g4_hit_blocks * page, r.input_tokens);
    d["g4_block_hit_rate"] = rate(r.g4_hit_blocks, r.page_refs);
    d["local_token_hit_rate"] = rate(local * page, r.input_tokens);
    d["global_token_hit_rate"] = rate((local + r.g4_hit_blocks) * page, r.input_tokens);
    d["local_block_hit_rate"] = rate(local, r.page_refs);
    d["global_block_hit_rate"] = rate(local + r.g4_hit_blocks, r.page_refs);
    d["global_hit_tokens"] = (local + r.g4_hit_blocks) * page;
  }
  return d;
}

ReplayAssign ParseAssign(const std::string& name) {
  if (name == "conversation") return ReplayAssign::kConversation;
  if (name == "random") return ReplayAssign::kRandom;
  throw StatusException(Error(ErrorCode::kInvalidArgument,
                              "--assign '" + name + "': expected 'conversation' or 'random'"));
}

// The options both replay entry points share.
ReplayOptions BaseOptions(uint32_t block_size, std::optional<uint64_t> g1_blocks, std::optional<uint64_t> g2_blocks,
                          std::optional<uint64_t> g3_blocks, const std::string& policy,
                          const std::optional<std::string>& disk_policy, double prefill_tokens_per_s,
                          double decode_tokens_per_s, uint64_t progress_every, double linger_seconds) {
  ReplayOptions o;
  o.page_size = block_size;
  o.g1_blocks = g1_blocks;
  o.g2_blocks = g2_blocks;
  o.g3_blocks = g3_blocks;
  TierPolicy host = ReplayPolicy(policy), disk = disk_policy ? ReplayPolicy(*disk_policy) : host;
  o.policy = host.policy;
  o.opt_host = host.opt;
  o.disk_policy = disk.policy;
  o.opt_disk = disk.opt;
  o.prefill_tokens_per_s = prefill_tokens_per_s;
  o.decode_tokens_per_s = decode_tokens_per_s;
  o.config = KvbmConfig::FromEnvironment();
  o.progress_every = progress_every ? progress_every : 1;
  o.linger_seconds = linger_seconds;
  return o;
}

// Calls Python's `progress(finished, total, trace_seconds, token_hit_rate)` (and, once, the
// `on_metrics_port(port)`) from the replay's thread. A Python exception stops the replay and is
// kept to be re-raised by Run once the replay has unwound.
class ProgressBridge {
 public:
  ProgressBridge(nb::object progress, nb::object on_metrics_port)
      : progress_(std::move(progress)), on_port_(std::move(on_metrics_port)) {}

  // Installs the callback in `o` (none when there is nothing to call).
  void Install(ReplayOptions& o) {
    if (progress_.is_none() && on_port_.is_none()) return;
    o.progress = [this](const ReplayProgress& p) {
      nb::gil_scoped_acquire gil;
      try {
        if (!port_reported_ && !on_port_.is_none()) {
          port_reported_ = true;
          on_port_(p.metrics_port);
        }
        if (progress_.is_none()) return true;
        nb::object keep_going = progress_(p.finished, p.total, p.trace_seconds, p.token_hit_rate);
        return keep_going.is_none() || nb::cast<bool>(keep_going);
      } catch (nb::python_error& e) {
        e.restore();  // re-raised by Run, once the replay has unwound
        raised_ = true;
        return false;
      }
    };
  }

  // Runs `replay` with the GIL released; re-raises what the callback raised, else unwraps.
  template <typename F>
  auto Run(F&& replay) {
    decltype(replay()) r;
    {
      nb::gil_scoped_release release;
      r = replay();
    }
    if (raised_) throw nb::python_error();
    return ThrowIfError(std::move(r));
  }

 private:
  nb::object progress_, on_port_;
  bool raised_ = false;
  bool port_reported_ = false;
};

}  // namespace
}  // namespace kvbm::python

void BindReplay(nanobind::module_& m) {
  using namespace kvbm;
  using namespace kvbm::python;

  nb::class_<Trace>(m, "ReplayTrace", "A parsed Mooncake trace (immutable).")
      .def_prop_ro("num_requests", [](const Trace& t) { return t.requests.size(); })
      .def_prop_ro("block_refs", [](const Trace& t) { return t.block_refs; })
      .def_prop_ro("input_tokens", [](const Trace& t) { return t.input_tokens; })
      .def("distinct_full_pages", &Trace::DistinctFullPages, "page_size"_a = kTraceBlockTokens,
           nb::call_guard<nb::gil_scoped_release>())
      .def("total_pages", &Trace::TotalPages, "page_size"_a = kTraceBlockTokens)
      .def("__len__", [](const Trace& t) { return t.requests.size(); });

  m.def(
      "parse_mooncake_trace",
      [](nb::bytes data, size_t limit) {
        std::string text(data.c_str(), data.size());
        nb::gil_scoped_release release;
        return ThrowIfError(ParseMooncakeTrace(text, limit));
      },
      "data"_a, "limit"_a = 0, "Parses Mooncake JSONL bytes; errors name the line.");
  m.def(
      "read_mooncake_trace",
      [](const std::string& path, size_t limit) {
        nb::gil_scoped_release release;
        return ThrowIfError(ReadMooncakeTrace(path, limit));
      },
      "path"_a, "limit"_a = 0, "Reads and parses a Mooncake JSONL file; errors name the line.");
  m.attr("MAX_TRACE_LINE_BYTES") = kMaxTraceLineBytes;

  m.def(
      "run_replay",
      [](const Trace& trace, uint32_t block_size, std::optional<uint64_t> g1_blocks,
         std::optional<uint64_t> g2_blocks, std::optional<uint64_t> g3_blocks,
         const std::string& policy, std::optional<std::string> disk_policy, double prefill_tokens_per_s, double decode_tokens_per_s,
         bool move_bytes, uint32_t bytes_per_token, nb::object progress, uint64_t progress_every,
         double linger_seconds, nb::object on_metrics_port, uint32_t load_steps) {
        ReplayOptions o = BaseOptions(block_size, g1_blocks, g2_blocks, g3_blocks, policy, disk_policy,
                                      prefill_tokens_per_s, decode_tokens_per_s, progress_every, linger_seconds);
        o.move_bytes = move_bytes;
        if (move_bytes && load_steps > 0)
          throw ConfigError(fmt::format(
              "run_replay: load_steps={} applies without move_bytes (with real bytes the worker's loads take "
              "the steps they take)",
              load_steps));
        o.load_steps = load_steps;
        o.bytes_per_token = bytes_per_token;
        ProgressBridge bridge(progress, on_metrics_port);
        bridge.Install(o);
        return ResultDict(bridge.Run([&] { return RunReplay(trace, o); }), block_size);
      },
      "trace"_a, "block_size"_a = kTraceBlockTokens, "g1_blocks"_a.none() = nb::none(),
      "g2_blocks"_a.none() = nb::none(), "g3_blocks"_a.none() = 0, "policy"_a = "adaptive",
      "disk_policy"_a.none() = nb::none(),
      "prefill_tokens_per_s"_a = 10000.0, "decode_tokens_per_s"_a = 50.0, "move_bytes"_a = false,
      "bytes_per_token"_a = 8, "progress"_a.none() = nb::none(), "progress_every"_a = 256,
      "linger_seconds"_a = 0.0, "on_metrics_port"_a.none() = nb::none(), "load_steps"_a = 0,
      "Replays `trace` through the connector core; returns the figures as a dict (see "
      "docs/REPLAY.md).\n"
      "Sizes in blocks: None = unlimited (computed from the trace), 0 = off (G1: no prefix "
      "cache).\n"
      "`policy` orders G2 and G3 ('adaptive', kvbm's default; 'reuse', 'leaf-first', 'lru', or 'opt': Belady's MIN from the "
      "trace); `disk_policy` overrides it for G3.\n"
      "`progress(finished, total, trace_seconds, token_hit_rate)` is called every "
      "`progress_every`\n"
      "finished requests; returning False cancels (CancelledError).\n"
      "`on_metrics_port(port)` is called once, at the first progress point, with the port the\n"
      "DYN_KVBM_METRICS endpoint bound (0 when it is off or could not bind).\n"
      "`load_steps`: engine steps each load takes (0: within its step; not with move_bytes), so that\n"
      "policies that treat blocks held by a load differently can differ.");

  m.def(
      "assign_instances",
      [](const Trace& trace, uint32_t instances, const std::string& assign, uint64_t seed) {
        return AssignInstances(trace, instances, ParseAssign(assign), seed);
      },
      "trace"_a, "instances"_a, "assign"_a = "conversation", "seed"_a = 0,
      "The instance of each request (by trace index) under `assign` ('conversation' or 'random').");

  m.def(
      "run_replay_instances",
      [](const Trace& trace, uint32_t instances, uint64_t g4_blocks, const std::string& assign, uint64_t seed,
         uint32_t block_size, std::optional<uint64_t> g1_blocks, std::optional<uint64_t> g2_blocks,
         std::optional<uint64_t> g3_blocks, const std::string& policy, std::optional<std::string> disk_policy,
         double prefill_tokens_per_s, double decode_tokens_per_s, nb::object progress, uint64_t progress_every,
         double linger_seconds) {
        ReplayOptions o = BaseOptions(block_size, g1_blocks, g2_blocks, g3_blocks, policy, disk_policy,
                                      prefill_tokens_per_s, decode_tokens_per_s, progress_every, linger_seconds);
        o.instances = instances;
        o.g4_blocks = g4_blocks;
        o.assign = ParseAssign(assign);
        o.assign_seed = seed;
        ProgressBridge bridge(progress, nb::none());
        bridge.Install(o);
        ReplayInstancesResult res = bridge.Run([&] { return RunReplayInstances(trace, o); });
        nb::dict out;
        out["instances"] = instances;
        out["assign"] = assign;
        out["g4_blocks"] = res.g4_blocks;
        out["g4_used_blocks"] = res.g4_used;
        out["g4_evictions"] = res.g4_evictions;
        nb::list per;
        for (const ReplayResult& x : res.instances) per.append(ResultDict(x, block_size, true));
        out["per_instance"] = per;
        out["overall"] = ResultDict(res.total, block_size, true);
        return out;
      },
      "trace"_a, "instances"_a = 1, "g4_blocks"_a = 0, "assign"_a = "conversation", "seed"_a = 0,
      "block_size"_a = kTraceBlockTokens, "g1_blocks"_a.none() = nb::none(), "g2_blocks"_a.none() = nb::none(),
      "g3_blocks"_a.none() = 0, "policy"_a = "adaptive", "disk_policy"_a.none() = nb::none(),
      "prefill_tokens_per_s"_a = 10000.0, "decode_tokens_per_s"_a = 50.0, "progress"_a.none() = nb::none(),
      "progress_every"_a = 256, "linger_seconds"_a = 0.0,
      "Replays `trace` on `instances` engines (each with its own G1/G2/G3 of the given sizes) that share "
      "one G4 of `g4_blocks` (LRU); requests go to instances by `assign` ('conversation': round-robin by "
      "conversation, or 'random'). Returns {'per_instance': [...], 'overall': {...}, ...}: each with "
      "local (G1+G2+G3) and global (plus G4) hit rates.");
}
