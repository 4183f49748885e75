#include "kvbm/distributed.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <mutex>
#include <thread>
#include <zmq.hpp>

#include "distributed/wire.h"

namespace kvbm {
namespace {

using namespace std::chrono_literals;

KvbmConfig TestConfig() {
  KvbmConfig c;
  c.cpu_cache_gb = 1.5;
  c.disk_cache_gb = 4;
  c.leader_zmq_pub_port = 0;  // free ports: tests run beside each other and beside real leaders
  c.leader_zmq_ack_port = 0;
  return c;
}

LeaderOptions FastOptions(uint32_t world) {
  LeaderOptions o;
  o.world_size = world;
  o.timings.heartbeat_interval = 50ms;
  o.timings.dead_after = 1000ms;
  o.init_timeout = 10s;
  return o;
}

WorkerOptions WorkerFor(const Leader& leader, uint32_t rank, uint32_t world,
                        uint64_t bytes_per_block) {
  WorkerOptions o;
  o.rank = rank;
  o.world_size = world;
  o.device_blocks = 100 + rank;
  o.bytes_per_block = bytes_per_block;
  o.pub_port = leader.pub_port();
  o.ack_port = leader.ack_port();
  o.timings.heartbeat_interval = 50ms;
  o.timings.dead_after = 1000ms;
  return o;
}

template <typename Pred>
bool WaitFor(Pred pred, std::chrono::milliseconds limit) {
  auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(2ms);
  }
  return pred();
}

std::optional<OpResult> PollFor(Leader& leader, uint64_t id, std::chrono::milliseconds limit) {
  std::optional<OpResult> r;
  WaitFor([&] { return (r = leader.Poll(id)).has_value(); }, limit);
  return r;
}

// A kvbm_worker_proc child, SIGKILLed if still running at destruction.
class WorkerProcess {
 public:
  WorkerProcess(const Leader& leader, uint32_t rank, uint32_t world, uint64_t bytes_per_block) {
#ifdef KVBM_WORKER_PROC
    std::vector<std::string> args = {KVBM_WORKER_PROC,
                                     "--rank",
                                     std::to_string(rank),
                                     "--world-size",
                                     std::to_string(world),
                                     "--pub-port",
                                     std::to_string(leader.pub_port()),
                                     "--ack-port",
                                     std::to_string(leader.ack_port()),
                                     "--bytes-per-block",
                                     std::to_string(bytes_per_block),
                                     "--heartbeat-ms",
                                     "50",
                                     "--dead-after-ms",
                                     "1000"};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_ = fork();
    if (pid_ == 0) {
      execv(argv[0], argv.data());
      _exit(127);
    }
#else
    (void)leader, (void)rank, (void)world, (void)bytes_per_block;
#endif
  }
  ~WorkerProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  void Kill9() {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
};

#ifdef KVBM_WORKER_PROC
constexpr bool kHaveWorkerProc = true;
#else
constexpr bool kHaveWorkerProc = false;
#endif

uint64_t Bpb(uint32_t rank) { return 1'000'000 + 12'345 * rank; }

uint64_t ExpectedBlocks(double gb, uint32_t world) {
  uint64_t sum = 0;
  for (uint32_t r = 0; r < world; ++r) sum += Bpb(r);
  return static_cast<uint64_t>(std::floor(gb * 1e9 / static_cast<double>(sum)));
}

class DistributedHandshake : public ::testing::TestWithParam<uint32_t> {};

TEST_P(DistributedHandshake, ThreadWorkersAreSizedByTheFormula) {
  const uint32_t world = GetParam();
  auto leader = Leader::Create(TestConfig(), FastOptions(world));
  ASSERT_TRUE(leader.has_value()) << leader.error().ToString();
  std::mutex mu;
  std::vector<std::pair<uint64_t, uint64_t>> allocated;
  std::vector<std::unique_ptr<Worker>> workers;
  for (uint32_t r = 0; r < world; ++r) {
    auto w = Worker::Create(
        WorkerFor(**leader, r, world, Bpb(r)),
        [&](uint64_t host, uint64_t disk) -> Status {
          std::lock_guard lock(mu);
          allocated.emplace_back(host, disk);
          return {};
        },
        nullptr);
    ASSERT_TRUE(w.has_value()) << w.error().ToString();
    workers.push_back(std::move(*w));
  }
  ASSERT_TRUE((*leader)->WaitReady().has_value());
  const uint64_t host = ExpectedBlocks(1.5, world), disk = ExpectedBlocks(4, world);
  EXPECT_EQ((*leader)->host_blocks(), host);
  EXPECT_EQ((*leader)->disk_blocks(), disk);
  uint64_t sum = 0;
  for (uint32_t r = 0; r < world; ++r) sum += Bpb(r);
  EXPECT_EQ(host, TestConfig().HostBlocks(sum));
  std::lock_guard lock(mu);
  ASSERT_EQ(allocated.size(), world);
  for (auto [h, d] : allocated) {
    EXPECT_EQ(h, host);
    EXPECT_EQ(d, disk);
  }
  for (auto& w : workers) {
    auto sizes = w->WaitReady(5s);
    ASSERT_TRUE(sizes.has_value());
    EXPECT_EQ(sizes->host_blocks, host);
  }
}

TEST_P(DistributedHandshake, WorkerProcessesAreSizedAndAcknowledgeOps) {
  if (!kHaveWorkerProc) GTEST_SKIP() << "kvbm_worker_proc not built";
  const uint32_t world = GetParam();
  auto leader = Leader::Create(TestConfig(), FastOptions(world));
  ASSERT_TRUE(leader.has_value());
  std::vector<std::unique_ptr<WorkerProcess>> procs;
  for (uint32_t r = 0; r < world; ++r)
    procs.push_back(std::make_unique<WorkerProcess>(**leader, r, world, Bpb(r)));
  auto ready = (*leader)->WaitReady();
  ASSERT_TRUE(ready.has_value()) << ready.error().ToString();
  EXPECT_EQ((*leader)->host_blocks(), ExpectedBlocks(1.5, world));
  EXPECT_EQ((*leader)->disk_blocks(), ExpectedBlocks(4, world));
  for (uint64_t id = 1; id <= 20; ++id) {
    ASSERT_TRUE((*leader)->Submit(TransferOp{id, OpKind::kLoadHost, "r", {{1, 2, 3}}}).has_value());
  }
  for (uint64_t id = 1; id <= 20; ++id) {
    auto r = PollFor(**leader, id, 5s);
    ASSERT_TRUE(r.has_value()) << id;
    EXPECT_TRUE(r->failed_blocks.empty());
    EXPECT_FALSE(r->worker_lost);
  }
}

INSTANTIATE_TEST_SUITE_P(Ranks, DistributedHandshake, ::testing::Values(1u, 2u, 4u));

TEST(DistributedLeader, TimeoutNamesTheRanksThatDidNotAnswer) {
  auto opts = FastOptions(3);
  opts.init_timeout = 600ms;
  auto leader = Leader::Create(TestConfig(), opts);
  ASSERT_TRUE(leader.has_value());
  auto w = Worker::Create(WorkerFor(**leader, 0, 3, 10), nullptr, nullptr);
  ASSERT_TRUE(w.has_value());
  auto s = (*leader)->WaitReady();
  ASSERT_FALSE(s.has_value());
  EXPECT_EQ(s.error().code(), ErrorCode::kTimeout);
  EXPECT_NE(s.error().message().find("ranks [1, 2] never reported"), std::string::npos)
      << s.error().message();
  EXPECT_NE(s.error().message().find("DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS"),
            std::string::npos);
  EXPECT_EQ((*leader)->Submit(TransferOp{1, OpKind::kLoadHost, "", {}}).error().code(),
            ErrorCode::kFailedPrecondition);
}

TEST(DistributedLeader, AllocationFailureIsReported) {
  auto leader = Leader::Create(TestConfig(), FastOptions(2));
  ASSERT_TRUE(leader.has_value());
  auto ok = Worker::Create(WorkerFor(**leader, 0, 2, 10), nullptr, nullptr);
  auto bad = Worker::Create(
      WorkerFor(**leader, 1, 2, 10),
      [](uint64_t, uint64_t) -> Status {
        return MakeError(ErrorCode::kResourceExhausted, "cannot pin 42 GB");
      },
      nullptr);
  auto s = (*leader)->WaitReady();
  ASSERT_FALSE(s.has_value());
  EXPECT_EQ(s.error().code(), ErrorCode::kResourceExhausted);
  EXPECT_NE(s.error().message().find("rank 1"), std::string::npos);
  EXPECT_NE(s.error().message().find("cannot pin 42 GB"), std::string::npos);
  EXPECT_FALSE((*bad)->WaitReady(1s).has_value());
}

// Workers that execute on their own thread (like the real executor) and record what they saw.
struct ThreadWorkers {
  struct Seen {
    std::mutex mu;
    std::vector<TransferOp> ops;
  };
  std::vector<std::unique_ptr<Seen>> seen;
  std::vector<std::unique_ptr<Worker>> workers;
  std::mutex threads_mu;
  std::vector<std::thread> threads;  // GUARDED_BY(threads_mu)
  ~ThreadWorkers() {
    workers.clear();
    std::lock_guard lock(threads_mu);
    for (auto& t : threads) t.join();
  }
  void Start(const Leader& leader, uint32_t world,
             std::optional<std::pair<uint32_t, uint32_t>> fail_rank_block = std::nullopt) {
    for (uint32_t r = 0; r < world; ++r) {
      seen.push_back(std::make_unique<Seen>());
      Seen* s = seen.back().get();
      auto w = Worker::Create(
          WorkerFor(leader, r, world, 1000), nullptr,
          [this, s, r, fail_rank_block](const TransferOp& op,
                                        std::function<void(std::vector<uint32_t>)> done) {
            {
              std::lock_guard lock(s->mu);
              s->ops.push_back(op);
            }
            std::vector<uint32_t> failed;
            if (fail_rank_block && fail_rank_block->first == r)
              failed.push_back(fail_rank_block->second);
            std::lock_guard lock(threads_mu);
            threads.emplace_back([done = std::move(done), failed] { done(failed); });
          });
      ASSERT_TRUE(w.has_value());
      workers.push_back(std::move(*w));
    }
  }
  size_t Count(uint32_t rank) {
    std::lock_guard lock(seen[rank]->mu);
    return seen[rank]->ops.size();
  }
};

TEST(DistributedTransfer, FanOutToEveryRankAndMergeFailures) {
  auto leader = Leader::Create(TestConfig(), FastOptions(4));
  ASSERT_TRUE(leader.has_value());
  ThreadWorkers tw;
  tw.Start(**leader, 4, std::make_pair(2u, 1u));
  ASSERT_TRUE((*leader)->WaitReady().has_value());
  TransferOp op{77, OpKind::kStoreHost, "req", {{10, 0, 111}, {11, 1, 222}, {12, 2, 333}}};
  std::atomic<bool> called{false};
  OpResult got;
  ASSERT_TRUE((*leader)
                  ->Submit(op, std::nullopt,
                           [&](const OpResult& r) {
                             got = r;
                             called = true;
                           })
                  .has_value());
  ASSERT_TRUE(WaitFor([&] { return called.load(); }, 5s));
  EXPECT_EQ(got.op_id, 77u);
  EXPECT_EQ(got.failed_blocks, std::vector<uint32_t>{1});
  EXPECT_FALSE(got.worker_lost);
  for (uint32_t r = 0; r < 4; ++r) {
    std::lock_guard lock(tw.seen[r]->mu);
    ASSERT_EQ(tw.seen[r]->ops.size(), 1u);
    EXPECT_EQ(tw.seen[r]->ops[0], op);
  }
  // The same id again while unpolled is refused; a fresh id through Poll works.
  ASSERT_TRUE((*leader)->Submit(TransferOp{78, OpKind::kLoadHost, "", {{1, 1, 1}}}).has_value());
  EXPECT_EQ((*leader)->Submit(TransferOp{78, OpKind::kLoadHost, "", {}}).error().code(),
            ErrorCode::kInvalidArgument);
  auto r = PollFor(**leader, 78, 5s);
  ASSERT_TRUE(r.has_value());
  EXPECT_TRUE(r->failed_blocks.empty());
  EXPECT_EQ((*leader)->in_flight(), 0u);
}

TEST(DistributedTransfer, StoresWaitForTheForwardPassLoadsDoNot) {
  auto leader = Leader::Create(TestConfig(), FastOptions(2));
  ASSERT_TRUE(leader.has_value());
  ThreadWorkers tw;
  tw.Start(**leader, 2);
  ASSERT_TRUE((*leader)->WaitReady().has_value());
  ASSERT_TRUE((*leader)
                  ->Submit(TransferOp{1, OpKind::kStoreHost, "", {{0, 0, 0}}}, /*gate=*/5)
                  .has_value());
  ASSERT_TRUE((*leader)->Submit(TransferOp{2, OpKind::kLoadHost, "", {{0, 0, 0}}}).has_value());
  ASSERT_TRUE(PollFor(**leader, 2, 5s).has_value());  // the load ran at once
  tw.workers[0]->ForwardPassCompleted(4);
  tw.workers[1]->ForwardPassCompleted(5);
  std::this_thread::sleep_for(200ms);
  EXPECT_FALSE((*leader)->Poll(1).has_value());  // rank 0 has not reached iteration 5
  EXPECT_EQ(tw.Count(0), 1u);
  EXPECT_EQ(tw.Count(1), 2u);
  tw.workers[0]->ForwardPassCompleted(6);
  auto r = PollFor(**leader, 1, 5s);
  ASSERT_TRUE(r.has_value());
  EXPECT_TRUE(r->failed_blocks.empty());
  // A gate already passed runs at once.
  ASSERT_TRUE((*leader)->Submit(TransferOp{3, OpKind::kStoreHost, "", {}}, 3).has_value());
  EXPECT_TRUE(PollFor(**leader, 3, 5s).has_value());
}

TEST(DistributedFaults, KilledWorkerProcessFailsPendingOpsAndLaterSubmits) {
  if (!kHaveWorkerProc) GTEST_SKIP() << "kvbm_worker_proc not built";
  auto leader = Leader::Create(TestConfig(), FastOptions(2));
  ASSERT_TRUE(leader.has_value());
  WorkerProcess p0(**leader, 0, 2, 1000), p1(**leader, 1, 2, 1000);
  ASSERT_TRUE((*leader)->WaitReady().has_value());
  ASSERT_TRUE((*leader)->Submit(TransferOp{1, OpKind::kLoadHost, "", {{0, 0, 0}}}).has_value());
  ASSERT_TRUE(PollFor(**leader, 1, 5s).has_value());
  p1.Kill9();
  auto killed = std::chrono::steady_clock::now();
  // Submitted after the kill, before the leader can know: rank 1 never answers.
  ASSERT_TRUE(
      (*leader)
          ->Submit(TransferOp{2, OpKind::kLoadDisk, "req", {{5, 6, 7}, {8, 9, 10}, {1, 2, 3}}})
          .has_value());
  auto r = PollFor(**leader, 2, 5s);
  auto noticed = std::chrono::steady_clock::now() - killed;
  ASSERT_TRUE(r.has_value()) << "the pending op hung";
  EXPECT_TRUE(r->worker_lost);
  EXPECT_EQ(r->failed_blocks, (std::vector<uint32_t>{0, 1, 2}));
  EXPECT_LT(noticed, 3s);
  EXPECT_EQ((*leader)->lost_ranks(), std::vector<uint32_t>{1});
  auto later = (*leader)->Submit(TransferOp{3, OpKind::kLoadHost, "", {}});
  ASSERT_FALSE(later.has_value());
  EXPECT_EQ(later.error().code(), ErrorCode::kUnavailable);
}

TEST(DistributedLeader, SamePortsAreAClearErrorDistinctPortsDoNotInterfere) {
  auto a = Leader::Create(TestConfig(), FastOptions(1));
  ASSERT_TRUE(a.has_value());
  KvbmConfig same_pub = TestConfig();
  same_pub.leader_zmq_pub_port = (*a)->pub_port();
  auto b = Leader::Create(same_pub, FastOptions(1));
  ASSERT_FALSE(b.has_value());
  EXPECT_EQ(b.error().code(), ErrorCode::kUnavailable);
  EXPECT_NE(b.error().message().find("DYN_KVBM_LEADER_ZMQ_PUB_PORT"), std::string::npos)
      << b.error().message();
  EXPECT_NE(b.error().message().find("address in use"), std::string::npos);
  KvbmConfig same_ack = TestConfig();
  same_ack.leader_zmq_ack_port = (*a)->ack_port();
  auto c = Leader::Create(same_ack, FastOptions(1));
  ASSERT_FALSE(c.has_value());
  EXPECT_NE(c.error().message().find("DYN_KVBM_LEADER_ZMQ_ACK_PORT"), std::string::npos)
      << c.error().message();
  EXPECT_NE(c.error().message().find("address in use"), std::string::npos);

  // A second leader on its own ports, each with one worker: each op reaches only its own.
  auto d = Leader::Create(TestConfig(), FastOptions(1));
  ASSERT_TRUE(d.has_value());
  ThreadWorkers wa, wd;
  wa.Start(**a, 1);
  wd.Start(**d, 1);
  ASSERT_TRUE((*a)->WaitReady().has_value());
  ASSERT_TRUE((*d)->WaitReady().has_value());
  ASSERT_TRUE((*a)->Submit(TransferOp{1, OpKind::kLoadHost, "a", {}}).has_value());
  ASSERT_TRUE((*d)->Submit(TransferOp{1, OpKind::kLoadHost, "d", {}}).has_value());
  ASSERT_TRUE(PollFor(**a, 1, 5s).has_value());
  ASSERT_TRUE(PollFor(**d, 1, 5s).has_value());
  std::lock_guard la(wa.seen[0]->mu), ld(wd.seen[0]->mu);
  ASSERT_EQ(wa.seen[0]->ops.size(), 1u);
  ASSERT_EQ(wd.seen[0]->ops.size(), 1u);
  EXPECT_EQ(wa.seen[0]->ops[0].request_id, "a");
  EXPECT_EQ(wd.seen[0]->ops[0].request_id, "d");
}

TEST(DistributedFaults, GarbageToTheLeaderIsRejectedAndTheSystemKeepsWorking) {
  auto leader = Leader::Create(TestConfig(), FastOptions(2));
  ASSERT_TRUE(leader.has_value());
  ThreadWorkers tw;
  tw.Start(**leader, 2);
  ASSERT_TRUE((*leader)->WaitReady().has_value());

  zmq::context_t ctx;
  zmq::socket_t rogue(ctx, zmq::socket_type::dealer);
  rogue.set(zmq::sockopt::linger, 0);
  rogue.connect("tcp://127.0.0.1:" + std::to_string((*leader)->ack_port()));
  std::string wrong_version = wire::Encode(wire::Heartbeat{0});
  wrong_version[1] = 9;
  const std::vector<std::string> junk = {
      "",
      "\xff\xff\xff",
      std::string("\xdd\xff\xff\xff\xff", 5),
      wrong_version,
      wire::Encode(wire::OpResultMsg{0, 1, {0}}),  // claims rank 0 from the wrong peer
      wire::Encode(wire::Hello{7, 2, 1, 1}),       // rank out of range
      wire::Encode(wire::Hello{0, 3, 1, 1}),       // wrong world size
      wire::Encode(wire::Shutdown{})};             // not a worker's message
  for (const auto& j : junk) rogue.send(zmq::buffer(j), zmq::send_flags::none);
  rogue.send(zmq::str_buffer("a"), zmq::send_flags::sndmore);
  rogue.send(zmq::str_buffer("b"), zmq::send_flags::none);

  // Raw bytes on TCP that are not even ZMTP.
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons((*leader)->ack_port());
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  std::string noise(4096, '\xab');
  ASSERT_GT(write(fd, noise.data(), noise.size()), 0);
  close(fd);

  EXPECT_TRUE(WaitFor([&] { return (*leader)->rejected_messages() >= junk.size() + 1; }, 5s))
      << (*leader)->rejected_messages();
  ASSERT_TRUE((*leader)->Submit(TransferOp{5, OpKind::kLoadHost, "", {{0, 0, 0}}}).has_value());
  auto r = PollFor(**leader, 5, 5s);
  ASSERT_TRUE(r.has_value());
  EXPECT_TRUE(r->failed_blocks.empty());
  EXPECT_TRUE((*leader)->lost_ranks().empty());
}

// A worker facing a leader made of raw sockets that also publishes garbage.
TEST(DistributedFaults, GarbageToAWorkerIsRejectedAndTheWorkerKeepsWorking) {
  zmq::context_t ctx;
  zmq::socket_t pub(ctx, zmq::socket_type::pub), router(ctx, zmq::socket_type::router);
  pub.set(zmq::sockopt::linger, 0);
  router.set(zmq::sockopt::linger, 0);
  pub.bind("tcp://127.0.0.1:*");
  router.bind("tcp://127.0.0.1:*");
  auto port = [](zmq::socket_t& s) {
    std::string ep = s.get(zmq::sockopt::last_endpoint);
    return static_cast<uint16_t>(std::stoi(ep.substr(ep.rfind(':') + 1)));
  };
  WorkerOptions wo;
  wo.pub_port = port(pub);
  wo.ack_port = port(router);
  wo.bytes_per_block = 10;
  std::atomic<int> executed{0};
  auto worker = Worker::Create(
      wo, nullptr, [&](const TransferOp&, std::function<void(std::vector<uint32_t>)> done) {
        ++executed;
        done({});
      });
  ASSERT_TRUE(worker.has_value());
  router.set(zmq::sockopt::rcvtimeo, 5000);
  auto recv_msg = [&](std::string* from) -> std::optional<wire::Message> {
    zmq::message_t id, body;
    if (!router.recv(id)) return std::nullopt;
    if (!router.recv(body)) return std::nullopt;
    *from = id.to_string();
    auto m = wire::Decode(
        std::span<const uint8_t>(static_cast<const uint8_t*>(body.data()), body.size()));
    return m ? std::optional<wire::Message>(*m) : std::nullopt;
  };
  auto send_to = [&](const std::string& id, const std::string& bytes) {
    router.send(zmq::buffer(id), zmq::send_flags::sndmore);
    router.send(zmq::buffer(bytes), zmq::send_flags::none);
  };
  std::string id;
  auto hello = recv_msg(&id);
  ASSERT_TRUE(hello && std::holds_alternative<wire::Hello>(*hello));
  send_to(id, "\x93garbage");
  send_to(id, wire::Encode(wire::Heartbeat{}));  // a type the leader never sends to one worker
  send_to(id, wire::Encode(wire::Sizing{3, 4}));
  std::string wrong_version = wire::Encode(wire::Heartbeat{});
  wrong_version[1] = 2;
  std::optional<wire::Message> ready;
  for (int i = 0; i < 200 && !ready; ++i) {
    pub.send(zmq::str_buffer("\xc1\xc1 not msgpack"), zmq::send_flags::none);
    pub.send(zmq::buffer(wrong_version), zmq::send_flags::none);
    pub.send(zmq::buffer(wire::Encode(wire::Heartbeat{})), zmq::send_flags::none);
    router.set(zmq::sockopt::rcvtimeo, 20);
    std::string from;
    while (auto m = recv_msg(&from)) {
      if (std::holds_alternative<wire::Ready>(*m)) {
        ready = m;
        break;
      }
    }
  }
  ASSERT_TRUE(ready.has_value());
  EXPECT_TRUE(std::get<wire::Ready>(*ready).ok);
  wire::OpRequest req;
  req.meta.host_blocks = 3;
  req.meta.disk_blocks = 4;
  req.meta.ops.push_back(TransferOp{9, OpKind::kLoadHost, "", {{0, 0, 0}}});
  pub.send(zmq::buffer(wire::Encode(req)), zmq::send_flags::none);
  router.set(zmq::sockopt::rcvtimeo, 5000);
  std::optional<wire::OpResultMsg> result;
  std::string from;
  while (!result) {
    auto m = recv_msg(&from);
    ASSERT_TRUE(m.has_value()) << "no op result";
    if (auto* r = std::get_if<wire::OpResultMsg>(&*m)) result = *r;
  }
  EXPECT_EQ(result->op_id, 9u);
  EXPECT_TRUE(result->failed_blocks.empty());
  EXPECT_EQ(executed.load(), 1);
  EXPECT_GE((*worker)->rejected_messages(), 4u);
}

}  // namespace
}  // namespace kvbm
