// Bindings of the tokens layer: block and sequence hashes, token sequences, salt hashes.
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <fmt/format.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include "kvbm/block_pool.h"
#include "kvbm/config.h"
#include "kvbm/core_bench.h"
#include "kvbm/error.h"
#include "kvbm/layout.h"
#include "kvbm/tokens.h"
#include "python/bindings.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvbm::python {

void BindHashing(nb::module_& m) {
  nb::class_<TokenBlock>(m, "TokenBlock", "One full block of a token sequence and its hashes.")
      .def(nb::init<>())
      .def("__init__",
           [](TokenBlock* b, uint64_t block_hash, uint64_t sequence_hash, OptHash parent, uint32_t index) {
             new (b) TokenBlock{block_hash, SequenceHash(sequence_hash), ToSequenceHash(parent), index};
           },
           "block_hash"_a, "sequence_hash"_a, "parent"_a = nb::none(), "index"_a = 0)
      .def_rw("block_hash", &TokenBlock::block_hash)
      .def_prop_ro("sequence_hash", [](const TokenBlock& b) { return b.sequence_hash.value(); })
      .def_prop_ro("parent", [](const TokenBlock& b) { return OptionalHash(b.parent); })
      .def_rw("index", &TokenBlock::index)
      .def_prop_ro("key", [](const TokenBlock& b) { return KeyTuple(KeyOf(b)); },
                   "(sequence_hash, block_hash, parent) as match_prefix takes it")
      .def("__eq__", [](const TokenBlock& a, const TokenBlock& b) {
        return a.block_hash == b.block_hash && a.sequence_hash == b.sequence_hash && a.parent == b.parent &&
               a.index == b.index;
      })
      .def("__repr__", [](const TokenBlock& b) {
        return fmt::format("TokenBlock(index={}, block_hash={}, sequence_hash={}, parent={})", b.index, b.block_hash,
                           b.sequence_hash.value(), b.parent ? fmt::format("{}", b.parent->value()) : "None");
      });

  m.attr("DEFAULT_SALT_HASH") = ComputeSaltHash(std::nullopt, std::nullopt);
  m.def("compute_salt_hash", &ComputeSaltHash, "salt"_a = nb::none(), "lora_name"_a = nb::none(),
        "XXH3_64(compact JSON {\"salt\":..,\"lora_name\":..}, seed 0); absent fields are left out.");
  m.def("salt_json", &SaltJson, "salt"_a = nb::none(), "lora_name"_a = nb::none());
  m.def("compute_block_hash", [](const Tokens& tokens, uint64_t salt_hash) { return ComputeBlockHash(tokens, salt_hash); },
        "tokens"_a, "salt_hash"_a, Release());
  m.def("chain_sequence_hash",
        [](OptHash parent, uint64_t block_hash, uint64_t salt_hash) {
          return ChainSequenceHash(ToSequenceHash(parent), block_hash, salt_hash).value();
        },
        "parent"_a.none(), "block_hash"_a, "salt_hash"_a);
  using Bytes = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
  nb::class_<BlockExtraKeys>(m, "BlockExtraKeys",
                             "What besides its tokens shapes each block of a prompt: multimodal items "
                             "and prompt-embedding slices (folded into the block hashes).")
      .def(nb::init<>())
      .def("__init__",
           [](BlockExtraKeys* self, uint32_t block_size, uint64_t num_prompt_tokens,
              const std::vector<std::tuple<std::string, uint64_t, uint64_t>>& mm_items, std::optional<Bytes> embeds,
              size_t embeds_row_bytes, std::optional<Bytes> is_token) {
             std::vector<MultimodalItem> items;
             items.reserve(mm_items.size());
             for (const auto& [id, offset, length] : mm_items) items.push_back({id, offset, length});
             std::vector<EmbedsDigest> digests;
             if (embeds) {
               std::span<const uint8_t> data(embeds->data(), embeds->size());
               std::span<const uint8_t> mask;
               if (is_token) mask = std::span<const uint8_t>(is_token->data(), is_token->size());
               if (data.size() / std::max<size_t>(embeds_row_bytes, 1) != num_prompt_tokens)
                 ThrowIfError(MakeError(ErrorCode::kInvalidArgument,
                                        fmt::format("prompt embeddings have {} bytes: not {} rows of {} bytes",
                                                    data.size(), num_prompt_tokens, embeds_row_bytes)));
               nb::gil_scoped_release release;
               digests = ThrowIfError(HashEmbedsBlocks(data, embeds_row_bytes, block_size, mask));
             }
             new (self) BlockExtraKeys(
                 ThrowIfError(BlockExtraKeys::Make(block_size, num_prompt_tokens, std::move(items), std::move(digests))));
           },
           "block_size"_a, "num_prompt_tokens"_a, "mm_items"_a = std::vector<std::tuple<std::string, uint64_t, uint64_t>>{},
           "embeds"_a = nb::none(), "embeds_row_bytes"_a = 0, "is_token"_a = nb::none(),
           "mm_items: (identifier, offset, length) per item; embeds: the prompt's embeddings as one contiguous "
           "uint8 array of num_prompt_tokens rows of embeds_row_bytes; is_token: one byte per position, nonzero "
           "where the position is a token id (mixed prompts). InvalidArgumentError names what is wrong.")
      .def_prop_ro("empty", &BlockExtraKeys::empty)
      .def_prop_ro("block_size", &BlockExtraKeys::block_size)
      .def("digest", &BlockExtraKeys::Digest, "index"_a)
      .def("multimodal_keys",
           [](const BlockExtraKeys& k, size_t i) {
             std::vector<std::pair<std::string, int64_t>> out;
             for (const auto& [id, off] : k.MultimodalKeys(i)) out.emplace_back(std::string(id), off);
             return out;
           },
           "index"_a, "(identifier, offset relative to the block) of each item overlapping block `index`");
  m.def("hash_token_blocks",
        [](const Tokens& tokens, uint32_t block_size, uint64_t salt_hash, const BlockExtraKeys* extra) {
          static const BlockExtraKeys kNone;
          return ThrowIfError(HashTokenBlocks(tokens, block_size, salt_hash, extra ? *extra : kNone));
        },
        "tokens"_a, "block_size"_a, "salt_hash"_a, "extra_keys"_a = nb::none(), Release(),
        "Hashes of the full blocks of `tokens`; a partial tail is ignored; `extra_keys` folded in.");

  nb::class_<TokenBlockSequence>(m, "TokenBlockSequence",
                                 "A token sequence whose full blocks are hashed as they complete.")
      .def(nb::init<uint32_t, uint64_t>(), "block_size"_a, "salt_hash"_a = ComputeSaltHash(std::nullopt, std::nullopt))
      .def("append", &TokenBlockSequence::Append, "token"_a)
      .def("extend", [](TokenBlockSequence& s, const Tokens& t) { s.Extend(t); }, "tokens"_a, Release())
      .def("truncate", [](TokenBlockSequence& s, size_t n) { ThrowIfError(s.Truncate(n)); }, "num_tokens"_a)
      .def_prop_ro("tokens", [](const TokenBlockSequence& s) { return s.tokens(); })
      .def_prop_ro("blocks", [](const TokenBlockSequence& s) { return s.blocks(); })
      .def_prop_ro("tail", [](const TokenBlockSequence& s) { return Tokens(s.tail().begin(), s.tail().end()); })
      .def_prop_ro("num_tokens", &TokenBlockSequence::num_tokens)
      .def_prop_ro("block_size", &TokenBlockSequence::block_size)
      .def_prop_ro("salt_hash", &TokenBlockSequence::salt_hash)
      .def("block_tokens",
           [](const TokenBlockSequence& s, size_t i) {
             if (i >= s.blocks().size())
               throw nb::index_error(fmt::format("block {} of {}", i, s.blocks().size()).c_str());
             auto t = s.block_tokens(i);
             return Tokens(t.begin(), t.end());
           },
           "index"_a)
      .def("__len__", &TokenBlockSequence::num_tokens);
}


}  // namespace kvbm::python
