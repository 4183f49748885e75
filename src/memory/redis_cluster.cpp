#include "kvbm/redis_cluster.h"

#include <fmt/format.h>
#include <hiredis/hiredis.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <charconv>
#include <cstring>

namespace kvbm {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr std::array<uint16_t, 256> MakeCrc16Table() {
  std::array<uint16_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint16_t crc = static_cast<uint16_t>(i << 8);
    for (int b = 0; b < 8; ++b)
      crc = static_cast<uint16_t>((crc & 0x8000) ? (crc << 1) ^ 0x1021 : crc << 1);
    table[i] = crc;
  }
  return table;
}
constexpr std::array<uint16_t, 256> kCrc16Table = MakeCrc16Table();

uint16_t Crc16Xmodem(std::string_view bytes) {
  uint16_t crc = 0;
  for (char c : bytes)
    crc = static_cast<uint16_t>((crc << 8) ^
                                kCrc16Table[((crc >> 8) ^ static_cast<uint8_t>(c)) & 0xff]);
  return crc;
}

struct ReplyDeleter {
  void operator()(redisReply* r) const {
    if (r != nullptr) freeReplyObject(r);
  }
};
using ReplyPtr = std::unique_ptr<redisReply, ReplyDeleter>;

timeval ToTimeval(milliseconds ms) {
  if (ms.count() < 1) ms = milliseconds(1);
  return timeval{static_cast<time_t>(ms.count() / 1000),
                 static_cast<suseconds_t>((ms.count() % 1000) * 1000)};
}

milliseconds Remaining(Clock::time_point deadline) {
  return std::chrono::duration_cast<milliseconds>(deadline - Clock::now());
}

std::optional<uint16_t> ParsePort(std::string_view s) {
  if (s.empty() || s.size() > 5 ||
      !std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return std::nullopt;
  uint32_t v = 0;
  std::from_chars(s.data(), s.data() + s.size(), v);
  if (v == 0 || v > 65535) return std::nullopt;
  return static_cast<uint16_t>(v);
}

// "host:port" as in MOVED/ASK replies; the host may be empty (then: the replying node's host).
std::optional<RedisNodeAddress> ParseEndpoint(std::string_view s,
                                              const std::string& fallback_host) {
  const size_t colon = s.rfind(':');
  if (colon == std::string_view::npos) return std::nullopt;
  auto port = ParsePort(s.substr(colon + 1));
  if (!port) return std::nullopt;
  std::string host(s.substr(0, colon));
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  if (host.empty() || host == "?") host = fallback_host;
  return RedisNodeAddress{std::move(host), *port};
}

std::string Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return std::string(s);
}

}  // namespace

uint16_t RedisKeySlot(std::string_view key) {
  // Redis hashes only the part between the first '{' and the first '}' after it, when that part
  // is not empty.
  if (const size_t open = key.find('{'); open != std::string_view::npos) {
    const size_t close = key.find('}', open + 1);
    if (close != std::string_view::npos && close > open + 1)
      key = key.substr(open + 1, close - open - 1);
  }
  return Crc16Xmodem(key) & (kRedisClusterSlots - 1);
}

std::string RedisNodeAddress::ToString() const {
  return host.find(':') != std::string::npos ? fmt::format("[{}]:{}", host, port)
                                             : fmt::format("{}:{}", host, port);
}

