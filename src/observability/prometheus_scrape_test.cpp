// A real Prometheus server scrapes a real MetricsServer; the value is read back through
// Prometheus' HTTP query API.
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <thread>

#include "kvbm/observability.h"

namespace kvbm {
namespace {

constexpr const char* kPrometheus = "/usr/bin/prometheus";

uint16_t FreeLoopbackPort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

// A temporary directory removed with everything in it.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "kvbm_prom_XXXXXX").string();
    path = mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

// The Prometheus process; killed and reaped on destruction.
struct ChildProcess {
  pid_t pid = -1;
  explicit ChildProcess(std::vector<std::string> argv, const std::filesystem::path& log) {
    pid = fork();
    if (pid == 0) {
      FILE* f = fopen(log.c_str(), "w");
      if (f) {
        dup2(fileno(f), 1);
        dup2(fileno(f), 2);
      }
      std::vector<char*> args;
      for (auto& a : argv) args.push_back(a.data());
      args.push_back(nullptr);
      execv(args[0], args.data());
      _exit(127);
    }
  }
  bool Alive() const { return pid > 0 && waitpid(pid, nullptr, WNOHANG) == 0; }
  ~ChildProcess() {
    if (pid <= 0) return;
    kill(pid, SIGTERM);
    for (int i = 0; i < 50; ++i) {
      if (waitpid(pid, nullptr, WNOHANG) == pid) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
  }
};

// The first sample value of an instant-vector query result, e.g.
// {"status":"success","data":{"resultType":"vector","result":[{"metric":{...},"value":[1.7e9,"123"]}]}}
std::optional<double> FirstValue(const std::string& json) {
  if (json.find("\"status\":\"success\"") == std::string::npos) return std::nullopt;
  size_t v = json.find("\"value\":[");
  if (v == std::string::npos) return std::nullopt;
  size_t q1 = json.find('"', json.find(',', v));
  size_t q2 = json.find('"', q1 + 1);
  if (q1 == std::string::npos || q2 == std::string::npos) return std::nullopt;
  return std::stod(json.substr(q1 + 1, q2 - q1 - 1));
}

TEST(PrometheusScrape, RealPrometheusReadsTheCounters) {
  if (access(kPrometheus, X_OK) != 0) GTEST_SKIP() << kPrometheus << " not installed";

  auto metrics = std::make_shared<KvbmMetrics>();
  metrics->blocks[static_cast<size_t>(TransferPath::kD2H)] = 4242;
  metrics->host_hit_rate.Record(8, 2);
  MetricsServer server(metrics, {.host = "127.0.0.1", .port = 0});
  ASSERT_TRUE(server.Start());

  TempDir dir;
  const uint16_t prom_port = FreeLoopbackPort();
  {
    std::ofstream cfg(dir.path / "prometheus.yml");
    cfg << "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        << "scrape_configs:\n  - job_name: kvbm\n    static_configs:\n"
        << "      - targets: ['127.0.0.1:" << server.port() << "']\n";
  }
  ChildProcess prom({kPrometheus, "--config.file=" + (dir.path / "prometheus.yml").string(),
                     "--storage.tsdb.path=" + (dir.path / "data").string(),
                     "--web.listen-address=127.0.0.1:" + std::to_string(prom_port)},
                    dir.path / "prometheus.log");
  ASSERT_GT(prom.pid, 0);

  httplib::Client api("127.0.0.1", prom_port);
  api.set_connection_timeout(1);
  api.set_read_timeout(2);
  auto query = [&](const std::string& q) -> std::optional<double> {
    auto res = api.Get("/api/v1/query", httplib::Params{{"query", q}}, httplib::Headers{});
    if (!res || res->status != 200) return std::nullopt;
    return FirstValue(res->body);
  };

  // Wait for the target to be up and the counter scraped; Prometheus needs a few seconds to
  // start and scrapes every second.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(15);
  std::optional<double> value;
  while (std::chrono::steady_clock::now() < deadline) {
    ASSERT_TRUE(prom.Alive()) << "prometheus exited; see its log in the temp dir";
    if (query("up{job=\"kvbm\"}") == 1.0) {
      value = query("kvbm_offload_blocks_d2h");
      if (value) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
  ASSERT_TRUE(value) << "Prometheus never reported kvbm_offload_blocks_d2h";
  EXPECT_EQ(*value, 4242);
  EXPECT_EQ(query("kvbm_host_cache_hit_rate"), 0.25);

  // A change reaches Prometheus with the next scrape.
  metrics->blocks[static_cast<size_t>(TransferPath::kD2H)] = 5000;
  const auto deadline2 = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (std::chrono::steady_clock::now() < deadline2 &&
         query("kvbm_offload_blocks_d2h") != 5000.0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  EXPECT_EQ(query("kvbm_offload_blocks_d2h"), 5000);
  // The histogram is usable with histogram_quantile (no parse problems on Prometheus' side).
  EXPECT_TRUE(query("sum(kvbm_transfer_seconds_count)").has_value());
}

}  // namespace
}  // namespace kvbm
