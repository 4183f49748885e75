#include <fmt/format.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "kvbm/observability.h"

namespace kvbm {
namespace {

// Parses the text exposition format: sample lines into {"name{labels}" -> value}, TYPE lines
// into {family -> type}. Fails the test on a line it does not understand.
struct Exposition {
  std::map<std::string, double> samples;
  std::map<std::string, std::string> types;
  std::map<std::string, std::string> help;
};

Exposition Parse(const std::string& text) {
  Exposition e;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    if (line.rfind("# TYPE ", 0) == 0) {
      std::istringstream l(line.substr(7));
      std::string name, type;
      l >> name >> type;
      EXPECT_FALSE(e.types.contains(name)) << "duplicate TYPE for " << name;
      e.types[name] = type;
      continue;
    }
    if (line.rfind("# HELP ", 0) == 0) {
      const std::string rest = line.substr(7);
      const size_t sp = rest.find(' ');
      e.help[rest.substr(0, sp)] = sp == std::string::npos ? "" : rest.substr(sp + 1);
      continue;
    }
    EXPECT_NE(line[0], '#') << line;
    const size_t sp = line.rfind(' ');
    EXPECT_NE(sp, std::string::npos) << line;
    const std::string key = line.substr(0, sp);
    EXPECT_FALSE(e.samples.contains(key)) << "duplicate series " << key;
    e.samples[key] = std::stod(line.substr(sp + 1));
  }
  return e;
}

TEST(MetricsExposition, ReferenceNamesAreCountersWithoutTotalSuffix) {
  KvbmMetrics m;
  m.blocks[static_cast<size_t>(TransferPath::kD2H)] = 11;
  m.blocks[static_cast<size_t>(TransferPath::kH2D_Disk)] = 12;
  m.blocks[static_cast<size_t>(TransferPath::kD2D)] = 13;
  m.blocks[static_cast<size_t>(TransferPath::kH2Dev)] = 14;
  m.blocks[static_cast<size_t>(TransferPath::kDisk2Dev)] = 15;
  m.blocks[static_cast<size_t>(TransferPath::kDisk2H)] = 16;
  m.matched_tokens = 320;
  m.requested_tokens = 1000;
  const Exposition e = Parse(RenderPrometheusText(m));
  const std::map<std::string, double> expected = {
      {"kvbm_offload_blocks_d2h", 11}, {"kvbm_offload_blocks_h2d", 12},
      {"kvbm_offload_blocks_d2d", 13}, {"kvbm_onboard_blocks_h2d", 14},
      {"kvbm_onboard_blocks_d2d", 15}, {"kvbm_matched_tokens", 320},
      {"kvbm_requested_tokens", 1000},
  };
  for (const auto& [name, value] : expected) {
    ASSERT_TRUE(e.samples.contains(name)) << name;
    EXPECT_EQ(e.samples.at(name), value) << name;
    EXPECT_EQ(e.types.at(name), "counter") << name;
    EXPECT_FALSE(e.help.at(name).empty()) << name;
  }
  EXPECT_FALSE(e.samples.contains("kvbm_offload_blocks_d2h_total"));
  EXPECT_EQ(e.samples.at("kvbm_transfer_blocks{path=\"disk2h\"}"), 16);
  EXPECT_EQ(e.types.at("kvbm_host_cache_hit_rate"), "gauge");
  EXPECT_EQ(e.types.at("kvbm_disk_cache_hit_rate"), "gauge");
}

TEST(MetricsExposition, LabelledFamiliesAndHitRates) {
  KvbmMetrics m(4);
  m.dropped_offloads[static_cast<size_t>(DropReason::kQueueFull)] = 7;
  m.bytes[static_cast<size_t>(TransferPath::kDisk2Dev)] = 1 << 20;
  m.pool_capacity[static_cast<size_t>(TierId::kHost)] = 100;
  m.pool_used[static_cast<size_t>(TierId::kHost)] = 42;
  m.load_errors = 3;
  m.host_hit_rate.Record(10, 5);
  m.host_hit_rate.Record(10, 0);
  m.disk_hit_rate.Record(4, 4);
  const Exposition e = Parse(RenderPrometheusText(m));
  EXPECT_EQ(e.samples.at("kvbm_offload_dropped_blocks{reason=\"queue_full\"}"), 7);
  EXPECT_EQ(e.samples.at("kvbm_offload_dropped_blocks{reason=\"target_full\"}"), 0);
  EXPECT_EQ(e.samples.at("kvbm_transfer_bytes{path=\"disk2d\"}"), 1 << 20);
  EXPECT_EQ(e.samples.at("kvbm_pool_capacity_blocks{tier=\"host\"}"), 100);
  EXPECT_EQ(e.samples.at("kvbm_pool_used_blocks{tier=\"host\"}"), 42);
  EXPECT_EQ(e.samples.at("kvbm_load_errors"), 3);
  EXPECT_DOUBLE_EQ(e.samples.at("kvbm_host_cache_hit_rate"), 0.25);
  EXPECT_DOUBLE_EQ(e.samples.at("kvbm_disk_cache_hit_rate"), 1.0);
}

TEST(MetricsExposition, HistogramBucketsAreCumulative) {
  KvbmMetrics m;
  auto& h = m.latency[static_cast<size_t>(TransferPath::kD2H)];
  h.Observe(5e-6);  // first bucket
  h.Observe(2e-3);  // le=0.003
  h.Observe(2e-3);
  h.Observe(100.0);  // above every bound: +Inf only
  const Exposition e = Parse(RenderPrometheusText(m));
  EXPECT_EQ(e.types.at("kvbm_transfer_seconds"), "histogram");
  auto bucket = [&](const char* le) {
    return e.samples.at(std::string("kvbm_transfer_seconds_bucket{path=\"d2h\",le=\"") + le +
                        "\"}");
  };
  EXPECT_EQ(bucket("1e-05"), 1);
  EXPECT_EQ(bucket("0.001"), 1);
  EXPECT_EQ(bucket("0.003"), 3);
  EXPECT_EQ(bucket("30"), 3);
  EXPECT_EQ(bucket("+Inf"), 4);
  EXPECT_EQ(e.samples.at("kvbm_transfer_seconds_count{path=\"d2h\"}"), 4);
  EXPECT_NEAR(e.samples.at("kvbm_transfer_seconds_sum{path=\"d2h\"}"), 100.004005, 1e-9);
  EXPECT_EQ(e.samples.at("kvbm_transfer_seconds_bucket{path=\"h2d\",le=\"+Inf\"}"), 0);
}

// promtool is Prometheus' own parser; it ships with the prometheus package.
TEST(MetricsExposition, PromtoolAcceptsTheText) {
  if (access("/usr/bin/promtool", X_OK) != 0) GTEST_SKIP() << "promtool not installed";
  KvbmMetrics m;
  m.latency[0].Observe(0.01);
  char path[] = "/tmp/kvbm_metrics_XXXXXX";
  int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  const std::string text = RenderPrometheusText(m);
  ASSERT_EQ(write(fd, text.data(), text.size()), static_cast<ssize_t>(text.size()));
  close(fd);
  // `check metrics` parses and lints; the only lint allowed is the reference's counter names
  // without the _total suffix, which kvbm keeps on purpose.
  const std::string cmd = std::string("/usr/bin/promtool check metrics < ") + path + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[512];
  while (size_t n = fread(buf, 1, sizeof(buf), p)) out.append(buf, n);
  pclose(p);
  unlink(path);
  std::istringstream lines(out);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty()) continue;
    EXPECT_NE(line.find("counter metrics should have \"_total\" suffix"), std::string::npos)
        << line;
  }
}