Result<std::vector<RedisNodeAddress>> ParseRedisSeeds(std::string_view url) {
  auto bad = [&](std::string_view entry, std::string why) {
    return MakeError(ErrorCode::kInvalidArgument,
                     fmt::format("Redis Cluster address \"{}\": entry \"{}\" {}", url, entry, why));
  };
  std::vector<RedisNodeAddress> seeds;
  if (Trim(url).empty())
    return MakeError(ErrorCode::kInvalidArgument,
                     "Redis Cluster address is empty; expected redis://host:port[,host:port...]");
  size_t start = 0;
  while (start <= url.size()) {
    size_t comma = url.find(',', start);
    if (comma == std::string_view::npos) comma = url.size();
    const std::string entry = Trim(url.substr(start, comma - start));
    start = comma + 1;
    if (entry.empty()) return bad(entry, "is empty (a stray comma?)");
    std::string_view rest = entry;
    if (const size_t sep = rest.find("://"); sep != std::string_view::npos) {
      std::string_view scheme = rest.substr(0, sep);
      if (scheme != "redis")
        return bad(
            entry,
            fmt::format("has scheme '{}://'; only redis:// is supported (rediss:// would need TLS)",
                        scheme));
      rest.remove_prefix(sep + 3);
    }
    if (rest.find('@') != std::string_view::npos)
      return bad(entry, "holds a user or password; authentication is not supported");
    if (const size_t slash = rest.find('/'); slash != std::string_view::npos) {
      if (slash + 1 != rest.size())
        return bad(entry, "has a path or database number; a Redis Cluster has only database 0");
      rest.remove_suffix(1);
    }
    std::string host;
    std::string_view port_text;
    if (!rest.empty() && rest.front() == '[') {
      const size_t close = rest.find(']');
      if (close == std::string_view::npos)
        return bad(entry, "opens an IPv6 bracket that is never closed");
      host = std::string(rest.substr(1, close - 1));
      if (close + 1 >= rest.size() || rest[close + 1] != ':')
        return bad(entry, "has no port (expected [host]:port)");
      port_text = rest.substr(close + 2);
    } else {
      const size_t colon = rest.rfind(':');
      if (colon == std::string_view::npos) return bad(entry, "has no port (expected host:port)");
      host = std::string(rest.substr(0, colon));
      if (host.find(':') != std::string::npos)
        return bad(entry, "is an IPv6 literal without brackets ([::1]:7000)");
      port_text = rest.substr(colon + 1);
    }
    if (host.empty()) return bad(entry, "has no host");
    auto port = ParsePort(port_text);
    if (!port) return bad(entry, fmt::format("has port '{}'; expected 1..65535", port_text));
    seeds.push_back({std::move(host), *port});
    if (comma == url.size()) break;
  }
  return seeds;
}

Status RedisClusterOptions::Validate() const {
  auto bad = [](std::string what) {
    return MakeError(ErrorCode::kInvalidArgument, std::move(what));
  };
  if (seeds.empty()) return bad("Redis Cluster options: no seed node given");
  if (connect_timeout.count() <= 0)
    return bad("Redis Cluster options: connect_timeout must be > 0 ms");
  if (command_timeout.count() <= 0)
    return bad("Redis Cluster options: command_timeout must be > 0 ms");
  if (call_timeout.count() <= 0) return bad("Redis Cluster options: call_timeout must be > 0 ms");
  if (reconnect_backoff.count() < 0)
    return bad("Redis Cluster options: reconnect_backoff must be >= 0 ms");
  if (max_redirects == 0) return bad("Redis Cluster options: max_redirects must be >= 1");
  return {};
}

struct RedisCluster::Node {
  RedisNodeAddress address;
  redisContext* context = nullptr;
  Clock::time_point retry_after{};
  std::string last_error;
};

struct RedisCluster::Command {
  std::string_view name, key;
  // The value argument (SET), given as two parts sent back to back: a header and the bytes
  // after it, so a framed block goes out without being copied into one buffer first.
  std::string_view value_head, value_tail;
  bool has_value = false;
  uint16_t slot = 0;
  std::optional<RedisNodeAddress> ask;  // where an ASK redirect sent it, for one attempt
  ReplyPtr reply;

  Command(std::string_view command, std::string_view k) : name(command), key(k), slot(RedisKeySlot(k)) {}
  Command(std::string_view command, std::string_view k, std::string_view head, std::string_view tail)
      : name(command), key(k), value_head(head), value_tail(tail), has_value(true), slot(RedisKeySlot(k)) {}
};

