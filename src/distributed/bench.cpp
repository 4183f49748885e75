// The no-op worker and the round-trip measurement behind `kvbm bench distributed`.
#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "kvbm/distributed.h"
#include "kvbm/log.h"

namespace kvbm {

int RunNoOpWorker(const WorkerOptions& options) {
  auto worker = Worker::Create(
      options, [](uint64_t, uint64_t) -> Status { return {}; },
      [](const TransferOp&, std::function<void(std::vector<uint32_t>)> done) { done({}); });
  if (!worker) {
    Log(LogLevel::kError, "{}", worker.error().ToString());
    return 2;
  }
  if (auto ready = (*worker)->WaitReady(std::chrono::seconds(60)); !ready) {
    Log(LogLevel::kError, "{}", ready.error().ToString());
    return 3;
  }
  while ((*worker)->leader_alive()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  return 0;
}

Result<double> MeasureRoundTripMedianUs(Leader& leader, uint32_t warmup, uint32_t iterations) {
  if (iterations == 0)
    return MakeError(ErrorCode::kInvalidArgument, "iterations must be at least 1");
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  bool lost = false;
  std::vector<double> samples;
  samples.reserve(iterations);
  // Op ids far from anything an engine would use, so a shared leader is not confused.
  uint64_t id = 0xBE0C000000000000ull;
  for (uint32_t i = 0; i < warmup + iterations; ++i) {
    TransferOp op;
    op.id = id++;
    op.kind = OpKind::kLoadHost;
    {
      std::lock_guard lock(mu);
      done = false;
    }
    auto start = std::chrono::steady_clock::now();
    auto s = leader.Submit(op, std::nullopt, [&](const OpResult& r) {
      {
        std::lock_guard lock(mu);
        done = true;
        lost = r.worker_lost;
      }
      cv.notify_one();
    });
    if (!s) return std::unexpected(s.error());
    std::unique_lock lock(mu);
    if (!cv.wait_for(lock, std::chrono::seconds(30), [&] { return done; }))
      return MakeError(ErrorCode::kTimeout, "a benchmark op did not complete within 30 s");
    if (lost) return MakeError(ErrorCode::kUnavailable, "a worker was lost during the benchmark");
    auto us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
    if (i >= warmup) samples.push_back(us);
  }
  std::nth_element(samples.begin(), samples.begin() + samples.size() / 2, samples.end());
  return samples[samples.size() / 2];
}

}  // namespace kvbm
