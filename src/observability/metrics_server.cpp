// Prometheus text exposition (format 0.0.4) and the HTTP endpoint that serves it.
//
// The endpoint is libmicrohttpd on one internal epoll thread. It lives inside the engine's
// process, so a slow or hostile local client must cost only itself: every connection is a few
// KB of state in one event loop (no thread per connection), the request line and headers must
// fit in a fixed per-connection buffer, a request with a body is refused before the body is
// read, idle connections are closed after a short timeout, and the number of connections is
// capped. A scrape is therefore answered in about the time it takes to render, however many
// idle or half-sent connections are open.
#include <fmt/format.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "kvbm/log.h"
#include "kvbm/observability.h"

namespace kvbm {
namespace {

void Header(std::string& out, std::string_view name, std::string_view type, std::string_view help) {
  fmt::format_to(std::back_inserter(out), "# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
}

void Sample(std::string& out, std::string_view name, uint64_t value) {
  fmt::format_to(std::back_inserter(out), "{} {}\n", name, value);
}

void Sample(std::string& out, std::string_view name, double value) {
  fmt::format_to(std::back_inserter(out), "{} {}\n", name, value);
}

uint64_t Load(const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); }

uint64_t PathBlocks(const KvbmMetrics& m, TransferPath p) {
  return Load(m.blocks[static_cast<size_t>(p)]);
}

// The reference's per-path counters, exposed without a `_total` suffix as the reference does.
struct NamedPathCounter {
  const char* name;
  TransferPath path;
  const char* help;
};
constexpr NamedPathCounter kPathCounters[] = {
    {"kvbm_offload_blocks_d2h", TransferPath::kD2H,
     "Blocks offloaded from device (G1) to host (G2)."},
    {"kvbm_offload_blocks_h2d", TransferPath::kH2D_Disk,
     "Blocks offloaded from host (G2) to disk (G3)."},
    {"kvbm_offload_blocks_d2d", TransferPath::kD2D,
     "Blocks offloaded from device (G1) directly to disk (G3)."},
    {"kvbm_onboard_blocks_h2d", TransferPath::kH2Dev,
     "Blocks onboarded from host (G2) to device (G1)."},
    {"kvbm_onboard_blocks_d2d", TransferPath::kDisk2Dev,
     "Blocks onboarded from disk (G3) to device (G1)."},
};

// The samples of one Prometheus histogram: cumulative buckets, sum and count. `labels` is empty
// or `key="value"` pairs, put before `le` and on the sum and count.
void HistogramSamples(std::string& out, const char* name, const std::string& labels,
                      const LatencyHistogram::Snapshot& s) {
  const std::string before_le = labels.empty() ? "" : labels + ",";
  const std::string braces = labels.empty() ? "" : "{" + labels + "}";
  // The snapshot counts each bucket on its own; Prometheus buckets are cumulative.
  uint64_t cumulative = 0;
  for (size_t b = 0; b < LatencyHistogram::kBounds.size(); ++b) {
    cumulative += s.counts[b];
    fmt::format_to(std::back_inserter(out), "{}_bucket{{{}le=\"{}\"}} {}\n", name, before_le,
                   LatencyHistogram::kBounds[b], cumulative);
  }
  fmt::format_to(std::back_inserter(out), "{}_bucket{{{}le=\"+Inf\"}} {}\n", name, before_le, s.count);
  fmt::format_to(std::back_inserter(out), "{}_sum{} {}\n", name, braces, s.sum);
  fmt::format_to(std::back_inserter(out), "{}_count{} {}\n", name, braces, s.count);
}

constexpr TierId kTiers[] = {TierId::kDevice, TierId::kHost, TierId::kDisk, TierId::kRemote};

}  // namespace

std::string RenderPrometheusText(const KvbmMetrics& m) {
  std::string out;
  out.reserve(8192);
  for (const auto& c : kPathCounters) {
    Header(out, c.name, "counter", c.help);
    Sample(out, c.name, PathBlocks(m, c.path));
  }
  Header(out, "kvbm_matched_tokens", "counter",
         "Prompt tokens found in kvbm's tiers (loaded instead of recomputed).");
  Sample(out, "kvbm_matched_tokens", Load(m.matched_tokens));
  Header(out, "kvbm_requested_tokens", "counter", "Prompt tokens looked up in kvbm's tiers.");
  Sample(out, "kvbm_requested_tokens", Load(m.requested_tokens));

  Header(out, "kvbm_host_cache_hit_rate", "gauge",
         "Host (G2) blocks hit / blocks queried over the last DYN_KVBM_CACHE_STATS_MAX_REQUESTS "
         "requests.");
  Sample(out, "kvbm_host_cache_hit_rate", m.host_hit_rate.Rate());
  Header(out, "kvbm_disk_cache_hit_rate", "gauge",
         "Disk (G3) blocks hit / blocks queried over the last DYN_KVBM_CACHE_STATS_MAX_REQUESTS "
         "requests.");
  Sample(out, "kvbm_disk_cache_hit_rate", m.disk_hit_rate.Rate());

  Header(out, "kvbm_offload_dropped_blocks", "counter", "Blocks not offloaded, by reason.");
  for (size_t r = 0; r < kNumDropReasons; ++r) {
    fmt::format_to(std::back_inserter(out), "kvbm_offload_dropped_blocks{{reason=\"{}\"}} {}\n",
                   DropReasonLabel(static_cast<DropReason>(r)), Load(m.dropped_offloads[r]));
  }
  Header(out, "kvbm_bypassed_requests", "counter",
         "Requests neither matched nor stored: an input kvbm cannot key, by reason.");
  for (size_t r = 0; r < kNumBypassReasons; ++r) {
    fmt::format_to(std::back_inserter(out), "kvbm_bypassed_requests{{reason=\"{}\"}} {}\n",
                   BypassReasonLabel(static_cast<BypassReason>(r)), Load(m.bypassed_requests[r]));
  }
  Header(out, "kvbm_read_skipped_requests", "counter",
         "Requests that must not read cached KV (prompt logprobs, some pooling tasks): stored, never loaded.");
  Sample(out, "kvbm_read_skipped_requests", Load(m.read_skipped_requests));
  Header(out, "kvbm_load_errors", "counter", "Blocks reported to the engine as failed loads.");
  Sample(out, "kvbm_load_errors", Load(m.load_errors));
  Header(out, "kvbm_corrupt_blocks", "counter",
         "Blocks whose checksum or hash did not verify when read back.");
  Sample(out, "kvbm_corrupt_blocks", Load(m.corrupt_blocks));
  Header(out, "kvbm_disk_writes_avoided", "counter",
         "Blocks the disk admission filter kept off disk.");
  Sample(out, "kvbm_disk_writes_avoided", Load(m.disk_writes_avoided));

  Header(out, "kvbm_disk_recovery_blocks", "counter",
         "Persistent G3 slots the workers examined at start (DYN_KVBM_DISK_PERSISTENT), by result, summed over "
         "ranks: verified blocks are kept, the others dropped.");
  for (size_t r = 0; r < kNumDiskRecoveryResults; ++r)
    fmt::format_to(std::back_inserter(out), "kvbm_disk_recovery_blocks{{result=\"{}\"}} {}\n",
                   DiskRecoveryResultLabel(static_cast<DiskRecoveryResult>(r)), Load(m.disk_recovery_blocks[r]));
  Header(out, "kvbm_disk_restored_blocks", "counter",
         "Blocks the scheduler put back into its G3 pool at start: held intact by every rank, matchable again.");
  Sample(out, "kvbm_disk_restored_blocks", Load(m.disk_restored_blocks));
  Header(out, "kvbm_remote_hit_blocks", "counter", "Blocks the scheduler found in the remote tier (G4).");
  Sample(out, "kvbm_remote_hit_blocks", Load(m.remote_hit_blocks));
  Header(out, "kvbm_remote_miss_blocks", "counter",
         "Blocks the scheduler looked up in the remote tier (G4) that it did not hold.");
  Sample(out, "kvbm_remote_miss_blocks", Load(m.remote_miss_blocks));
  Header(out, "kvbm_remote_verify_failures", "counter",
         "Remote (G4) values rejected on read: gone, another layout or rank, torn or corrupt.");
  Sample(out, "kvbm_remote_verify_failures", Load(m.remote_verify_failures));
  Header(out, "kvbm_remote_errors", "counter", "Remote (G4) calls that failed (unreachable, timeout).");
  Sample(out, "kvbm_remote_errors", Load(m.remote_errors));
  Header(out, "kvbm_remote_lookup_seconds", "histogram", "Latency of the scheduler's G4 existence checks.");
  HistogramSamples(out, "kvbm_remote_lookup_seconds", "", m.remote_lookup_latency.Read());

  Header(out, "kvbm_transfer_bytes", "counter", "Bytes moved, by transfer path.");
  for (size_t p = 0; p < kNumTransferPaths; ++p) {
    fmt::format_to(std::back_inserter(out), "kvbm_transfer_bytes{{path=\"{}\"}} {}\n",
                   TransferPathLabel(static_cast<TransferPath>(p)), Load(m.bytes[p]));
  }
  Header(out, "kvbm_transfer_blocks", "counter", "Blocks moved, by transfer path.");
  for (size_t p = 0; p < kNumTransferPaths; ++p) {
    fmt::format_to(std::back_inserter(out), "kvbm_transfer_blocks{{path=\"{}\"}} {}\n",
                   TransferPathLabel(static_cast<TransferPath>(p)), Load(m.blocks[p]));
  }

  Header(out, "kvbm_transfer_seconds", "histogram",
         "Latency of one transfer batch, by transfer path.");
  for (size_t p = 0; p < kNumTransferPaths; ++p)
    HistogramSamples(out, "kvbm_transfer_seconds",
                     fmt::format("path=\"{}\"", TransferPathLabel(static_cast<TransferPath>(p))),
                     m.latency[p].Read());

  Header(out, "kvbm_pool_capacity_blocks", "gauge", "Blocks in each tier's pool.");
  for (TierId t : kTiers) {
    fmt::format_to(std::back_inserter(out), "kvbm_pool_capacity_blocks{{tier=\"{}\"}} {}\n",
                   TierName(t), Load(m.pool_capacity[static_cast<size_t>(t)]));
  }
  Header(out, "kvbm_pool_used_blocks", "gauge",
         "Blocks of each tier's pool holding data (active or inactive).");
  for (TierId t : kTiers) {
    fmt::format_to(std::back_inserter(out), "kvbm_pool_used_blocks{{tier=\"{}\"}} {}\n",
                   TierName(t), Load(m.pool_used[static_cast<size_t>(t)]));
  }

  Header(out, "kvbm_kv_events_published", "counter",
         "KV events sent on the DYN_KVBM_EVENTS_ENDPOINT socket.");
  Sample(out, "kvbm_kv_events_published", Load(m.kv_events_published));
  Header(out, "kvbm_kv_events_dropped", "counter",
         "KV events lost (publisher queue overflow or send error).");
  Sample(out, "kvbm_kv_events_dropped", Load(m.kv_events_dropped));
  return out;
}

// ---------------------------------------------------------------------------------------------
// MetricsServer

namespace {

constexpr char kContentType[] = "text/plain; version=0.0.4; charset=utf-8";

// Per-request state between the calls MHD makes for one request (its `req_cls`): only whether
// the first call (headers complete) has been seen.
int g_request_seen_marker = 0;

MHD_Result Reply(MHD_Connection* connection, unsigned int status, std::string_view body,
                 const char* content_type) {
  MHD_Response* response = MHD_create_response_from_buffer(
      body.size(), const_cast<char*>(body.data()), MHD_RESPMEM_MUST_COPY);
  if (response == nullptr) return MHD_NO;
  MHD_add_response_header(response, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
  const MHD_Result r = MHD_queue_response(connection, status, response);
  MHD_destroy_response(response);
  return r;
}

}  // namespace

struct MetricsServer::Impl {
  std::shared_ptr<KvbmMetrics> metrics;
  Options options;
  MHD_Daemon* daemon = nullptr;
  uint16_t bound_port = 0;

