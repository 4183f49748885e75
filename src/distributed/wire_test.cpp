#include "distributed/wire.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <random>

namespace kvbm::wire {
namespace {

std::vector<Message> Samples() {
  OpRequest gated;
  gated.gate = 42;
  gated.meta.host_blocks = 10;
  gated.meta.disk_blocks = 20;
  gated.meta.ops.push_back(
      TransferOp{7, OpKind::kStoreHost, "req-1", {{1, 2, 3}, {4, 5, 0xFFFFFFFFFFFFFFFFull}}});
  OpRequest load;
  load.meta.ops.push_back(TransferOp{8, OpKind::kLoadDisk, "", {}});
  return {Hello{3, 4, 1000, 1 << 20},
          Sizing{123, 456},
          Ready{1, false, "out of memory"},
          Heartbeat{2},
          Heartbeat{kLeaderRank},
          gated,
          load,
          OpResultMsg{1, 99, {0, 5, 7}},
          Shutdown{}};
}

std::span<const uint8_t> Bytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

TEST(DistributedWire, EveryMessageRoundTrips) {
  for (const Message& m : Samples()) {
    auto back = Decode(Bytes(Encode(m)));
    ASSERT_TRUE(back.has_value()) << back.error().ToString();
    EXPECT_EQ(*back, m);
  }
}

TEST(DistributedWire, RejectsWrongVersionTruncationTrailingBytesAndGarbage) {
  std::string hello = Encode(Hello{0, 1, 2, 3});
  // [fixarray, version, ...]: version is the positive fixint at byte 1.
  std::string wrong = hello;
  wrong[1] = static_cast<char>(kWireVersion + 1);
  auto r = Decode(Bytes(wrong));
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().message().find("wire version 2"), std::string::npos) << r.error().message();
  for (size_t n = 0; n < hello.size(); ++n)
    EXPECT_FALSE(Decode(Bytes(hello.substr(0, n))).has_value()) << n;
  EXPECT_FALSE(Decode(Bytes(hello + "x")).has_value());
  EXPECT_FALSE(Decode(Bytes(std::string("\xff\xfe garbage", 10))).has_value());
  // A 32-bit array header that claims 4G elements must be refused, not allocated.
  EXPECT_FALSE(Decode(Bytes(std::string("\xdd\xff\xff\xff\xff", 5))).has_value());
  // An op request whose inner metadata carries two ops.
  OpRequest two;
  two.meta.ops = {TransferOp{1, OpKind::kLoadHost, "", {}},
                  TransferOp{2, OpKind::kLoadHost, "", {}}};
  EXPECT_FALSE(Decode(Bytes(Encode(two))).has_value());
}

// Mutation fuzzing of the decoder, bounded in time (KVBM_FUZZ_SECONDS, default 20). Property:
// never crashes, and whatever it accepts re-encodes to an equal message.
TEST(DistributedWire, FuzzDecoderWithMutations) {
  double seconds = 20;
  if (const char* env = std::getenv("KVBM_FUZZ_SECONDS")) seconds = std::atof(env);
  std::vector<std::string> seeds;
  for (const Message& m : Samples()) seeds.push_back(Encode(m));
  std::mt19937_64 rng(std::random_device{}());
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  uint64_t runs = 0, accepted = 0;
  while (runs < 1000 || std::chrono::steady_clock::now() < deadline) {
    std::string s = seeds[rng() % seeds.size()];
    int mutations = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < mutations; ++k) {
      switch (rng() % 6) {
        case 0:
          if (!s.empty()) s[rng() % s.size()] ^= static_cast<char>(1u << (rng() % 8));
          break;
        case 1:
          if (!s.empty()) s[rng() % s.size()] = static_cast<char>(rng());
          break;
        case 2:
          s.resize(s.empty() ? 0 : rng() % s.size());
          break;
        case 3:
          s.insert(s.begin() + static_cast<long>(s.empty() ? 0 : rng() % s.size()),
                   static_cast<char>(rng()));
          break;
        case 4: {  // interesting msgpack headers (huge lengths, nil, ext)
          static const char kHeaders[] = {'\xdd', '\xdc', '\xc6', '\xdb', '\xc0',
                                          '\xc7', '\xcf', '\x90', '\xde'};
          if (!s.empty()) s[rng() % s.size()] = kHeaders[rng() % sizeof(kHeaders)];
          break;
        }
        case 5:
          s += seeds[rng() % seeds.size()].substr(0, rng() % 16);
          break;
      }
    }
    ++runs;
    auto m = Decode(Bytes(s));
    if (m) {
      ++accepted;
      auto again = Decode(Bytes(Encode(*m)));
      ASSERT_TRUE(again.has_value());
      ASSERT_EQ(*again, *m);
    }
  }
  RecordProperty("runs", static_cast<int>(runs));
  EXPECT_GT(runs, 1000u);
  EXPECT_GT(accepted,
            0u);  // the mutations keep some inputs valid, so the accept path is fuzzed too
}

}  // namespace
}  // namespace kvbm::wire
