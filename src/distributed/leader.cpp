#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <set>
#include <thread>
#include <unordered_map>

#include "distributed/socket_util.h"
#include "distributed/wire.h"
#include "kvbm/distributed.h"
#include "kvbm/log.h"

namespace kvbm {

using Clock = std::chrono::steady_clock;
using namespace distributed_detail;

// Lock order: mu_ before pub_mu_ is never needed; the two are never held together.
// The I/O thread alone touches router_; pub_ is shared by Submit and the I/O thread under pub_mu_.
class Leader::Impl {
 public:
  Impl(const KvbmConfig& config, LeaderOptions options)
      : config_(config),
        options_(options),
        created_(Clock::now()),
        ctx_(1),
        pub_(ctx_, zmq::socket_type::pub),
        router_(ctx_, zmq::socket_type::router),
        ranks_(options.world_size) {}

  Status Bind() {
    CommonOptions(pub_);
    CommonOptions(router_);
    // PUB must never block Submit; a slow subscriber drops (and its op then times out as lost).
    pub_.set(zmq::sockopt::sndhwm, 100000);
    router_.set(zmq::sockopt::router_mandatory, 1);
    if (auto s = BindOne(pub_, config_.leader_zmq_pub_port, "DYN_KVBM_LEADER_ZMQ_PUB_PORT", "PUB");
        !s)
      return s;
    if (auto s = BindOne(router_, config_.leader_zmq_ack_port, "DYN_KVBM_LEADER_ZMQ_ACK_PORT",
                         "ROUTER (ack)");
        !s)
      return s;
    pub_port_ = BoundPort(pub_);
    ack_port_ = BoundPort(router_);
    thread_ = std::thread([this] { Loop(); });
    return {};
  }

  ~Impl() {
    stop_.store(true);
    if (thread_.joinable()) thread_.join();
    std::lock_guard lock(pub_mu_);
    SendMessage(pub_, wire::Shutdown{});
  }

  Status WaitReady() {
    auto deadline =
        created_ +
        (options_.init_timeout
             ? *options_.init_timeout
             : std::chrono::milliseconds(config_.leader_worker_init_timeout_secs * 1000ull));
    std::unique_lock lock(mu_);
    cv_.wait_until(lock, deadline,
                   [&] { return all_ready_ || !alloc_errors_.empty() || !lost_.empty(); });
    if (!alloc_errors_.empty())
      return MakeError(ErrorCode::kResourceExhausted,
                       fmt::format("worker allocation failed: {}", fmt::join(alloc_errors_, "; ")));
    if (all_ready_) return {};
    std::vector<uint32_t> silent, unready;
    for (uint32_t r = 0; r < ranks_.size(); ++r) {
      if (!ranks_[r].hello) {
        silent.push_back(r);
      } else if (!ranks_[r].ready) {
        unready.push_back(r);
      }
    }
    return MakeError(
        ErrorCode::kTimeout,
        fmt::format(
            "kvbm leader: not every worker was ready within {} ms "
            "(DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS): ranks {} never reported; "
            "ranks {} reported but did not acknowledge allocation{}",
            std::chrono::duration_cast<std::chrono::milliseconds>(deadline - created_).count(),
            silent, unready, lost_.empty() ? "" : fmt::format("; ranks {} lost", lost_)));
  }

  Status Submit(const TransferOp& op, std::optional<uint64_t> gate, OpDoneFn on_done) {
    wire::OpRequest req;
    req.gate = gate;
    {
      std::lock_guard lock(mu_);
      if (!lost_.empty())
        return MakeError(ErrorCode::kUnavailable,
                         fmt::format("kvbm leader: worker ranks {} are lost", lost_));
      if (!all_ready_)
        return MakeError(ErrorCode::kFailedPrecondition,
                         "kvbm leader: workers are not ready (call WaitReady)");
      if (pending_.contains(op.id) || done_.contains(op.id))
        return MakeError(
            ErrorCode::kInvalidArgument,
            fmt::format("kvbm leader: op id {} is already in flight or unpolled", op.id));
      Pending p;
      p.num_blocks = static_cast<uint32_t>(op.blocks.size());
      p.acked.assign(ranks_.size(), false);
      p.on_done = std::move(on_done);
      pending_.emplace(op.id, std::move(p));
      req.meta.host_blocks = host_blocks_;
      req.meta.disk_blocks = disk_blocks_;
    }
    req.meta.step = gate.value_or(0);
    req.meta.ops.push_back(op);
    bool sent = false;
    {
      std::lock_guard lock(pub_mu_);
      sent = SendMessage(pub_, req);
    }
    if (!sent) {
      std::lock_guard lock(mu_);
      pending_.erase(op.id);
      return MakeError(ErrorCode::kUnavailable, "kvbm leader: PUB socket refused the op");
    }
    return {};
  }

