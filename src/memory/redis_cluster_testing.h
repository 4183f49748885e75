// Test support: a real 6-node Redis Cluster started through scripts/redis_cluster.sh on free
// loopback ports, stopped when the object dies, at exit, or on a fatal signal (its nodes are
// SIGKILLed by pid), so that no test leaves a server behind even when it fails.
#pragma once

#include <fmt/format.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "kvbm/redis_cluster.h"

#ifndef KVBM_SOURCE_DIR
#error "KVBM_SOURCE_DIR must name the source tree (set by CMakeLists.txt for kvbm_tests)"
#endif

namespace kvbm::testing {

struct ShellResult {
  int rc = -1;
  std::string out;
};

// Runs `command` through /bin/sh; stdout (and stderr, merged) captured.
inline ShellResult Shell(const std::string& command) {
  ShellResult r;
  FILE* p = popen((command + " 2>&1").c_str(), "r");
  if (p == nullptr) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  const int status = pclose(p);
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

inline bool LoopbackPortFree(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return false;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const bool ok = bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
  close(fd);
  return ok;
}

class ClusterProcess {
 public:
  static constexpr int kNodes = 6;

  // Starts a cluster on a base port derived from the pid (retrying others when taken).
  // ok() tells whether it came up; error() says why not.
  ClusterProcess() {
    const int pid = static_cast<int>(getpid());
    // Ports a cluster of this process used a moment ago may still be held (TIME_WAIT), so a
    // process that starts many clusters needs more than a few candidates.
    for (int attempt = 0; attempt < 64 && !ok_; ++attempt) {
      const int base = 20000 + ((pid * 7 + attempt * 389) % 3000) * 10;  // 20000..49990, bus +10000
      bool free = true;
      for (int i = 0; i < kNodes && free; ++i)
        free = LoopbackPortFree(base + i) && LoopbackPortFree(base + 10000 + i);
      if (!free) continue;
      base_port_ = base;
      dir_ = fmt::format("/tmp/kvbm-redis-test-{}-{}", pid, base);
      ShellResult r =
          Shell(fmt::format("bash {}/scripts/redis_cluster.sh start --base-port {} --dir {}",
                            KVBM_SOURCE_DIR, base, dir_));
      if (r.rc == 0) {
        ok_ = true;
        Register(this);
      } else {
        error_ += r.out;
        Shell(Stop());
      }
    }
    if (!ok_ && error_.empty()) error_ = "no free loopback ports for a cluster (64 candidates tried)";
  }
  ~ClusterProcess() {
    if (!ok_) return;
    Unregister(this);
    Shell(Stop());
  }
  ClusterProcess(const ClusterProcess&) = delete;
  ClusterProcess& operator=(const ClusterProcess&) = delete;

  bool ok() const { return ok_; }
  const std::string& error() const { return error_; }
  int base_port() const { return base_port_; }
  const std::string& dir() const { return dir_; }
  std::string SeedUrl() const {
    return fmt::format("redis://127.0.0.1:{},127.0.0.1:{}", base_port_, base_port_ + 1);
  }

  // redis-cli against one node.
  ShellResult Cli(int port, const std::string& args) const {
    return Shell(fmt::format("timeout 10 redis-cli -h 127.0.0.1 -p {} {}", port, args));
  }
  int Pid(int port) const {
    std::ifstream f(fmt::format("{}/{}/redis.pid", dir_, port));
    int pid = -1;
    f >> pid;
    return pid;
  }

 private:
  std::string Stop() const {
    return fmt::format("bash {}/scripts/redis_cluster.sh stop --base-port {} --dir {}",
                       KVBM_SOURCE_DIR, base_port_, dir_);
  }

  // A fatal signal SIGKILLs the nodes of every live cluster (kill is async-signal-safe), then
  // re-raises; exit() runs the destructors' equivalent through atexit.
  static inline ClusterProcess* live_ = nullptr;
  static inline std::array<int, kNodes> live_pids_{};
  static void KillLive() {
    for (int pid : live_pids_)
      if (pid > 0) kill(pid, SIGKILL);
  }
  static void OnFatal(int sig) {
    KillLive();
    signal(sig, SIG_DFL);
    raise(sig);
  }
  static void Register(ClusterProcess* c) {
    live_ = c;
    for (int i = 0; i < kNodes; ++i) live_pids_[i] = c->Pid(c->base_port_ + i);
    static bool installed = [] {
      for (int sig : {SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL, SIGTERM, SIGINT})
        signal(sig, OnFatal);
      std::atexit([] {
        if (live_ != nullptr) Shell(live_->Stop());
      });
      return true;
    }();
    (void)installed;
  }
  static void Unregister(ClusterProcess* c) {
    if (live_ == c) {
      live_ = nullptr;
      live_pids_.fill(0);
    }
  }

  bool ok_ = false;
  int base_port_ = 0;
  std::string dir_;
  std::string error_;
};

}  // namespace kvbm::testing
