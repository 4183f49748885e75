#include <gtest/gtest.h>

#include <algorithm>

#include "kvbm/sim_engine.h"

namespace kvbm {
namespace {

KvbmConfig HostOnly(uint64_t blocks) {
  KvbmConfig c;
  c.cpu_cache_num_blocks = blocks;
  return c;
}

TEST(Worker, RejectsMalformedOutOfRangeAndMissizedSteps) {
  SimulatedEngine engine(HostOnly(8), SimEngineOptions{});
  KvbmWorker& w = engine.worker();
  std::vector<uint8_t> garbage = {0x93, 0x01, 0xff};
  auto s = w.BindStep(std::span<const uint8_t>(garbage));
  ASSERT_FALSE(s.has_value());
  EXPECT_EQ(s.error().code(), ErrorCode::kInvalidArgument);
  StepMetadata m;
  m.host_blocks = 8;
  m.ops.push_back({1, OpKind::kStoreHost, "", {{0, 8, 1}}});  // host slot 8 of 8
  s = w.BindStep(m);
  ASSERT_FALSE(s.has_value());
  EXPECT_NE(s.error().message().find("out of range"), std::string::npos);
  m.ops.clear();
  m.host_blocks = 9;  // the leader sized differently
  s = w.BindStep(m);
  ASSERT_FALSE(s.has_value());
  EXPECT_NE(s.error().message().find("sized"), std::string::npos);
  m.host_blocks = 8;
  m.ops.push_back({2, OpKind::kLoadDisk, "r", {{0, 0, 1}}});  // no disk tier
  EXPECT_FALSE(w.BindStep(m).has_value());
}

TEST(Worker, UnservableLoadIsALoadErrorAndTheRequestStillFinishes) {
  SimulatedEngine engine(HostOnly(8), SimEngineOptions{});
  KvbmWorker& w = engine.worker();
  StepMetadata m;
  m.host_blocks = 8;
  m.ops.push_back({1, OpKind::kLoadHost, "r", {{kNoBlock, 3, 1}, {0, 4, 2}}});
  ASSERT_TRUE(w.BindStep(m).has_value());
  w.WaitIdle();
  auto [sending, recving] = w.GetFinished();
  EXPECT_EQ(recving, std::vector<std::string>{"r"});
  // Slot 0 was never stored into: it holds no block, so it is an error too, never served.
  auto errors = w.TakeLoadErrors();
  std::sort(errors.begin(), errors.end());
  EXPECT_EQ(errors, (std::vector<uint32_t>{3, 4}));
}

TEST(Worker, FinishedWhileLoadingIsReportedAsSent) {
  SimulatedEngine engine(HostOnly(8), SimEngineOptions{});
  KvbmWorker& w = engine.worker();
  StepMetadata m;
  m.host_blocks = 8;
  m.finished_while_loading = {"gone"};  // no load in flight: reported at once
  ASSERT_TRUE(w.BindStep(m).has_value());
  auto [sending, recving] = w.GetFinished();
  EXPECT_EQ(sending, std::vector<std::string>{"gone"});
  EXPECT_TRUE(recving.empty());
}

}  // namespace
}  // namespace kvbm
