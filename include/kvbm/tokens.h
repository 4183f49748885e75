// Token blocks and sequence hashes, bit for bit the reference's.
//
//   block_hash      = XXH3_64(tokens as u32 little-endian, seed = salt_hash)
//   sequence_hash_0 = block_hash_0
//   sequence_hash_i = XXH3_64(le_bytes([sequence_hash_{i-1}: u64, block_hash_i: u64]), seed = salt_hash)
//   salt_hash       = XXH3_64(compact JSON {"salt":..,"lora_name":..}, seed 0), absent fields left out
//
// A block whose KV depends on more than its tokens (a multimodal item whose placeholders overlap
// it, its slice of prompt embeddings) has extra keys, folded into its block hash and so into its
// own sequence hash and every one after it:
//
//   block_hash'     = XXH3_64(le_bytes([block_hash: u64, extra_digest: u64]), seed = salt_hash)
//   extra_digest    = XXH3_64(ExtraKeyBytes(block), seed 0)
//
// A block without extra keys (every block of a text-only request) hashes exactly as above, so
// text keeps the reference's hashes bit for bit.
//
// Only full blocks are hashed. All functions are pure; TokenBlockSequence is
// thread-compatible (one writer, or many readers).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
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

// A multimodal item of a prompt (an image, an audio clip, a video): the engine's content
// identifier of the item (vLLM: `mm_feature.identifier`, a hash of the item's bytes, so the
// same image has the same identifier in every process), kept at full width, and the range of
// prompt positions its placeholder tokens take.
struct MultimodalItem {
  std::string identifier;
  uint64_t offset = 0;  // first placeholder position in the prompt
  uint64_t length = 0;  // placeholder positions
};

// 128 bits of a block's slice of prompt embeddings (XXH3-128 over the slice's bytes).
struct EmbedsDigest {
  uint64_t low = 0, high = 0;
  friend bool operator==(const EmbedsDigest&, const EmbedsDigest&) = default;
};

// XXH3-128 of each full block's slice of a prompt's embeddings: `data` holds `rows` rows
// (one per prompt position) of `row_bytes` bytes each. `is_token` (empty, or one byte per
// row): which positions are token ids rather than embeddings (vLLM's mixed prompts); it enters
// the digest. REQUIRES: block_size > 0, row_bytes > 0, is_token empty or of `rows` bytes.
Result<std::vector<EmbedsDigest>> HashEmbedsBlocks(std::span<const uint8_t> data, size_t row_bytes,
                                                   uint32_t block_size,
                                                   std::span<const uint8_t> is_token = {});

// What besides its tokens entered one block's KV, as vLLM's KV events list it (`extra_keys`):
// the LoRA name, the multimodal items overlapping the block (identifier, offset relative to the
// block), the cache salt (first block only) and the embeddings digest.
struct BlockInputs {
  std::optional<std::string> lora_name;
  std::vector<std::pair<std::string, int64_t>> multimodal;
  std::optional<std::string> cache_salt;
  std::optional<EmbedsDigest> embeds;
  bool empty() const { return !lora_name && multimodal.empty() && !cache_salt && !embeds; }
};

// The extra keys of one prompt, per block: what besides the tokens shapes each block's KV.
// Immutable once built; cheap to query per block (the items are sorted by offset and each
// block finds its first overlapping item by binary search).
class BlockExtraKeys {
 public:
  BlockExtraKeys() = default;
  // `items` in any order; `embeds`: one digest per full block of the prompt (or none).
  // InvalidArgument (naming the item) when an identifier is empty, a placeholder range is
  // empty or runs past `num_prompt_tokens`, or there are more embedding digests than blocks.
  static Result<BlockExtraKeys> Make(uint32_t block_size, uint64_t num_prompt_tokens,
                                     std::vector<MultimodalItem> items,
                                     std::vector<EmbedsDigest> embeds = {});

  bool empty() const { return items_.empty() && embeds_.empty(); }
  uint32_t block_size() const { return block_size_; }
  const std::vector<MultimodalItem>& items() const { return items_; }
  // The digest folded into block `index`'s hash; nullopt when the block has no extra key.
  std::optional<uint64_t> Digest(size_t index) const;
  // Block `index`'s multimodal keys as vLLM names them: (identifier, item offset relative to
  // the block start, negative when the item began in an earlier block).
  std::vector<std::pair<std::string_view, int64_t>> MultimodalKeys(size_t index) const;
  // Block `index`'s embeddings digest, if the prompt has embeddings there.
  const EmbedsDigest* Embeds(size_t index) const;

 private:
  uint32_t block_size_ = 1;
  std::vector<MultimodalItem> items_;  // sorted by offset
  std::vector<EmbedsDigest> embeds_;   // per full prompt block
};

// block_hash' of a block with extra keys (see the top of this file).
uint64_t FoldExtraKey(uint64_t block_hash, uint64_t extra_digest, uint64_t salt_hash);

// One full block: its tokens' hash, its prefix's hash and its parent's.
struct TokenBlock {
  uint64_t block_hash = 0;
  SequenceHash sequence_hash;
  std::optional<SequenceHash> parent;
  uint32_t index = 0;  // position of the block in its sequence
};

// Hashes of the full blocks of `tokens` (a partial tail is ignored), with `extra` folded into
// the blocks that have extra keys.
// REQUIRES: block_size > 0 (else InvalidArgument); a non-empty `extra` was made for block_size.
Result<std::vector<TokenBlock>> HashTokenBlocks(std::span<const Token> tokens, uint32_t block_size,
                                                uint64_t salt_hash, const BlockExtraKeys& extra = {});
// The same into a caller-owned vector (cleared first), so a hot loop reuses its memory.
Status HashTokenBlocksInto(std::span<const Token> tokens, uint32_t block_size, uint64_t salt_hash,
                           std::vector<TokenBlock>& out, const BlockExtraKeys& extra = {});

// A token sequence that grows token by token: full blocks are hashed as they complete, the
// partial tail is kept apart.
class TokenBlockSequence {
 public:
  // Throws ConfigError when block_size is 0, or when a non-empty `extra` was made for another
  // block size.
  TokenBlockSequence(uint32_t block_size, uint64_t salt_hash, BlockExtraKeys extra = {});

  void Append(Token token);
  void Extend(std::span<const Token> tokens);
  // Drops tokens from the end (e.g. rejected speculative tokens); completed blocks past the
  // new length are dropped too.
  Status Truncate(size_t num_tokens);

  uint32_t block_size() const { return block_size_; }
  uint64_t salt_hash() const { return salt_hash_; }
  const BlockExtraKeys& extra_keys() const { return extra_; }
  size_t num_tokens() const { return tokens_.size(); }
  const std::vector<Token>& tokens() const { return tokens_; }
  const std::vector<TokenBlock>& blocks() const { return blocks_; }
  std::span<const Token> tail() const;
  std::span<const Token> block_tokens(size_t block_index) const;

 private:
  void HashCompletedBlocks();

  uint32_t block_size_;
  uint64_t salt_hash_;
  BlockExtraKeys extra_;
  std::vector<Token> tokens_;
  std::vector<TokenBlock> blocks_;
};

}  // namespace kvbm
