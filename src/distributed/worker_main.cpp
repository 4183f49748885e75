// kvbm_worker_proc: a stand-alone worker process that moves no bytes (for tests and the
// distributed benchmark), and a --bench-leader mode that spawns N such workers of itself,
// measures the op round trip and prints JSON.
//
//   kvbm_worker_proc --rank R --world-size N [--host H] --pub-port P --ack-port A
//                    [--device-blocks D] [--bytes-per-block B] [--fail-block I]
//                    [--heartbeat-ms MS] [--dead-after-ms MS]
//   kvbm_worker_proc --bench-leader N [--iterations K] [--warmup W]
#include <fmt/format.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "kvbm/distributed.h"
#include "kvbm/log.h"

namespace {

struct Args {
  kvbm::WorkerOptions worker;
  std::optional<uint32_t> fail_block;
  uint32_t bench_leader = 0;
  uint32_t iterations = 2000;
  uint32_t warmup = 200;
};

uint64_t Number(const char* flag, const char* value) {
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(value, &end, 10);
  if (errno != 0 || end == value || *end != '\0') {
    std::fprintf(stderr, "kvbm_worker_proc: %s needs a number, got '%s'\n", flag, value);
    std::exit(64);
  }
  return v;
}

Args Parse(int argc, char** argv) {
  Args a;
  a.worker.device_blocks = 1;
  a.worker.bytes_per_block = 1;
  for (int i = 1; i < argc; ++i) {
    std::string f = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "kvbm_worker_proc: %s needs a value\n", f.c_str());
      std::exit(64);
    }
    const char* v = argv[++i];
    if (f == "--rank")
      a.worker.rank = static_cast<uint32_t>(Number(argv[i - 1], v));
    else if (f == "--world-size")
      a.worker.world_size = static_cast<uint32_t>(Number(argv[i - 1], v));
    else if (f == "--host")
      a.worker.leader_host = v;
    else if (f == "--pub-port")
      a.worker.pub_port = static_cast<uint16_t>(Number(argv[i - 1], v));
    else if (f == "--ack-port")
      a.worker.ack_port = static_cast<uint16_t>(Number(argv[i - 1], v));
    else if (f == "--device-blocks")
      a.worker.device_blocks = Number(argv[i - 1], v);
    else if (f == "--bytes-per-block")
      a.worker.bytes_per_block = Number(argv[i - 1], v);
    else if (f == "--fail-block")
      a.fail_block = static_cast<uint32_t>(Number(argv[i - 1], v));
    else if (f == "--heartbeat-ms")
      a.worker.timings.heartbeat_interval = std::chrono::milliseconds(Number(argv[i - 1], v));
    else if (f == "--dead-after-ms")
      a.worker.timings.dead_after = std::chrono::milliseconds(Number(argv[i - 1], v));
    else if (f == "--bench-leader")
      a.bench_leader = static_cast<uint32_t>(Number(argv[i - 1], v));
    else if (f == "--iterations")
      a.iterations = static_cast<uint32_t>(Number(argv[i - 1], v));
    else if (f == "--warmup")
      a.warmup = static_cast<uint32_t>(Number(argv[i - 1], v));
    else {
      std::fprintf(stderr, "kvbm_worker_proc: unknown flag %s\n", f.c_str());
      std::exit(64);
    }
  }
  return a;
}

int RunWorker(const Args& a) {
  if (!a.fail_block) return kvbm::RunNoOpWorker(a.worker);
  // A worker that reports one block index as failed on every op that has it (for tests).
  uint32_t fail = *a.fail_block;
  auto worker = kvbm::Worker::Create(
      a.worker, [](uint64_t, uint64_t) -> kvbm::Status { return {}; },
      [fail](const kvbm::TransferOp& op, std::function<void(std::vector<uint32_t>)> done) {
        std::vector<uint32_t> failed;
        if (fail < op.blocks.size()) failed.push_back(fail);
        done(std::move(failed));
      });
  if (!worker) return 2;
  if (!(*worker)->WaitReady(std::chrono::seconds(60))) return 3;
  while ((*worker)->leader_alive()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  return 0;
}

// Spawns `n` workers of this executable against a leader on free ports; prints the median.
int BenchLeader(const Args& a) {
  kvbm::KvbmConfig config;
  config.cpu_cache_num_blocks = 1;
  config.leader_zmq_pub_port = 0;
  config.leader_zmq_ack_port = 0;
  kvbm::LeaderOptions lo;
  lo.world_size = a.bench_leader;
  lo.init_timeout = std::chrono::seconds(30);
  auto leader = kvbm::Leader::Create(config, lo);
  if (!leader) {
    std::fprintf(stderr, "%s\n", leader.error().ToString().c_str());
    return 1;
  }
  std::vector<pid_t> children;
  for (uint32_t r = 0; r < a.bench_leader; ++r) {
    std::vector<std::string> args = {"kvbm_worker_proc",
                                     "--rank",
                                     std::to_string(r),
                                     "--world-size",
                                     std::to_string(a.bench_leader),
                                     "--pub-port",
                                     std::to_string((*leader)->pub_port()),
                                     "--ack-port",
                                     std::to_string((*leader)->ack_port())};
    std::vector<char*> argv;
    for (auto& s : args) argv.push_back(s.data());
    argv.push_back(nullptr);
    pid_t pid = fork();
    if (pid == 0) {
      execv("/proc/self/exe", argv.data());
      _exit(127);
    }
    children.push_back(pid);
  }
  int rc = 0;
  if (auto s = (*leader)->WaitReady(); !s) {
    std::fprintf(stderr, "%s\n", s.error().ToString().c_str());
    rc = 1;
  } else if (auto us = kvbm::MeasureRoundTripMedianUs(**leader, a.warmup, a.iterations); !us) {
    std::fprintf(stderr, "%s\n", us.error().ToString().c_str());
    rc = 1;
  } else {
    std::printf("{\"workers\": %u, \"iterations\": %u, \"median_us\": %.3f}\n", a.bench_leader,
                a.iterations, *us);
  }
  leader->reset();  // says goodbye; the workers exit
  for (pid_t pid : children) {
    int status = 0;
    for (int i = 0; i < 100 && waitpid(pid, &status, WNOHANG) == 0; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (waitpid(pid, &status, WNOHANG) == 0) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
    }
  }
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  Args a = Parse(argc, argv);
  if (a.bench_leader > 0) return BenchLeader(a);
  return RunWorker(a);
}
