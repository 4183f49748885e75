// PageConnector: pages by the engine's own key, on the tier chain (real pools, real G2 memory,
// a real G3 file).
#include "kvbm/page_connector.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include "kvbm/tier_chain.h"

namespace kvbm {
namespace {

// 2 layers x K|V x 4 tokens x 64 elements x 2 bytes: 4 chunks of 512 bytes, 2 KiB a page.
constexpr uint64_t kChunk = 512;
constexpr uint64_t kPage = 4 * kChunk;

KvbmConfig Sized(std::optional<uint64_t> host, std::optional<uint64_t> disk) {
  KvbmConfig c;
  c.cpu_cache_num_blocks = host;
  c.disk_cache_num_blocks = disk;
  c.disk_cache_dir = std::filesystem::temp_directory_path().string();
  c.disk_disable_o_direct = true;  // tmpfs in some sandboxes
  return c;
}

PageConnectorOptions Options() {
  PageConnectorOptions o;
  o.page.num_layers = 2;
  o.page.outer_dim = 2;
  o.page.page_size = 4;
  o.page.inner_dim = 64;
  o.page.dtype_bytes = 2;
  o.element_order = "token,head,dim";
  return o;
}

std::unique_ptr<PageConnector> Make(const KvbmConfig& config, PageConnectorOptions o = Options()) {
  auto c = PageConnector::Create(config, std::move(o));
  EXPECT_TRUE(c.has_value()) << c.error().ToString();
  return c ? std::move(*c) : nullptr;
}

// Pages as the engine holds them: page i's 4 chunks, stored in REVERSED order in memory, so a
// connector that copied by address order instead of segment order would scramble them.
struct Pages {
  explicit Pages(size_t n, uint8_t seed) : bytes(n * kPage) {
    for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(seed * 31 + i * 7 + i / 251);
  }
  std::vector<uint64_t> Segments(size_t first, size_t count) {
    std::vector<uint64_t> a;
    for (size_t p = first; p < first + count; ++p)
      for (size_t s = 0; s < 4; ++s) a.push_back(reinterpret_cast<uint64_t>(bytes.data() + p * kPage + (3 - s) * kChunk));
    return a;
  }
  std::vector<uint8_t> Page(size_t p) const {
    return {bytes.begin() + static_cast<long>(p * kPage), bytes.begin() + static_cast<long>((p + 1) * kPage)};
  }
  std::vector<uint8_t> bytes;
};

std::vector<std::string> Keys(std::initializer_list<const char*> names) { return {names.begin(), names.end()}; }

std::vector<bool> Put(PageConnector& c, const std::vector<std::string>& keys, Pages& pages, size_t first = 0) {
  auto a = pages.Segments(first, keys.size());
  auto r = c.Put(keys, a, kChunk);
  EXPECT_TRUE(r.has_value()) << r.error().ToString();
  return r ? *r : std::vector<bool>{};
}

std::vector<bool> Get(PageConnector& c, const std::vector<std::string>& keys, Pages& into, size_t first = 0) {
  auto a = into.Segments(first, keys.size());
  auto r = c.Get(keys, a, kChunk);
  EXPECT_TRUE(r.has_value()) << r.error().ToString();
  return r ? *r : std::vector<bool>{};
}

TEST(PageConnector, PagesGoThroughTheChainWriteThroughAndComeBackExact) {
  KvbmConfig config = Sized(2, 8);
  config.disable_disk_offload_filter = true;  // every stored page is also written to G3
  auto c = Make(config);
  ASSERT_TRUE(c);
  EXPECT_EQ(c->chunk_pages(), 2u);  // a step holds at most G2's blocks
  Pages src(5, 1), dst(5, 2);
  auto keys = Keys({"a", "b", "c", "d", "e"});
  EXPECT_EQ(Put(*c, keys, src), std::vector<bool>(5, true));
  TierChainStats s = c->chain_stats();
  EXPECT_EQ(s.store_host_blocks, 5u);
  EXPECT_EQ(s.offload_disk_blocks, 5u);
  EXPECT_EQ(c->pool_stats(TierId::kHost).registered, 2u);  // the last two; the rest left G2 by policy
  EXPECT_EQ(c->pool_stats(TierId::kDisk).registered, 5u);
  EXPECT_EQ(c->metrics()->blocks[static_cast<size_t>(TransferPath::kD2H)].load(), 5u);
  EXPECT_EQ(c->metrics()->blocks[static_cast<size_t>(TransferPath::kH2D_Disk)].load(), 5u);
  EXPECT_EQ(c->PrefixHits(Keys({"a", "b", "zz", "c"})), 2u);
  EXPECT_EQ(Get(*c, keys, dst), std::vector<bool>(5, true));
  for (size_t p = 0; p < 5; ++p) EXPECT_EQ(dst.Page(p), src.Page(p)) << "page " << p;
  s = c->chain_stats();
  EXPECT_EQ(s.onboard_host_blocks, 2u);
  EXPECT_EQ(s.onboard_disk_blocks, 3u);
  EXPECT_EQ(c->metrics()->matched_tokens.load(), 5u * 4);
  // A key held nowhere is a miss and its segments are left alone.
  Pages untouched(1, 9);
  const auto before = untouched.Page(0);
  EXPECT_EQ(Get(*c, Keys({"nope"}), untouched), std::vector<bool>{false});
  EXPECT_EQ(untouched.Page(0), before);
  EXPECT_EQ(c->stats().get_missing, 1u);
}

TEST(PageConnector, TheAdmissionFilterSendsAPageToDiskOnItsSecondSight) {
  auto c = Make(Sized(4, 8));
  ASSERT_TRUE(c);
  Pages src(3, 3);
  auto keys = Keys({"a", "b", "c"});
  EXPECT_EQ(Put(*c, keys, src), std::vector<bool>(3, true));
  EXPECT_EQ(c->chain_stats().offload_disk_blocks, 0u);
  EXPECT_EQ(c->chain_stats().dropped_filter, 3u);
  EXPECT_EQ(Put(*c, keys, src), std::vector<bool>(3, true));  // held: not written to G2 again
  EXPECT_EQ(c->chain_stats().skipped_cached_blocks, 3u);
  EXPECT_EQ(c->chain_stats().offload_disk_blocks, 3u);
  EXPECT_EQ(c->pool_stats(TierId::kDisk).registered, 3u);
}

// The victim of a full G2 is the configured policy's. One sequence of puts and gets on a G2 of
// 3 pages, through the connector, and the same sequence on a bare pool of that policy (the
// reference): the connector keeps exactly what the pool keeps. Under lru the victim is the
// least recently used page; the other policies decide as their evictors do (eviction.h).
struct Op {
  bool put;
  const char* key;
};
const std::vector<Op> kSequence = {{true, "a"}, {false, "a"}, {true, "b"}, {false, "a"},
                                   {true, "c"}, {true, "d"}, {true, "e"}};

std::vector<std::string> HeldByConnector(EvictionPolicy policy) {
  KvbmConfig config = Sized(3, std::nullopt);
  config.host_eviction_policy = std::string(EvictionPolicyName(policy));
  auto c = Make(config);
  if (!c) return {};
  Pages src(1, 4), dst(1, 0);
  for (const Op& op : kSequence) {
    if (op.put) EXPECT_EQ(Put(*c, {op.key}, src), std::vector<bool>{true});
    else EXPECT_EQ(Get(*c, {op.key}, dst), std::vector<bool>{true});
  }
  std::vector<std::string> held;
  for (const char* k : {"a", "b", "c", "d", "e"})
    if (c->Contains(k)) held.push_back(k);
  return held;
}

std::vector<std::string> HeldByReferencePool(EvictionPolicy policy) {
  auto pool = BlockPool::Create(TierId::kHost, 3, policy);
  for (const Op& op : kSequence) {
    BlockKey k = PageKey(op.key);
    // Each handle is released at once, as the connector's are when its step ends.
    if (op.put) {
      StoreRunResult stored = pool->StoreRun(std::span<const BlockKey>(&k, 1), 0);
      EXPECT_EQ(stored.run.size(), 1u);
    } else {
      BlockRun hit = pool->MatchPrefix(std::span<const BlockKey>(&k, 1));
      EXPECT_EQ(hit.size(), 1u);
    }
  }
  std::vector<std::string> held;
  for (const char* name : {"a", "b", "c", "d", "e"})
    if (pool->Contains(PageKey(name))) held.push_back(name);
  return held;
}

TEST(PageConnector, EvictionFollowsTheConfiguredPolicy) {
  // lru: a was used last before c, so b then a go for d and e.
  EXPECT_EQ(HeldByConnector(EvictionPolicy::kLru), Keys({"c", "d", "e"}));
  for (EvictionPolicy p : {EvictionPolicy::kLru, EvictionPolicy::kLeafFirst, EvictionPolicy::kReuse})
    EXPECT_EQ(HeldByConnector(p), HeldByReferencePool(p)) << EvictionPolicyName(p);
}

TEST(PageConnector, ACorruptDiskPageIsAMissNeverServedAndInvalidated) {
  auto c = Make(Sized(std::nullopt, 4));  // G3 only: pages go G1 -> G3
  ASSERT_TRUE(c);
  Pages src(2, 5), dst(2, 6);
  auto keys = Keys({"a", "b"});
  EXPECT_EQ(Put(*c, keys, src), std::vector<bool>(2, true));
  EXPECT_EQ(c->chain_stats().store_disk_blocks, 2u);
  // Behind kvbm's back: every byte of the G3 file.
  const int fd = c->disk_fd();
  ASSERT_GE(fd, 0);
  const off_t size = lseek(fd, 0, SEEK_END);
  std::vector<uint8_t> junk(static_cast<size_t>(size), 0x5A);
  ASSERT_EQ(pwrite(fd, junk.data(), junk.size(), 0), size);
  const auto before = dst.Page(0);
  EXPECT_EQ(Get(*c, keys, dst), std::vector<bool>(2, false));
  EXPECT_EQ(dst.Page(0), before);  // nothing scattered
  EXPECT_EQ(c->chain_stats().load_errors, 2u);
  EXPECT_EQ(c->metrics()->corrupt_blocks.load(), 2u);
  EXPECT_EQ(c->stats().get_failed, 2u);
  EXPECT_FALSE(c->Contains("a"));  // invalidated: a miss from now on
  EXPECT_EQ(c->PrefixHits(keys), 0u);
  EXPECT_EQ(Put(*c, keys, src), std::vector<bool>(2, true));  // stored again, readable again
  EXPECT_EQ(Get(*c, keys, dst), std::vector<bool>(2, true));
  EXPECT_EQ(dst.Page(1), src.Page(1));
}

TEST(PageConnector, TwoKeysCollidingOn64BitsAreDifferentPages) {
  PageConnectorOptions o = Options();
  // x and y share a sequence hash; their 128-bit identities differ.
  o.key_of = [](std::string_view key) {
    BlockKey k = PageKey(key);
    if (key == "x" || key == "y") {
      k.sequence_hash = SequenceHash(42);
      k.block_hash = key == "x" ? 1 : 2;
    }
    return k;
  };
  auto c = Make(Sized(4, 4), std::move(o));
  ASSERT_TRUE(c);
  Pages src(2, 7), dst(1, 8);
  EXPECT_EQ(Put(*c, Keys({"x"}), src, 0), std::vector<bool>{true});
  EXPECT_FALSE(c->Contains("y"));
  const auto before = dst.Page(0);
  EXPECT_EQ(Get(*c, Keys({"y"}), dst), std::vector<bool>{false});
  EXPECT_EQ(dst.Page(0), before);
  EXPECT_EQ(Put(*c, Keys({"y"}), src, 1), std::vector<bool>{false});  // refused while x is held
  EXPECT_EQ(c->stats().put_refused, 1u);
  EXPECT_EQ(Get(*c, Keys({"x"}), dst), std::vector<bool>{true});
  EXPECT_EQ(dst.Page(0), src.Page(0));
}

TEST(PageConnector, BatchesLargerThanG2RunInSteps) {
  KvbmConfig config = Sized(3, 16);
  config.disable_disk_offload_filter = true;
  auto c = Make(config);
  ASSERT_TRUE(c);
  Pages src(10, 10), dst(10, 11);
  std::vector<std::string> keys;
  for (int i = 0; i < 10; ++i) keys.push_back("k" + std::to_string(i));
  EXPECT_EQ(Put(*c, keys, src), std::vector<bool>(10, true));
  EXPECT_EQ(Get(*c, keys, dst), std::vector<bool>(10, true));
  for (size_t p = 0; p < 10; ++p) EXPECT_EQ(dst.Page(p), src.Page(p)) << "page " << p;
}

TEST(PageConnector, PromotionCopiesDiskHitsUpWhenConfigured) {
  KvbmConfig config = Sized(2, 8);
  config.disable_disk_offload_filter = true;
  config.promote_disk_hits = true;
  auto c = Make(config);
  ASSERT_TRUE(c);
  Pages src(4, 12), dst(4, 13);
  auto keys = Keys({"a", "b", "c", "d"});
  Put(*c, keys, src);  // a, b left G2 for c, d
  EXPECT_EQ(Get(*c, Keys({"a"}), dst), std::vector<bool>{true});
  EXPECT_EQ(c->chain_stats().promote_host_blocks, 1u);
  EXPECT_EQ(c->chain_stats().onboard_disk_blocks, 1u);
  EXPECT_EQ(Get(*c, Keys({"a"}), dst), std::vector<bool>{true});
  EXPECT_EQ(c->chain_stats().onboard_host_blocks, 1u);  // the promoted copy served it
  EXPECT_EQ(dst.Page(0), src.Page(0));
}

TEST(PageConnector, BadCallsNameTheProblemAndClearDropsEverything) {
  auto c = Make(Sized(2, 2));
  ASSERT_TRUE(c);
  Pages src(1, 14);
  auto a = src.Segments(0, 1);
  auto bad = c->Put(Keys({"a", "b"}), a, kChunk);  // 4 segments cannot make 2 pages
  ASSERT_FALSE(bad.has_value());
  EXPECT_EQ(bad.error().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(bad.error().message().find("do not make pages"), std::string::npos);
  EXPECT_FALSE(c->Get(Keys({"a"}), a, kChunk / 2).has_value());
  EXPECT_THROW(PageConnector::Create(Sized(std::nullopt, std::nullopt), Options()), ConfigError);
  PageConnectorOptions zero = Options();
  zero.page.inner_dim = 0;
  EXPECT_THROW(PageConnector::Create(Sized(2, 2), zero), ConfigError);
  Put(*c, Keys({"a"}), src);
  ASSERT_TRUE(c->Contains("a"));
  ASSERT_TRUE(c->Clear().has_value());
  EXPECT_FALSE(c->Contains("a"));
  EXPECT_EQ(Put(*c, Keys({"a"}), src), std::vector<bool>{true});
}

}  // namespace
}  // namespace kvbm
