#include "distributed/wire.h"

#include <fmt/format.h>

#include <limits>
#include <msgpack.hpp>
#include <type_traits>

namespace kvbm::wire {
namespace {

using Packer = msgpack::packer<msgpack::sbuffer>;

void Header(Packer& pk, uint32_t fields, MsgType type) {
  pk.pack_array(fields);
  pk.pack(kWireVersion);
  pk.pack(static_cast<uint8_t>(type));
}

struct EncodeVisitor {
  Packer& pk;
  void operator()(const Hello& m) const {
    Header(pk, 6, MsgType::kHello);
    pk.pack(m.rank);
    pk.pack(m.world_size);
    pk.pack(m.device_blocks);
    pk.pack(m.bytes_per_block);
  }
  void operator()(const Sizing& m) const {
    Header(pk, 4, MsgType::kSizing);
    pk.pack(m.host_blocks);
    pk.pack(m.disk_blocks);
  }
  void operator()(const Ready& m) const {
    Header(pk, 5, MsgType::kReady);
    pk.pack(m.rank);
    pk.pack(m.ok);
    pk.pack(m.error);
  }
  void operator()(const Heartbeat& m) const {
    Header(pk, 3, MsgType::kHeartbeat);
    pk.pack(m.rank);
  }
  void operator()(const OpRequest& m) const {
    Header(pk, 4, MsgType::kOpRequest);
    if (m.gate) {
      pk.pack(*m.gate);
    } else {
      pk.pack_nil();
    }
    std::string inner = EncodeStepMetadata(m.meta);
    pk.pack_bin(static_cast<uint32_t>(inner.size()));
    pk.pack_bin_body(inner.data(), static_cast<uint32_t>(inner.size()));
  }
  void operator()(const OpResultMsg& m) const {
    Header(pk, 5, MsgType::kOpResult);
    pk.pack(m.rank);
    pk.pack(m.op_id);
    pk.pack_array(static_cast<uint32_t>(m.failed_blocks.size()));
    for (uint32_t b : m.failed_blocks) pk.pack(b);
  }
  void operator()(const Shutdown&) const { Header(pk, 2, MsgType::kShutdown); }
};

std::unexpected<Error> Malformed(const std::string& why) {
  return MakeError(ErrorCode::kInvalidArgument, "rejected kvbm leader/worker message: " + why);
}

template <typename T>
bool As(const msgpack::object& o, T* out) {
  if constexpr (std::is_same_v<T, bool>) {
    if (o.type != msgpack::type::BOOLEAN) return false;
    *out = o.via.boolean;
    return true;
  } else if constexpr (std::is_same_v<T, std::string>) {
    if (o.type != msgpack::type::STR) return false;
    out->assign(o.via.str.ptr, o.via.str.size);
    return true;
  } else {
    if (o.type != msgpack::type::POSITIVE_INTEGER) return false;
    if (o.via.u64 > std::numeric_limits<T>::max()) return false;
    *out = static_cast<T>(o.via.u64);
    return true;
  }
}

// Field counts per type, including version and type.
uint32_t ExpectedFields(MsgType type) {
  switch (type) {
    case MsgType::kHello:
      return 6;
    case MsgType::kSizing:
      return 4;
    case MsgType::kReady:
      return 5;
    case MsgType::kHeartbeat:
      return 3;
    case MsgType::kOpRequest:
      return 4;
    case MsgType::kOpResult:
      return 5;
    case MsgType::kShutdown:
      return 2;
  }
  return 0;
}

}  // namespace

std::string Encode(const Message& message) {
  msgpack::sbuffer buf;
  Packer pk(buf);
  std::visit(EncodeVisitor{pk}, message);
  return std::string(buf.data(), buf.size());
}

Result<Message> Decode(std::span<const uint8_t> bytes) {
  if (bytes.empty()) return Malformed("empty");
  if (static_cast<int64_t>(bytes.size()) > kMaxMessageBytes)
    return Malformed(fmt::format("{} bytes is too large", bytes.size()));
  msgpack::object_handle handle;
  size_t offset = 0;
  try {
    // array elements, map pairs, str bytes, bin bytes, ext bytes, depth: bound what a hostile
    // message can make the unpacker allocate (an OpResult lists at most 1M block indices).
    msgpack::unpack_limit limit(1u << 20, 0, 1u << 16, static_cast<size_t>(kMaxMessageBytes), 0, 4);
    handle = msgpack::unpack(reinterpret_cast<const char*>(bytes.data()), bytes.size(), offset,
                             nullptr, nullptr, limit);
  } catch (const std::exception& e) {
    return Malformed(fmt::format("not msgpack ({})", e.what()));
  }
  if (offset != bytes.size())
    return Malformed(fmt::format("{} trailing bytes", bytes.size() - offset));
  const msgpack::object& root = handle.get();
  if (root.type != msgpack::type::ARRAY || root.via.array.size < 2)
    return Malformed("not an array of at least 2");
  const msgpack::object* f = root.via.array.ptr;
  const uint32_t n = root.via.array.size;
  uint32_t version = 0;
  if (!As(f[0], &version)) return Malformed("version is not an unsigned integer");
  if (version != kWireVersion)
    return Malformed(fmt::format("wire version {} (this kvbm speaks {})", version, kWireVersion));
  uint8_t raw_type = 0;
  if (!As(f[1], &raw_type) || raw_type < 1 || raw_type > static_cast<uint8_t>(MsgType::kShutdown))
    return Malformed("unknown message type");
  const auto type = static_cast<MsgType>(raw_type);
  if (n != ExpectedFields(type))
    return Malformed(fmt::format("type {} with {} fields", raw_type, n));
  switch (type) {
    case MsgType::kHello: {
      Hello m;
      if (!As(f[2], &m.rank) || !As(f[3], &m.world_size) || !As(f[4], &m.device_blocks) ||
          !As(f[5], &m.bytes_per_block))
        return Malformed("hello fields are not (u32, u32, u64, u64)");
      return m;
    }
    case MsgType::kSizing: {
      Sizing m;
      if (!As(f[2], &m.host_blocks) || !As(f[3], &m.disk_blocks))
        return Malformed("sizing fields are not (u64, u64)");
      return m;
    }
    case MsgType::kReady: {
      Ready m;
      if (!As(f[2], &m.rank) || !As(f[3], &m.ok) || !As(f[4], &m.error))
        return Malformed("ready fields are not (u32, bool, str)");
      return m;
    }
    case MsgType::kHeartbeat: {
      Heartbeat m;
      if (!As(f[2], &m.rank)) return Malformed("heartbeat rank is not a u32");
      return m;
    }
    case MsgType::kOpRequest: {
      OpRequest m;
      if (f[2].type != msgpack::type::NIL) {
        uint64_t gate = 0;
        if (!As(f[2], &gate)) return Malformed("op gate is neither nil nor a u64");
        m.gate = gate;
      }
      if (f[3].type != msgpack::type::BIN) return Malformed("op body is not bin");
      auto meta = DecodeStepMetadata(std::span<const uint8_t>(
          reinterpret_cast<const uint8_t*>(f[3].via.bin.ptr), f[3].via.bin.size));
      if (!meta) return Malformed("op body: " + meta.error().message());
      if (meta->ops.size() != 1)
        return Malformed(fmt::format("op body carries {} ops, not 1", meta->ops.size()));
      m.meta = std::move(*meta);
      return m;
    }
    case MsgType::kOpResult: {
      OpResultMsg m;
      if (!As(f[2], &m.rank) || !As(f[3], &m.op_id))
        return Malformed("op result rank/id are not (u32, u64)");
      if (f[4].type != msgpack::type::ARRAY)
        return Malformed("op result failed list is not an array");
      m.failed_blocks.reserve(f[4].via.array.size);
      for (uint32_t i = 0; i < f[4].via.array.size; ++i) {
        uint32_t b = 0;
        if (!As(f[4].via.array.ptr[i], &b)) return Malformed("op result failed entry is not a u32");
        m.failed_blocks.push_back(b);
      }
      return m;
    }
    case MsgType::kShutdown:
      return Shutdown{};
  }
  return Malformed("unknown message type");
}

}  // namespace kvbm::wire
