#include <algorithm>
#include <bit>
#include <cstring>
#include <fmt/format.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "kvbm/tokens.h"

namespace kvbm {
namespace {

static_assert(std::endian::native == std::endian::little,
              "kvbm hashes tokens as little-endian u32; a big-endian port must byte-swap");

// JSON string escaping as serde_json writes it (the reference serialises with serde_json):
// quote, backslash and control characters escaped, everything else (UTF-8 included) verbatim.
void AppendJsonString(std::string& out, std::string_view s) {
  out.push_back('"');
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) out += fmt::format("\\u{:04x}", c);
        else out.push_back(static_cast<char>(c));
    }
  }
  out.push_back('"');
}

}  // namespace

std::string SaltJson(const std::optional<std::string>& salt,
                     const std::optional<std::string>& lora_name) {
  std::string json = "{";
  if (salt) {
    json += "\"salt\":";
    AppendJsonString(json, *salt);
  }
  if (lora_name) {
    if (salt) json += ",";
    json += "\"lora_name\":";
    AppendJsonString(json, *lora_name);
  }
  json += "}";
  return json;
}

uint64_t ComputeSaltHash(const std::optional<std::string>& salt,
                         const std::optional<std::string>& lora_name) {
  std::string json = SaltJson(salt, lora_name);
  return XXH3_64bits_withSeed(json.data(), json.size(), 0);
}

uint64_t ComputeBlockHash(std::span<const Token> tokens, uint64_t salt_hash) {
  return XXH3_64bits_withSeed(tokens.data(), tokens.size_bytes(), salt_hash);
}

SequenceHash ChainSequenceHash(std::optional<SequenceHash> parent, uint64_t block_hash,
                               uint64_t salt_hash) {
  if (!parent) return SequenceHash(block_hash);
  uint64_t pair[2] = {parent->value(), block_hash};
  return SequenceHash(XXH3_64bits_withSeed(pair, sizeof(pair), salt_hash));
}

uint64_t FoldExtraKey(uint64_t block_hash, uint64_t extra_digest, uint64_t salt_hash) {
  uint64_t pair[2] = {block_hash, extra_digest};
  return XXH3_64bits_withSeed(pair, sizeof(pair), salt_hash);
}

Result<std::vector<EmbedsDigest>> HashEmbedsBlocks(std::span<const uint8_t> data, size_t row_bytes,
                                                   uint32_t block_size, std::span<const uint8_t> is_token) {
  if (block_size == 0 || row_bytes == 0)
    return MakeError(ErrorCode::kInvalidArgument,
                     fmt::format("prompt embeddings: block size {} and row bytes {} must be > 0", block_size, row_bytes));
  if (data.size() % row_bytes != 0)
    return MakeError(ErrorCode::kInvalidArgument,
                     fmt::format("prompt embeddings: {} bytes are not whole rows of {} bytes", data.size(), row_bytes));
  const size_t rows = data.size() / row_bytes;
  if (!is_token.empty() && is_token.size() != rows)
    return MakeError(ErrorCode::kInvalidArgument,
                     fmt::format("prompt embeddings: a token mask of {} positions for {} rows", is_token.size(), rows));
  std::vector<EmbedsDigest> out(rows / block_size);
  const size_t block_bytes = row_bytes * block_size;
  for (size_t i = 0; i < out.size(); ++i) {
    XXH3_state_t state;
    XXH3_128bits_reset(&state);
    XXH3_128bits_update(&state, data.data() + i * block_bytes, block_bytes);
    if (!is_token.empty()) XXH3_128bits_update(&state, is_token.data() + i * block_size, block_size);
    XXH128_hash_t h = XXH3_128bits_digest(&state);
    out[i] = {h.low64, h.high64};
  }
  return out;
}

