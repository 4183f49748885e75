// Prometheus text exposition (format 0.0.4) and the HTTP endpoint that serves it.
#include <fmt/format.h>
#include <httplib.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

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
  Header(out, "kvbm_load_errors", "counter", "Blocks reported to the engine as failed loads.");
  Sample(out, "kvbm_load_errors", Load(m.load_errors));
  Header(out, "kvbm_corrupt_blocks", "counter",
         "Blocks whose checksum or hash did not verify when read back.");
  Sample(out, "kvbm_corrupt_blocks", Load(m.corrupt_blocks));
  Header(out, "kvbm_disk_writes_avoided", "counter",
         "Blocks the disk admission filter kept off disk.");
  Sample(out, "kvbm_disk_writes_avoided", Load(m.disk_writes_avoided));

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
  {
    const LatencyHistogram::Snapshot s = m.remote_lookup_latency.Read();
    Header(out, "kvbm_remote_lookup_seconds", "histogram", "Latency of the scheduler's G4 existence checks.");
    uint64_t cumulative = 0;
    for (size_t b = 0; b < LatencyHistogram::kBounds.size(); ++b) {
      cumulative += s.counts[b];
      fmt::format_to(std::back_inserter(out), "kvbm_remote_lookup_seconds_bucket{{le=\"{}\"}} {}\n",
                     LatencyHistogram::kBounds[b], cumulative);
    }
    fmt::format_to(std::back_inserter(out), "kvbm_remote_lookup_seconds_bucket{{le=\"+Inf\"}} {}\n", s.count);
    fmt::format_to(std::back_inserter(out), "kvbm_remote_lookup_seconds_sum {}\n", s.sum);
    fmt::format_to(std::back_inserter(out), "kvbm_remote_lookup_seconds_count {}\n", s.count);
  }

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
  for (size_t p = 0; p < kNumTransferPaths; ++p) {
    const char* path = TransferPathLabel(static_cast<TransferPath>(p));
    const LatencyHistogram::Snapshot s = m.latency[p].Read();
    // The snapshot counts each bucket on its own; Prometheus buckets are cumulative.
    uint64_t cumulative = 0;
    for (size_t b = 0; b < LatencyHistogram::kBounds.size(); ++b) {
      cumulative += s.counts[b];
      fmt::format_to(std::back_inserter(out),
                     "kvbm_transfer_seconds_bucket{{path=\"{}\",le=\"{}\"}} {}\n", path,
                     LatencyHistogram::kBounds[b], cumulative);
    }
    fmt::format_to(std::back_inserter(out),
                   "kvbm_transfer_seconds_bucket{{path=\"{}\",le=\"+Inf\"}} {}\n", path, s.count);
    fmt::format_to(std::back_inserter(out), "kvbm_transfer_seconds_sum{{path=\"{}\"}} {}\n", path,
                   s.sum);
    fmt::format_to(std::back_inserter(out), "kvbm_transfer_seconds_count{{path=\"{}\"}} {}\n", path,
                   s.count);
  }

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

struct MetricsServer::Impl {
  std::shared_ptr<KvbmMetrics> metrics;
  Options options;
  std::unique_ptr<httplib::Server> server;
  std::thread thread;
  uint16_t bound_port = 0;
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

// httplib reports a failed bind as `false`; this finds out why, so the message can name the
// setting that is wrong: EADDRINUSE is the port's fault, anything else the host's.
Error DiagnoseBindFailure(const std::string& host, uint16_t port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  const std::string service = std::to_string(port);
  if (int rc = getaddrinfo(host.c_str(), service.c_str(), &hints, &res); rc != 0) {
    return Error(ErrorCode::kInvalidArgument,
                 fmt::format("DYN_KVBM_METRICS_HOST=\"{}\": cannot resolve the metrics address: {}",
                             host, gai_strerror(rc)));
  }
  int err = 0;
  int fd = socket(res->ai_family, res->ai_socktype, res->ai_protocol);
  if (fd < 0) {
    err = errno;
  } else {
    int yes = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    if (bind(fd, res->ai_addr, res->ai_addrlen) != 0) err = errno;
    close(fd);
  }
  freeaddrinfo(res);
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

}  // namespace

Status MetricsServer::Start() {
  if (impl_->server)
    return MakeError(ErrorCode::kFailedPrecondition, "MetricsServer already started");
  auto server = std::make_unique<httplib::Server>();
  // httplib's default sets SO_REUSEPORT, which would let a second kvbm bind the same port and
  // silently share (or steal) scrapes; SO_REUSEADDR alone still allows a quick restart.
  server->set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  std::shared_ptr<KvbmMetrics> metrics = impl_->metrics;
  std::function<void()> before = impl_->options.before_scrape;
  server->Get("/metrics", [metrics, before](const httplib::Request&, httplib::Response& res) {
    if (before) before();
    res.set_content(RenderPrometheusText(*metrics), "text/plain; version=0.0.4; charset=utf-8");
  });

  const std::string& host = impl_->options.host;
  const uint16_t port = impl_->options.port;
  int bound = 0;
  if (port == 0) {
    bound = server->bind_to_any_port(host);
    if (bound < 0) return std::unexpected(DiagnoseBindFailure(host, 0));
  } else {
    if (!server->bind_to_port(host, port)) return std::unexpected(DiagnoseBindFailure(host, port));
    bound = port;
  }
  impl_->bound_port = static_cast<uint16_t>(bound);
  httplib::Server* raw = server.get();
  auto exited = std::make_shared<std::atomic<bool>>(false);
  impl_->thread = std::thread([raw, exited] {
    raw->listen_after_bind();
    exited->store(true);
  });
  // httplib's stop() is a no-op until the listen loop has marked itself running; waiting here
  // makes Stop() right after Start() reliable.
  while (!raw->is_running() && !exited->load())
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  impl_->server = std::move(server);
  Log(LogLevel::kInfo, "kvbm metrics: serving http://{}:{}/metrics", host, impl_->bound_port);
  return {};
}

void MetricsServer::Stop() {
  if (!impl_ || !impl_->server) return;
  impl_->server->stop();
  if (impl_->thread.joinable()) impl_->thread.join();
  impl_->server.reset();
  impl_->bound_port = 0;
}

bool MetricsServer::running() const {
  return impl_->server != nullptr && impl_->server->is_running();
}

uint16_t MetricsServer::port() const { return impl_->bound_port; }

}  // namespace kvbm
