// kvbm_gpu_check: byte-exact round trips of the CUDA backend and the data-path benchmark, for
// a lent GPU machine (scripts/gpu_check.sh). Exit status: 0 all round trips passed, 1 a round
// trip failed, 2 no CUDA device (the reason is printed).
//
// Usage: kvbm_gpu_check [--device N] [--json FILE] [--pinned-gib G] [--no-bench]
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kvbm/cuda.h"
#include "transfer/cuda/cuda_backend.h"
#include "transfer/cuda/gpu_roundtrip.h"

namespace {

std::string Escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      out += ' ';
      continue;
    }
    out += c;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int device = 0;
  std::string json;
  double pinned_gib = 8;
  bool bench = true;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--device" && i + 1 < argc)
      device = std::atoi(argv[++i]);
    else if (a == "--json" && i + 1 < argc)
      json = argv[++i];
    else if (a == "--pinned-gib" && i + 1 < argc)
      pinned_gib = std::atof(argv[++i]);
    else if (a == "--no-bench")
      bench = false;
    else {
      std::fprintf(stderr, "usage: %s [--device N] [--json FILE] [--pinned-gib G] [--no-bench]\n",
                   argv[0]);
      return 64;
    }
  }
  std::string doc = "{\n";
  auto write_json = [&] {
    if (json.empty()) return;
    if (FILE* f = std::fopen(json.c_str(), "w")) {
      std::fputs(doc.c_str(), f);
      std::fclose(f);
    }
  };
  const bool kernels = !kvbm::cuda::EmbeddedKernels().empty();
  if (!kvbm::CudaAvailable()) {
    std::printf("no CUDA device: %s\n", kvbm::CudaUnavailableReason().c_str());
    doc += "  \"status\": \"no_device\",\n  \"reason\": \"" +
           Escape(kvbm::CudaUnavailableReason()) + "\"\n}\n";
    write_json();
    return 2;
  }
  std::printf("CUDA devices: %d; kernels embedded: %s; device %d NUMA node %d\n",
              kvbm::CudaDeviceCount(), kernels ? "yes" : "no", device,
              kvbm::CudaDeviceNumaNode(device));

  int failed = 0;
  doc += "  \"kernels_embedded\": " + std::string(kernels ? "true" : "false") +
         ",\n  \"roundtrips\": [\n";
  auto results = kvbm::cuda::gpucheck::RunRoundTrips(device);
  for (size_t i = 0; i < results.size(); ++i) {
    const auto& r = results[i];
    if (!r.ok) ++failed;
    std::printf("%-4s %s  %s\n", r.ok ? "ok" : "FAIL", r.name.c_str(), r.detail.c_str());
    doc += "    {\"name\": \"" + Escape(r.name) + "\", \"ok\": " + (r.ok ? "true" : "false") +
           ", \"detail\": \"" + Escape(r.detail) + "\"}" + (i + 1 < results.size() ? ",\n" : "\n");
  }
  doc += "  ],\n  \"roundtrips_failed\": " + std::to_string(failed) + ",\n  \"benchmark\": [\n";
  std::printf("round trips: %zu, failed: %d\n", results.size(), failed);
  if (bench) {
    auto figures = kvbm::cuda::gpucheck::RunBenchmark(device, pinned_gib);
    for (size_t i = 0; i < figures.size(); ++i) {
      const auto& f = figures[i];
      std::printf("bench %-36s %8.2f GB/s  ratio %.3f  %s\n", f.name.c_str(), f.gbps, f.ratio,
                  f.note.c_str());
      char nums[96];
      std::snprintf(nums, sizeof(nums), "\"value\": %.4f, \"ratio\": %.4f", f.gbps, f.ratio);
      doc += "    {\"name\": \"" + Escape(f.name) + "\", " + nums + ", \"note\": \"" +
             Escape(f.note) + "\"}" + (i + 1 < figures.size() ? ",\n" : "\n");
    }
  }
  doc += "  ],\n  \"status\": \"" + std::string(failed == 0 ? "pass" : "fail") + "\"\n}\n";
  write_json();
  return failed == 0 ? 0 : 1;
}
