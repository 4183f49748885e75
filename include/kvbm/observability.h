// The observability layer: the Prometheus endpoint, the periodic cache-statistics log line and
// the KV-event publisher (ARCHITECTURE.md, "Metrics"; docs/METRICS.md lists every name).
//
//   MetricsServer     serves GET /metrics (Prometheus text format 0.0.4) from a KvbmMetrics on
//                     one event-loop thread of its own (libmicrohttpd, epoll), with bounded
//                     connections, request size and idle time: idle or hostile local clients
//                     cannot delay a scrape or grow the process.
//   CacheStatsLogger  logs host/disk hit rates and matched/requested tokens every interval.
//   KvEventPublisher  turns BlockRegistry events into vLLM's KV-event batches (msgpack) on a
//                     ZeroMQ PUB socket, from a thread of its own.
//
// Thread safety: Start/Stop of one object must not race with each other or with destruction;
// everything else (port(), counters, the registry sink) may be called from any thread.
// Ownership: each object shares ownership of the KvbmMetrics it reads (shared_ptr); the
// publisher's registry sink holds only the publisher's queue, so a registry that outlives its
// publisher is harmless (its later events are counted as dropped).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "kvbm/block_pool.h"
#include "kvbm/config.h"
#include "kvbm/error.h"
#include "kvbm/metrics.h"

namespace kvbm {

// The full text the endpoint serves, one scrape. Pure function of `metrics`' current values.
std::string RenderPrometheusText(const KvbmMetrics& metrics);

class MetricsServer {
 public:
  struct Options {
    std::string host = "127.0.0.1";  // DYN_KVBM_METRICS_HOST; "0.0.0.0" binds every interface
    uint16_t port = 6880;            // DYN_KVBM_METRICS_PORT; 0 = an ephemeral port
    // Called before each scrape is rendered (the manager refreshes pool occupancy here).
    // Runs on the server thread; must not block for long.
    std::function<void()> before_scrape;
    // Limits that keep a slow or hostile client from costing more than itself. Connections
    // beyond `max_connections` are closed on accept; a connection that sends nothing for
    // `idle_timeout` is closed; the request line plus headers must fit in `max_request_bytes`
    // (else 431/414), and a request with a body is answered 413 without reading the body.
    size_t max_connections = 512;
    std::chrono::seconds idle_timeout{10};
    size_t max_request_bytes = 16 * 1024;
  };
  static Options OptionsFrom(const KvbmConfig& config);

  // REQUIRES: metrics != nullptr (else InvariantError).
  MetricsServer(std::shared_ptr<KvbmMetrics> metrics, Options options);
  ~MetricsServer();  // Stop()
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  // Binds and starts serving. An address that cannot be bound (port in use, unknown host) is
  // kUnavailable / kInvalidArgument with a message naming DYN_KVBM_METRICS_PORT or
  // DYN_KVBM_METRICS_HOST and the value; the caller logs it and runs on without metrics.
  // FailedPrecondition when already started.
  Status Start();
  // Stops serving and joins the thread. Idempotent.
  void Stop();
  bool running() const;
  // The bound port (the ephemeral one when Options::port was 0); 0 before Start.
  uint16_t port() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Logs "kvbm cache stats: host hit rate ..., disk hit rate ..., matched tokens ..., requested
// tokens ..." every `interval` on its own thread until Stop(), which returns promptly.
class CacheStatsLogger {
 public:
  using LineSink = std::function<void(const std::string&)>;  // default: Log(kInfo, ...)
  // REQUIRES: metrics != nullptr, interval > 0 (else InvariantError).
  CacheStatsLogger(std::shared_ptr<KvbmMetrics> metrics, std::chrono::milliseconds interval,
                   LineSink sink = nullptr);
  // interval = DYN_KVBM_CACHE_STATS_LOG_INTERVAL_SECS.
  static std::unique_ptr<CacheStatsLogger> FromConfig(const KvbmConfig& config,
                                                      std::shared_ptr<KvbmMetrics> metrics);
  ~CacheStatsLogger();  // Stop()
  CacheStatsLogger(const CacheStatsLogger&) = delete;
  CacheStatsLogger& operator=(const CacheStatsLogger&) = delete;

  void Stop();
  // The line the logger writes, from the current values (also for tests).
  static std::string FormatLine(const KvbmMetrics& metrics);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// How each event inside a batch is encoded. The batch itself is always the positional array
// [ts, events, data_parallel_rank].
//   kArray: each event a positional array whose first element is its tag, e.g.
//           ["BlockStored", hashes, parent, token_ids, block_size, lora_id, medium, lora_name]
//           (vLLM's msgspec `array_like=True, tag=True` structs, vLLM releases up to v0.23,
//           the ones Dynamo pins).
//   kMap:   each event a map with the tag under "type" (vLLM after PR #42892).
enum class KvEventEncoding : uint8_t { kArray, kMap };

// vLLM's `medium` string for a tier: device "GPU", host "CPU", disk "DISK", remote "REMOTE".
std::string_view KvEventMedium(TierId tier);

class KvEventPublisher {
 public:
  struct Options {
    std::string endpoint;      // DYN_KVBM_EVENTS_ENDPOINT, bound (subscribers connect)
    std::string topic;         // first frame of every message; vLLM's default is ""
    uint32_t block_size = 16;  // block_size of stored events (tokens per block)
    int64_t data_parallel_rank = 0;
    KvEventEncoding encoding = KvEventEncoding::kArray;
    size_t max_batch_events = 512;                    // events per message at most
    std::chrono::microseconds max_batch_delay{2000};  // a batch waits this long to fill
    size_t queue_capacity = size_t{1} << 20;          // events waiting; beyond: dropped, counted
    int send_hwm = 100000;                            // ZMQ_SNDHWM, in messages (vLLM's default)
    std::shared_ptr<KvbmMetrics> metrics;             // optional: kv_events_published/_dropped
  };

  // Creates the PUB socket, binds it and starts the publisher thread. InvalidArgument /
  // Unavailable naming DYN_KVBM_EVENTS_ENDPOINT and the value when it cannot bind.
  static Result<std::unique_ptr<KvEventPublisher>> Create(Options options);
  // Flushes what is queued (bounded wait), then stops the thread and closes the socket.
  ~KvEventPublisher();
  KvEventPublisher(const KvEventPublisher&) = delete;
  KvEventPublisher& operator=(const KvEventPublisher&) = delete;

  // Subscribes to `registry` (BlockRegistry::AddSink). The sink only copies the event into a
  // queue; it never blocks on the socket.
  void Attach(BlockRegistry& registry);
  // The sink itself: queue one event (stored / removed). Thread-safe, non-blocking.
  void Enqueue(const KvEvent& event);
  // Queues an AllBlocksCleared event.
  void EnqueueAllCleared();
  // Waits until every event queued so far has been handed to the socket; false on timeout.
  bool Flush(std::chrono::milliseconds timeout);

  // The endpoint actually bound (tcp://host:port with the real port when ":0" or "*" was given).
  const std::string& endpoint() const;
  uint64_t published_events() const;
  uint64_t published_batches() const;
  uint64_t dropped_events() const;

 private:
  struct Impl;
  explicit KvEventPublisher(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvbm
