// kvbm._core bindings for the leader/worker benchmark: a no-op worker entry point (run in a
// child Python process) and a leader that measures the op round trip. Both release the GIL
// while they wait.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <chrono>
#include <memory>

#include "kvbm/distributed.h"
#include "python/bindings.h"

namespace nb = nanobind;

namespace kvbm {
namespace {

// Owns a Leader on free ports of 127.0.0.1 for `kvbm bench distributed`.
class DistributedBenchLeader {
 public:
  DistributedBenchLeader(uint32_t world_size, double init_timeout_s) {
    KvbmConfig config;
    config.cpu_cache_num_blocks = 1;
    config.leader_zmq_pub_port = 0;
    config.leader_zmq_ack_port = 0;
    LeaderOptions options;
    options.world_size = world_size;
    options.init_timeout = std::chrono::milliseconds(static_cast<int64_t>(init_timeout_s * 1000));
    auto leader = Leader::Create(config, options);
    leader_ = python::ThrowIfError(std::move(leader));
  }
  uint16_t pub_port() const { return Get().pub_port(); }
  uint16_t ack_port() const { return Get().ack_port(); }
  void WaitReady() {
    Status s;
    {
      nb::gil_scoped_release release;
      s = Get().WaitReady();
    }
    python::ThrowIfError(s);
  }
  double Measure(uint32_t warmup, uint32_t iterations) {
    Result<double> us = MakeError(ErrorCode::kInternal, "not run");
    {
      nb::gil_scoped_release release;
      us = MeasureRoundTripMedianUs(Get(), warmup, iterations);
    }
    return python::ThrowIfError(std::move(us));
  }
  // Says goodbye to the workers, which then exit.
  void Close() {
    nb::gil_scoped_release release;
    leader_.reset();
  }

 private:
  Leader& Get() const {
    if (!leader_)
      throw python::StatusException(
          Error(ErrorCode::kFailedPrecondition, "the benchmark leader is closed"));
    return *leader_;
  }
  std::unique_ptr<Leader> leader_;
};

}  // namespace
}  // namespace kvbm

// Global, like the other Bind* functions that module.cpp declares.
void BindDistributed(nb::module_& m) {
  using namespace kvbm;
  nb::class_<DistributedBenchLeader>(m, "DistributedBenchLeader")
      .def(nb::init<uint32_t, double>(), nb::arg("world_size"), nb::arg("init_timeout_s") = 60.0)
      .def_prop_ro("pub_port", &DistributedBenchLeader::pub_port)
      .def_prop_ro("ack_port", &DistributedBenchLeader::ack_port)
      .def("wait_ready", &DistributedBenchLeader::WaitReady)
      .def("measure", &DistributedBenchLeader::Measure, nb::arg("warmup"), nb::arg("iterations"),
           "Median round trip in microseconds of one op to every worker and back.")
      .def("close", &DistributedBenchLeader::Close);
  m.def(
      "run_noop_worker",
      [](uint32_t rank, uint32_t world_size, const std::string& host, uint16_t pub_port,
         uint16_t ack_port) {
        WorkerOptions o;
        o.rank = rank;
        o.world_size = world_size;
        o.device_blocks = 1;
        o.bytes_per_block = 1;
        o.leader_host = host;
        o.pub_port = pub_port;
        o.ack_port = ack_port;
        nb::gil_scoped_release release;
        return RunNoOpWorker(o);
      },
      nb::arg("rank"), nb::arg("world_size"), nb::arg("host"), nb::arg("pub_port"),
      nb::arg("ack_port"),
      "Runs a worker that moves no bytes until its leader is gone; returns an exit code.");
}