TEST(MetricsServer, ServesScrapeOverHttp) {
  auto metrics = std::make_shared<KvbmMetrics>();
  int refreshed = 0;
  MetricsServer::Options opts;
  opts.port = 0;
  opts.before_scrape = [&] {
    ++refreshed;
    metrics->pool_used[static_cast<size_t>(TierId::kDisk)] = 77;
  };
  MetricsServer server(metrics, opts);
  ASSERT_TRUE(server.Start()) << "start";
  ASSERT_NE(server.port(), 0);
  EXPECT_TRUE(server.running());

  metrics->blocks[static_cast<size_t>(TransferPath::kD2H)] += 123;
  metrics->matched_tokens += 4096;
  httplib::Client client("127.0.0.1", server.port());
  auto res = client.Get("/metrics");
  ASSERT_TRUE(res) << httplib::to_string(res.error());
  EXPECT_EQ(res->status, 200);
  EXPECT_EQ(res->get_header_value("Content-Type"), "text/plain; version=0.0.4; charset=utf-8");
  Exposition e = Parse(res->body);
  EXPECT_EQ(e.samples.at("kvbm_offload_blocks_d2h"), 123);
  EXPECT_EQ(e.samples.at("kvbm_matched_tokens"), 4096);
  EXPECT_EQ(e.samples.at("kvbm_pool_used_blocks{tier=\"disk\"}"), 77);
  EXPECT_EQ(refreshed, 1);

  // A later scrape sees later values: nothing is cached.
  metrics->blocks[static_cast<size_t>(TransferPath::kD2H)] += 1;
  e = Parse(client.Get("/metrics")->body);
  EXPECT_EQ(e.samples.at("kvbm_offload_blocks_d2h"), 124);
  EXPECT_EQ(client.Get("/nope")->status, 404);

  const uint16_t port = server.port();
  const auto t0 = std::chrono::steady_clock::now();
  server.Stop();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(2));
  EXPECT_FALSE(server.running());
  httplib::Client after("127.0.0.1", port);
  after.set_connection_timeout(1);
  EXPECT_FALSE(after.Get("/metrics"));
}

