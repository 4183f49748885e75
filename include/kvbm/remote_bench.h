// Native passes of kvbm's G2 <-> G4 path, for `kvbm bench remote` (python/kvbm/bench/remote.py),
// which pairs them with redis-benchmark on the same cluster.
//
// A RemoteBench owns a G2-like host buffer of `num_blocks` blocks of `block_bytes` (seeded
// bytes) and one RedisCluster client. A pass runs the calls the worker makes for G4
// (KvbmWorker::StartRemotePut / StartFetch in src/connector/worker.cpp), on the calling thread:
//   - Put (G2 -> G4): every block named with RemoteBlockKey, given a header with
//     EncodeRemoteBlockHeader (XXH3 of the bytes) and SET as header + the G2 block's own bytes
//     (RedisCluster::SetParts), `batch_blocks` blocks per pipelined call;
//   - Get (G4 -> G2): GET of the same keys, `batch_blocks` per call (RedisCluster::GetEach),
//     each value verified with DecodeRemoteBlock and copied into its G2 block straight from the
//     reply. A missing or rejected block is an error.
// Keys live under `name_space` ("kvbm-bench" by default) with a per-bench random fingerprint, so
// two benches on one cluster never read each other's blocks; Clear() deletes them.
//
// Thread safety: none; one caller at a time.
// Ownership: the bench owns its buffer and its client.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kvbm/error.h"
#include "kvbm/redis_cluster.h"

namespace kvbm {

struct RemoteBenchOptions {
  std::vector<RedisNodeAddress> seeds;
  uint64_t block_bytes = 2 << 20;
  uint64_t num_blocks = 64;
  uint32_t batch_blocks = 16;  // keys per pipelined call (spread over the masters by slot)
  std::string name_space = "kvbm-bench";
  std::chrono::milliseconds timeout{30000};  // connect, each socket operation, each call
};

class RemoteBench {
 public:
  // InvalidArgument for a zero size or batch; the client's errors when no seed answers.
  static Result<std::unique_ptr<RemoteBench>> Create(const RemoteBenchOptions& options);
  ~RemoteBench();
  RemoteBench(const RemoteBench&) = delete;
  RemoteBench& operator=(const RemoteBench&) = delete;

  Result<double> PutSeconds();  // one G2 -> G4 pass
  Result<double> GetSeconds();  // one G4 -> G2 pass (after a Put)
  // Clears G2, runs Get, and counts blocks whose bytes differ from the seeded ones.
  Result<uint64_t> Verify();
  // Deletes this bench's keys.
  Status Clear();

  uint64_t bytes() const;        // block bytes moved by a pass
  uint64_t value_bytes() const;  // one stored value: header + block
  uint32_t masters() const;      // masters in the cluster's slot map

 private:
  explicit RemoteBench(const RemoteBenchOptions& options);
  RemoteBenchOptions options_;
  std::unique_ptr<RedisCluster> client_;
  uint64_t fingerprint_ = 0;
  std::vector<std::string> keys_;
  std::vector<uint8_t> g2_, seed_;
};

}  // namespace kvbm
