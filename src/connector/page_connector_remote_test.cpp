// G4 for pages by key, on a real Redis Cluster: two page connectors (two SGLang instances, each
// its own G2) share one cluster through the tier chain's G4; what one stored is a byte-exact
// hit for the other, and instances of another model share nothing.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "kvbm/page_connector.h"
#include "memory/redis_cluster_fixture.h"

namespace kvbm {
namespace {

using testing::SharedClusterTest;

constexpr uint64_t kPage = 2 * 2 * 4 * 64 * 2;  // layers x K|V x tokens x inner x bytes

class PageConnectorRemoteTest : public SharedClusterTest {
 protected:
  static std::unique_ptr<PageConnector> Make(const std::string& descriptor) {
    KvbmConfig c;
    c.cpu_cache_num_blocks = 8;
    c.remote_url = cluster_->SeedUrl();
    c.remote_timeout_ms = 2000;
    c.remote_match_budget_ms = 500;  // generous on a loaded machine
    c.remote_required = true;
    PageConnectorOptions o;
    o.page.num_layers = 2;
    o.page.outer_dim = 2;
    o.page.page_size = 4;
    o.page.inner_dim = 64;
    o.page.dtype_bytes = 2;
    o.element_order = "token,head,dim";
    o.remote_descriptor = descriptor;
    auto r = PageConnector::Create(c, std::move(o));
    EXPECT_TRUE(r.has_value()) << r.error().ToString();
    return r ? std::move(*r) : nullptr;
  }
};

// One contiguous segment per page.
std::vector<uint64_t> Addresses(std::vector<uint8_t>& bytes, size_t pages) {
  std::vector<uint64_t> a;
  for (size_t p = 0; p < pages; ++p) a.push_back(reinterpret_cast<uint64_t>(bytes.data() + p * kPage));
  return a;
}

TEST_F(PageConnectorRemoteTest, WhatOneInstanceStoredIsAByteExactHitForAnother) {
  auto a = Make("sglang model=m tp=0/1");
  auto b = Make("sglang model=m tp=0/1");
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(a->has_remote() && b->has_remote());
  std::vector<std::string> keys = {"k0", "k1", "k2"};
  std::vector<uint8_t> src(3 * kPage), dst(3 * kPage, 0);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint8_t>(i * 13 + i / 97);
  auto sa = Addresses(src, 3);
  auto put = a->Put(keys, sa, kPage);
  ASSERT_TRUE(put.has_value()) << put.error().ToString();
  EXPECT_EQ(*put, std::vector<bool>(3, true));
  EXPECT_EQ(a->chain_stats().offload_remote_blocks, 3u);  // DYN_KVBM_REMOTE_ADMISSION=store (default)
  // B's G2 is empty: every page is found in G4, fetched through B's G2, verified.
  EXPECT_EQ(b->PrefixHits(keys), 3u);
  EXPECT_TRUE(b->Contains("k1"));
  auto da = Addresses(dst, 3);
  auto got = b->Get(keys, da, kPage);
  ASSERT_TRUE(got.has_value()) << got.error().ToString();
  EXPECT_EQ(*got, std::vector<bool>(3, true));
  EXPECT_EQ(dst, src);
  EXPECT_EQ(b->chain_stats().onboard_remote_blocks, 3u);
  EXPECT_GE(b->metrics()->blocks[static_cast<size_t>(TransferPath::kRemote2H)].load(), 3u);
  // Fetched into B's G2: the next read is a G2 hit.
  ASSERT_TRUE(b->Get(keys, da, kPage).has_value());
  EXPECT_EQ(b->chain_stats().onboard_host_blocks, 3u);
}

TEST_F(PageConnectorRemoteTest, AnotherModelSharesNothing) {
  auto a = Make("sglang model=m tp=0/1");
  auto other = Make("sglang model=other tp=0/1");
  ASSERT_TRUE(a && other);
  std::vector<std::string> keys = {"k0"};
  std::vector<uint8_t> src(kPage, 7), dst(kPage, 0);
  auto sa = Addresses(src, 1), da = Addresses(dst, 1);
  ASSERT_TRUE(a->Put(keys, sa, kPage).has_value());
  EXPECT_EQ(other->PrefixHits(keys), 0u);
  auto got = other->Get(keys, da, kPage);
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(*got, std::vector<bool>{false});
  EXPECT_EQ(dst, std::vector<uint8_t>(kPage, 0));
}

}  // namespace
}  // namespace kvbm