Result<BlockExtraKeys> BlockExtraKeys::Make(uint32_t block_size, uint64_t num_prompt_tokens,
                                            std::vector<MultimodalItem> items, std::vector<EmbedsDigest> embeds) {
  if (block_size == 0) return MakeError(ErrorCode::kInvalidArgument, "extra keys: block_size must be > 0");
  for (size_t i = 0; i < items.size(); ++i) {
    const MultimodalItem& it = items[i];
    if (it.identifier.empty())
      return MakeError(ErrorCode::kInvalidArgument, fmt::format("multimodal item {} has no identifier", i));
    if (it.length == 0 || it.offset + it.length > num_prompt_tokens || it.offset + it.length < it.offset)
      return MakeError(ErrorCode::kInvalidArgument,
                       fmt::format("multimodal item {} ('{}') takes positions [{}, +{}) of a {}-token prompt", i,
                                   it.identifier, it.offset, it.length, num_prompt_tokens));
  }
  if (embeds.size() > num_prompt_tokens / block_size)
    return MakeError(ErrorCode::kInvalidArgument,
                     fmt::format("{} embedding digests for a prompt of {} full blocks", embeds.size(),
                                 num_prompt_tokens / block_size));
  std::stable_sort(items.begin(), items.end(),
                   [](const MultimodalItem& a, const MultimodalItem& b) { return a.offset < b.offset; });
  BlockExtraKeys k;
  k.block_size_ = block_size;
  k.items_ = std::move(items);
  k.embeds_ = std::move(embeds);
  return k;
}

std::vector<std::pair<std::string_view, int64_t>> BlockExtraKeys::MultimodalKeys(size_t index) const {
  std::vector<std::pair<std::string_view, int64_t>> out;
  if (items_.empty()) return out;
  const uint64_t start = uint64_t{index} * block_size_, end = start + block_size_;
  // Items overlapping [start, end): offset < end and offset + length > start. Items are sorted
  // by offset but may be long, so every item before `end` is checked (a prompt has few items).
  auto last = std::lower_bound(items_.begin(), items_.end(), end,
                               [](const MultimodalItem& it, uint64_t e) { return it.offset < e; });
  for (auto it = items_.begin(); it != last; ++it) {
    if (it->offset + it->length > start)
      out.emplace_back(it->identifier, static_cast<int64_t>(it->offset) - static_cast<int64_t>(start));
  }
  return out;
}

const EmbedsDigest* BlockExtraKeys::Embeds(size_t index) const {
  return index < embeds_.size() ? &embeds_[index] : nullptr;
}

std::optional<uint64_t> BlockExtraKeys::Digest(size_t index) const {
  if (empty()) return std::nullopt;
  auto mm = MultimodalKeys(index);
  const EmbedsDigest* e = Embeds(index);
  if (mm.empty() && !e) return std::nullopt;
  // Canonical bytes: per item 'm', identifier length (u64), identifier, offset in block (i64);
  // then 'e' and the 16 bytes of the embeddings digest. Lengths make the encoding unambiguous.
  XXH3_state_t state;
  XXH3_64bits_reset(&state);
  for (const auto& [id, offset] : mm) {
    const char tag = 'm';
    const uint64_t len = id.size();
    XXH3_64bits_update(&state, &tag, 1);
    XXH3_64bits_update(&state, &len, sizeof(len));
    XXH3_64bits_update(&state, id.data(), id.size());
    XXH3_64bits_update(&state, &offset, sizeof(offset));
  }
  if (e) {
    const char tag = 'e';
    const uint64_t words[2] = {e->low, e->high};
    XXH3_64bits_update(&state, &tag, 1);
    XXH3_64bits_update(&state, words, sizeof(words));
  }
  return XXH3_64bits_digest(&state);
}

