// The G4 value format: every way a value can fail to verify is rejected, also after a trip
// through a real Redis Cluster where another writer or a corruption changed it.
#include "kvbm/remote_block.h"

#include <gtest/gtest.h>

#include <random>

#include "kvbm/redis_cluster.h"
#include "memory/redis_cluster_testing.h"

namespace kvbm {
namespace {

std::vector<uint8_t> Bytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

void ExpectRejected(const Result<std::span<const uint8_t>>& r, std::string_view reason) {
  ASSERT_FALSE(r) << "accepted a value that should fail with: " << reason;
  EXPECT_EQ(r.error().code(), ErrorCode::kCorrupt);
  EXPECT_NE(r.error().message().find(fmt::format("remote block rejected ({})", reason)),
            std::string::npos)
      << r.error().message();
}

constexpr uint64_t kHash = 0x1234'5678'9abc'def0ull;

TEST(RemoteBlock, KeyAndFingerprint) {
  const uint64_t fp = RemoteLayoutFingerprint("model=llama;layers=32;dtype=bf16;tp=0/2");
  EXPECT_EQ(fp, RemoteLayoutFingerprint("model=llama;layers=32;dtype=bf16;tp=0/2"));
  EXPECT_NE(fp, RemoteLayoutFingerprint("model=llama;layers=32;dtype=bf16;tp=1/2"));
  EXPECT_EQ(RemoteBlockKey("kvbm", 0xab, kHash), "kvbm:00000000000000ab:123456789abcdef0");
  EXPECT_TRUE(ValidateRemoteNamespace("kvbm-prod.v1"));
  for (const char* bad : {"", "a b", "a{b}", "a\nb"}) {
    auto st = ValidateRemoteNamespace(bad);
    ASSERT_FALSE(st) << bad;
    EXPECT_EQ(st.error().code(), ErrorCode::kInvalidArgument);
  }
  EXPECT_FALSE(ValidateRemoteNamespace(std::string(129, 'n')));
}

TEST(RemoteBlock, RoundTripAndEveryRejection) {
  const auto bytes = Bytes(8192, 1);
  const uint64_t fp = RemoteLayoutFingerprint("a");
  const std::string value = EncodeRemoteBlock(fp, kHash, bytes);
  ASSERT_EQ(value.size(), kRemoteBlockHeaderBytes + bytes.size());
  auto ok = DecodeRemoteBlock(value, fp, kHash, bytes.size());
  ASSERT_TRUE(ok) << ok.error().ToString();
  EXPECT_TRUE(std::equal(ok->begin(), ok->end(), bytes.begin(), bytes.end()));

  ExpectRejected(DecodeRemoteBlock(value, RemoteLayoutFingerprint("b"), kHash, bytes.size()),
                 "other fingerprint");
  ExpectRejected(DecodeRemoteBlock(value, fp, kHash + 1, bytes.size()), "other sequence hash");
  ExpectRejected(DecodeRemoteBlock(value, fp, kHash, bytes.size() + 1), "other length");
  ExpectRejected(DecodeRemoteBlock(value.substr(0, value.size() - 1), fp, kHash, bytes.size()),
                 "truncated");
  ExpectRejected(DecodeRemoteBlock(value.substr(0, 10), fp, kHash, bytes.size()), "truncated");
  ExpectRejected(DecodeRemoteBlock("", fp, kHash, bytes.size()), "truncated");
  ExpectRejected(DecodeRemoteBlock(value + "x", fp, kHash, bytes.size()), "trailing bytes");
  // Every single flipped bit of the block's bytes (a sample of positions) fails the checksum.
  for (size_t pos = 0; pos < bytes.size(); pos += 97) {
    std::string bad = value;
    bad[kRemoteBlockHeaderBytes + pos] ^= 0x10;
    ExpectRejected(DecodeRemoteBlock(bad, fp, kHash, bytes.size()), "checksum mismatch");
  }
  std::string bad_magic = value;
  bad_magic[0] ^= 1;
  ExpectRejected(DecodeRemoteBlock(bad_magic, fp, kHash, bytes.size()), "bad magic");
  std::string bad_version = value;
  bad_version[4] = 2;
  ExpectRejected(DecodeRemoteBlock(bad_version, fp, kHash, bytes.size()), "unsupported version");
  std::string bad_checksum = value;
  bad_checksum[32] ^= 1;
  ExpectRejected(DecodeRemoteBlock(bad_checksum, fp, kHash, bytes.size()), "checksum mismatch");

  // An empty block still frames and verifies.
  const std::string empty = EncodeRemoteBlock(fp, kHash, {});
  auto e = DecodeRemoteBlock(empty, fp, kHash, 0);
  ASSERT_TRUE(e);
  EXPECT_TRUE(e->empty());
}

TEST(RemoteBlock, ValuesChangedInsideARealClusterAreRejected) {
  testing::ClusterProcess cluster;
  ASSERT_TRUE(cluster.ok()) << cluster.error();
  RedisClusterOptions o;
  o.seeds = *ParseRedisSeeds(cluster.SeedUrl());
  auto client = RedisCluster::Connect(o);
  ASSERT_TRUE(client) << client.error().ToString();

  const uint64_t ours = RemoteLayoutFingerprint("model=a;tp=0/1"),
                 theirs = RemoteLayoutFingerprint("model=b;tp=0/1");
  constexpr size_t kBlock = 64 * 1024;
  std::vector<std::string> keys;
  std::vector<std::vector<uint8_t>> blocks;
  std::vector<std::string> values;
  for (uint64_t h = 0; h < 8; ++h) {
    keys.push_back(RemoteBlockKey("kvbm-test", ours, kHash + h));
    blocks.push_back(Bytes(kBlock, h));
    values.push_back(EncodeRemoteBlock(ours, kHash + h, blocks.back()));
  }
  // Block 1 written by an engine of another model under our key; block 2 truncated (a torn
  // writer); block 3 corrupted in place inside Redis afterwards.
  values[1] = EncodeRemoteBlock(theirs, kHash + 1, blocks[1]);
  values[2].resize(values[2].size() / 2);
  std::vector<std::pair<std::string, std::string_view>> items;
  for (size_t i = 0; i < keys.size(); ++i) items.emplace_back(keys[i], values[i]);
  ASSERT_TRUE((*client)->Set(items));
  const int port = (*client)->MasterOf(RedisKeySlot(keys[3]))->port;
  auto r =
      cluster.Cli(port, fmt::format("setrange '{}' {} Z", keys[3], kRemoteBlockHeaderBytes + 1000));
  ASSERT_EQ(r.rc, 0) << r.out;

  auto got = (*client)->Get(keys);
  ASSERT_TRUE(got) << got.error().ToString();
  for (size_t i = 0; i < keys.size(); ++i) {
    ASSERT_TRUE((*got)[i].has_value());
    auto decoded = DecodeRemoteBlock(*(*got)[i], ours, kHash + i, kBlock);
    if (i == 1)
      ExpectRejected(decoded, "other fingerprint");
    else if (i == 2)
      ExpectRejected(decoded, "truncated");
    else if (i == 3)
      ExpectRejected(decoded, "checksum mismatch");
    else {
      ASSERT_TRUE(decoded) << decoded.error().ToString();
      EXPECT_TRUE(std::equal(decoded->begin(), decoded->end(), blocks[i].begin(), blocks[i].end()));
    }
  }
}

}  // namespace
}  // namespace kvbm