  // MHD's access handler: called once when the headers are complete, then (only if we queued
  // nothing) once per chunk of body. Every answer is queued on the first call, so a body is
  // never read, let alone kept.
  static MHD_Result Handle(void* cls, MHD_Connection* connection, const char* url,
                           const char* method, const char* /*version*/, const char* /*upload_data*/,
                           size_t* upload_data_size, void** req_cls) {
    Impl* self = static_cast<Impl*>(cls);
    if (*req_cls == nullptr) {
      *req_cls = &g_request_seen_marker;
    } else if (*upload_data_size != 0) {
      // Unreachable: the first call always queues a response. Refuse rather than buffer.
      *upload_data_size = 0;
      return MHD_NO;
    }
    const std::string_view m(method);
    if (m != MHD_HTTP_METHOD_GET && m != MHD_HTTP_METHOD_HEAD)
      return Reply(connection, MHD_HTTP_METHOD_NOT_ALLOWED, "only GET /metrics\n", "text/plain");
    const char* length =
        MHD_lookup_connection_value(connection, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    const char* chunked =
        MHD_lookup_connection_value(connection, MHD_HEADER_KIND, MHD_HTTP_HEADER_TRANSFER_ENCODING);
    if ((length != nullptr && std::string_view(length) != "0") || chunked != nullptr)
      return Reply(connection, MHD_HTTP_CONTENT_TOO_LARGE, "a scrape has no body\n", "text/plain");
    if (std::string_view(url) != "/metrics")
      return Reply(connection, MHD_HTTP_NOT_FOUND, "not found: only /metrics\n", "text/plain");
    if (self->options.before_scrape) self->options.before_scrape();
    return Reply(connection, MHD_HTTP_OK, RenderPrometheusText(*self->metrics), kContentType);
  }
};

MetricsServer::Options MetricsServer::OptionsFrom(const KvbmConfig& config) {
  Options o;
  o.host = config.metrics_host;
  o.port = config.metrics_port;
  return o;
}

MetricsServer::MetricsServer(std::shared_ptr<KvbmMetrics> metrics, Options options)
    : impl_(std::make_unique<Impl>()) {
  Check(metrics != nullptr, "MetricsServer needs a KvbmMetrics");
  impl_->metrics = std::move(metrics);
  impl_->options = std::move(options);
}

MetricsServer::~MetricsServer() { Stop(); }

namespace {

// The error for a failed bind, naming the setting that is wrong: the port when it is taken or
// privileged, the host otherwise.
Error BindError(const std::string& host, uint16_t port, int err) {
  if (err == EADDRINUSE || err == EACCES) {
    return Error(
        ErrorCode::kUnavailable,
        fmt::format("DYN_KVBM_METRICS_PORT=\"{}\": cannot listen for metrics on {}:{}: {}", port,
                    host, port, err == EADDRINUSE ? "address already in use" : std::strerror(err)));
  }
  return Error(ErrorCode::kInvalidArgument,
               fmt::format("DYN_KVBM_METRICS_HOST=\"{}\": cannot listen for metrics on {}:{}: {}",
                           host, host, port, err != 0 ? std::strerror(err) : "bind failed"));
}

// Resolves `host`, binds the first address that binds and listens on it. SO_REUSEADDR only
// (a quick restart works); never SO_REUSEPORT, which would let a second kvbm share the port
// silently. Returns the listening socket and the port actually bound.
Result<std::pair<int, uint16_t>> Listen(const std::string& host, uint16_t port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string service = std::to_string(port);
  if (int rc = getaddrinfo(host.c_str(), service.c_str(), &hints, &res); rc != 0) {
    return MakeError(
        ErrorCode::kInvalidArgument,
        fmt::format("DYN_KVBM_METRICS_HOST=\"{}\": cannot resolve the metrics address: {}", host,
                    gai_strerror(rc)));
  }
  int first_err = 0;
  int fd = -1;
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) {
      if (first_err == 0) first_err = errno;
      continue;
    }
    int yes = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, SOMAXCONN) == 0) break;
    if (first_err == 0) first_err = errno;
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  if (fd < 0) return std::unexpected(BindError(host, port, first_err));
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  uint16_t bound = port;
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    if (addr.ss_family == AF_INET)
      bound = ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
    else if (addr.ss_family == AF_INET6)
      bound = ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port);
  }
  return std::make_pair(fd, bound);
}

}  // namespace

