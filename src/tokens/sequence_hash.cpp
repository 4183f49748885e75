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

Status HashTokenBlocksInto(std::span<const Token> tokens, uint32_t block_size, uint64_t salt_hash,
                           std::vector<TokenBlock>& out) {
  if (block_size == 0) return MakeError(ErrorCode::kInvalidArgument, "block_size must be > 0");
  out.clear();
  const size_t n = tokens.size() / block_size;
  out.resize(n);
  // Block hashes are independent (the CPU overlaps them); only the 16-byte chain is serial.
  for (size_t i = 0; i < n; ++i) {
    out[i].block_hash = ComputeBlockHash(tokens.subspan(i * block_size, block_size), salt_hash);
    out[i].index = static_cast<uint32_t>(i);
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
                                                uint64_t salt_hash) {
  std::vector<TokenBlock> blocks;
  if (auto s = HashTokenBlocksInto(tokens, block_size, salt_hash, blocks); !s) return std::unexpected(s.error());
  return blocks;
}

TokenBlockSequence::TokenBlockSequence(uint32_t block_size, uint64_t salt_hash)
    : block_size_(block_size), salt_hash_(salt_hash) {
  if (block_size == 0) throw ConfigError("TokenBlockSequence: block_size must be > 0");
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
    b.parent = blocks_.empty() ? std::nullopt : std::optional(blocks_.back().sequence_hash);
    b.sequence_hash = ChainSequenceHash(b.parent, b.block_hash, salt_hash_);
    blocks_.push_back(b);
  }
}

}  // namespace kvbm
