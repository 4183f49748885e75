// A small Redis Cluster client for the remote tier (G4), over hiredis's blocking API.
//
// No C/C++ cluster client is packaged in Debian, so the routing is here, and only what G4
// needs: keys are routed by slot (CRC16-XMODEM mod 16384, honouring {hash tags}); the slot map
// is loaded with CLUSTER SLOTS and reloaded after a MOVED or a node failure; MOVED and ASK
// (with ASKING) are followed up to `max_redirects` times per key; one connection per master;
// each batch is pipelined: all of a node's commands are written, then all its replies read,
// every node's writes before any node's reads. Commands are sent with non-blocking sendmsg
// straight from the callers' buffers (no copy into a command buffer), to every node in
// parallel; replies are read as they arrive from any node.
//
// Failures: every socket operation carries a timeout (connect and command), and a whole call
// carries `call_timeout`, so a dead or stalled node costs an error, never a hang. A node whose
// connection failed is not retried for `reconnect_backoff` (its keys fail at once with
// kUnavailable); its connection is dropped and the slot map is reloaded on the next call, which
// is how the client follows a failover. A batch call succeeds only when every key succeeded;
// otherwise it returns the first error (code kUnavailable, kTimeout or kInternal), naming the
// node, and how many keys failed. Writes of a failed call may be partly applied (a cache
// tolerates that: every value is verified on read).
//
// Thread safety: all public methods may be called from any thread; one mutex serialises calls
// (G4 batches are large, so the lock is not the bottleneck; use one client per thread for more
// parallelism). stats() reads atomics without the lock.
// Ownership: the client owns its hiredis contexts (freed on drop or destruction).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvbm/error.h"

struct redisReply;  // hiredis

namespace kvbm {

inline constexpr uint32_t kRedisClusterSlots = 16384;

// CRC16-XMODEM of the key (or of its first non-empty {hash tag}) mod 16384, as Redis computes it.
uint16_t RedisKeySlot(std::string_view key);

struct RedisNodeAddress {
  std::string host;  // a name or an IPv4/IPv6 literal (IPv6 without brackets)
  uint16_t port = 0;
  std::string ToString() const;  // host:port, [v6]:port
  bool operator==(const RedisNodeAddress&) const = default;
};

// Parses `redis://host:port,host:port,...`. The scheme is optional; each entry may repeat it;
// IPv6 literals go in brackets. InvalidArgument naming the entry and what was wrong for: an
// empty list or entry, another scheme (rediss:// needs TLS, unsupported), a user or password, a
// path or database number (a cluster has only database 0), a missing or bad port.
Result<std::vector<RedisNodeAddress>> ParseRedisSeeds(std::string_view url);

struct RedisClusterOptions {
  std::vector<RedisNodeAddress> seeds;
  std::chrono::milliseconds connect_timeout{500};
  std::chrono::milliseconds command_timeout{1000};  // each socket read or write
  std::chrono::milliseconds call_timeout{3000};     // a whole batch call, redirects included
  std::chrono::milliseconds reconnect_backoff{200};
  uint32_t max_redirects = 5;

  // InvalidArgument naming the field: no seeds, a zero timeout, max_redirects of 0.
  Status Validate() const;
};

// A SET whose value is `head` followed by `tail` (a block's header and its bytes), sent without
// joining them.
struct RedisSetItem {
  std::string_view key, head, tail;
};

struct RedisClusterStats {
  uint64_t calls = 0;           // batch calls (Exists, Get, Set, Del)
  uint64_t commands = 0;        // key commands sent, redirected retries included
  uint64_t errors = 0;          // calls that returned an error
  uint64_t moved = 0;           // MOVED redirects followed
  uint64_t ask = 0;             // ASK redirects followed
  uint64_t timeouts = 0;        // socket operations that timed out
  uint64_t connects = 0;        // connections opened (the first ones and reconnects)
  uint64_t slot_map_loads = 0;  // CLUSTER SLOTS loads that succeeded
};

class RedisCluster {
 public:
  // Validates the options, connects to the first seed that answers CLUSTER SLOTS and loads the
  // slot map. kUnavailable (nothing listening, refused) or kTimeout (no answer within the
  // timeouts) naming every seed tried when none does; gives up after
  // max(call_timeout, connect_timeout + command_timeout), so a small per-call budget (a
  // scheduler's match budget) still leaves the first connection its own timeouts.
  static Result<std::unique_ptr<RedisCluster>> Connect(const RedisClusterOptions& options);
  ~RedisCluster();
  RedisCluster(const RedisCluster&) = delete;
  RedisCluster& operator=(const RedisCluster&) = delete;

  // One EXISTS per key, pipelined per node; true where the key is there.
  Result<std::vector<bool>> Exists(std::span<const std::string> keys);
  // One GET per key; nullopt where the key is not there.
  Result<std::vector<std::optional<std::string>>> Get(std::span<const std::string> keys);
  // Like Get without copying the values: `visit(i, value)` runs for each key as its reply is
  // read (any order; nullopt where the key is not there), the view valid during the call only.
  // On an error some keys may have been visited and others not.
  Status GetEach(std::span<const std::string> keys,
                 const std::function<void(size_t, std::optional<std::string_view>)>& visit);
  // One SET per item (key, value).
  Status Set(std::span<const std::pair<std::string, std::string_view>> items);
  // One SET per item, the value head + tail.
  Status SetParts(std::span<const RedisSetItem> items);
  // One DEL per key; how many existed.
  Result<uint64_t> Del(std::span<const std::string> keys);

  // The master serving `slot` in the current map (nullopt when the slot is unassigned).
  std::optional<RedisNodeAddress> MasterOf(uint16_t slot) const;
  // Reloads the slot map now (normally done on demand).
  Status RefreshSlotMap();

  RedisClusterStats stats() const;

 private:
  struct Node;
  struct Command;
  explicit RedisCluster(const RedisClusterOptions& options);

  // Runs `commands` (each routed by its slot) and leaves each one's reply in it, or, with
  // `on_reply`, hands each non-error reply to it as it is read and frees it; the first failure
  // otherwise. REQUIRES mu_ held.
  using ReplyHook = std::function<void(size_t, const ::redisReply&)>;
  Status Execute(std::vector<Command>& commands, const ReplyHook* on_reply = nullptr);
  // Asks known masters, then seeds, then any other node seen, for CLUSTER SLOTS until one
  // answers or `deadline` passes. REQUIRES mu_ held.
  Status LoadSlotMapLocked(std::chrono::steady_clock::time_point deadline);
  Node* NodeFor(const RedisNodeAddress& address);
  Status EnsureConnected(Node& node, std::chrono::steady_clock::time_point deadline);
  void Drop(Node& node);

  const RedisClusterOptions options_;
  mutable std::mutex mu_;
  std::vector<std::unique_ptr<Node>> nodes_;  // GUARDED_BY(mu_); never shrinks (stable pointers)
  std::vector<int32_t> slot_owner_;           // GUARDED_BY(mu_); index into nodes_, -1 unknown
  bool slot_map_stale_ = false;               // GUARDED_BY(mu_)
  static constexpr size_t kRecvBufferBytes = 256 << 10;
  std::vector<char> recv_buffer_;             // GUARDED_BY(mu_); replies are read through it

  struct Counters {
    std::atomic<uint64_t> calls{0}, commands{0}, errors{0}, moved{0}, ask{0}, timeouts{0},
        connects{0}, slot_map_loads{0};
  };
  Counters counters_;
};

}  // namespace kvbm
