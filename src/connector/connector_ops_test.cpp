#include <gtest/gtest.h>

#include <random>

#include "kvbm/connector_ops.h"

namespace kvbm {
namespace {

StepMetadata Sample() {
  StepMetadata m;
  m.step = 7;
  m.host_blocks = 100;
  m.disk_blocks = 1000;
  m.ops.push_back({1, OpKind::kLoadHost, "req-1", {{3, 4, 0xDEADBEEFCAFEull}, {kNoBlock, 5, 9}}});
  BlockOp first{1, 2, 3};
  first.has_lineage = true;
  first.block_hash = 3;
  BlockOp second{4, 5, 0x1234567890ull};
  second.has_lineage = true;
  second.block_hash = 77;
  second.parent = 3;
  second.position = 1;
  m.ops.push_back({2, OpKind::kOffloadDisk, "", {first, second}});
  m.finished_while_loading = {"req-9"};
  return m;
}

TEST(ConnectorOps, RoundTrip) {
  StepMetadata m = Sample();
  std::string bytes = EncodeStepMetadata(m);
  auto back = DecodeStepMetadata(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
  ASSERT_TRUE(back.has_value()) << back.error().ToString();
  EXPECT_EQ(*back, m);
}

TEST(ConnectorOps, RejectsWrongVersionTruncatedAndGarbage) {
  std::string bytes = EncodeStepMetadata(Sample());
  auto span = [](const std::string& s) {
    return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size());
  };
  std::string wrong = bytes;
  wrong[1] = 9;  // the version is the first element of the root array (positive fixint)
  auto r = DecodeStepMetadata(span(wrong));
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().message().find("version"), std::string::npos);
  for (size_t n = 0; n < bytes.size(); ++n) EXPECT_FALSE(DecodeStepMetadata(span(bytes.substr(0, n))).has_value());
  std::mt19937 rng(1);
  for (int i = 0; i < 20000; ++i) {
    std::string mutated = bytes;
    int flips = 1 + rng() % 4;
    for (int f = 0; f < flips; ++f) mutated[rng() % mutated.size()] = static_cast<char>(rng());
    auto m = DecodeStepMetadata(span(mutated));  // must not crash; accepted ones re-encode
    if (m) {
      EXPECT_TRUE(DecodeStepMetadata(span(EncodeStepMetadata(*m))).has_value());
    }
  }
}

}  // namespace
}  // namespace kvbm