namespace {

// One node's pipelined commands in the Redis protocol (RESP), written with sendmsg straight
// from the callers' buffers: only the small framing lives here. Built once per call and node.
class RespBatch {
 public:
  static constexpr size_t kMaxIov = 1024;  // Linux's UIO_MAXIOV
  void AddAsking() { Text("*1\r\n$6\r\nASKING\r\n"); }
  void Add(std::string_view name, std::string_view key, const std::string_view* head,
           const std::string_view* tail) {
    const bool value = head != nullptr;
    Text(fmt::format("*{}\r\n${}\r\n", value ? 3 : 2, name.size()));
    Bytes(name);
    Text(fmt::format("\r\n${}\r\n", key.size()));
    Bytes(key);
    if (value) {
      Text(fmt::format("\r\n${}\r\n", head->size() + tail->size()));
      Bytes(*head);
      Bytes(*tail);
    }
    Text("\r\n");
  }
  // Pointers into text_ are taken only now, once it no longer grows.
  void Finish() {
    iov_.reserve(pieces_.size());
    for (const Piece& p : pieces_)
      if (p.length > 0)
        iov_.push_back({const_cast<char*>(p.data ? p.data : text_.data() + p.offset), p.length});
  }
  bool done() const { return next_ >= iov_.size(); }
  // One non-blocking sendmsg of what is left. False on a socket error (errno set); true when
  // it sent something or the socket is full (EAGAIN).
  bool SendSome(int fd) {
    msghdr msg{};
    msg.msg_iov = iov_.data() + next_;
    msg.msg_iovlen = std::min<size_t>(iov_.size() - next_, kMaxIov);
    const ssize_t n = sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
    size_t left = static_cast<size_t>(n);
    while (left > 0 && next_ < iov_.size()) {
      iovec& v = iov_[next_];
      const size_t take = std::min(left, v.iov_len);
      v.iov_base = static_cast<char*>(v.iov_base) + take;
      v.iov_len -= take;
      left -= take;
      if (v.iov_len == 0) ++next_;
    }
    return true;
  }

 private:
  struct Piece {
    const char* data;  // caller's bytes, or nullptr: text_ at offset
    size_t offset, length;
  };
  void Text(std::string_view t) {
    pieces_.push_back({nullptr, text_.size(), t.size()});
    text_.append(t);
  }
  void Bytes(std::string_view b) { pieces_.push_back({b.data(), 0, b.size()}); }
  std::string text_;
  std::vector<Piece> pieces_;
  std::vector<iovec> iov_;
  size_t next_ = 0;
};

}  // namespace

RedisCluster::RedisCluster(const RedisClusterOptions& options)
    : options_(options), slot_owner_(kRedisClusterSlots, -1), recv_buffer_(kRecvBufferBytes) {}

RedisCluster::~RedisCluster() {
  for (auto& n : nodes_)
    if (n->context != nullptr) redisFree(n->context);
}

Result<std::unique_ptr<RedisCluster>> RedisCluster::Connect(const RedisClusterOptions& options) {
  if (auto st = options.Validate(); !st) return std::unexpected(st.error());
  std::unique_ptr<RedisCluster> cluster(new RedisCluster(options));
  std::lock_guard lock(cluster->mu_);
  if (auto st = cluster->LoadSlotMapLocked(
          Clock::now() +
          std::max(options.call_timeout, options.connect_timeout + options.command_timeout));
      !st)
    return std::unexpected(st.error());
  return cluster;
}

RedisCluster::Node* RedisCluster::NodeFor(const RedisNodeAddress& address) {
  for (auto& n : nodes_)
    if (n->address == address) return n.get();
  nodes_.push_back(std::make_unique<Node>());
  nodes_.back()->address = address;
  return nodes_.back().get();
}

void RedisCluster::Drop(Node& node) {
  if (node.context != nullptr) redisFree(node.context);
  node.context = nullptr;
  node.retry_after = Clock::now() + options_.reconnect_backoff;
  slot_map_stale_ = true;
}

namespace {
// Classifies a failed context: a timed-out socket operation is kTimeout, the rest kUnavailable.
Error ContextError(const redisContext* c, int saved_errno, const RedisNodeAddress& where,
                   std::string_view during) {
  const bool timeout =
      saved_errno == EAGAIN || saved_errno == EWOULDBLOCK || saved_errno == ETIMEDOUT ||
      (c != nullptr && (std::strstr(c->errstr, "timed out") != nullptr ||
                        std::strstr(c->errstr, "temporarily unavailable") != nullptr));
  const char* what = c != nullptr && c->errstr[0] != '\0' ? c->errstr : std::strerror(saved_errno);
  return Error(timeout ? ErrorCode::kTimeout : ErrorCode::kUnavailable,
               fmt::format("Redis node {} {} while {}: {}", where.ToString(),
                           timeout ? "timed out" : "failed", during, what));
}
}  // namespace

