#include <fmt/format.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

#include "distributed/socket_util.h"
#include "distributed/wire.h"
#include "kvbm/distributed.h"
#include "kvbm/log.h"

namespace kvbm {

using Clock = std::chrono::steady_clock;
using namespace distributed_detail;

namespace {

// Results handed from executor threads to the I/O thread. Shared (shared_ptr) between the
// worker and every outstanding `done` callback, so a late `done` after the worker is gone is
// harmless.
struct ResultQueue {
  std::mutex mu;
  std::deque<wire::OpResultMsg> items;  // GUARDED_BY(mu)
  WakeFd wake;
};

constexpr auto kHelloRetry = std::chrono::milliseconds(100);

}  // namespace

WorkerOptions WorkerOptions::FromConfig(const KvbmConfig& config, uint32_t rank,
                                        uint32_t world_size, uint64_t device_blocks,
                                        uint64_t bytes_per_block) {
  WorkerOptions o;
  o.rank = rank;
  o.world_size = world_size;
  o.device_blocks = device_blocks;
  o.bytes_per_block = bytes_per_block;
  o.leader_host = config.leader_zmq_host;
  o.pub_port = config.leader_zmq_pub_port;
  o.ack_port = config.leader_zmq_ack_port;
  return o;
}

// The I/O thread alone touches sub_ and dealer_. mu_ guards the state WaitReady reads.
class Worker::Impl {
 public:
  Impl(WorkerOptions options, AllocateFn allocate, ExecuteFn execute)
      : options_(std::move(options)),
        allocate_(std::move(allocate)),
        execute_(std::move(execute)),
        ctx_(1),
        sub_(ctx_, zmq::socket_type::sub),
        dealer_(ctx_, zmq::socket_type::dealer),
        results_(std::make_shared<ResultQueue>()) {}

  ~Impl() {
    stop_.store(true);
    results_->wake.Signal();
    if (thread_.joinable()) thread_.join();
  }

  Status Connect() {
    if (!results_->wake.valid())
      return MakeError(ErrorCode::kInternal, "kvbm worker: eventfd failed");
    try {
      CommonOptions(sub_);
      CommonOptions(dealer_);
      sub_.set(zmq::sockopt::subscribe, "");
      sub_.set(zmq::sockopt::rcvhwm, 100000);
      sub_.connect(TcpEndpoint(options_.leader_host, options_.pub_port));
      dealer_.connect(TcpEndpoint(options_.leader_host, options_.ack_port));
    } catch (const zmq::error_t& e) {
      return MakeError(
          ErrorCode::kInvalidArgument,
          fmt::format("kvbm worker rank {}: cannot connect to leader {}:{}/{}: {}", options_.rank,
                      options_.leader_host, options_.pub_port, options_.ack_port, e.what()));
    }
    thread_ = std::thread([this] { Loop(); });
    return {};
  }

  Result<TierSizes> WaitReady(std::chrono::milliseconds timeout) {
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, timeout, [&] { return ready_sent_ || alloc_error_.has_value(); });
    if (alloc_error_) return std::unexpected(*alloc_error_);
    if (!ready_sent_)
      return MakeError(
          ErrorCode::kTimeout,
          fmt::format("kvbm worker rank {}: leader {}:{}/{} did not size this worker within {} ms",
                      options_.rank, options_.leader_host, options_.pub_port, options_.ack_port,
                      timeout.count()));
    return sizes_;
  }

  void ForwardPassCompleted(uint64_t iteration) {
    uint64_t cur = forward_.load();
    while (cur < iteration && !forward_.compare_exchange_weak(cur, iteration)) {
    }
    results_->wake.Signal();
  }

  bool leader_alive() const {
    if (leader_gone_.load()) return false;
    auto last = last_leader_ns_.load();
    if (last == 0) return true;
    return Clock::now().time_since_epoch().count() - last <
           std::chrono::nanoseconds(options_.timings.dead_after).count();
  }
  uint64_t rejected() const { return rejected_.load(); }

 private:
  void Reject(const std::string& why) {
    rejected_.fetch_add(1);
    Log(LogLevel::kWarn, "kvbm worker rank {}: {}", options_.rank, why);
  }

