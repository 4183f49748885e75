#include <gtest/gtest.h>

#include <xxhash.h>

#include "kvbm/tokens.h"

namespace kvbm {
namespace {

TEST(SequenceHash, ReferenceVectors) {
  std::vector<Token> tokens = {1, 2, 3, 4, 5, 6, 7, 8};
  auto blocks = HashTokenBlocks(tokens, 4, 1337);
  ASSERT_TRUE(blocks.has_value());
  ASSERT_EQ(blocks->size(), 2u);
  EXPECT_EQ((*blocks)[0].sequence_hash.value(), 14643705804678351452ull);
  EXPECT_EQ((*blocks)[1].sequence_hash.value(), 4945711292740353085ull);
  EXPECT_EQ((*blocks)[0].sequence_hash.value(), (*blocks)[0].block_hash);
  EXPECT_EQ((*blocks)[1].parent, (*blocks)[0].sequence_hash);
}

TEST(SequenceHash, EmptySaltJsonHash) {
  EXPECT_EQ(SaltJson(std::nullopt, std::nullopt), "{}");
  EXPECT_EQ(ComputeSaltHash(std::nullopt, std::nullopt), 1389868326933519382ull);
  EXPECT_EQ(ComputeSaltHash(std::nullopt, std::nullopt), XXH3_64bits_withSeed("{}", 2, 0));
}

TEST(SequenceHash, SaltJsonFieldsAndEscaping) {
  EXPECT_EQ(SaltJson(std::string("a"), std::nullopt), R"({"salt":"a"})");
  EXPECT_EQ(SaltJson(std::nullopt, std::string("l")), R"({"lora_name":"l"})");
  EXPECT_EQ(SaltJson(std::string("a\"b\n"), std::string("x\\")), R"({"salt":"a\"b\n","lora_name":"x\\"})");
  EXPECT_NE(ComputeSaltHash(std::string("a"), std::nullopt), ComputeSaltHash(std::nullopt, std::nullopt));
}

TEST(SequenceHash, BlockHashIsXxh3OverLittleEndianU32) {
  std::vector<Token> tokens = {1, 2, 3, 4};
  unsigned char bytes[16] = {1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0};
  EXPECT_EQ(ComputeBlockHash(tokens, 1337), XXH3_64bits_withSeed(bytes, 16, 1337));
}

TEST(SequenceHash, PartialTailIsNotHashed) {
  std::vector<Token> tokens = {1, 2, 3, 4, 5, 6, 7};
  auto blocks = HashTokenBlocks(tokens, 4, 0);
  ASSERT_TRUE(blocks.has_value());
  EXPECT_EQ(blocks->size(), 1u);
  EXPECT_FALSE(HashTokenBlocks(tokens, 0, 0).has_value());
}

TEST(TokenBlockSequence, GrowsTokenByTokenAndMatchesBatch) {
  TokenBlockSequence seq(4, 1337);
  std::vector<Token> tokens;
  for (Token t = 1; t <= 11; ++t) {
    seq.Append(t);
    tokens.push_back(t);
    auto batch = HashTokenBlocks(tokens, 4, 1337);
    ASSERT_EQ(seq.blocks().size(), batch->size());
    for (size_t i = 0; i < batch->size(); ++i)
      EXPECT_EQ(seq.blocks()[i].sequence_hash, (*batch)[i].sequence_hash);
    EXPECT_EQ(seq.tail().size(), tokens.size() % 4);
  }
  EXPECT_EQ(seq.blocks()[0].sequence_hash.value(), 14643705804678351452ull);
  EXPECT_EQ(seq.blocks()[1].sequence_hash.value(), 4945711292740353085ull);
  ASSERT_TRUE(seq.Truncate(5).has_value());
  EXPECT_EQ(seq.blocks().size(), 1u);
  EXPECT_EQ(seq.tail().size(), 1u);
  EXPECT_FALSE(seq.Truncate(99).has_value());
  EXPECT_THROW(TokenBlockSequence(0, 0), ConfigError);
}


// --- extra keys: multimodal items and prompt embeddings ---

std::vector<Token> Placeholders(size_t n, Token image_token = 7) {
  std::vector<Token> t(n, image_token);
  for (size_t i = 0; i < 8 && i < n; ++i) t[i] = static_cast<Token>(100 + i);  // some text first
  return t;
}

BlockExtraKeys Keys(uint32_t bs, uint64_t n, std::vector<MultimodalItem> items, std::vector<EmbedsDigest> e = {}) {
  auto k = BlockExtraKeys::Make(bs, n, std::move(items), std::move(e));
  EXPECT_TRUE(k.has_value()) << (k ? "" : k.error().message());
  return k ? *k : BlockExtraKeys{};
}

TEST(ExtraKeys, NoExtraKeysKeepsTheReferenceVectors) {
  std::vector<Token> tokens = {1, 2, 3, 4, 5, 6, 7, 8};
  auto blocks = HashTokenBlocks(tokens, 4, 1337, Keys(4, 8, {}));
  ASSERT_TRUE(blocks.has_value());
  EXPECT_EQ((*blocks)[0].sequence_hash.value(), 14643705804678351452ull);
  EXPECT_EQ((*blocks)[1].sequence_hash.value(), 4945711292740353085ull);
}

TEST(ExtraKeys, AnImageChangesItsBlocksAndEveryLaterOneButNoEarlierOne) {
  const uint32_t bs = 4;
  std::vector<Token> tokens = Placeholders(32);
  auto text = *HashTokenBlocks(tokens, bs, 0);
  // An image on positions [10, 18): blocks 2, 3 and 4 overlap it.
  auto a = *HashTokenBlocks(tokens, bs, 0, Keys(bs, 32, {{"imageA", 10, 8}}));
  auto b = *HashTokenBlocks(tokens, bs, 0, Keys(bs, 32, {{"imageB", 10, 8}}));
  for (size_t i = 0; i < text.size(); ++i) {
    if (i < 2) {
      EXPECT_EQ(a[i].sequence_hash, text[i].sequence_hash) << i;
      EXPECT_EQ(a[i].sequence_hash, b[i].sequence_hash) << i;
    } else {
      EXPECT_NE(a[i].sequence_hash, text[i].sequence_hash) << i;
      EXPECT_NE(a[i].sequence_hash, b[i].sequence_hash) << i;
    }
    // Blocks past the image carry no key of their own, but their prefix differs.
    EXPECT_EQ(a[i].block_hash == text[i].block_hash, i < 2 || i > 4) << i;
  }
  // The same image again: the same hashes (a content identifier, nothing per process).
  auto a2 = *HashTokenBlocks(tokens, bs, 0, Keys(bs, 32, {{"imageA", 10, 8}}));
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i].sequence_hash, a2[i].sequence_hash);
}

