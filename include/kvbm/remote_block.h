// The remote tier's (G4) key and value format: how one KV block is named and framed in a shared
// key-value store (Redis Cluster), so that engines of the same model, layout, dtype and
// tensor-parallel rank share blocks and nothing else is ever served.
//
//   key   = <namespace> ":" <fingerprint, 16 hex digits> ":" <sequence hash, 16 hex digits>
//   value = header (40 bytes, little-endian) followed by the block's bytes
//           u32 magic 'KVG4' | u16 format version | u16 header bytes (40)
//           u64 layout fingerprint | u64 sequence hash | u64 byte length
//           u64 XXH3-64 of the block's bytes (seeded with the sequence hash)
//
// The layout fingerprint is XXH3-64 of a descriptor string the caller builds from everything
// that makes two blocks' bytes incompatible (model, layout dims, dtype, tensor-parallel rank and
// world size, kvbm format). It is both in the key (blocks of another model are simply other
// keys) and in the header (a value that was renamed or written by a buggy peer still fails).
//
// DecodeRemoteBlock accepts a value only when every header field equals what the caller expects
// and the checksum of the bytes matches; anything else is ErrorCode::kCorrupt with a message
// that starts with "remote block rejected (<reason>)", reason one of: bad magic, unsupported
// version, other fingerprint, other sequence hash, other length, truncated, trailing bytes,
// checksum mismatch.
//
// Thread safety: free functions over values; no state.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "kvbm/error.h"

namespace kvbm {

inline constexpr uint32_t kRemoteBlockMagic = 0x3447564b;  // "KVG4" read as little-endian bytes
inline constexpr uint16_t kRemoteBlockVersion = 1;
inline constexpr size_t kRemoteBlockHeaderBytes = 40;

// XXH3-64 of `descriptor` (seeded with a kvbm-G4 constant so it never collides by construction
// with other XXH3 uses of the same string).
uint64_t RemoteLayoutFingerprint(std::string_view descriptor);

// InvalidArgument naming the namespace when it is empty, longer than 128 bytes, or holds a
// control character, a space, '{' or '}' (braces would change Redis Cluster's key slot).
Status ValidateRemoteNamespace(std::string_view name_space);

// REQUIRES: ValidateRemoteNamespace(name_space) succeeded.
std::string RemoteBlockKey(std::string_view name_space, uint64_t fingerprint,
                           uint64_t sequence_hash);

using RemoteBlockHeader = std::array<uint8_t, kRemoteBlockHeaderBytes>;

// The header of `bytes` (its checksum included): header followed by `bytes` is the value, which
// a client can send as two parts without joining them (RedisCluster::SetParts).
RemoteBlockHeader EncodeRemoteBlockHeader(uint64_t fingerprint, uint64_t sequence_hash,
                                          std::span<const uint8_t> bytes);

// Header + bytes, ready to SET.
std::string EncodeRemoteBlock(uint64_t fingerprint, uint64_t sequence_hash,
                              std::span<const uint8_t> bytes);

// The block's bytes (a view into `value`) when `value` verifies against what the caller asked
// for; kCorrupt with the reason otherwise (see above). Never returns unverified bytes.
Result<std::span<const uint8_t>> DecodeRemoteBlock(std::string_view value,
                                                   uint64_t expected_fingerprint,
                                                   uint64_t expected_sequence_hash,
                                                   uint64_t expected_length);

}  // namespace kvbm