Status MetricsServer::Start() {
  if (impl_->daemon != nullptr)
    return MakeError(ErrorCode::kFailedPrecondition, "MetricsServer already started");
  const std::string& host = impl_->options.host;
  auto listening = Listen(host, impl_->options.port);
  if (!listening) return std::unexpected(listening.error());
  const auto [fd, bound] = *listening;

  // One epoll thread serves every connection. The limits are the Options' (see the header).
  const Options& o = impl_->options;
  impl_->daemon = MHD_start_daemon(
      MHD_USE_EPOLL_INTERNAL_THREAD | MHD_USE_ITC, 0, nullptr, nullptr, &Impl::Handle, impl_.get(),
      MHD_OPTION_LISTEN_SOCKET, fd, MHD_OPTION_CONNECTION_LIMIT,
      static_cast<unsigned int>(o.max_connections), MHD_OPTION_CONNECTION_TIMEOUT,
      static_cast<unsigned int>(o.idle_timeout.count()), MHD_OPTION_CONNECTION_MEMORY_LIMIT,
      o.max_request_bytes, MHD_OPTION_END);
  if (impl_->daemon == nullptr) {
    // MHD may or may not have closed the socket on this path; leaking one descriptor on a
    // failure this rare is safer than closing a number another thread may reuse.
    return MakeError(ErrorCode::kInternal,
                     fmt::format("cannot start the metrics server on {}:{}", host, bound));
  }
  impl_->bound_port = bound;
  Log(LogLevel::kInfo, "kvbm metrics: serving http://{}:{}/metrics", host, bound);
  return {};
}

void MetricsServer::Stop() {
  if (!impl_ || impl_->daemon == nullptr) return;
  MHD_stop_daemon(impl_->daemon);  // joins the thread, closes every socket
  impl_->daemon = nullptr;
  impl_->bound_port = 0;
}

bool MetricsServer::running() const { return impl_->daemon != nullptr; }

uint16_t MetricsServer::port() const { return impl_->bound_port; }

}  // namespace kvbm