TEST(ExtraKeys, OffsetInsideTheBlockAndFullIdentifierWidthMatter) {
  const uint32_t bs = 4;
  std::vector<Token> tokens = Placeholders(16);
  auto at9 = *HashTokenBlocks(tokens, bs, 0, Keys(bs, 16, {{"img", 9, 3}}));
  auto at10 = *HashTokenBlocks(tokens, bs, 0, Keys(bs, 16, {{"img", 10, 2}}));
  EXPECT_NE(at9[2].sequence_hash, at10[2].sequence_hash);
  // Identifiers that differ only past their first 16 bits (or bytes) are different items.
  std::string long_a(64, 'f'), long_b(64, 'f');
  long_b.back() = 'e';
  auto x = *HashTokenBlocks(tokens, bs, 0, Keys(bs, 16, {{long_a, 4, 4}}));
  auto y = *HashTokenBlocks(tokens, bs, 0, Keys(bs, 16, {{long_b, 4, 4}}));
  EXPECT_NE(x[1].sequence_hash, y[1].sequence_hash);
  // Two items in one block are both keyed, in position order whatever order they come in.
  auto both = *HashTokenBlocks(tokens, bs, 0, Keys(bs, 16, {{"p", 4, 1}, {"q", 6, 1}}));
  auto swapped = *HashTokenBlocks(tokens, bs, 0, Keys(bs, 16, {{"q", 6, 1}, {"p", 4, 1}}));
  auto other = *HashTokenBlocks(tokens, bs, 0, Keys(bs, 16, {{"p", 4, 1}, {"r", 6, 1}}));
  EXPECT_EQ(both[1].sequence_hash, swapped[1].sequence_hash);
  EXPECT_NE(both[1].sequence_hash, other[1].sequence_hash);
}

TEST(ExtraKeys, MultimodalKeysNameTheItemsOverlappingEachBlock) {
  auto k = Keys(4, 32, {{"b", 20, 2}, {"a", 2, 9}});
  auto k0 = k.MultimodalKeys(0);
  ASSERT_EQ(k0.size(), 1u);
  EXPECT_EQ(k0[0].first, "a");
  EXPECT_EQ(k0[0].second, 2);
  auto k2 = k.MultimodalKeys(2);  // [8, 12): a continues from position 2
  ASSERT_EQ(k2.size(), 1u);
  EXPECT_EQ(k2[0].second, -6);
  EXPECT_TRUE(k.MultimodalKeys(3).empty());  // [12, 16): nothing
  EXPECT_EQ(k.MultimodalKeys(5).size(), 1u);  // [20, 24): b
  EXPECT_FALSE(k.Digest(3).has_value());
  EXPECT_TRUE(k.Digest(5).has_value());
}

