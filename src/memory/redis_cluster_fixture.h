// A GoogleTest fixture for tests that share one real Redis Cluster (redis_cluster_testing.h)
// per test suite: started before the suite's first test, stopped after its last, and flushed
// before every test so that no test sees another's keys. Tests only; loopback ports only.
#pragma once

#include <gtest/gtest.h>

#include "memory/redis_cluster_testing.h"

namespace kvbm::testing {

class SharedClusterTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    cluster_ = new ClusterProcess();
    ASSERT_TRUE(cluster_->ok()) << cluster_->error();
  }
  static void TearDownTestSuite() {
    delete cluster_;
    cluster_ = nullptr;
  }
  void SetUp() override {
    ASSERT_TRUE(cluster_ && cluster_->ok());
    FlushAll();
  }
  static void FlushAll() {
    for (int i = 0; i < ClusterProcess::kNodes; ++i) cluster_->Cli(cluster_->base_port() + i, "flushall");
  }

  // One cluster at a time: GoogleTest runs suites one after another, and each suite that
  // derives from this fixture starts and stops its own.
  static inline ClusterProcess* cluster_ = nullptr;
};

}  // namespace kvbm::testing
