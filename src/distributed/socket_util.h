// Small helpers shared by the leader and the worker (private to src/distributed): an eventfd
// that wakes an I/O thread from other threads, socket setup, and one-frame send/receive.
#pragma once

#include <sys/eventfd.h>
#include <unistd.h>

#include <cstdint>
#include <string>
#include <zmq.hpp>

#include "distributed/wire.h"

namespace kvbm::distributed_detail {

// Move-only eventfd; Signal() is async-signal- and thread-safe, Drain() is for the I/O thread.
class WakeFd {
 public:
  WakeFd() : fd_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {}
  ~WakeFd() {
    if (fd_ >= 0) ::close(fd_);
  }
  WakeFd(const WakeFd&) = delete;
  WakeFd& operator=(const WakeFd&) = delete;
  bool valid() const { return fd_ >= 0; }
  int fd() const { return fd_; }
  void Signal() const {
    uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(fd_, &one, sizeof(one));
  }
  void Drain() const {
    uint64_t v = 0;
    [[maybe_unused]] ssize_t n = ::read(fd_, &v, sizeof(v));
  }

 private:
  int fd_;
};

// Options every socket gets: no lingering on close (a dead peer must not hold up shutdown)
// and a bound on message size (no unbounded allocation from a hostile peer).
inline void CommonOptions(zmq::socket_t& s) {
  s.set(zmq::sockopt::linger, 0);
  s.set(zmq::sockopt::maxmsgsize, wire::kMaxMessageBytes);
}

inline bool SendMessage(zmq::socket_t& s, const wire::Message& m,
                        zmq::send_flags flags = zmq::send_flags::dontwait) {
  std::string bytes = wire::Encode(m);
  try {
    return s.send(zmq::buffer(bytes), flags).has_value();
  } catch (const zmq::error_t&) {
    return false;
  }
}

inline std::string TcpEndpoint(const std::string& host, uint16_t port) {
  return "tcp://" + host + ":" + (port == 0 ? std::string("*") : std::to_string(port));
}

inline uint16_t BoundPort(zmq::socket_t& s) {
  std::string ep = s.get(zmq::sockopt::last_endpoint);
  auto colon = ep.rfind(':');
  if (colon == std::string::npos) return 0;
  return static_cast<uint16_t>(std::stoul(ep.substr(colon + 1)));
}

}  // namespace kvbm::distributed_detail
