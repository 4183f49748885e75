// End to end: a simulated engine writes KV for many multi-turn requests; kvbm offloads through
// G2 to G3 under memory pressure, evicts, onboards again, and every loaded byte is compared.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <numeric>
#include <random>

#include "kvbm/sim_engine.h"
#include "kvbm/io_queue.h"

namespace kvbm {
namespace {

KvbmConfig Config(uint64_t host_blocks, uint64_t disk_blocks) {
  KvbmConfig c;
  c.cpu_cache_num_blocks = host_blocks;
  c.disk_cache_num_blocks = disk_blocks;
  c.disk_cache_dir = "/tmp/";
  c.disable_disk_offload_filter = true;
  return c;
}

// Conversations whose turns extend the previous turn's tokens.
std::vector<std::vector<Token>> Conversations(int conversations, int turns, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::vector<Token>> requests;
  std::vector<std::vector<Token>> history(conversations);
  for (int t = 0; t < turns; ++t)
    for (int c = 0; c < conversations; ++c) {
      size_t add = 40 + rng() % 60;
      for (size_t i = 0; i < add; ++i) history[c].push_back(rng() % 32000);
      requests.push_back(history[c]);
    }
  return requests;
}

TEST(SimEngine, MultiTurnOffloadEvictOnboardIsByteExact) {
  for (bool outer_first : {false, true}) {
    SimEngineOptions o;
    o.device_blocks = 64;
    o.outer_first = outer_first;
    SimulatedEngine engine(Config(80, 400), o);
    auto reqs = Conversations(8, 5, 7);
    uint64_t loaded = 0, host = 0, disk = 0;
    for (size_t i = 0; i < reqs.size(); ++i) {
      auto r = engine.RunRequest(std::to_string(i).insert(0, 1, 'r'), reqs[i]);  // g++ 12 -Wrestrict false positive on "r" + ...
      ASSERT_TRUE(r.has_value()) << r.error().ToString();
      EXPECT_EQ(r->mismatched_blocks, 0u);
      EXPECT_EQ(r->load_errors, 0u);
      EXPECT_LT(r->loaded_tokens, r->prompt_tokens);  // never the whole prompt
      loaded += r->loaded_tokens;
      host += r->host_blocks;
      disk += r->disk_blocks;
    }
    EXPECT_GT(host, 0u);
    EXPECT_GT(disk, 0u) << "G2 is too small to hold every conversation: later turns must come from G3";
    engine.worker().WaitIdle();
    auto hs = engine.leader().host_pool()->stats();
    EXPECT_GT(hs.evictions, 0u);
    // Each onboarded block moved exactly block_bytes.
    auto& m = *engine.worker().metrics();
    uint64_t bpb = engine.bytes_per_block();
    EXPECT_EQ(m.bytes[static_cast<size_t>(TransferPath::kH2Dev)], host * bpb);
    EXPECT_EQ(m.bytes[static_cast<size_t>(TransferPath::kDisk2Dev)], disk * bpb);
  }
}

TEST(SimEngine, DiskOnlyBypass) {
  SimEngineOptions o;
  SimulatedEngine engine(Config(0, 200), o);
  auto reqs = Conversations(3, 3, 11);
  uint64_t disk = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    auto r = engine.RunRequest(std::to_string(i).insert(0, 1, 'r'), reqs[i]);  // g++ 12 -Wrestrict false positive on "r" + ...
    ASSERT_TRUE(r.has_value()) << r.error().ToString();
    EXPECT_EQ(r->mismatched_blocks, 0u);
    disk += r->disk_blocks;
  }
  EXPECT_GT(disk, 0u);
  EXPECT_EQ(engine.leader().chain().stats().store_host_blocks, 0u);
  EXPECT_GT(engine.leader().chain().stats().store_disk_blocks, 0u);
}

TEST(SimEngine, OverwrittenDiskBlockIsDetectedNotServed) {
  SimEngineOptions o;
  SimulatedEngine engine(Config(0, 64), o);
  std::vector<Token> prompt(16 * 6);
  std::iota(prompt.begin(), prompt.end(), 1);
  ASSERT_TRUE(engine.RunRequest("a", prompt).has_value());
  engine.worker().WaitIdle();
  // Overwrite the first stored block behind kvbm's back.
  const TierMemory& disk = engine.worker().disk_memory();
  uint64_t stride = disk.layout->block_stride();
  std::vector<uint8_t> junk(stride, 0x5A);
  void* aligned = nullptr;
  ASSERT_EQ(posix_memalign(&aligned, 4096, stride), 0);
  std::memcpy(aligned, junk.data(), stride);
  // Block ids are handed out from the top of the free list: find the slot of block 0 by
  // corrupting every slot that holds data.
  for (uint64_t s = 0; s < disk.layout->dims().num_blocks; ++s)
    ASSERT_EQ(pwrite(disk.fd, aligned, stride, s * stride), static_cast<ssize_t>(stride));
  free(aligned);
  auto r = engine.RunRequest("b", prompt);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->mismatched_blocks, 0u);
  EXPECT_EQ(r->load_errors, r->disk_blocks);
  EXPECT_GT(r->load_errors, 0u);
  EXPECT_EQ(engine.leader().chain().stats().load_errors, r->load_errors);
  EXPECT_EQ(engine.worker().metrics()->corrupt_blocks.load(), r->load_errors);  // each failed its checksum
  // The bad blocks were dropped from G3 and "b" stored its recomputed blocks again: the next
  // identical request loads fresh, verified data.
  engine.worker().WaitIdle();
  auto c = engine.RunRequest("c", prompt);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->load_errors, 0u);
  EXPECT_EQ(c->mismatched_blocks, 0u);
  EXPECT_EQ(c->disk_blocks, r->disk_blocks);
}

TEST(SimEngine, InjectedIoErrorFailsExactlyTheAffectedBlocks) {
  SimEngineOptions o;
  SimulatedEngine engine(Config(0, 64), o);
  std::vector<Token> prompt(16 * 8);
  std::iota(prompt.begin(), prompt.end(), 100);
  ASSERT_TRUE(engine.RunRequest("a", prompt).has_value());
  engine.worker().WaitIdle();
  // Fail the slot that holds block 3 of the prompt.
  auto blocks = *HashTokenBlocks(prompt, 16, ComputeSaltHash(std::nullopt, std::nullopt));
  std::vector<BlockKey> key = {KeyOf(blocks[3])};
  auto held = engine.leader().disk_pool()->MatchPrefix(key);
  ASSERT_EQ(held.size(), 1u);
  uint64_t stride = engine.worker().disk_memory().layout->block_stride();
  engine.worker().transfer_engine().io_queue().InjectFailure(engine.worker().disk_memory().fd,
                                                             held.id(0).value() * stride, stride);
  held.Release();
  auto r = engine.RunRequest("b", prompt);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->load_errors, 1u);
  EXPECT_EQ(r->mismatched_blocks, 0u);
  engine.worker().transfer_engine().io_queue().ClearFailures();
}

}  // namespace
}  // namespace kvbm