TEST(MetricsServer, StopRightAfterStartAndDestructorJoin) {
  auto metrics = std::make_shared<KvbmMetrics>();
  for (int i = 0; i < 5; ++i) {
    MetricsServer server(metrics, {.host = "127.0.0.1", .port = 0});
    ASSERT_TRUE(server.Start());
    if (i % 2 == 0) server.Stop();  // else the destructor stops it
  }
}

// A listening socket that holds a port without SO_REUSEPORT, as another process would.
struct HeldPort {
  int fd = -1;
  uint16_t port = 0;
  HeldPort() {
    fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 || listen(fd, 4) != 0) return;
    socklen_t len = sizeof(a);
    getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    port = ntohs(a.sin_port);
  }
  ~HeldPort() { close(fd); }
};

TEST(MetricsServer, PortInUseNamesThePortVariable) {
  HeldPort held;
  ASSERT_NE(held.port, 0);
  MetricsServer server(std::make_shared<KvbmMetrics>(), {.host = "127.0.0.1", .port = held.port});
  auto st = server.Start();
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code(), ErrorCode::kUnavailable);
  EXPECT_NE(st.error().message().find("DYN_KVBM_METRICS_PORT"), std::string::npos)
      << st.error().message();
  EXPECT_NE(st.error().message().find(std::to_string(held.port)), std::string::npos)
      << st.error().message();
  EXPECT_FALSE(server.running());
}

// httplib's default SO_REUSEPORT would let two kvbm processes share one port silently.
TEST(MetricsServer, SecondServerOnSamePortFails) {
  auto metrics = std::make_shared<KvbmMetrics>();
  MetricsServer first(metrics, {.host = "127.0.0.1", .port = 0});
  ASSERT_TRUE(first.Start());
  MetricsServer second(metrics, {.host = "127.0.0.1", .port = first.port()});
  auto st = second.Start();
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message().find("DYN_KVBM_METRICS_PORT"), std::string::npos)
      << st.error().message();
}

TEST(MetricsServer, BadHostNamesTheHostVariable) {
  for (const char* host : {"no-such-host.invalid", "203.0.113.7" /* TEST-NET-3: not local */}) {
    MetricsServer server(std::make_shared<KvbmMetrics>(), {.host = host, .port = 0});
    auto st = server.Start();
    ASSERT_FALSE(st) << host;
    EXPECT_EQ(st.error().code(), ErrorCode::kInvalidArgument) << host;
    EXPECT_NE(st.error().message().find("DYN_KVBM_METRICS_HOST"), std::string::npos)
        << st.error().message();
    EXPECT_NE(st.error().message().find(host), std::string::npos) << st.error().message();
  }
}

TEST(MetricsServer, OptionsFromConfig) {
  const KvbmConfig c = KvbmConfig::FromMap({{"DYN_KVBM_CPU_CACHE_GB", "1"},
                                            {"DYN_KVBM_METRICS", "true"},
                                            {"DYN_KVBM_METRICS_PORT", "7001"},
                                            {"DYN_KVBM_METRICS_HOST", "0.0.0.0"}});
  const MetricsServer::Options o = MetricsServer::OptionsFrom(c);
  EXPECT_EQ(o.port, 7001);
  EXPECT_EQ(o.host, "0.0.0.0");
  EXPECT_EQ(MetricsServer::OptionsFrom(KvbmConfig{}).host, "127.0.0.1");
}

TEST(MetricsServer, AllInterfacesBindServesLoopback) {
  MetricsServer server(std::make_shared<KvbmMetrics>(), {.host = "0.0.0.0", .port = 0});
  ASSERT_TRUE(server.Start());
  httplib::Client client("127.0.0.1", server.port());
  auto res = client.Get("/metrics");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
}