TEST(ExtraKeys, BadItemsAreRejectedByName) {
  auto empty_id = BlockExtraKeys::Make(4, 16, {{"", 0, 4}});
  ASSERT_FALSE(empty_id.has_value());
  EXPECT_NE(empty_id.error().message().find("no identifier"), std::string::npos);
  auto past = BlockExtraKeys::Make(4, 16, {{"img", 10, 8}});
  ASSERT_FALSE(past.has_value());
  EXPECT_NE(past.error().message().find("'img'"), std::string::npos);
  EXPECT_FALSE(BlockExtraKeys::Make(4, 16, {{"img", 3, 0}}).has_value());
  EXPECT_FALSE(BlockExtraKeys::Make(4, 16, {}, std::vector<EmbedsDigest>(5)).has_value());
  EXPECT_FALSE(BlockExtraKeys::Make(0, 16, {}).has_value());
}

TEST(ExtraKeys, EmbeddingSlicesKeyTheirBlocks) {
  const uint32_t bs = 4;
  const size_t rows = 12, row_bytes = 8;
  std::vector<uint8_t> a(rows * row_bytes), b;
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<uint8_t>(i * 31 + 7);
  b = a;
  b[5 * row_bytes + 3] ^= 1;  // one bit of row 5 (block 1)
  auto da = *HashEmbedsBlocks(a, row_bytes, bs);
  auto db = *HashEmbedsBlocks(b, row_bytes, bs);
  ASSERT_EQ(da.size(), 3u);
  EXPECT_EQ(da[0], db[0]);
  EXPECT_NE(da[1], db[1]);
  EXPECT_EQ(da[2], db[2]);
  std::vector<Token> zeros(rows, 0);  // vLLM gives an embeddings prompt all-zero token ids
  auto ha = *HashTokenBlocks(zeros, bs, 0, Keys(bs, rows, {}, da));
  auto hb = *HashTokenBlocks(zeros, bs, 0, Keys(bs, rows, {}, db));
  auto plain = *HashTokenBlocks(zeros, bs, 0);
  EXPECT_EQ(ha[0].sequence_hash, hb[0].sequence_hash);
  EXPECT_NE(ha[0].sequence_hash, plain[0].sequence_hash);
  EXPECT_NE(ha[1].sequence_hash, hb[1].sequence_hash);
  EXPECT_NE(ha[2].sequence_hash, hb[2].sequence_hash);  // the chain carries it on
  // The mask of which positions are token ids enters the digest.
  std::vector<uint8_t> mask(rows, 0), mask2(rows, 0);
  mask2[1] = 1;
  EXPECT_NE((*HashEmbedsBlocks(a, row_bytes, bs, mask))[0], (*HashEmbedsBlocks(a, row_bytes, bs, mask2))[0]);
  EXPECT_FALSE(HashEmbedsBlocks(a, row_bytes, bs, std::vector<uint8_t>(3)).has_value());
  EXPECT_FALSE(HashEmbedsBlocks(std::span<const uint8_t>(a.data(), 9), row_bytes, bs).has_value());
}

TEST(ExtraKeys, GrowingSequenceMatchesBatchHashing) {
  const uint32_t bs = 4;
  std::vector<Token> tokens = Placeholders(30);
  auto k = Keys(bs, 30, {{"img", 5, 12}});
  TokenBlockSequence seq(bs, 99, k);
  for (Token t : tokens) seq.Append(t);
  seq.Extend(std::vector<Token>{1, 2, 3, 4, 5, 6});  // decode past the prompt
  std::vector<Token> all = tokens;
  all.insert(all.end(), {1, 2, 3, 4, 5, 6});
  auto batch = *HashTokenBlocks(all, bs, 99, k);
  ASSERT_EQ(seq.blocks().size(), batch.size());
  for (size_t i = 0; i < batch.size(); ++i) EXPECT_EQ(seq.blocks()[i].sequence_hash, batch[i].sequence_hash) << i;
  EXPECT_THROW(TokenBlockSequence(8, 0, k), ConfigError);
}

}  // namespace
}  // namespace kvbm