  std::optional<OpResult> Poll(uint64_t op_id) {
    std::lock_guard lock(mu_);
    auto it = done_.find(op_id);
    if (it == done_.end()) return std::nullopt;
    OpResult r = std::move(it->second);
    done_.erase(it);
    return r;
  }

  bool ready() const {
    std::lock_guard lock(mu_);
    return all_ready_;
  }
  uint64_t host_blocks() const {
    std::lock_guard lock(mu_);
    return host_blocks_;
  }
  uint64_t disk_blocks() const {
    std::lock_guard lock(mu_);
    return disk_blocks_;
  }
  size_t in_flight() const {
    std::lock_guard lock(mu_);
    return pending_.size();
  }
  std::vector<uint32_t> lost_ranks() const {
    std::lock_guard lock(mu_);
    return lost_;
  }
  uint64_t rejected() const { return rejected_.load(); }
  uint16_t pub_port() const { return pub_port_; }
  uint16_t ack_port() const { return ack_port_; }

 private:
  struct RankState {
    bool hello = false;
    bool ready = false;
    wire::Hello info;
    std::string routing_id;
    Clock::time_point last_seen;
  };
  struct Pending {
    uint32_t num_blocks = 0;
    std::vector<bool> acked;
    std::set<uint32_t> failed;
    OpDoneFn on_done;
  };
  using Completion = std::pair<OpDoneFn, OpResult>;

  Status BindOne(zmq::socket_t& s, uint16_t port, const char* var, const char* what) {
    std::string ep = TcpEndpoint(config_.leader_zmq_host, port);
    try {
      s.bind(ep);
    } catch (const zmq::error_t& e) {
      std::string why = e.num() == EADDRINUSE ? "address in use" : e.what();
      return MakeError(ErrorCode::kUnavailable,
                       fmt::format("kvbm leader: cannot bind {} socket to {} ({}={}): {}", what, ep,
                                   var, port, why));
    }
    return {};
  }

  void Reject(const std::string& why) {
    rejected_.fetch_add(1);
    Log(LogLevel::kWarn, "kvbm leader: {}", why);
  }

  void Loop() {
    auto next_beat = Clock::now();
    while (!stop_.load()) {
      auto now = Clock::now();
      if (now >= next_beat) {
        {
          std::lock_guard lock(pub_mu_);
          SendMessage(pub_, wire::Heartbeat{wire::kLeaderRank});
        }
        next_beat = now + options_.timings.heartbeat_interval;
        CheckLiveness(now);
      }
      auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(next_beat - Clock::now());
      zmq::pollitem_t items[] = {{router_.handle(), 0, ZMQ_POLLIN, 0}};
      try {
        zmq::poll(items, 1, std::max(wait, std::chrono::milliseconds(1)));
      } catch (const zmq::error_t& e) {
        if (e.num() == EINTR) continue;
        Log(LogLevel::kError, "kvbm leader: poll failed: {}", e.what());
        return;
      }
      if (items[0].revents & ZMQ_POLLIN) DrainRouter();
    }
  }

  void DrainRouter() {
    std::vector<Completion> completions;
    for (int budget = 0; budget < 4096; ++budget) {
      zmq::message_t id, body;
      auto got = router_.recv(id, zmq::recv_flags::dontwait);
      if (!got) break;
      if (!id.more()) {
        Reject("message without a payload frame");
        continue;
      }
      (void)router_.recv(body, zmq::recv_flags::none);
      if (body.more()) {
        // Drop the rest of a multi-frame message: our peers send exactly one payload frame.
        zmq::message_t rest;
        while (body.more() && router_.recv(rest, zmq::recv_flags::none) && rest.more()) {
        }
        Reject("multi-frame message");
        continue;
      }
      auto msg = wire::Decode(
          std::span<const uint8_t>(static_cast<const uint8_t*>(body.data()), body.size()));
      if (!msg) {
        Reject(msg.error().message());
        continue;
      }
      Handle(id.to_string(), *msg, &completions);
    }
    for (auto& [fn, result] : completions) fn(result);
  }