// ---------------------------------------------------------------------------------------------
// Hostile and idle clients (issue 17): a raw loopback socket, so the test controls every byte.

struct RawClient {
  int fd = -1;
  explicit RawClient(uint16_t port) {
    fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port);
    if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
      close(fd);
      fd = -1;
    }
  }
  ~RawClient() {
    if (fd >= 0) close(fd);
  }
  RawClient(const RawClient&) = delete;
  RawClient& operator=(const RawClient&) = delete;
  // Sends all of `data`; false once the peer has closed or reset.
  bool Send(std::string_view data) {
    while (!data.empty()) {
      ssize_t n = send(fd, data.data(), data.size(), MSG_NOSIGNAL);
      if (n <= 0) return false;
      data.remove_prefix(static_cast<size_t>(n));
    }
    return true;
  }
  // Reads until the peer closes or `deadline`; what arrived.
  std::string ReadUntilClose(std::chrono::steady_clock::time_point deadline) {
    std::string out;
    char buf[4096];
    while (std::chrono::steady_clock::now() < deadline) {
      pollfd p{fd, POLLIN, 0};
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (poll(&p, 1, static_cast<int>(std::max<int64_t>(left.count(), 1))) <= 0) continue;
      ssize_t n = recv(fd, buf, sizeof(buf), 0);
      if (n <= 0) break;
      out.append(buf, static_cast<size_t>(n));
    }
    return out;
  }
};

// Resident set of this process in KiB (the server runs in it).
long RssKiB() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  return -1;
}

// One scrape over a fresh connection; its duration, and the status code (0 = no answer).
std::pair<std::chrono::milliseconds, int> TimedScrape(uint16_t port) {
  const auto t0 = std::chrono::steady_clock::now();
  httplib::Client client("127.0.0.1", port);
  client.set_connection_timeout(5);
  client.set_read_timeout(5);
  auto res = client.Get("/metrics");
  const auto took =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
  return {took, res ? res->status : 0};
}

TEST(MetricsServerHostile, ScrapeAnswersWithin1sWith200IdleConnectionsOpen) {
  auto metrics = std::make_shared<KvbmMetrics>();
  MetricsServer server(metrics, {.host = "127.0.0.1", .port = 0});
  ASSERT_TRUE(server.Start());
  std::vector<std::unique_ptr<RawClient>> idle;
  for (int i = 0; i < 200; ++i) {
    idle.push_back(std::make_unique<RawClient>(server.port()));
    ASSERT_GE(idle.back()->fd, 0) << "connection " << i;
    // Every other one sends a request line and part of its headers, never the blank line
    // that ends them (a slowloris); the rest send nothing.
    if (i % 2 == 0) {
      ASSERT_TRUE(idle.back()->Send("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: "));
    }
  }
  for (int i = 0; i < 5; ++i) {
    const auto [took, status] = TimedScrape(server.port());
    EXPECT_EQ(status, 200) << "scrape " << i;
    EXPECT_LT(took, std::chrono::milliseconds(1000)) << "scrape " << i;
  }
  // The idle connections are still open (a scrape did not need them gone): a half-sent one
  // can still finish its request and get the metrics.
  ASSERT_TRUE(idle[0]->Send("1\r\n\r\n"));
  const std::string reply =
      idle[0]->ReadUntilClose(std::chrono::steady_clock::now() + std::chrono::seconds(2));
  EXPECT_EQ(reply.rfind("HTTP/1.1 200", 0), 0u) << reply.substr(0, 80);
  EXPECT_NE(reply.find("kvbm_offload_blocks_d2h"), std::string::npos);
  // Stopping closes every connection without waiting for their timeouts.
  const auto t0 = std::chrono::steady_clock::now();
  server.Stop();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(2));
}

TEST(MetricsServerHostile, IdleConnectionsAreClosedAfterTheTimeout) {
  MetricsServer::Options o{.host = "127.0.0.1", .port = 0};
  o.idle_timeout = std::chrono::seconds(1);
  MetricsServer server(std::make_shared<KvbmMetrics>(), o);
  ASSERT_TRUE(server.Start());
  RawClient half(server.port());
  ASSERT_TRUE(half.Send("GET /metrics HTTP/1.1\r\nHost:"));
  const auto t0 = std::chrono::steady_clock::now();
  half.ReadUntilClose(t0 + std::chrono::seconds(10));
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_GE(took, std::chrono::milliseconds(900));
  EXPECT_LT(took, std::chrono::seconds(5)) << "the server kept an idle connection open";
}

