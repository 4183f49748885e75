// Token blocks and sequence hashes, bit for bit the reference's.
//
//   block_hash      = XXH3_64(tokens as u32 little-endian, seed = salt_hash)
//   sequence_hash_0 = block_hash_0
//   sequence_hash_i = XXH3_64(le_bytes([sequence_hash_{i-1}: u64, block_hash_i: u64]), seed = salt_hash)
//   salt_hash       = XXH3_64(compact JSON {"salt":..,"lora_name":..}, seed 0), absent fields left out
//
// Only full blocks are hashed. All functions are pure; TokenBlockSequence is
// thread-compatible (one writer, or many readers).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvbm/error.h"
#include "kvbm/types.h"

namespace kvbm {

using Token = uint32_t;

// The salt hash of a request: cache salt and LoRA name, either may be absent.
uint64_t ComputeSaltHash(const std::optional<std::string>& salt,
                         const std::optional<std::string>& lora_name);
// The compact JSON the salt hash is computed over (exposed for `kvbm hash` and tests).
std::string SaltJson(const std::optional<std::string>& salt,
                     const std::optional<std::string>& lora_name);

uint64_t ComputeBlockHash(std::span<const Token> tokens, uint64_t salt_hash);
SequenceHash ChainSequenceHash(std::optional<SequenceHash> parent, uint64_t block_hash,
                               uint64_t salt_hash);

// One full block: its tokens' hash, its prefix's hash and its parent's.
struct TokenBlock {
  uint64_t block_hash = 0;
  SequenceHash sequence_hash;
  std::optional<SequenceHash> parent;
  uint32_t index = 0;  // position of the block in its sequence
};

// Hashes of the full blocks of `tokens` (a partial tail is ignored).
// REQUIRES: block_size > 0 (else InvalidArgument).
Result<std::vector<TokenBlock>> HashTokenBlocks(std::span<const Token> tokens, uint32_t block_size,
                                                uint64_t salt_hash);
// The same into a caller-owned vector (cleared first), so a hot loop reuses its memory.
Status HashTokenBlocksInto(std::span<const Token> tokens, uint32_t block_size, uint64_t salt_hash,
                           std::vector<TokenBlock>& out);

// A token sequence that grows token by token: full blocks are hashed as they complete, the
// partial tail is kept apart.
class TokenBlockSequence {
 public:
  // Throws ConfigError when block_size is 0.
  TokenBlockSequence(uint32_t block_size, uint64_t salt_hash);

  void Append(Token token);
  void Extend(std::span<const Token> tokens);
  // Drops tokens from the end (e.g. rejected speculative tokens); completed blocks past the
  // new length are dropped too.
  Status Truncate(size_t num_tokens);

  uint32_t block_size() const { return block_size_; }
  uint64_t salt_hash() const { return salt_hash_; }
  size_t num_tokens() const { return tokens_.size(); }
  const std::vector<Token>& tokens() const { return tokens_; }
  const std::vector<TokenBlock>& blocks() const { return blocks_; }
  std::span<const Token> tail() const;
  std::span<const Token> block_tokens(size_t block_index) const;

 private:
  void HashCompletedBlocks();

  uint32_t block_size_;
  uint64_t salt_hash_;
  std::vector<Token> tokens_;
  std::vector<TokenBlock> blocks_;
};

}  // namespace kvbm