  void Loop() {
    auto next_hello = Clock::now();
    auto next_beat = Clock::now();
    while (!stop_.load()) {
      auto now = Clock::now();
      if (!sized_ && now >= next_hello) {
        // DEALER queues until connected; repeating covers a leader that started after us.
        SendMessage(dealer_, wire::Hello{options_.rank, options_.world_size, options_.device_blocks,
                                         options_.bytes_per_block});
        next_hello = now + kHelloRetry;
      }
      if (sized_ && now >= next_beat) {
        SendMessage(dealer_, wire::Heartbeat{options_.rank});
        next_beat = now + options_.timings.heartbeat_interval;
      }
      MaybeSendReady();
      auto next = sized_ ? next_beat : next_hello;
      auto wait =
          std::max(std::chrono::duration_cast<std::chrono::milliseconds>(next - Clock::now()),
                   std::chrono::milliseconds(1));
      zmq::pollitem_t items[] = {{sub_.handle(), 0, ZMQ_POLLIN, 0},
                                 {dealer_.handle(), 0, ZMQ_POLLIN, 0},
                                 {nullptr, results_->wake.fd(), ZMQ_POLLIN, 0}};
      try {
        zmq::poll(items, 3, wait);
      } catch (const zmq::error_t& e) {
        if (e.num() == EINTR) continue;
        Log(LogLevel::kError, "kvbm worker rank {}: poll failed: {}", options_.rank, e.what());
        return;
      }
      if (items[2].revents & ZMQ_POLLIN) results_->wake.Drain();
      if (items[0].revents & ZMQ_POLLIN) Drain(sub_, /*from_pub=*/true);
      if (items[1].revents & ZMQ_POLLIN) Drain(dealer_, /*from_pub=*/false);
      ReleaseGated();
      FlushResults();
    }
  }

