#include "kvbm/connector_ops.h"

#include <fmt/format.h>

#include <msgpack.hpp>

namespace kvbm {

// Layout: [version, step, host_blocks, disk_blocks, [op...], [finished...]]
// op: [id, kind, request_id, [src, dst, hash, src, dst, hash, ...] (flat triples: compact),
//      [block_hash, parent or nil, position, ...] (one triple per block, or empty: blocks without
//      lineage; disk writes carry it for the persistent G3's slot records)].
std::string EncodeStepMetadata(const StepMetadata& meta) {
  msgpack::sbuffer buf;
  msgpack::packer<msgpack::sbuffer> pk(buf);
  pk.pack_array(6);
  pk.pack(kProtocolVersion);
  pk.pack(meta.step);
  pk.pack(meta.host_blocks);
  pk.pack(meta.disk_blocks);
  pk.pack_array(static_cast<uint32_t>(meta.ops.size()));
  for (const TransferOp& op : meta.ops) {
    pk.pack_array(5);
    pk.pack(op.id);
    pk.pack(static_cast<uint8_t>(op.kind));
    pk.pack(op.request_id);
    pk.pack_array(static_cast<uint32_t>(op.blocks.size() * 3));
    bool lineage = false;
    for (const BlockOp& b : op.blocks) {
      pk.pack(b.src);
      pk.pack(b.dst);
      pk.pack(b.hash);
      lineage = lineage || b.has_lineage;
    }
    pk.pack_array(lineage ? static_cast<uint32_t>(op.blocks.size() * 3) : 0);
    if (lineage)
      for (const BlockOp& b : op.blocks) {
        pk.pack(b.block_hash);
        if (b.parent) pk.pack(*b.parent);
        else pk.pack_nil();
        pk.pack(b.position);
      }
  }
  pk.pack_array(static_cast<uint32_t>(meta.finished_while_loading.size()));
  for (const auto& r : meta.finished_while_loading) pk.pack(r);
  return std::string(buf.data(), buf.size());
}

namespace {

Error Malformed(const std::string& why) {
  return Error(ErrorCode::kInvalidArgument, "malformed kvbm step metadata: " + why);
}

template <typename T>
bool As(const msgpack::object& o, T* out) {
  if constexpr (std::is_same_v<T, std::string>) {
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

}  // namespace

Result<StepMetadata> DecodeStepMetadata(std::span<const uint8_t> bytes) {
  msgpack::object_handle handle;
  try {
    // Limits bound what a hostile message can make us allocate.
    msgpack::unpack_limit limit(1 << 20, 1 << 10, 1 << 20, 1 << 24, 1 << 16, 16);
    handle = msgpack::unpack(reinterpret_cast<const char*>(bytes.data()), bytes.size(), nullptr, nullptr, limit);
  } catch (const std::exception& e) {
    return std::unexpected(Malformed(e.what()));
  }
  const msgpack::object& root = handle.get();
  if (root.type != msgpack::type::ARRAY || root.via.array.size != 6) return std::unexpected(Malformed("root is not a 6-array"));
  const msgpack::object* f = root.via.array.ptr;
  uint32_t version = 0;
  if (!As(f[0], &version)) return std::unexpected(Malformed("version is not an integer"));
  if (version != kProtocolVersion)
    return std::unexpected(Malformed(fmt::format("protocol version {} (this kvbm speaks {})", version, kProtocolVersion)));
  StepMetadata meta;
  if (!As(f[1], &meta.step) || !As(f[2], &meta.host_blocks) || !As(f[3], &meta.disk_blocks))
    return std::unexpected(Malformed("step/sizes are not integers"));
  if (f[4].type != msgpack::type::ARRAY) return std::unexpected(Malformed("ops is not an array"));
  for (uint32_t i = 0; i < f[4].via.array.size; ++i) {
    const msgpack::object& o = f[4].via.array.ptr[i];
    if (o.type != msgpack::type::ARRAY || o.via.array.size != 5) return std::unexpected(Malformed(fmt::format("op {} is not a 5-array", i)));
    const msgpack::object* of = o.via.array.ptr;
    TransferOp op;
    uint8_t kind = 0;
    if (!As(of[0], &op.id) || !As(of[1], &kind) || kind > kMaxOpKind || !As(of[2], &op.request_id))
      return std::unexpected(Malformed(fmt::format("op {} has a bad id, kind or request id", i)));
    op.kind = static_cast<OpKind>(kind);
    if (of[3].type != msgpack::type::ARRAY || of[3].via.array.size % 3 != 0)
      return std::unexpected(Malformed(fmt::format("op {} blocks are not triples", i)));
    const msgpack::object* b = of[3].via.array.ptr;
    for (uint32_t k = 0; k < of[3].via.array.size; k += 3) {
      BlockOp bo;
      if (!As(b[k], &bo.src) || !As(b[k + 1], &bo.dst) || !As(b[k + 2], &bo.hash))
        return std::unexpected(Malformed(fmt::format("op {} block {} is not (u32, u32, u64)", i, k / 3)));
      op.blocks.push_back(bo);
    }
    const msgpack::object& lo = of[4];
    if (lo.type != msgpack::type::ARRAY || (lo.via.array.size != 0 && lo.via.array.size != of[3].via.array.size))
      return std::unexpected(Malformed(fmt::format("op {} lineage is neither empty nor one triple per block", i)));
    for (uint32_t k = 0; k < lo.via.array.size; k += 3) {
      BlockOp& bo = op.blocks[k / 3];
      const msgpack::object* l = lo.via.array.ptr + k;
      bo.has_lineage = true;
      if (l[1].type != msgpack::type::NIL) {
        uint64_t parent = 0;
        if (!As(l[1], &parent)) return std::unexpected(Malformed(fmt::format("op {} block {} has a bad parent", i, k / 3)));
        bo.parent = parent;
      }
      if (!As(l[0], &bo.block_hash) || !As(l[2], &bo.position))
        return std::unexpected(Malformed(fmt::format("op {} block {} lineage is not (u64, u64|nil, u32)", i, k / 3)));
    }
    meta.ops.push_back(std::move(op));
  }
  if (f[5].type != msgpack::type::ARRAY) return std::unexpected(Malformed("finished list is not an array"));
  for (uint32_t i = 0; i < f[5].via.array.size; ++i) {
    std::string r;
    if (!As(f[5].via.array.ptr[i], &r)) return std::unexpected(Malformed("finished entry is not a string"));
    meta.finished_while_loading.push_back(std::move(r));
  }
  return meta;
}

}  // namespace kvbm