Status RedisCluster::EnsureConnected(Node& node, Clock::time_point deadline) {
  if (node.context != nullptr) return {};
  if (Clock::now() < node.retry_after)
    return MakeError(ErrorCode::kUnavailable,
                     fmt::format("Redis node {} is backing off after a failure ({})",
                                 node.address.ToString(), node.last_error));
  const milliseconds left = Remaining(deadline);
  if (left.count() <= 0) {
    counters_.timeouts.fetch_add(1, std::memory_order_relaxed);
    return MakeError(ErrorCode::kTimeout,
                     fmt::format("Redis Cluster call timed out before connecting to {}",
                                 node.address.ToString()));
  }
  errno = 0;
  redisContext* c = redisConnectWithTimeout(node.address.host.c_str(), node.address.port,
                                            ToTimeval(std::min(options_.connect_timeout, left)));
  const int saved_errno = errno;
  if (c == nullptr || c->err != 0) {
    Error e = c == nullptr ? Error(ErrorCode::kUnavailable,
                                   fmt::format("Redis node {}: cannot allocate a connection",
                                               node.address.ToString()))
                           : ContextError(c, saved_errno, node.address, "connecting");
    if (c != nullptr) redisFree(c);
    if (e.code() == ErrorCode::kTimeout) counters_.timeouts.fetch_add(1, std::memory_order_relaxed);
    node.last_error = e.message();
    Drop(node);
    return std::unexpected(std::move(e));
  }
  redisEnableKeepAlive(c);
  redisSetTimeout(c, ToTimeval(options_.command_timeout));
  // Keep the reply reader's buffer between replies: G4 values are large, and hiredis would
  // otherwise free and regrow (and the kernel re-fault) it for every one.
  c->reader->maxbuf = 0;
  node.context = c;
  counters_.connects.fetch_add(1, std::memory_order_relaxed);
  return {};
}

Status RedisCluster::LoadSlotMapLocked(Clock::time_point deadline) {
  // Known masters first (they know the newest map), then the seeds.
  std::vector<Node*> candidates;
  for (int32_t owner : slot_owner_)
    if (owner >= 0 &&
        std::find(candidates.begin(), candidates.end(), nodes_[owner].get()) == candidates.end())
      candidates.push_back(nodes_[owner].get());
  for (const auto& seed : options_.seeds) {
    Node* n = NodeFor(seed);
    if (std::find(candidates.begin(), candidates.end(), n) == candidates.end())
      candidates.push_back(n);
  }
  // Every other node ever seen (replicas promoted since, for instance) as a last resort.
  for (auto& n : nodes_)
    if (std::find(candidates.begin(), candidates.end(), n.get()) == candidates.end())
      candidates.push_back(n.get());

  std::vector<std::string> failures;
  bool all_timeouts = true, ran_out = false;
  for (Node* node : candidates) {
    if (Remaining(deadline).count() <= 0) {
      failures.push_back(fmt::format("out of time ({} ms) before asking {}",
                                     options_.call_timeout.count(), node->address.ToString()));
      ran_out = true;
      break;
    }
    if (auto st = EnsureConnected(*node, deadline); !st) {
      all_timeouts = all_timeouts && st.error().code() == ErrorCode::kTimeout;
      failures.push_back(st.error().message());
      continue;
    }
    redisSetTimeout(node->context,
                    ToTimeval(std::min(options_.command_timeout, Remaining(deadline))));
    errno = 0;
    ReplyPtr reply(static_cast<redisReply*>(redisCommand(node->context, "CLUSTER SLOTS")));
    const int saved_errno = errno;
    if (!reply) {
      Error e = ContextError(node->context, saved_errno, node->address,
                             "loading the slot map (CLUSTER SLOTS)");
      if (e.code() == ErrorCode::kTimeout)
        counters_.timeouts.fetch_add(1, std::memory_order_relaxed);
      all_timeouts = all_timeouts && e.code() == ErrorCode::kTimeout;
      node->last_error = e.message();
      failures.push_back(e.message());
      Drop(*node);
      continue;
    }
    all_timeouts = false;
    if (reply->type == REDIS_REPLY_ERROR) {
      failures.push_back(
          fmt::format("Redis node {} refused CLUSTER SLOTS ({}): is it a cluster node?",
                      node->address.ToString(), std::string(reply->str, reply->len)));
      continue;
    }
    if (reply->type != REDIS_REPLY_ARRAY) {
      failures.push_back(fmt::format("Redis node {}: CLUSTER SLOTS reply is not an array",
                                     node->address.ToString()));
      continue;
    }
    std::vector<int32_t> owners(kRedisClusterSlots, -1);
    bool malformed = false;
    for (size_t i = 0; i < reply->elements && !malformed; ++i) {
      const redisReply* range = reply->element[i];
      if (range->type != REDIS_REPLY_ARRAY || range->elements < 3 ||
          range->element[0]->type != REDIS_REPLY_INTEGER ||
          range->element[1]->type != REDIS_REPLY_INTEGER ||
          range->element[2]->type != REDIS_REPLY_ARRAY || range->element[2]->elements < 2 ||
          range->element[2]->element[0]->type != REDIS_REPLY_STRING ||
          range->element[2]->element[1]->type != REDIS_REPLY_INTEGER) {
        malformed = true;
        break;
      }
      const long long first = range->element[0]->integer, last = range->element[1]->integer;
      const long long port = range->element[2]->element[1]->integer;
      if (first < 0 || last >= kRedisClusterSlots || first > last || port <= 0 || port > 65535) {
        malformed = true;
        break;
      }
      std::string host(range->element[2]->element[0]->str, range->element[2]->element[0]->len);
      if (host.empty() || host == "?") host = node->address.host;
      Node* master = NodeFor({std::move(host), static_cast<uint16_t>(port)});
      const auto index =
          static_cast<int32_t>(std::find_if(nodes_.begin(), nodes_.end(),
                                            [&](const auto& n) { return n.get() == master; }) -
                               nodes_.begin());
      std::fill(owners.begin() + first, owners.begin() + last + 1, index);
    }
    if (malformed) {
      failures.push_back(
          fmt::format("Redis node {}: malformed CLUSTER SLOTS reply", node->address.ToString()));
      continue;
    }
    slot_owner_ = std::move(owners);
    slot_map_stale_ = false;
    counters_.slot_map_loads.fetch_add(1, std::memory_order_relaxed);
    return {};
  }
  std::string tried;
  for (const auto& f : failures) tried += (tried.empty() ? "" : "; ") + f;
  if (ran_out) counters_.timeouts.fetch_add(1, std::memory_order_relaxed);
  return MakeError((all_timeouts || ran_out) && !failures.empty() ? ErrorCode::kTimeout
                                                                  : ErrorCode::kUnavailable,
                   fmt::format("no node of the Redis Cluster served its slot map: {}", tried));
}

