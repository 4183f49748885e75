// Native single passes of the data path and its memcpy anchor, driven in interleaved pairs by
// `kvbm bench transfer` (python/kvbm/bench/transfer.py).
#include <memory>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include "bindings.h"
#include "kvbm/remote_bench.h"
#include "kvbm/transfer_bench.h"

namespace nb = nanobind;
using namespace nb::literals;

void BindTransferBench(nb::module_& m) {
  nb::class_<kvbm::TransferBench>(m, "TransferBench",
                                  "G1/G2/G3 buffers, kvbm's transfer engine and a memcpy anchor over the same bytes; "
                                  "pass(name) times one native pass (GIL released).")
      .def_static(
          "create",
          [](uint64_t block_bytes, uint64_t num_blocks, const std::string& disk_dir, uint32_t memcpy_threads) {
            kvbm::TransferBenchOptions o;
            o.block_bytes = block_bytes;
            o.num_blocks = num_blocks;
            o.disk_dir = disk_dir;
            o.memcpy_threads = memcpy_threads;
            kvbm::Result<std::unique_ptr<kvbm::TransferBench>> r = [&] {
              nb::gil_scoped_release release;
              return kvbm::TransferBench::Create(o);
            }();
            return kvbm::python::ThrowIfError(std::move(r));
          },
          "block_bytes"_a, "num_blocks"_a, "disk_dir"_a = "/tmp/", "memcpy_threads"_a = 0)
      .def(
          "pass_seconds",
          [](kvbm::TransferBench& b, const std::string& name, uint32_t threads) {
            auto pass = kvbm::python::ThrowIfError(kvbm::ParseTransferBenchPass(name));
            kvbm::Result<double> r = [&] {
              nb::gil_scoped_release release;
              return b.Pass(pass, threads);
            }();
            return kvbm::python::ThrowIfError(std::move(r));
          },
          "name"_a, "threads"_a = 0,
          "Seconds of one pass: g1_to_g2, g2_to_g1, g2_to_g3, g3_to_g2, memcpy_g1_to_g2, memcpy_g2_to_g1 "
          "(threads: memcpy only, 0 = kvbm's memcpy threads).")
      .def("verify",
           [](kvbm::TransferBench& b) {
             kvbm::Result<uint64_t> r = [&] {
               nb::gil_scoped_release release;
               return b.Verify();
             }();
             return kvbm::python::ThrowIfError(std::move(r));
           })
      .def_prop_ro("bytes", &kvbm::TransferBench::bytes)
      .def_prop_ro("disk_bytes", &kvbm::TransferBench::disk_bytes)
      .def_prop_ro("disk_fd", &kvbm::TransferBench::disk_fd)
      .def_prop_ro("memcpy_threads", &kvbm::TransferBench::memcpy_threads)
      .def_prop_ro("io_depth", &kvbm::TransferBench::io_depth)
      .def_prop_ro("io_queue", &kvbm::TransferBench::io_queue);

  nb::class_<kvbm::RemoteBench>(m, "RemoteBench",
                                "A G2-like buffer and kvbm's Redis Cluster client: one native G2 -> G4 (put) or "
                                "G4 -> G2 (get) pass per call, as the worker runs them (GIL released).")
      .def_static(
          "create",
          [](const std::string& url, uint64_t block_bytes, uint64_t num_blocks, uint32_t batch_blocks,
             const std::string& name_space, uint32_t timeout_ms) {
            kvbm::RemoteBenchOptions o;
            o.seeds = kvbm::python::ThrowIfError(kvbm::ParseRedisSeeds(url));
            o.block_bytes = block_bytes;
            o.num_blocks = num_blocks;
            o.batch_blocks = batch_blocks;
            o.name_space = name_space;
            o.timeout = std::chrono::milliseconds(timeout_ms);
            kvbm::Result<std::unique_ptr<kvbm::RemoteBench>> r = [&] {
              nb::gil_scoped_release release;
              return kvbm::RemoteBench::Create(o);
            }();
            return kvbm::python::ThrowIfError(std::move(r));
          },
          "url"_a, "block_bytes"_a, "num_blocks"_a, "batch_blocks"_a = 16, "name_space"_a = "kvbm-bench",
          "timeout_ms"_a = 30000)
      .def("put_seconds",
           [](kvbm::RemoteBench& b) {
             kvbm::Result<double> r = [&] {
               nb::gil_scoped_release release;
               return b.PutSeconds();
             }();
             return kvbm::python::ThrowIfError(std::move(r));
           })
      .def("get_seconds",
           [](kvbm::RemoteBench& b) {
             kvbm::Result<double> r = [&] {
               nb::gil_scoped_release release;
               return b.GetSeconds();
             }();
             return kvbm::python::ThrowIfError(std::move(r));
           })
      .def("verify",
           [](kvbm::RemoteBench& b) {
             kvbm::Result<uint64_t> r = [&] {
               nb::gil_scoped_release release;
               return b.Verify();
             }();
             return kvbm::python::ThrowIfError(std::move(r));
           })
      .def("clear",
           [](kvbm::RemoteBench& b) {
             kvbm::Status s = [&] {
               nb::gil_scoped_release release;
               return b.Clear();
             }();
             kvbm::python::ThrowIfError(std::move(s));
           })
      .def_prop_ro("bytes", &kvbm::RemoteBench::bytes)
      .def_prop_ro("value_bytes", &kvbm::RemoteBench::value_bytes)
      .def_prop_ro("masters", &kvbm::RemoteBench::masters);
}