  // Returns the rank if `from` is the peer that reported as `rank`, else rejects.
  bool Known(const std::string& from, uint32_t rank, const char* what) {
    if (rank >= ranks_.size() || !ranks_[rank].hello || ranks_[rank].routing_id != from) {
      Reject(fmt::format("{} from an unknown peer claiming rank {}", what, rank));
      return false;
    }
    return true;
  }

  void Handle(const std::string& from, const wire::Message& msg,
              std::vector<Completion>* completions) {
    auto now = Clock::now();
    std::unique_lock lock(mu_);
    if (const auto* hello = std::get_if<wire::Hello>(&msg)) {
      if (hello->rank >= ranks_.size() || hello->world_size != ranks_.size()) {
        Reject(fmt::format("hello from rank {} of world size {}; this leader expects world size {}",
                           hello->rank, hello->world_size, ranks_.size()));
        return;
      }
      RankState& rs = ranks_[hello->rank];
      if (rs.ready && rs.routing_id != from) {
        Reject(fmt::format("a second worker claims rank {}", hello->rank));
        return;
      }
      rs.hello = true;
      rs.info = *hello;
      rs.routing_id = from;
      rs.last_seen = now;
      if (!sized_ &&
          std::all_of(ranks_.begin(), ranks_.end(), [](const RankState& r) { return r.hello; })) {
        // Every rank holds its shard of each block, so a tier's bytes are split across the sum.
        uint64_t sum = 0;
        for (const auto& r : ranks_) sum += r.info.bytes_per_block;
        host_blocks_ = config_.HostBlocks(sum);
        disk_blocks_ = config_.DiskBlocks(sum);
        sized_ = true;
        Log(LogLevel::kInfo,
            "kvbm leader: {} workers, {} bytes per block in all: {} host blocks, {} disk blocks",
            ranks_.size(), sum, host_blocks_, disk_blocks_);
        for (auto& r : ranks_) SendTo(r.routing_id, wire::Sizing{host_blocks_, disk_blocks_});
      } else if (sized_) {
        SendTo(from, wire::Sizing{host_blocks_, disk_blocks_});
      }
    } else if (const auto* ready = std::get_if<wire::Ready>(&msg)) {
      if (!Known(from, ready->rank, "ready")) return;
      RankState& rs = ranks_[ready->rank];
      rs.last_seen = now;
      if (!ready->ok) {
        alloc_errors_.push_back(fmt::format("rank {}: {}", ready->rank, ready->error));
      } else {
        rs.ready = true;
        all_ready_ =
            std::all_of(ranks_.begin(), ranks_.end(), [](const RankState& r) { return r.ready; });
      }
      lock.unlock();
      cv_.notify_all();
    } else if (const auto* beat = std::get_if<wire::Heartbeat>(&msg)) {
      if (Known(from, beat->rank, "heartbeat")) ranks_[beat->rank].last_seen = now;
    } else if (const auto* res = std::get_if<wire::OpResultMsg>(&msg)) {
      if (!Known(from, res->rank, "op result")) return;
      ranks_[res->rank].last_seen = now;
      auto it = pending_.find(res->op_id);
      if (it == pending_.end()) {
        Log(LogLevel::kDebug, "kvbm leader: result of op {} from rank {} after the op completed",
            res->op_id, res->rank);
        return;
      }
      Pending& p = it->second;
      if (p.acked[res->rank]) return;
      p.acked[res->rank] = true;
      for (uint32_t b : res->failed_blocks) {
        if (b < p.num_blocks) {
          p.failed.insert(b);
        } else {
          Reject(fmt::format("rank {} reported block index {} of op {} with {} blocks", res->rank,
                             b, res->op_id, p.num_blocks));
        }
      }
      if (std::all_of(p.acked.begin(), p.acked.end(), [](bool a) { return a; })) {
        OpResult r{res->op_id, std::vector<uint32_t>(p.failed.begin(), p.failed.end()), false};
        Complete(it, std::move(r), completions);
      }
    } else {
      Reject("a message type that workers do not send");
    }
  }

  // REQUIRES: mu_ held.
  void Complete(std::unordered_map<uint64_t, Pending>::iterator it, OpResult result,
                std::vector<Completion>* completions) {
    if (it->second.on_done) {
      completions->emplace_back(std::move(it->second.on_done), std::move(result));
    } else {
      done_.emplace(it->first, std::move(result));
    }
    pending_.erase(it);
  }