Status RedisCluster::RefreshSlotMap() {
  std::lock_guard lock(mu_);
  return LoadSlotMapLocked(Clock::now() + options_.call_timeout);
}

std::optional<RedisNodeAddress> RedisCluster::MasterOf(uint16_t slot) const {
  std::lock_guard lock(mu_);
  if (slot >= kRedisClusterSlots || slot_owner_[slot] < 0) return std::nullopt;
  return nodes_[slot_owner_[slot]]->address;
}

Status RedisCluster::Execute(std::vector<Command>& commands, const ReplyHook* on_reply) {
  counters_.calls.fetch_add(1, std::memory_order_relaxed);
  const auto deadline = Clock::now() + options_.call_timeout;
  if (slot_map_stale_)
    (void)LoadSlotMapLocked(deadline);  // best effort: a failure keeps the old map

  std::optional<Error> first_error;
  size_t failed = 0;
  auto fail = [&](const Error& e) {
    if (!first_error) first_error = e;
    ++failed;
  };
  std::vector<size_t> pending(commands.size());
  for (size_t i = 0; i < pending.size(); ++i) pending[i] = i;
  bool reloaded = false;

  for (uint32_t round = 0; !pending.empty(); ++round) {
    if (round > options_.max_redirects) {
      for (size_t i = 0; i < pending.size(); ++i)
        fail(Error(ErrorCode::kUnavailable,
                   fmt::format("key slot {} still redirected after {} redirects",
                               commands[pending[i]].slot, options_.max_redirects)));
      break;
    }
    if (Remaining(deadline).count() <= 0) {
      counters_.timeouts.fetch_add(1, std::memory_order_relaxed);
      for (size_t i = 0; i < pending.size(); ++i)
        fail(Error(ErrorCode::kTimeout, fmt::format("Redis Cluster call ran past its {} ms budget",
                                                    options_.call_timeout.count())));
      break;
    }
    // Group by node, in the order nodes are first met.
    std::vector<std::pair<Node*, std::vector<size_t>>> groups;
    for (size_t i : pending) {
      const Command& cmd = commands[i];
      Node* node =
          cmd.ask ? NodeFor(*cmd.ask)
                  : (slot_owner_[cmd.slot] >= 0 ? nodes_[slot_owner_[cmd.slot]].get() : nullptr);
      if (node == nullptr) {
        slot_map_stale_ = true;
        fail(Error(ErrorCode::kUnavailable,
                   fmt::format("key slot {} is served by no node of the slot map", cmd.slot)));
        continue;
      }
      auto it = std::find_if(groups.begin(), groups.end(),
                             [&](const auto& g) { return g.first == node; });
      if (it == groups.end()) {
        groups.emplace_back(node, std::vector<size_t>{});
        it = groups.end() - 1;
      }
      it->second.push_back(i);
    }
    auto node_failed = [&](Node& node, std::span<const size_t> ops, std::string_view during,
                           int saved_errno) {
      Error e = ContextError(node.context, saved_errno, node.address, during);
      if (e.code() == ErrorCode::kTimeout)
        counters_.timeouts.fetch_add(1, std::memory_order_relaxed);
      node.last_error = e.message();
      Drop(node);
      for (size_t k = 0; k < ops.size(); ++k) fail(e);
    };

    // Phase 1: connect and frame every node's commands, then send them all, every node's in
    // parallel (non-blocking sends, polled), so no master waits while another is written to.
    std::vector<bool> asked(commands.size(), false);
    std::vector<bool> alive(groups.size(), false);
    std::vector<RespBatch> batches(groups.size());
    for (size_t g = 0; g < groups.size(); ++g) {
      auto& [node, ops] = groups[g];
      if (auto st = EnsureConnected(*node, deadline); !st) {
        for (size_t k = 0; k < ops.size(); ++k) fail(st.error());
        continue;
      }
      redisSetTimeout(node->context,
                      ToTimeval(std::min(options_.command_timeout, Remaining(deadline))));
      for (size_t i : ops) {
        Command& cmd = commands[i];
        asked[i] = cmd.ask.has_value();
        if (cmd.ask) batches[g].AddAsking();
        batches[g].Add(cmd.name, cmd.key, cmd.has_value ? &cmd.value_head : nullptr,
                       cmd.has_value ? &cmd.value_tail : nullptr);
      }
      batches[g].Finish();
      counters_.commands.fetch_add(ops.size(), std::memory_order_relaxed);
      alive[g] = true;
    }
    for (;;) {
      std::vector<pollfd> fds;
      std::vector<size_t> fd_group;
      for (size_t g = 0; g < groups.size(); ++g) {
        if (!alive[g] || batches[g].done()) continue;
        errno = 0;
        if (!batches[g].SendSome(groups[g].first->context->fd)) {
          node_failed(*groups[g].first, groups[g].second, "sending commands", errno);
          alive[g] = false;
          continue;
        }
        if (batches[g].done()) continue;
        fds.push_back({groups[g].first->context->fd, POLLOUT, 0});
        fd_group.push_back(g);
      }
      if (fds.empty()) break;
      const milliseconds left = std::min(options_.command_timeout, Remaining(deadline));
      const int ready =
          left.count() <= 0 ? 0 : poll(fds.data(), fds.size(), static_cast<int>(left.count()));
      if (ready < 0 && errno == EINTR) continue;
      if (ready <= 0) {
        for (size_t g : fd_group) {
          node_failed(*groups[g].first, groups[g].second, "sending commands",
                      ready == 0 ? ETIMEDOUT : errno);
          alive[g] = false;
        }
      }
    }
    // Phase 2: read every node's replies as they arrive (poll over all nodes), so the masters'
    // reply streams flow in parallel instead of one node's waiting in its socket buffer.
    std::vector<size_t> next;
    bool moved = false;
    auto handle = [&](Node& node, size_t index, ReplyPtr reply) {
      Command& cmd = commands[index];
      const RedisNodeAddress& from = node.address;
      cmd.ask.reset();
      if (reply->type != REDIS_REPLY_ERROR) {
        if (on_reply != nullptr) {
          (*on_reply)(index, *reply);  // then freed at once: one large value alive at a time
          return;
        }
        cmd.reply = std::move(reply);
        return;
      }
      std::string_view text(reply->str, reply->len);
      const bool is_moved = text.starts_with("MOVED "), is_ask = text.starts_with("ASK ");
      if (is_moved || is_ask) {
        // "MOVED <slot> <host>:<port>"
        const size_t space = text.find(' ', is_moved ? 6 : 4);
        auto target = space == std::string_view::npos
                          ? std::nullopt
                          : ParseEndpoint(text.substr(space + 1), from.host);
        if (!target) {
          fail(Error(
              ErrorCode::kInternal,
              fmt::format("Redis node {} sent a malformed redirect: {}", from.ToString(), text)));
          return;
        }
        if (is_moved) {
          counters_.moved.fetch_add(1, std::memory_order_relaxed);
          Node* owner = NodeFor(*target);
          for (size_t n = 0; n < nodes_.size(); ++n)
            if (nodes_[n].get() == owner) slot_owner_[cmd.slot] = static_cast<int32_t>(n);
          moved = true;
        } else {
          counters_.ask.fetch_add(1, std::memory_order_relaxed);
          cmd.ask = std::move(*target);
        }
        next.push_back(index);
        return;
      }
      if (text.starts_with("CLUSTERDOWN") || text.starts_with("TRYAGAIN") ||
          text.starts_with("LOADING") || text.starts_with("MASTERDOWN")) {
        slot_map_stale_ = true;
        fail(Error(ErrorCode::kUnavailable,
                   fmt::format("Redis node {}: {}", from.ToString(), text)));
        return;
      }
      fail(Error(ErrorCode::kInternal,
                 fmt::format("Redis node {} refused the command: {}", from.ToString(), text)));
    };
    // Per group: replies still expected (an ASK-redirected command has two: ASKING's, then its
    // own).
    struct Progress {
      size_t op = 0;  // next command of the group whose reply is due
      bool asking_due = false;
    };
    std::vector<Progress> progress(groups.size());
    for (size_t g = 0; g < groups.size(); ++g)
      if (alive[g]) progress[g].asking_due = asked[groups[g].second[0]];
    // Takes every complete reply already parsed for group g; false when the reader failed.
    auto drain = [&](size_t g) {
      auto& [node, ops] = groups[g];
      Progress& p = progress[g];
      while (p.op < ops.size()) {
        void* raw = nullptr;
        if (redisGetReplyFromReader(node->context, &raw) != REDIS_OK) return false;
        if (raw == nullptr) return true;
        ReplyPtr reply(static_cast<redisReply*>(raw));
        if (p.asking_due) {
          p.asking_due = false;  // ASKING's own +OK
          continue;
        }
        handle(*node, ops[p.op], std::move(reply));
        if (++p.op < ops.size()) p.asking_due = asked[ops[p.op]];
      }
      return true;
    };
    for (;;) {
      std::vector<pollfd> fds;
      std::vector<size_t> fd_group;
      for (size_t g = 0; g < groups.size(); ++g) {
        if (!alive[g]) continue;
        if (!drain(g)) {
          node_failed(*groups[g].first, std::span(groups[g].second).subspan(progress[g].op),
                      "parsing replies", 0);
          alive[g] = false;
          continue;
        }
        if (progress[g].op == groups[g].second.size()) continue;
        fds.push_back({groups[g].first->context->fd, POLLIN, 0});
        fd_group.push_back(g);
      }
      if (fds.empty()) break;
      const milliseconds left = std::min(options_.command_timeout, Remaining(deadline));
      const int ready =
          left.count() <= 0 ? 0 : poll(fds.data(), fds.size(), static_cast<int>(left.count()));
      if (ready < 0 && errno == EINTR) continue;
      if (ready <= 0) {
        // Nobody answered within the command timeout (or the call's budget): those nodes are
        // stalled; drop them so a later call reconnects.
        for (size_t g : fd_group) {
          node_failed(*groups[g].first, std::span(groups[g].second).subspan(progress[g].op),
                      "reading replies", ready == 0 ? ETIMEDOUT : errno);
          alive[g] = false;
        }
        continue;
      }
      for (size_t f = 0; f < fds.size(); ++f) {
        if (fds[f].revents == 0) continue;
        const size_t g = fd_group[f];
        // Everything the socket holds, in large non-blocking reads, each fed to the reply
        // reader and its complete replies taken at once (so large values do not pile up).
        redisContext* ctx = groups[g].first->context;
        for (;;) {
          const ssize_t n = recv(ctx->fd, recv_buffer_.data(), recv_buffer_.size(), MSG_DONTWAIT);
          if (n < 0 && errno == EINTR) continue;
          if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
          if (n <= 0 || redisReaderFeed(ctx->reader, recv_buffer_.data(), static_cast<size_t>(n)) != REDIS_OK ||
              !drain(g)) {
            node_failed(*groups[g].first, std::span(groups[g].second).subspan(progress[g].op),
                        "reading replies", n == 0 ? ECONNRESET : errno);
            alive[g] = false;
            break;
          }
          if (progress[g].op == groups[g].second.size()) break;
        }
      }
    }
    // A MOVED usually means more than one slot moved (resharding, failover): reload once.
    if (moved && !reloaded) {
      reloaded = true;
      slot_map_stale_ = true;
      (void)LoadSlotMapLocked(deadline);
    }
    pending = std::move(next);
  }
  if (!first_error) return {};
  counters_.errors.fetch_add(1, std::memory_order_relaxed);
  return MakeError(
      first_error->code(),
      fmt::format("{} ({} of {} keys failed)", first_error->message(), failed, commands.size()));
}

