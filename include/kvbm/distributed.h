// Leader and workers over ZeroMQ: one Leader per engine instance (the scheduler process), one
// Worker per tensor-parallel rank (the engine's worker processes). The leader sizes the host
// and disk tiers from the workers' reports, fans each TransferOp out to every rank and
// completes it once every rank has acknowledged; a rank that stops answering is declared lost
// within `DistributedTimings::dead_after`, its pending ops complete with every block failed and
// later Submits fail fast with Unavailable. See src/distributed/DESIGN.md for the protocol.
//
// Thread safety: every public method of Leader and Worker may be called from any thread. Each
// object owns one I/O thread that alone touches its receiving sockets; completion callbacks
// (Leader::Submit's on_done) and the worker's AllocateFn/ExecuteFn run on that I/O thread and
// must not block for long nor call back into the same object's blocking methods (WaitReady).
// The ExecuteFn's `done` may be called from any thread, exactly once.
//
// Ownership: Create() returns a unique_ptr; destroying it stops the I/O thread and closes the
// sockets (linger 0). The leader tells its workers it is going away (best effort).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kvbm/config.h"
#include "kvbm/connector_ops.h"
#include "kvbm/error.h"

namespace kvbm {

struct DistributedTimings {
  // Both sides send a heartbeat this often; it is also the period of the leader's checks.
  std::chrono::milliseconds heartbeat_interval{250};
  // A peer silent for this long is lost.
  std::chrono::milliseconds dead_after{3000};
};

struct LeaderOptions {
  uint32_t world_size = 1;
  DistributedTimings timings;
  // Overrides config.leader_worker_init_timeout_secs (tests want less than a second).
  std::optional<std::chrono::milliseconds> init_timeout;
};

// The outcome of one op across all ranks. `failed_blocks` are indices into the op's `blocks`,
// sorted and unique: the union of every rank's failures (a block is only usable when every
// rank moved its shard). When a rank was lost, every index is listed and `worker_lost` is set.
struct OpResult {
  uint64_t op_id = 0;
  std::vector<uint32_t> failed_blocks;
  bool worker_lost = false;
};

using OpDoneFn = std::function<void(const OpResult&)>;

class Leader {
 public:
  // Binds PUB on config.leader_zmq_host:leader_zmq_pub_port and ROUTER on ..._ack_port (port 0
  // picks a free port, see pub_port()/ack_port()). A port already taken is Unavailable with a
  // message naming DYN_KVBM_LEADER_ZMQ_PUB_PORT or _ACK_PORT and "address in use".
  static Result<std::unique_ptr<Leader>> Create(const KvbmConfig& config, LeaderOptions options);
  ~Leader();
  Leader(const Leader&) = delete;
  Leader& operator=(const Leader&) = delete;

  // Blocks until every rank has reported, been sized and acknowledged its allocation, within
  // the init timeout counted from Create(). Timeout names the ranks that did not answer;
  // a rank whose allocation failed gives ResourceExhausted with its message.
  Status WaitReady();
  bool ready() const;

  // Tier sizes in blocks (valid once every rank has reported; 0 before).
  uint64_t host_blocks() const;
  uint64_t disk_blocks() const;
  uint16_t pub_port() const;
  uint16_t ack_port() const;

  // Sends `op` to every rank; returns at once. With `gate`, each worker runs the op only once
  // its forward-pass counter has reached `gate` (stores); without, at once (loads).
  // Completion: `on_done` is called on the I/O thread when given, else the result waits for
  // Poll(op.id). REQUIRES: op.id not already in flight or unpolled (InvalidArgument).
  // FailedPrecondition before ready(); Unavailable once a rank was lost.
  Status Submit(const TransferOp& op, std::optional<uint64_t> gate = std::nullopt,
                OpDoneFn on_done = nullptr);

  // The result of a completed op submitted without a callback (removed on return).
  std::optional<OpResult> Poll(uint64_t op_id);
  size_t in_flight() const;
  // Ranks declared lost (empty while all are alive).
  std::vector<uint32_t> lost_ranks() const;
  // Count of messages rejected by the decoder (garbage, wrong version, unknown sender).
  uint64_t rejected_messages() const;

 private:
  class Impl;
  explicit Leader(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

struct WorkerOptions {
  uint32_t rank = 0;
  uint32_t world_size = 1;
  uint64_t device_blocks = 0;
  uint64_t bytes_per_block = 0;
  std::string leader_host = "127.0.0.1";
  uint16_t pub_port = 56001;
  uint16_t ack_port = 56002;
  DistributedTimings timings;

  static WorkerOptions FromConfig(const KvbmConfig& config, uint32_t rank, uint32_t world_size,
                                  uint64_t device_blocks, uint64_t bytes_per_block);
};

// Allocates this rank's host and disk tiers; called once, on the worker's I/O thread.
using AllocateFn = std::function<Status(uint64_t host_blocks, uint64_t disk_blocks)>;
// Runs one op; calls `done` (from any thread, exactly once) with the indices into op.blocks
// that failed on this rank.
using ExecuteFn = std::function<void(
    const TransferOp& op, std::function<void(std::vector<uint32_t> failed_blocks)> done)>;

struct TierSizes {
  uint64_t host_blocks = 0;
  uint64_t disk_blocks = 0;
};

class Worker {
 public:
  static Result<std::unique_ptr<Worker>> Create(WorkerOptions options, AllocateFn allocate,
                                                ExecuteFn execute);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Blocks until the leader sized this rank and the allocation was acknowledged.
  Result<TierSizes> WaitReady(std::chrono::milliseconds timeout);

  // The forward pass `iteration` finished on this rank: ops gated on it or earlier may run.
  void ForwardPassCompleted(uint64_t iteration);

  // False once the leader said goodbye or was silent for dead_after (after it was first heard).
  bool leader_alive() const;
  // Count of messages rejected by the decoder (garbage, wrong version); for tests and metrics.
  uint64_t rejected_messages() const;

 private:
  class Impl;
  explicit Worker(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// A worker that moves no bytes (allocates nothing, acknowledges every op at once); runs until
// its leader is gone. Used by the kvbm_worker_proc executable and by `kvbm bench distributed`.
// Returns 0 on a clean end, non-zero when the handshake did not complete.
int RunNoOpWorker(const WorkerOptions& options);

// Median round-trip time in microseconds of one op (no blocks) from Submit to completion on
// every rank, over `iterations` ops after `warmup`. REQUIRES: leader.ready().
Result<double> MeasureRoundTripMedianUs(Leader& leader, uint32_t warmup, uint32_t iterations);

}  // namespace kvbm
