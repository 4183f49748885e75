#include "kvbm/remote_block.h"

#include <fmt/format.h>
#include <xxhash.h>

#include <cstring>

namespace kvbm {
namespace {

// Separates the fingerprint domain from other XXH3 uses of kvbm ("kvbm-G4\0" as an integer).
constexpr uint64_t kFingerprintSeed = 0x0034472d6d62766bull;

void PutU16(uint8_t* p, uint16_t v) {
  for (int i = 0; i < 2; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
void PutU32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
void PutU64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint64_t GetLe(const uint8_t* p, int n) {
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

uint64_t BlockChecksum(uint64_t sequence_hash, const void* bytes, size_t length) {
  return XXH3_64bits_withSeed(bytes, length, sequence_hash);
}

std::unexpected<Error> Reject(std::string_view reason, std::string detail) {
  return MakeError(ErrorCode::kCorrupt,
                   fmt::format("remote block rejected ({}): {}", reason, detail));
}

}  // namespace

uint64_t RemoteLayoutFingerprint(std::string_view descriptor) {
  return XXH3_64bits_withSeed(descriptor.data(), descriptor.size(), kFingerprintSeed);
}

Status ValidateRemoteNamespace(std::string_view name_space) {
  if (name_space.empty())
    return MakeError(ErrorCode::kInvalidArgument, "the remote namespace is empty");
  if (name_space.size() > 128)
    return MakeError(
        ErrorCode::kInvalidArgument,
        fmt::format("the remote namespace is {} bytes long; at most 128", name_space.size()));
  for (char c : name_space) {
    const auto u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u == 0x7f || c == '{' || c == '}')
      return MakeError(
          ErrorCode::kInvalidArgument,
          fmt::format(
              "the remote namespace \"{}\" holds a character that is not allowed (0x{:02x}); "
              "spaces, control characters and braces are refused",
              name_space, u));
  }
  return {};
}

std::string RemoteBlockKey(std::string_view name_space, uint64_t fingerprint,
                           uint64_t sequence_hash) {
  return fmt::format("{}:{:016x}:{:016x}", name_space, fingerprint, sequence_hash);
}

RemoteBlockHeader EncodeRemoteBlockHeader(uint64_t fingerprint, uint64_t sequence_hash,
                                          std::span<const uint8_t> bytes) {
  RemoteBlockHeader h{};
  uint8_t* p = h.data();
  PutU32(p, kRemoteBlockMagic);
  PutU16(p + 4, kRemoteBlockVersion);
  PutU16(p + 6, static_cast<uint16_t>(kRemoteBlockHeaderBytes));
  PutU64(p + 8, fingerprint);
  PutU64(p + 16, sequence_hash);
  PutU64(p + 24, bytes.size());
  PutU64(p + 32, BlockChecksum(sequence_hash, bytes.data(), bytes.size()));
  return h;
}

std::string EncodeRemoteBlock(uint64_t fingerprint, uint64_t sequence_hash,
                              std::span<const uint8_t> bytes) {
  const RemoteBlockHeader h = EncodeRemoteBlockHeader(fingerprint, sequence_hash, bytes);
  std::string value(kRemoteBlockHeaderBytes + bytes.size(), '\0');
  std::memcpy(value.data(), h.data(), h.size());
  if (!bytes.empty()) std::memcpy(value.data() + kRemoteBlockHeaderBytes, bytes.data(), bytes.size());
  return value;
}

Result<std::span<const uint8_t>> DecodeRemoteBlock(std::string_view value,
                                                   uint64_t expected_fingerprint,
                                                   uint64_t expected_sequence_hash,
                                                   uint64_t expected_length) {
  const auto* p = reinterpret_cast<const uint8_t*>(value.data());
  if (value.size() < kRemoteBlockHeaderBytes)
    return Reject("truncated", fmt::format("{} bytes, shorter than the {}-byte header",
                                           value.size(), kRemoteBlockHeaderBytes));
  if (const uint64_t magic = GetLe(p, 4); magic != kRemoteBlockMagic)
    return Reject("bad magic",
                  fmt::format("0x{:08x}, expected 0x{:08x}", magic, kRemoteBlockMagic));
  const uint64_t version = GetLe(p + 4, 2), header_bytes = GetLe(p + 6, 2);
  if (version != kRemoteBlockVersion || header_bytes != kRemoteBlockHeaderBytes)
    return Reject(
        "unsupported version",
        fmt::format("format {} with a {}-byte header; this kvbm reads format {} ({} bytes)",
                    version, header_bytes, kRemoteBlockVersion, kRemoteBlockHeaderBytes));
  if (const uint64_t fp = GetLe(p + 8, 8); fp != expected_fingerprint)
    return Reject(
        "other fingerprint",
        fmt::format(
            "layout fingerprint {:016x}, expected {:016x} (another model, layout, dtype or rank)",
            fp, expected_fingerprint));
  if (const uint64_t hash = GetLe(p + 16, 8); hash != expected_sequence_hash)
    return Reject("other sequence hash",
                  fmt::format("{:016x}, expected {:016x}", hash, expected_sequence_hash));
  const uint64_t length = GetLe(p + 24, 8);
  if (length != expected_length)
    return Reject("other length",
                  fmt::format("header says {} bytes, expected {}", length, expected_length));
  const uint64_t present = value.size() - kRemoteBlockHeaderBytes;
  if (present < length)
    return Reject("truncated", fmt::format("{} of {} block bytes present", present, length));
  if (present > length)
    return Reject("trailing bytes",
                  fmt::format("{} bytes after a {}-byte block", present - length, length));
  std::span<const uint8_t> bytes(p + kRemoteBlockHeaderBytes, length);
  if (const uint64_t sum = BlockChecksum(expected_sequence_hash, bytes.data(), bytes.size()),
      stored = GetLe(p + 32, 8);
      sum != stored)
    return Reject("checksum mismatch",
                  fmt::format("bytes hash to {:016x}, header says {:016x}", sum, stored));
  return bytes;
}

}  // namespace kvbm