Result<std::vector<bool>> RedisCluster::Exists(std::span<const std::string> keys) {
  std::vector<Command> commands;
  commands.reserve(keys.size());
  for (const auto& k : keys) commands.emplace_back("EXISTS", k);
  std::lock_guard lock(mu_);
  if (auto st = Execute(commands); !st) return std::unexpected(st.error());
  std::vector<bool> out(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) {
    const redisReply* r = commands[i].reply.get();
    if (r->type != REDIS_REPLY_INTEGER)
      return MakeError(ErrorCode::kInternal,
                       fmt::format("EXISTS {} answered with reply type {}", keys[i], r->type));
    out[i] = r->integer > 0;
  }
  return out;
}

Status RedisCluster::GetEach(
    std::span<const std::string> keys,
    const std::function<void(size_t, std::optional<std::string_view>)>& visit) {
  std::vector<Command> commands;
  commands.reserve(keys.size());
  for (const auto& k : keys) commands.emplace_back("GET", k);
  std::optional<Error> bad_reply;
  const ReplyHook hook = [&](size_t i, const redisReply& r) {
    if (r.type == REDIS_REPLY_STRING)
      visit(i, std::string_view(r.str, r.len));
    else if (r.type == REDIS_REPLY_NIL)
      visit(i, std::nullopt);
    else if (!bad_reply)
      bad_reply = Error(ErrorCode::kInternal, fmt::format("GET {} answered with reply type {}", keys[i], r.type));
  };
  std::lock_guard lock(mu_);
  if (auto st = Execute(commands, &hook); !st) return st;
  if (bad_reply) return std::unexpected(*bad_reply);
  return {};
}