  void Drain(zmq::socket_t& s, bool from_pub) {
    for (int budget = 0; budget < 4096; ++budget) {
      zmq::message_t body;
      if (!s.recv(body, zmq::recv_flags::dontwait)) return;
      if (body.more()) {
        zmq::message_t rest;
        while (s.recv(rest, zmq::recv_flags::none) && rest.more()) {
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
      last_leader_ns_.store(Clock::now().time_since_epoch().count());
      if (from_pub) {
        saw_pub_ = true;
        if (const auto* op = std::get_if<wire::OpRequest>(&*msg)) {
          HandleOp(*op);
        } else if (std::holds_alternative<wire::Shutdown>(*msg)) {
          Log(LogLevel::kInfo, "kvbm worker rank {}: leader shut down", options_.rank);
          leader_gone_.store(true);
        } else if (!std::holds_alternative<wire::Heartbeat>(*msg)) {
          Reject("a message type the leader does not publish");
        }
      } else if (const auto* sizing = std::get_if<wire::Sizing>(&*msg)) {
        HandleSizing(*sizing);
      } else {
        Reject("a message type the leader does not send to one worker");
      }
    }
  }

  void HandleSizing(const wire::Sizing& sizing) {
    if (sized_) {
      if (sizing.host_blocks != sizes_.host_blocks || sizing.disk_blocks != sizes_.disk_blocks)
        Reject("the leader changed the sizing after allocation; ignored");
      return;
    }
    sized_ = true;
    Status s = allocate_ ? allocate_(sizing.host_blocks, sizing.disk_blocks) : Status{};
    std::lock_guard lock(mu_);
    sizes_ = TierSizes{sizing.host_blocks, sizing.disk_blocks};
    if (!s) {
      alloc_error_ = s.error();
      SendMessage(dealer_, wire::Ready{options_.rank, false, s.error().ToString()});
      cv_.notify_all();
    }
    allocated_ = s.has_value();
  }

  // Ready only once our SUB has received something: after that, no op published to us is
  // lost to the PUB/SUB slow-joiner window.
  void MaybeSendReady() {
    if (!allocated_ || !saw_pub_ || ready_sent_flag_) return;
    SendMessage(dealer_, wire::Ready{options_.rank, true, ""});
    ready_sent_flag_ = true;
    {
      std::lock_guard lock(mu_);
      ready_sent_ = true;
    }
    cv_.notify_all();
  }

  void HandleOp(const wire::OpRequest& req) {
    const TransferOp& op = req.meta.ops.front();
    if (!allocated_ || req.meta.host_blocks != sizes_.host_blocks ||
        req.meta.disk_blocks != sizes_.disk_blocks) {
      Reject(fmt::format("op {} for sizing ({}, {}) but this worker has ({}, {}{}); failing it",
                         op.id, req.meta.host_blocks, req.meta.disk_blocks, sizes_.host_blocks,
                         sizes_.disk_blocks, allocated_ ? "" : ", not allocated"));
      wire::OpResultMsg r{options_.rank, op.id, {}};
      for (uint32_t i = 0; i < op.blocks.size(); ++i) r.failed_blocks.push_back(i);
      SendMessage(dealer_, r);
      return;
    }
    if (req.gate && *req.gate > forward_.load()) {
      gated_.emplace(*req.gate, op);
      return;
    }
    Run(op);
  }

  void ReleaseGated() {
    uint64_t reached = forward_.load();
    while (!gated_.empty() && gated_.begin()->first <= reached) {
      TransferOp op = std::move(gated_.begin()->second);
      gated_.erase(gated_.begin());
      Run(op);
    }
  }

  void Run(const TransferOp& op) {
    std::weak_ptr<ResultQueue> weak = results_;
    auto done = [weak, rank = options_.rank, id = op.id](std::vector<uint32_t> failed) {
      auto q = weak.lock();
      if (!q) return;
      {
        std::lock_guard lock(q->mu);
        q->items.push_back(wire::OpResultMsg{rank, id, std::move(failed)});
      }
      q->wake.Signal();
    };
    try {
      if (execute_) {
        execute_(op, std::move(done));
      } else {
        done({});
      }
    } catch (const std::exception& e) {
      Log(LogLevel::kError, "kvbm worker rank {}: executor threw on op {}: {}", options_.rank,
          op.id, e.what());
      std::vector<uint32_t> all(op.blocks.size());
      for (uint32_t i = 0; i < all.size(); ++i) all[i] = i;
      SendMessage(dealer_, wire::OpResultMsg{options_.rank, op.id, std::move(all)});
    }
  }

  void FlushResults() {
    std::deque<wire::OpResultMsg> batch;
    {
      std::lock_guard lock(results_->mu);
      batch.swap(results_->items);
    }
    for (const auto& r : batch) SendMessage(dealer_, r);
  }

  const WorkerOptions options_;
  AllocateFn allocate_;
  ExecuteFn execute_;
  zmq::context_t ctx_;
  zmq::socket_t sub_;     // I/O thread only
  zmq::socket_t dealer_;  // I/O thread only
  std::shared_ptr<ResultQueue> results_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> forward_{0};
  std::atomic<uint64_t> rejected_{0};
  std::atomic<bool> leader_gone_{false};
  std::atomic<int64_t> last_leader_ns_{0};

  // I/O thread only.
  bool sized_ = false;
  bool allocated_ = false;
  bool saw_pub_ = false;
  bool ready_sent_flag_ = false;
  std::multimap<uint64_t, TransferOp> gated_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  TierSizes sizes_;                   // written once by the I/O thread under mu_
  bool ready_sent_ = false;           // GUARDED_BY(mu_)
  std::optional<Error> alloc_error_;  // GUARDED_BY(mu_)
};

Result<std::unique_ptr<Worker>> Worker::Create(WorkerOptions options, AllocateFn allocate,
                                               ExecuteFn execute) {
  if (options.world_size == 0 || options.rank >= options.world_size)
    return MakeError(ErrorCode::kInvalidArgument,
                     fmt::format("kvbm worker: rank {} is not below world size {}", options.rank,
                                 options.world_size));
  auto impl = std::make_unique<Impl>(std::move(options), std::move(allocate), std::move(execute));
  if (auto s = impl->Connect(); !s) return std::unexpected(s.error());
  return std::unique_ptr<Worker>(new Worker(std::move(impl)));
}

Worker::Worker(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Worker::~Worker() = default;
Result<TierSizes> Worker::WaitReady(std::chrono::milliseconds timeout) {
  return impl_->WaitReady(timeout);
}
void Worker::ForwardPassCompleted(uint64_t iteration) { impl_->ForwardPassCompleted(iteration); }
bool Worker::leader_alive() const { return impl_->leader_alive(); }
uint64_t Worker::rejected_messages() const { return impl_->rejected(); }

}  // namespace kvbm