// Beyond max_connections the server accepts nothing more: a new connection waits in the
// kernel's backlog, costing the process nothing, and is served once a slot frees.
TEST(MetricsServerHostile, ConnectionsBeyondTheLimitWaitUntilASlotFrees) {
  MetricsServer::Options o{.host = "127.0.0.1", .port = 0};
  o.max_connections = 8;
  MetricsServer server(std::make_shared<KvbmMetrics>(), o);
  ASSERT_TRUE(server.Start());
  std::vector<std::unique_ptr<RawClient>> held;
  for (int i = 0; i < 8; ++i) held.push_back(std::make_unique<RawClient>(server.port()));
  RawClient extra(server.port());
  ASSERT_GE(extra.fd, 0);
  ASSERT_TRUE(extra.Send("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
  EXPECT_EQ(extra.ReadUntilClose(std::chrono::steady_clock::now() + std::chrono::milliseconds(500)),
            "")
      << "served beyond the connection limit";
  held.clear();  // closing them frees the slots
  const std::string reply =
      extra.ReadUntilClose(std::chrono::steady_clock::now() + std::chrono::seconds(5));
  EXPECT_EQ(reply.rfind("HTTP/1.1 200", 0), 0u) << reply.substr(0, 80);
  const auto [took, status] = TimedScrape(server.port());
  EXPECT_EQ(status, 200);
}

TEST(MetricsServerHostile, TenMegabyteRequestsAreRefusedWithoutKeepingMemory) {
  auto metrics = std::make_shared<KvbmMetrics>();
  MetricsServer server(metrics, {.host = "127.0.0.1", .port = 0});
  ASSERT_TRUE(server.Start());
  const std::string chunk(64 * 1024, 'a');
  constexpr size_t kTenMb = 10 * 1000 * 1000;
  const long rss_before = RssKiB();
  ASSERT_GT(rss_before, 0);
  auto deadline = [] { return std::chrono::steady_clock::now() + std::chrono::seconds(5); };

  // 1. A 10 MB header: refused once it overflows the request buffer.
  {
    RawClient c(server.port());
    ASSERT_TRUE(c.Send("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: "));
    size_t sent = 0;
    while (sent < kTenMb && c.Send(chunk)) sent += chunk.size();
    const std::string reply = c.ReadUntilClose(deadline());
    EXPECT_LT(sent, kTenMb) << "the server read a 10 MB header";
    EXPECT_TRUE(reply.empty() || reply.rfind("HTTP/1.1 431", 0) == 0 ||
                reply.rfind("HTTP/1.1 413", 0) == 0)
        << reply.substr(0, 80);
  }
  // 2. A 10 MB request line (URI).
  {
    RawClient c(server.port());
    ASSERT_TRUE(c.Send("GET /"));
    size_t sent = 0;
    while (sent < kTenMb && c.Send(chunk)) sent += chunk.size();
    const std::string reply = c.ReadUntilClose(deadline());
    EXPECT_LT(sent, kTenMb) << "the server read a 10 MB request line";
    EXPECT_TRUE(reply.empty() || reply.rfind("HTTP/1.1 414", 0) == 0) << reply.substr(0, 80);
  }
  // 3. A 10 MB body (GET and POST): answered before the body is read, connection closed.
  for (const char* method : {"GET", "POST"}) {
    RawClient c(server.port());
    ASSERT_TRUE(c.Send(fmt::format("{} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                                   method, kTenMb)));
    size_t sent = 0;
    while (sent < kTenMb && c.Send(chunk)) sent += chunk.size();
    const std::string reply = c.ReadUntilClose(deadline());
    EXPECT_LT(sent, kTenMb) << method << ": the server read a 10 MB body";
    EXPECT_TRUE(reply.rfind(std::string(method) == "GET" ? "HTTP/1.1 413" : "HTTP/1.1 405", 0) ==
                    0 ||
                reply.empty())
        << method << ": " << reply.substr(0, 80);
  }
  const long grown = RssKiB() - rss_before;
  // Each connection is bounded by max_request_bytes (16 KiB); allow noise from the test's own
  // allocations, far below the 10 MB sent each time.
  EXPECT_LT(grown, 4 * 1024) << "RSS grew by " << grown << " KiB";
  const auto [took, status] = TimedScrape(server.port());
  EXPECT_EQ(status, 200);
  EXPECT_LT(took, std::chrono::milliseconds(1000));
}

}  // namespace
}  // namespace kvbm