Result<std::vector<std::optional<std::string>>> RedisCluster::Get(
    std::span<const std::string> keys) {
  std::vector<std::optional<std::string>> out(keys.size());
  auto st = GetEach(keys, [&](size_t i, std::optional<std::string_view> v) {
    if (v) out[i].emplace(*v);
  });
  if (!st) return std::unexpected(st.error());
  return out;
}

Status RedisCluster::SetParts(std::span<const RedisSetItem> items) {
  std::vector<Command> commands;
  commands.reserve(items.size());
  for (const auto& it : items) commands.emplace_back("SET", it.key, it.head, it.tail);
  std::lock_guard lock(mu_);
  if (auto st = Execute(commands); !st) return st;
  for (size_t i = 0; i < items.size(); ++i) {
    const redisReply* r = commands[i].reply.get();
    if (r->type != REDIS_REPLY_STATUS)
      return MakeError(ErrorCode::kInternal,
                       fmt::format("SET {} answered with reply type {}", items[i].key, r->type));
  }
  return {};
}

Status RedisCluster::Set(std::span<const std::pair<std::string, std::string_view>> items) {
  std::vector<RedisSetItem> parts;
  parts.reserve(items.size());
  for (const auto& [k, v] : items) parts.push_back({k, v, {}});
  return SetParts(parts);
}

Result<uint64_t> RedisCluster::Del(std::span<const std::string> keys) {
  std::vector<Command> commands;
  commands.reserve(keys.size());
  for (const auto& k : keys) commands.emplace_back("DEL", k);
  std::lock_guard lock(mu_);
  if (auto st = Execute(commands); !st) return std::unexpected(st.error());
  uint64_t existed = 0;
  for (const auto& c : commands)
    if (c.reply->type == REDIS_REPLY_INTEGER) existed += static_cast<uint64_t>(c.reply->integer);
  return existed;
}

RedisClusterStats RedisCluster::stats() const {
  auto get = [](const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  return {get(counters_.calls),    get(counters_.commands),      get(counters_.errors),
          get(counters_.moved),    get(counters_.ask),           get(counters_.timeouts),
          get(counters_.connects), get(counters_.slot_map_loads)};
}

}  // namespace kvbm
