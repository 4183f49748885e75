#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <numeric>
#include <vector>

#include "kvbm/page_store.h"

namespace kvbm {
namespace {

constexpr uint64_t kBlock = 4 * 1024;  // 4 segments of 1 KiB

KvbmConfig Sized(uint64_t host, uint64_t disk) {
  KvbmConfig c;
  c.cpu_cache_num_blocks = host;
  c.disk_cache_num_blocks = disk;
  c.disk_cache_dir = std::filesystem::temp_directory_path().string();
  c.disk_disable_o_direct = true;  // tmpfs in some sandboxes
  return c;
}

std::vector<uint8_t> Pattern(uint8_t seed) {
  std::vector<uint8_t> v(kBlock);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<uint8_t>(seed * 31 + i * 7);
  return v;
}

std::vector<uint64_t> Segments(std::vector<uint8_t>& block) {
  // Reversed segment order: the store must keep them in the order given, not address order.
  return {reinterpret_cast<uint64_t>(block.data() + 3 * 1024), reinterpret_cast<uint64_t>(block.data() + 2 * 1024),
          reinterpret_cast<uint64_t>(block.data() + 1024), reinterpret_cast<uint64_t>(block.data())};
}

TEST(PageStore, RoundTripsThroughHostAndDiskAndCountsPrefixes) {
  auto s = PageStore::Create(Sized(2, 4), kBlock, "fmt");
  ASSERT_TRUE(s.has_value()) << s.error().ToString();
  PageStore& store = **s;
  std::vector<std::vector<uint8_t>> blocks;
  for (uint8_t i = 0; i < 5; ++i) blocks.push_back(Pattern(i));
  for (uint64_t k = 0; k < 5; ++k) {
    auto seg = Segments(blocks[k]);
    uint64_t key = 100 + k;
    auto ok = store.Put({&key, 1}, seg, 1024);
    ASSERT_TRUE(ok.has_value());
    EXPECT_TRUE((*ok)[0]);
  }
  EXPECT_EQ(store.stats().host_to_disk, 3u);  // 2 host slots: three went down to G3
  std::vector<uint64_t> keys = {100, 101, 102, 103, 104, 999, 100};
  EXPECT_EQ(store.PrefixHits(keys), 5u);
  for (uint64_t k = 0; k < 5; ++k) {
    std::vector<uint8_t> out(kBlock, 0);
    auto seg = Segments(out);
    uint64_t key = 100 + k;
    auto ok = store.Get({&key, 1}, seg, 1024);
    ASSERT_TRUE(ok.has_value());
    ASSERT_TRUE((*ok)[0]) << "key " << key;
    EXPECT_EQ(out, blocks[k]) << "key " << key;
  }
  EXPECT_EQ(store.stats().disk_hits, 3u);
  uint64_t missing = 7;
  std::vector<uint8_t> out(kBlock, 0);
  auto seg = Segments(out);
  auto miss = store.Get({&missing, 1}, seg, 1024);
  ASSERT_TRUE(miss.has_value());
  EXPECT_FALSE((*miss)[0]);
}

TEST(PageStore, FullTiersDropTheLeastRecentAndSizesAreChecked) {
  auto s = PageStore::Create(Sized(1, 1), kBlock, "fmt");
  ASSERT_TRUE(s.has_value());
  PageStore& store = **s;
  auto b = Pattern(1);
  auto seg = Segments(b);
  for (uint64_t key = 1; key <= 3; ++key) ASSERT_TRUE(store.Put({&key, 1}, seg, 1024).has_value());
  EXPECT_FALSE(store.Contains(1));  // host 3, disk 2, key 1 dropped
  EXPECT_TRUE(store.Contains(2));
  EXPECT_TRUE(store.Contains(3));
  EXPECT_EQ(store.stats().dropped, 1u);
  uint64_t key = 9;
  auto bad = store.Put({&key, 1}, seg, 512);  // 4 x 512 != 4096
  ASSERT_FALSE(bad.has_value());
  EXPECT_EQ(bad.error().code(), ErrorCode::kInvalidArgument);
  EXPECT_THROW(PageStore::Create(Sized(0, 0), kBlock, "fmt"), ConfigError);
}

}  // namespace
}  // namespace kvbm
