#include "kvbm/replay.h"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstring>
#include <deque>
#include <fstream>
#include <list>
#include <numeric>
#include <queue>
#include <sstream>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <unordered_set>

#include "kvbm/leader.h"
#include "kvbm/manager.h"
#include "kvbm/sim_engine.h"
#include "kvbm/worker.h"

namespace kvbm {
namespace {

uint64_t CeilDiv(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// The G4 that instances share, as a hit-rate model: `capacity` blocks by sequence hash, exact
// LRU (a Redis Cluster under allkeys-lru approximates it by sampling).
class SharedG4 {
 public:
  explicit SharedG4(uint64_t capacity) : capacity_(capacity) {}

  // The leading run of `blocks` G4 holds; each block of it becomes most recently used (read).
  size_t MatchAndTouch(std::span<const TokenBlock> blocks) {
    size_t n = 0;
    for (const TokenBlock& b : blocks) {
      auto it = index_.find(b.sequence_hash.value());
      if (it == index_.end()) break;
      lru_.splice(lru_.end(), lru_, it->second);
      ++n;
    }
    return n;
  }

  // Stores (or rewrites) `hash` as most recently used, evicting the least recently used.
  void Put(SequenceHash hash) {
    if (capacity_ == 0) return;
    auto it = index_.find(hash.value());
    if (it != index_.end()) {
      lru_.splice(lru_.end(), lru_, it->second);
      return;
    }
    if (index_.size() >= capacity_) {
      index_.erase(lru_.front());
      lru_.pop_front();
      ++evictions_;
    }
    lru_.push_back(hash.value());
    index_.emplace(hash.value(), std::prev(lru_.end()));
  }

  uint64_t used() const { return index_.size(); }
  uint64_t evictions() const { return evictions_; }

 private:
  const uint64_t capacity_;
  std::list<uint64_t> lru_;  // least recently used first
  std::unordered_map<uint64_t, std::list<uint64_t>::iterator> index_;
  uint64_t evictions_ = 0;
};

}  // namespace

std::vector<uint32_t> AssignInstances(const Trace& trace, uint32_t instances, ReplayAssign assign,
                                      uint64_t seed) {
  if (instances == 0) throw ConfigError("kvbm replay: --instances must be >= 1");
  const auto& reqs = trace.requests;
  std::vector<uint32_t> out(reqs.size(), 0);
  if (assign == ReplayAssign::kRandom) {
    for (size_t i = 0; i < reqs.size(); ++i)
      out[i] = static_cast<uint32_t>(SplitMix64(seed ^ SplitMix64(i)) % instances);
    return out;
  }
  // The trace's common prefix: the blocks every (non-empty) request starts with.
  size_t common = SIZE_MAX;
  const std::vector<uint64_t>* first = nullptr;
  for (const TraceRequest& r : reqs) {
    if (r.hash_ids.empty()) continue;
    if (!first) {
      first = &r.hash_ids;
      common = r.hash_ids.size();
      continue;
    }
    size_t k = 0;
    while (k < common && k < r.hash_ids.size() && r.hash_ids[k] == (*first)[k]) ++k;
    common = k;
  }
  // A conversation's key: its first block past the common prefix (its last block when it has
  // none past it). A request without blocks is a conversation of its own.
  std::unordered_map<uint64_t, uint32_t> conversation_instance;
  uint64_t conversations = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    const auto& ids = reqs[i].hash_ids;
    if (ids.empty()) {
      out[i] = static_cast<uint32_t>(conversations++ % instances);
      continue;
    }
    uint64_t key = ids[std::min(common, ids.size() - 1)];
    auto [it, added] = conversation_instance.try_emplace(key, 0);
    if (added) it->second = static_cast<uint32_t>(conversations++ % instances);
    out[i] = it->second;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// The event loop

namespace {

class ReplayRun {
 public:
  // One instance of several (`seq` given): it replays the trace indices `order` (in trace
  // order), shares G4 `g4` (nullptr: none) and the event sequence counter `seq` of the event
  // loop. Alone (`seq` null): every request.
  ReplayRun(const Trace& trace, const ReplayOptions& o, std::vector<uint32_t> order = {},
            SharedG4* g4 = nullptr, uint64_t* seq = nullptr, bool report_progress = true)
      : trace_(trace),
        o_(o),
        page_(o.page_size),
        order_(seq ? std::move(order) : AllRequests(trace)),
        g4_(g4),
        seq_(seq ? seq : &own_seq_),
        report_progress_(report_progress) {
    if (page_ == 0) throw ConfigError("kvbm replay: --block-size must be > 0");
    if (!(o.prefill_tokens_per_s > 0) || !(o.decode_tokens_per_s > 0))
      throw ConfigError("kvbm replay: prefill and decode rates must be > 0 tokens/s");
    const uint64_t unlimited_pages = std::max<uint64_t>(trace.DistinctFullPages(page_) + 16, 16);
    g1_cache_ = !o.g1_blocks || *o.g1_blocks > 0;
    uint64_t g1 = o.g1_blocks && *o.g1_blocks > 0 ? *o.g1_blocks
                                                  : std::max<uint64_t>(trace.TotalPages(page_), 1);
    uint64_t g2 = o.g2_blocks ? *o.g2_blocks : unlimited_pages;
    uint64_t g3 = o.g3_blocks ? *o.g3_blocks : unlimited_pages;
    if (g2 == 0 && g3 == 0) throw ConfigError("kvbm replay: size G2 or G3 (both are 0)");
    result_.g1_blocks = g1_cache_ ? g1 : 0;
    result_.g2_blocks = g2;
    result_.g3_blocks = g3;
    g1_ = BlockPool::Create(TierId::kDevice, g1, EvictionPolicy::kLru);

    TierChainOptions tiers = TierChainOptions::FromConfig(
        o.config, uint64_t{page_} * std::max<uint32_t>(o.bytes_per_token, 1), g2, g3, o.policy);
    if (o.disk_policy) tiers.disk_policy = *o.disk_policy;
    if (o.opt_host || o.opt_disk) {
      oracle_ = BuildOracle();
      tiers.make_evictor = [this](TierId tier, uint64_t blocks) -> std::unique_ptr<Evictor> {
        if ((tier == TierId::kHost && o_.opt_host) || (tier == TierId::kDisk && o_.opt_disk))
          return MakeOptEvictor(oracle_, static_cast<uint32_t>(blocks));
        return nullptr;
      };
    }
    if (g4_ && g2 == 0)
      throw ConfigError("kvbm replay: G4 needs G2 (--g2-blocks > 0), as kvbm's remote tier does");
    manager_ = std::make_unique<KvBlockManager>(o.config, tiers, page_);
    leader_ = std::make_unique<ConnectorLeader>(manager_->chain(), o.config, page_, manager_->metrics());
    result_.metrics_port = manager_->metrics_port();
    if (o.move_bytes) SetUpBytes(g1);
  }

  ~ReplayRun() {
    if (worker_) worker_->WaitIdle();
    running_.clear();
    worker_.reset();
    leader_.reset();
  }

  Result<ReplayResult> Run() {
    auto t0 = std::chrono::steady_clock::now();
    while (!Done())
      if (auto s = StepOnce(); !s) return std::unexpected(s.error());
    result_.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (o_.linger_seconds > 0)
      std::this_thread::sleep_for(std::chrono::duration<double>(o_.linger_seconds));
    return Finalize();
  }

  bool Done() const { return next_ >= order_.size() && events_.empty(); }

  // What StepOnce does next, for an event loop over several instances: (time, 0, event
  // sequence) for an event, (arrival time, 1, trace index) for an arrival. Not when Done().
  std::tuple<double, int, uint64_t> NextKey() const {
    if (TakeEvent()) return {events_.top().t, 0, events_.top().seq};
    uint32_t i = order_[next_];
    return {trace_.requests[i].timestamp_ms / 1e3, 1, i};
  }

  // One event or arrival, then admissions.
  Status StepOnce() {
    if (TakeEvent()) {
      Event e = events_.top();
      events_.pop();
      now_ = e.t;
      Status s = e.kind == EventKind::kPrefillDone ? PrefillDone(e.request) : Finish(e.request);
      if (!s) return s;
    } else {
      uint32_t i = order_[next_++];
      now_ = std::max(now_, trace_.requests[i].timestamp_ms / 1e3);
      waiting_.push_back(i);
      result_.max_waiting = std::max<uint64_t>(result_.max_waiting, waiting_.size());
    }
    return AdmitWaiting();
  }

  uint64_t finished() const { return finished_; }
  double now() const { return now_; }
  uint16_t metrics_port() const { return result_.metrics_port; }
  // Local hits so far, for progress: (hit tokens, input tokens).
  std::pair<uint64_t, uint64_t> HitTokens() const { return {result_.hit_tokens(page_), result_.input_tokens}; }

  // The figures once Done().
  ReplayResult Finalize() {
    result_.trace_seconds = now_;
    const TierChainStats& st = leader_->chain().stats();
    result_.store_g1_g2 = st.store_host_blocks;
    result_.store_g1_g3 = st.store_disk_blocks;
    result_.offload_g2_g3 = st.offload_disk_blocks;
    result_.disk_writes_avoided = st.dropped_filter;
    result_.dropped_full = st.dropped_full;
    result_.skipped_cached = st.skipped_cached_blocks;
    result_.g1_evictions = g1_->stats().evictions;
    if (leader_->host_pool()) result_.g2_evictions = leader_->host_pool()->stats().evictions;
    if (leader_->disk_pool()) result_.g3_evictions = leader_->disk_pool()->stats().evictions;
    if (worker_) {
      worker_->WaitIdle();
      const auto& m = *worker_->metrics();
      auto bytes = [&](TransferPath p) { return m.bytes[static_cast<size_t>(p)].load(); };
      result_.bytes_loaded = bytes(TransferPath::kH2Dev) + bytes(TransferPath::kDisk2Dev);
      result_.bytes_stored =
          bytes(TransferPath::kD2H) + bytes(TransferPath::kH2D_Disk) + bytes(TransferPath::kD2D);
    }
    return result_;
  }

 private:
  enum class EventKind : uint8_t { kPrefillDone, kFinish };
  struct Event {
    double t;
    uint64_t seq;
    EventKind kind;
    uint32_t request;
    bool operator>(const Event& o) const { return t != o.t ? t > o.t : seq > o.seq; }
  };
  static std::vector<uint32_t> AllRequests(const Trace& trace) {
    std::vector<uint32_t> all(trace.requests.size());
    std::iota(all.begin(), all.end(), 0u);
    return all;
  }

  bool TakeEvent() const {
    return !events_.empty() &&
           (next_ >= order_.size() || events_.top().t <= trace_.requests[order_[next_]].timestamp_ms / 1e3);
  }

  struct Running {
    std::string id;
    std::vector<TokenBlock> blocks;         // full prompt blocks
    std::vector<ImmutableBlock> g1_cached;  // G1 prefix hits, then registered blocks
    std::vector<MutableBlock> g1_owned;     // blocks being computed (prompt tail, decode)
    std::vector<uint32_t> device_ids;
    uint64_t computed_tokens = 0;  // G1 hits + kvbm loads
    uint64_t g1_hits = 0;
    uint64_t local_hits = 0;  // G1 hits + kvbm loads
    uint64_t g4_hits = 0;     // the run past them that G4 held
  };

  // Every request's full prompt pages, by request index: the future Belady's MIN looks at.
  std::shared_ptr<NextUseOracle> BuildOracle() {
    auto oracle = std::make_shared<NextUseOracle>();
    for (uint32_t i : order_) {
      SynthesizeTokens(trace_.requests[i], tokens_);
      auto hashed = HashTokenBlocks(tokens_, page_, salt_hash_);
      if (!hashed) throw ConfigError("kvbm replay --policy opt: " + hashed.error().ToString());
      for (const TokenBlock& b : *hashed) oracle->AddUse(b.sequence_hash, i);
    }
    return oracle;
  }

  void SetUpBytes(uint64_t g1) {
    if (o_.bytes_per_token == 0 || o_.bytes_per_token % 4 != 0)
      throw ConfigError(fmt::format(
          "kvbm replay: bytes per token {} must be a positive multiple of 4 with --bytes",
          o_.bytes_per_token));
    const int64_t nb = static_cast<int64_t>(g1), page = page_, inner = o_.bytes_per_token / 4;
    g1_tensor_.assign(g1 * 2 * page_ * inner * 2, 0);
    DeviceTensors t;
    TensorShape s;
    s.dtype_bytes = 2;
    s.shape = {nb, 2, page, inner};
    s.strides = {2 * page * inner, page * inner, inner, 1};
    t.layer_shapes.push_back(s);
    t.layer_pointers.push_back(reinterpret_cast<uintptr_t>(g1_tensor_.data()));
    t.num_blocks = g1;
    t.page_size = page_;
    t.kind = MemoryKind::kHost;
    worker_ = std::make_unique<KvbmWorker>(o_.config, 0, 1, manager_->metrics());
    if (auto st = worker_->RegisterKvCaches(t); !st)
      throw ConfigError("kvbm replay --bytes: " + st.error().ToString());
    if (auto st = worker_->AllocateTiers(leader_->host_blocks(), leader_->disk_blocks()); !st)
      throw ConfigError("kvbm replay --bytes: " + st.error().ToString());
    expect_.resize(worker_->device_layout()->dims().chunk_bytes());
  }

  void Push(double t, EventKind kind, uint32_t request) {
    events_.push({t, (*seq_)++, kind, request});
  }

  Status AdmitWaiting() {
    while (!waiting_.empty()) {
      auto admitted = Admit(waiting_.front());
      if (!admitted) return std::unexpected(admitted.error());
      if (!*admitted) break;
      waiting_.pop_front();
    }
    return {};
  }

  // One engine step: the leader's operations go to the worker (when bytes move) and what the
  // worker reports comes back. Without a worker, loads are finished at once.
  Status Step(const std::string* loading_request) {
    StepMetadata meta = leader_->BuildStepMetadata();
    ++step_no_;
    if (!worker_) {
      std::vector<std::string> done;
      if (loading_request) {
        if (o_.load_steps == 0) done.push_back(*loading_request);
        else slow_loads_.emplace_back(step_no_ + o_.load_steps, *loading_request);
      }
      // Loads that span steps finish in order of their start.
      while (!slow_loads_.empty() && slow_loads_.front().first <= step_no_) {
        done.push_back(std::move(slow_loads_.front().second));
        slow_loads_.pop_front();
      }
      if (!done.empty()) leader_->OnWorkerOutput(done, {}, {});
      return {};
    }
    if (auto s = worker_->BindStep(meta); !s) return s;
    std::vector<std::string> recving, sending;
    if (loading_request) {
      auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
      while (std::find(recving.begin(), recving.end(), *loading_request) == recving.end()) {
        auto [snd, rcv] = worker_->GetFinished();
        sending.insert(sending.end(), snd.begin(), snd.end());
        recving.insert(recving.end(), rcv.begin(), rcv.end());
        if (std::chrono::steady_clock::now() > deadline)
          return MakeError(ErrorCode::kTimeout,
                           "kvbm replay: load for " + *loading_request + " never finished");
        if (std::find(recving.begin(), recving.end(), *loading_request) == recving.end())
          std::this_thread::sleep_for(std::chrono::microseconds(20));
      }
    }
    if (auto s = worker_->ForwardPassDone(); !s) return s;
    auto [snd, rcv] = worker_->GetFinished();
    sending.insert(sending.end(), snd.begin(), snd.end());
    recving.insert(recving.end(), rcv.begin(), rcv.end());
    last_errors_ = worker_->TakeLoadErrors();
    result_.load_errors += last_errors_.size();
    leader_->OnWorkerOutput(recving, sending, last_errors_);
    return {};
  }

  // Compares G1 block `dev` with the pattern of `hash`; true when equal.
  bool VerifyDevice(uint32_t dev, uint64_t hash) {
    const Layout& layout = *worker_->device_layout();
    for (uint64_t o = 0; o < layout.dims().outer_dim; ++o) {
      SimulatedEngine::FillChunk(expect_.data(), expect_.size(), hash, 0, o);
      if (std::memcmp(worker_->device_memory().ChunkAddress(dev, 0, o), expect_.data(),
                      expect_.size()) != 0)
        return false;
    }
    return true;
  }
  void FillDevice(uint32_t dev, uint64_t hash) {
    const Layout& layout = *worker_->device_layout();
    for (uint64_t o = 0; o < layout.dims().outer_dim; ++o)
      SimulatedEngine::FillChunk(worker_->device_memory().ChunkAddress(dev, 0, o), expect_.size(),
                                 hash, 0, o);
  }

  // Admits request `i` when G1 can hold it; false: it waits.
  Result<bool> Admit(uint32_t i) {
    const TraceRequest& req = trace_.requests[i];
    const uint64_t pages =
        std::max<uint64_t>(CeilDiv(req.input_length + req.output_length, page_), 1);
    if (pages > g1_->num_blocks()) {
      ++result_.rejected;
      return true;  // never fits: dropped from the queue
    }
    SynthesizeTokens(req, tokens_);
    auto hashed = HashTokenBlocks(tokens_, page_, salt_hash_);
    if (!hashed) return std::unexpected(hashed.error());
    Running run;
    run.blocks = std::move(*hashed);
    if (g1_cache_ && req.input_length > 0) {
      size_t cap = std::min<size_t>((req.input_length - 1) / page_, run.blocks.size());
      std::vector<BlockKey> keys;
      keys.reserve(cap);
      for (size_t k = 0; k < cap; ++k) keys.push_back(KeyOf(run.blocks[k]));
      BlockRun hit = g1_->MatchPrefix(keys);
      run.g1_cached.reserve(hit.size());
      for (size_t k = 0; k < hit.size(); ++k) run.g1_cached.push_back(hit.Share(k));
    }
    auto owned = g1_->Allocate(pages - run.g1_cached.size());
    if (!owned) return false;  // releases the G1 prefix; retried when a request finishes
    run.g1_owned = std::move(*owned);
    run.g1_hits = run.g1_cached.size();
    for (auto& b : run.g1_cached) run.device_ids.push_back(b.id().value());
    for (auto& b : run.g1_owned) run.device_ids.push_back(b.id().value());
    run.id = fmt::format("r{}", i);

    if (oracle_) oracle_->SetNow(i);  // request i is looked up now
    leader_->AddRequest(run.id, tokens_);
    auto match = leader_->GetNumNewMatchedTokens(run.id, run.g1_hits * page_);
    if (!match) return std::unexpected(match.error());
    if (auto s = leader_->UpdateStateAfterAlloc(run.id, run.device_ids, match->external_tokens); !s)
      return std::unexpected(s.error());
    const uint64_t loaded = match->external_tokens / page_;
    if (auto s = Step(loaded > 0 ? &run.id : nullptr); !s) return std::unexpected(s.error());
    if (worker_) {
      // G1 hits and loaded blocks must hold their block's bytes; everything else is computed.
      std::vector<uint32_t> errors = last_errors_;
      for (uint64_t k = 0; k < run.blocks.size(); ++k) {
        uint32_t dev = run.device_ids[k];
        uint64_t hash = run.blocks[k].sequence_hash.value();
        bool failed = std::find(errors.begin(), errors.end(), dev) != errors.end();
        if (k < run.g1_hits + loaded && !failed) {
          ++result_.blocks_verified;
          if (!VerifyDevice(dev, hash)) ++result_.mismatched_blocks;
        } else {
          FillDevice(dev, hash);
        }
      }
    }
    run.local_hits = run.g1_hits + loaded;
    if (g4_ && req.input_length > 0) {
      // G4 only past the local run, never the whole prompt (as the leader's match).
      const size_t cap = std::min<size_t>((req.input_length - 1) / page_, run.blocks.size());
      if (run.local_hits < cap)
        run.g4_hits = g4_->MatchAndTouch(std::span<const TokenBlock>(run.blocks).subspan(
            run.local_hits, cap - run.local_hits));
      result_.g4_hit_blocks += run.g4_hits;
    }
    result_.g1_hit_blocks += run.g1_hits;
    result_.g2_hit_blocks += match->host_blocks;
    result_.g3_hit_blocks += match->disk_blocks;
    result_.requests += 1;
    result_.block_refs += req.hash_ids.size();
    result_.page_refs += CeilDiv(req.input_length, page_);
    result_.input_tokens += req.input_length;
    run.computed_tokens = (run.g1_hits + loaded) * page_;
    Push(now_ + static_cast<double>(req.input_length) / o_.prefill_tokens_per_s,
         EventKind::kPrefillDone, i);
    running_.emplace(i, std::move(run));
    result_.max_running = std::max<uint64_t>(result_.max_running, running_.size());
    return true;
  }

  // The request's compute needs its KV: a load still in flight finishes now.
  void FinishSlowLoad(const std::string& id) {
    auto it = std::find_if(slow_loads_.begin(), slow_loads_.end(), [&](const auto& l) { return l.second == id; });
    if (it == slow_loads_.end()) return;
    slow_loads_.erase(it);
    std::string done = id;
    leader_->OnWorkerOutput(std::span<const std::string>(&done, 1), {}, {});
  }

  Status PrefillDone(uint32_t i) {
    Running& run = running_.at(i);
    FinishSlowLoad(run.id);
    const TraceRequest& req = trace_.requests[i];
    uint64_t scheduled =
        req.input_length > run.computed_tokens ? req.input_length - run.computed_tokens : 0;
    // The blocks this request computes (G4 hits aside) that G2 does not hold yet: G2 stores
    // them fresh now, and with admission "store" they are put into G4 too.
    std::vector<SequenceHash> g4_puts;
    if (g4_) {
      const BlockPool* host = leader_->host_pool();
      for (size_t k = run.local_hits + run.g4_hits; k < run.blocks.size(); ++k)
        if (!host->Contains(KeyOf(run.blocks[k]))) g4_puts.push_back(run.blocks[k].sequence_hash);
    }
    if (auto s = leader_->OnScheduled(run.id, run.device_ids, run.computed_tokens, scheduled); !s)
      return s;
    for (SequenceHash h : g4_puts) g4_->Put(h);
    result_.g4_put_blocks += g4_puts.size();
    // The store step, then three empty steps that release the leader's store pins.
    for (int k = 0; k < 4; ++k)
      if (auto s = Step(nullptr); !s) return s;
    if (g1_cache_) {
      // The computed full blocks become part of the engine's prefix cache.
      for (size_t k = run.g1_hits; k < run.blocks.size(); ++k) {
        MutableBlock& b = run.g1_owned[k - run.g1_hits];
        if (auto s = b.Complete(KeyOf(run.blocks[k])); !s) return s;
        auto reg = g1_->Register(std::move(b));
        if (!reg) return std::unexpected(reg.error());
        run.g1_cached.push_back(std::move(*reg));
      }
    }
    Push(now_ + static_cast<double>(req.output_length) / o_.decode_tokens_per_s, EventKind::kFinish,
         i);
    return {};
  }

  Status Finish(uint32_t i) {
    auto it = running_.find(i);
    if (leader_->RequestFinished(it->second.id)) {
      // A load still in flight cannot happen here (loads finish within their step); keep the
      // blocks until the worker reports it, as the contract asks.
      if (auto s = Step(nullptr); !s) return s;
    }
    running_.erase(it);
    ++finished_;
    if (report_progress_ && o_.progress &&
        (finished_ % o_.progress_every == 0 || finished_ == order_.size())) {
      ReplayProgress p;
      p.finished = finished_;
      p.total = order_.size();
      p.trace_seconds = now_;
      p.metrics_port = result_.metrics_port;
      p.token_hit_rate = result_.input_tokens ? static_cast<double>(result_.hit_tokens(page_)) /
                                                    static_cast<double>(result_.input_tokens)
                                              : 0;
      if (!o_.progress(p)) return MakeError(ErrorCode::kCancelled, "kvbm replay: cancelled");
    }
    return {};
  }

  const Trace& trace_;
  const ReplayOptions& o_;
  const uint32_t page_;
  const std::vector<uint32_t> order_;
  SharedG4* const g4_;
  uint64_t own_seq_ = 0;
  uint64_t* const seq_;
  const bool report_progress_;
  size_t next_ = 0;  // next of order_ to arrive
  const uint64_t salt_hash_ = ComputeSaltHash(std::nullopt, std::nullopt);
  bool g1_cache_ = true;
  std::shared_ptr<NextUseOracle> oracle_;  // Belady's MIN only
  std::shared_ptr<BlockPool> g1_;
  std::unique_ptr<KvBlockManager> manager_;
  std::unique_ptr<ConnectorLeader> leader_;  // after manager_: destroyed first
  std::vector<uint8_t> g1_tensor_;  // declared before worker_: outlives it
  std::unique_ptr<KvbmWorker> worker_;
  std::vector<uint8_t> expect_;
  std::vector<uint32_t> last_errors_;
  std::priority_queue<Event, std::vector<Event>, std::greater<Event>> events_;
  std::deque<uint32_t> waiting_;
  std::unordered_map<uint32_t, Running> running_;
  std::vector<Token> tokens_;
  std::deque<std::pair<uint64_t, std::string>> slow_loads_;  // (step it finishes at, request)
  uint64_t step_no_ = 0;
  uint64_t finished_ = 0;
  double now_ = 0;
  ReplayResult result_;
};

}  // namespace

Result<ReplayResult> RunReplay(const Trace& trace, const ReplayOptions& options) {
  ReplayRun run(trace, options);
  return run.Run();
}

Result<ReplayInstancesResult> RunReplayInstances(const Trace& trace, const ReplayOptions& options) {
  const uint32_t n = options.instances;
  if (n == 0) throw ConfigError("kvbm replay: --instances must be >= 1");
  if (n > kMaxReplayInstances)
    throw ConfigError(fmt::format("kvbm replay: --instances {} is more than {}", n, kMaxReplayInstances));
  if (options.move_bytes)
    throw ConfigError("kvbm replay: --bytes models one instance; --instances and --g4-blocks use the hit-rate model");
  std::vector<uint32_t> assigned = AssignInstances(trace, n, options.assign, options.assign_seed);
  std::vector<std::vector<uint32_t>> orders(n);
  for (uint32_t i = 0; i < assigned.size(); ++i) orders[assigned[i]].push_back(i);
  SharedG4 g4(options.g4_blocks);
  uint64_t seq = 0;
  // Instance 0 keeps the settings' metrics endpoint; the others would only collide on its port.
  ReplayOptions others = options;
  others.config.metrics = false;
  std::vector<std::unique_ptr<ReplayRun>> runs;
  for (uint32_t k = 0; k < n; ++k)
    runs.push_back(std::make_unique<ReplayRun>(trace, k == 0 ? options : others, std::move(orders[k]),
                                               options.g4_blocks > 0 ? &g4 : nullptr, &seq, false));
  auto t0 = std::chrono::steady_clock::now();
  const uint64_t total = trace.requests.size();
  uint64_t finished = 0;
  while (true) {
    // The instance whose next event or arrival comes first.
    ReplayRun* pick = nullptr;
    std::tuple<double, int, uint64_t> best;
    for (auto& r : runs) {
      if (r->Done()) continue;
      auto key = r->NextKey();
      if (!pick || key < best) {
        pick = r.get();
        best = key;
      }
    }
    if (!pick) break;
    uint64_t before = pick->finished();
    if (auto s = pick->StepOnce(); !s) return std::unexpected(s.error());
    if (pick->finished() == before || !options.progress) continue;
    finished += pick->finished() - before;
    if (finished % options.progress_every != 0 && finished != total) continue;
    ReplayProgress p;
    p.finished = finished;
    p.total = total;
    uint64_t hit = 0, input = 0;
    for (auto& r : runs) {
      p.trace_seconds = std::max(p.trace_seconds, r->now());
      auto [h, in] = r->HitTokens();
      hit += h;
      input += in;
    }
    p.token_hit_rate = input ? static_cast<double>(hit) / static_cast<double>(input) : 0;
    p.metrics_port = runs[0]->metrics_port();
    if (!options.progress(p)) return MakeError(ErrorCode::kCancelled, "kvbm replay: cancelled");
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (options.linger_seconds > 0)
    std::this_thread::sleep_for(std::chrono::duration<double>(options.linger_seconds));
  ReplayInstancesResult out;
  ReplayResult& t = out.total;
  for (auto& r : runs) {
    ReplayResult x = r->Finalize();
    x.seconds = seconds;
    t.requests += x.requests;
    t.rejected += x.rejected;
    t.block_refs += x.block_refs;
    t.page_refs += x.page_refs;
    t.input_tokens += x.input_tokens;
    t.g1_hit_blocks += x.g1_hit_blocks;
    t.g2_hit_blocks += x.g2_hit_blocks;
    t.g3_hit_blocks += x.g3_hit_blocks;
    t.g4_hit_blocks += x.g4_hit_blocks;
    t.g4_put_blocks += x.g4_put_blocks;
    t.g1_blocks = x.g1_blocks;
    t.g2_blocks = x.g2_blocks;
    t.g3_blocks = x.g3_blocks;
    t.store_g1_g2 += x.store_g1_g2;
    t.store_g1_g3 += x.store_g1_g3;
    t.offload_g2_g3 += x.offload_g2_g3;
    t.disk_writes_avoided += x.disk_writes_avoided;
    t.dropped_full += x.dropped_full;
    t.skipped_cached += x.skipped_cached;
    t.g1_evictions += x.g1_evictions;
    t.g2_evictions += x.g2_evictions;
    t.g3_evictions += x.g3_evictions;
    t.max_waiting = std::max(t.max_waiting, x.max_waiting);
    t.max_running = std::max(t.max_running, x.max_running);
    t.trace_seconds = std::max(t.trace_seconds, x.trace_seconds);
    t.metrics_port = std::max(t.metrics_port, x.metrics_port);
    out.instances.push_back(x);
  }
  t.seconds = seconds;
  out.g4_blocks = options.g4_blocks;
  out.g4_used = g4.used();
  out.g4_evictions = g4.evictions();
  return out;
}

}  // namespace kvbm