Status HashTokenBlocksInto(std::span<const Token> tokens, uint32_t block_size, uint64_t salt_hash,
                           std::vector<TokenBlock>& out, const BlockExtraKeys& extra) {
  if (block_size == 0) return MakeError(ErrorCode::kInvalidArgument, "block_size must be > 0");
  if (!extra.empty() && extra.block_size() != block_size)
    return MakeError(ErrorCode::kInvalidArgument,
                     fmt::format("extra keys made for block size {}, hashing with {}", extra.block_size(), block_size));
  out.clear();
  const size_t n = tokens.size() / block_size;
  out.resize(n);
  // Block hashes are independent (the CPU overlaps them); only the 16-byte chain is serial.
  for (size_t i = 0; i < n; ++i) {
    out[i].block_hash = ComputeBlockHash(tokens.subspan(i * block_size, block_size), salt_hash);
    out[i].index = static_cast<uint32_t>(i);
  }
  if (!extra.empty()) {
    for (size_t i = 0; i < n; ++i) {
      if (auto d = extra.Digest(i)) out[i].block_hash = FoldExtraKey(out[i].block_hash, *d, salt_hash);
    }
  }
  std::optional<SequenceHash> parent;
  for (size_t i = 0; i < n; ++i) {
    out[i].parent = parent;
    out[i].sequence_hash = ChainSequenceHash(parent, out[i].block_hash, salt_hash);
    parent = out[i].sequence_hash;
  }
  return {};
}

Result<std::vector<TokenBlock>> HashTokenBlocks(std::span<const Token> tokens, uint32_t block_size,
                                                uint64_t salt_hash, const BlockExtraKeys& extra) {
  std::vector<TokenBlock> blocks;
  if (auto s = HashTokenBlocksInto(tokens, block_size, salt_hash, blocks, extra); !s)
    return std::unexpected(s.error());
  return blocks;
}

TokenBlockSequence::TokenBlockSequence(uint32_t block_size, uint64_t salt_hash, BlockExtraKeys extra)
    : block_size_(block_size), salt_hash_(salt_hash), extra_(std::move(extra)) {
  if (block_size == 0) throw ConfigError("TokenBlockSequence: block_size must be > 0");
  if (!extra_.empty() && extra_.block_size() != block_size)
    throw ConfigError(fmt::format("TokenBlockSequence: extra keys made for block size {}, not {}",
                                  extra_.block_size(), block_size));
}

void TokenBlockSequence::Append(Token token) {
  tokens_.push_back(token);
  HashCompletedBlocks();
}

void TokenBlockSequence::Extend(std::span<const Token> tokens) {
  tokens_.insert(tokens_.end(), tokens.begin(), tokens.end());
  HashCompletedBlocks();
}

Status TokenBlockSequence::Truncate(size_t num_tokens) {
  if (num_tokens > tokens_.size())
    return MakeError(ErrorCode::kInvalidArgument,
                     fmt::format("cannot truncate {} tokens to {}", tokens_.size(), num_tokens));
  tokens_.resize(num_tokens);
  blocks_.resize(num_tokens / block_size_);
  return {};
}

std::span<const Token> TokenBlockSequence::tail() const {
  size_t full = blocks_.size() * block_size_;
  return std::span<const Token>(tokens_).subspan(full);
}

std::span<const Token> TokenBlockSequence::block_tokens(size_t block_index) const {
  Check(block_index < blocks_.size(), "block_tokens: index out of range");
  return std::span<const Token>(tokens_).subspan(block_index * block_size_, block_size_);
}

void TokenBlockSequence::HashCompletedBlocks() {
  while ((blocks_.size() + 1) * block_size_ <= tokens_.size()) {
    TokenBlock b;
    b.index = static_cast<uint32_t>(blocks_.size());
    b.block_hash = ComputeBlockHash(
        std::span<const Token>(tokens_).subspan(size_t{b.index} * block_size_, block_size_), salt_hash_);
    if (auto d = extra_.Digest(b.index)) b.block_hash = FoldExtraKey(b.block_hash, *d, salt_hash_);
    b.parent = blocks_.empty() ? std::nullopt : std::optional(blocks_.back().sequence_hash);
    b.sequence_hash = ChainSequenceHash(b.parent, b.block_hash, salt_hash_);
    blocks_.push_back(b);
  }
}

}  // namespace kvbm