  void CheckLiveness(Clock::time_point now) {
    std::vector<Completion> completions;
    {
      std::lock_guard lock(mu_);
      bool newly_lost = false;
      for (uint32_t r = 0; r < ranks_.size(); ++r) {
        // Before Ready a worker may be busy allocating; the init timeout covers that phase.
        if (!ranks_[r].ready || std::find(lost_.begin(), lost_.end(), r) != lost_.end()) continue;
        if (now - ranks_[r].last_seen > options_.timings.dead_after) {
          Log(LogLevel::kError,
              "kvbm leader: worker rank {} silent for over {} ms: lost; its pending ops fail", r,
              options_.timings.dead_after.count());
          lost_.push_back(r);
          newly_lost = true;
        }
      }
      if (newly_lost) {
        while (!pending_.empty()) {
          auto it = pending_.begin();
          OpResult res{it->first, {}, true};
          res.failed_blocks.resize(it->second.num_blocks);
          for (uint32_t i = 0; i < it->second.num_blocks; ++i) res.failed_blocks[i] = i;
          Complete(it, std::move(res), &completions);
        }
      }
    }
    cv_.notify_all();
    for (auto& [fn, result] : completions) fn(result);
  }

  // REQUIRES: called on the I/O thread.
  void SendTo(const std::string& routing_id, const wire::Message& m) {
    try {
      zmq::message_t id(routing_id.data(), routing_id.size());
      if (!router_.send(id, zmq::send_flags::sndmore | zmq::send_flags::dontwait)) return;
      SendMessage(router_, m);
    } catch (const zmq::error_t& e) {
      Log(LogLevel::kWarn, "kvbm leader: cannot reach a worker: {}", e.what());
    }
  }

  const KvbmConfig config_;
  const LeaderOptions options_;
  const Clock::time_point created_;
  zmq::context_t ctx_;
  std::mutex pub_mu_;
  zmq::socket_t pub_;     // GUARDED_BY(pub_mu_)
  zmq::socket_t router_;  // I/O thread only
  uint16_t pub_port_ = 0;
  uint16_t ack_port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> rejected_{0};
  std::thread thread_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<RankState> ranks_;                   // GUARDED_BY(mu_)
  bool sized_ = false;                             // GUARDED_BY(mu_)
  bool all_ready_ = false;                         // GUARDED_BY(mu_)
  uint64_t host_blocks_ = 0;                       // GUARDED_BY(mu_)
  uint64_t disk_blocks_ = 0;                       // GUARDED_BY(mu_)
  std::vector<std::string> alloc_errors_;          // GUARDED_BY(mu_)
  std::vector<uint32_t> lost_;                     // GUARDED_BY(mu_)
  std::unordered_map<uint64_t, Pending> pending_;  // GUARDED_BY(mu_)
  std::unordered_map<uint64_t, OpResult> done_;    // GUARDED_BY(mu_)
};

Result<std::unique_ptr<Leader>> Leader::Create(const KvbmConfig& config, LeaderOptions options) {
  if (options.world_size == 0)
    return MakeError(ErrorCode::kInvalidArgument, "kvbm leader: world size must be at least 1");
  auto impl = std::make_unique<Impl>(config, options);
  if (auto s = impl->Bind(); !s) return std::unexpected(s.error());
  return std::unique_ptr<Leader>(new Leader(std::move(impl)));
}

Leader::Leader(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Leader::~Leader() = default;
Status Leader::WaitReady() { return impl_->WaitReady(); }
bool Leader::ready() const { return impl_->ready(); }
uint64_t Leader::host_blocks() const { return impl_->host_blocks(); }
uint64_t Leader::disk_blocks() const { return impl_->disk_blocks(); }
uint16_t Leader::pub_port() const { return impl_->pub_port(); }
uint16_t Leader::ack_port() const { return impl_->ack_port(); }
Status Leader::Submit(const TransferOp& op, std::optional<uint64_t> gate, OpDoneFn on_done) {
  return impl_->Submit(op, gate, std::move(on_done));
}
std::optional<OpResult> Leader::Poll(uint64_t op_id) { return impl_->Poll(op_id); }
size_t Leader::in_flight() const { return impl_->in_flight(); }
std::vector<uint32_t> Leader::lost_ranks() const { return impl_->lost_ranks(); }
uint64_t Leader::rejected_messages() const { return impl_->rejected(); }

}  // namespace kvbm
