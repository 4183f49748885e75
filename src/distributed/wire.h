// The leader/worker wire format (private to src/distributed). Every message is one msgpack
// array [protocol version, message type, payload fields...]. Decoding is defensive: bounded
// sizes, exact field counts and types, no trailing bytes; anything else is InvalidArgument.
// Values only; thread-compatible.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "kvbm/connector_ops.h"
#include "kvbm/error.h"

namespace kvbm::wire {

// Bumped on any incompatible change of the messages below (independent of kProtocolVersion,
// which versions the StepMetadata carried inside an OpRequest).
inline constexpr uint32_t kWireVersion = 1;
inline constexpr uint32_t kLeaderRank = 0xFFFFFFFFu;
// Upper bound of one message on the sockets (ZMQ_MAXMSGSIZE) and of the decoder's buffers.
inline constexpr int64_t kMaxMessageBytes = 64ll << 20;

enum class MsgType : uint8_t {
  kHello = 1,      // worker -> leader (DEALER): who I am
  kSizing = 2,     // leader -> worker (ROUTER): tier sizes in blocks
  kReady = 3,      // worker -> leader: allocation done (or failed)
  kHeartbeat = 4,  // both ways
  kOpRequest = 5,  // leader -> all workers (PUB)
  kOpResult = 6,   // worker -> leader
  kShutdown = 7,   // leader -> all workers (PUB): the leader is going away
};

struct Hello {
  uint32_t rank = 0;
  uint32_t world_size = 0;
  uint64_t device_blocks = 0;
  uint64_t bytes_per_block = 0;
  friend bool operator==(const Hello&, const Hello&) = default;
};
struct Sizing {
  uint64_t host_blocks = 0;
  uint64_t disk_blocks = 0;
  friend bool operator==(const Sizing&, const Sizing&) = default;
};
struct Ready {
  uint32_t rank = 0;
  bool ok = true;
  std::string error;
  friend bool operator==(const Ready&, const Ready&) = default;
};
struct Heartbeat {
  uint32_t rank = kLeaderRank;
  friend bool operator==(const Heartbeat&, const Heartbeat&) = default;
};
// One TransferOp wrapped in a StepMetadata (the connector's codec, which also carries the
// leader's sizing for the worker to check) plus the forward-pass gate, which is ours.
struct OpRequest {
  std::optional<uint64_t> gate;
  StepMetadata meta;  // exactly one op
  friend bool operator==(const OpRequest&, const OpRequest&) = default;
};
struct OpResultMsg {
  uint32_t rank = 0;
  uint64_t op_id = 0;
  std::vector<uint32_t> failed_blocks;
  friend bool operator==(const OpResultMsg&, const OpResultMsg&) = default;
};
struct Shutdown {
  friend bool operator==(const Shutdown&, const Shutdown&) = default;
};

using Message = std::variant<Hello, Sizing, Ready, Heartbeat, OpRequest, OpResultMsg, Shutdown>;

std::string Encode(const Message& message);
Result<Message> Decode(std::span<const uint8_t> bytes);

}  // namespace kvbm::wire
