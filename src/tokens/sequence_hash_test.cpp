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

}  // namespace
}  // namespace kvbm
