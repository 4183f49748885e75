// Warm restart of G3 at the leader + worker level (DYN_KVBM_DISK_PERSISTENT): blocks stored to
// the disk tier by one engine are matched and loaded byte-exact by the next engine built with the
// same settings; a torn slot is dropped and counted; another model or layout restores nothing.
// Real files (O_DIRECT where the file system allows it), the real transfer path, the real pools;
// the engine is the simulated one (sim_engine.h), whose loads are checked byte for byte.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

#include "kvbm/block_pool.h"
#include "kvbm/sim_engine.h"
#include "kvbm/storage.h"

namespace kvbm {
namespace {

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/kvbm-warm-restart-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

constexpr uint32_t kPage = 16;
constexpr uint64_t kHostBlocks = 64, kDiskBlocks = 128;

SimEngineOptions Small(std::string descriptor = "model=tiny|kv_dtype=bfloat16|block=16") {
  SimEngineOptions o;
  o.num_layers = 2;
  o.page_size = kPage;
  o.inner_dim = 64;
  o.device_blocks = 32;
  o.remote_descriptor = std::move(descriptor);
  return o;
}

KvbmConfig Persistent(const std::string& dir, bool with_host = true) {
  KvbmConfig c;
  if (with_host) c.cpu_cache_num_blocks = kHostBlocks;
  c.disk_cache_num_blocks = kDiskBlocks;
  c.disk_cache_dir = dir;
  c.disk_persistent = true;
  c.disable_disk_offload_filter = true;  // every stored block goes on to G3 at once
  return c;
}

// The engine, or the same one with buffered I/O on a file system that refuses O_DIRECT.
std::unique_ptr<SimulatedEngine> Start(KvbmConfig config, const SimEngineOptions& options) {
  try {
    return std::make_unique<SimulatedEngine>(config, options);
  } catch (const ConfigError& e) {
    if (std::string(e.what()).find("O_DIRECT") == std::string::npos) throw;
    config.disk_disable_o_direct = true;
    return std::make_unique<SimulatedEngine>(config, options);
  }
}

std::vector<Token> Prompt(uint32_t seed, size_t blocks) {
  std::vector<Token> t(blocks * kPage + 3);  // a partial tail, never stored
  for (size_t i = 0; i < t.size(); ++i) t[i] = seed * 100'000 + static_cast<Token>(i);
  return t;
}

// Runs the prompts once (stores them to G2 and on to G3), then lets every write finish.
void Fill(SimulatedEngine& engine, const std::vector<std::vector<Token>>& prompts) {
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto out = engine.RunRequest("fill-" + std::to_string(i), prompts[i]);
    ASSERT_TRUE(out) << out.error().ToString();
    EXPECT_EQ(out->loaded_tokens, 0u) << "a fresh tier cannot hit";
  }
  engine.worker().WaitIdle();
}

TEST(WarmRestart, StoredBlocksMatchAndLoadByteExactAfterTheEngineIsRebuilt) {
  TempDir dir;
  const std::vector<std::vector<Token>> prompts = {Prompt(1, 6), Prompt(2, 4), Prompt(3, 9)};
  const uint64_t full_blocks = 6 + 4 + 9;
  {
    auto engine = Start(Persistent(dir.path()), Small());
    ASSERT_EQ(engine->leader().disk_pool()->stats().registered, 0u);
    ASSERT_NE(engine->worker().disk_recovery(), nullptr);
    EXPECT_TRUE(engine->worker().disk_recovery()->reset);  // a new file
    Fill(*engine, prompts);
    EXPECT_EQ(engine->leader().chain().stats().offload_disk_blocks, full_blocks);
  }
  // Everything is destroyed: pools, worker, files closed. The same settings again.
  auto engine = Start(Persistent(dir.path()), Small());
  const DiskRecovery* rec = engine->worker().disk_recovery();
  ASSERT_NE(rec, nullptr);
  EXPECT_FALSE(rec->reset) << rec->reset_reason;
  EXPECT_EQ(rec->blocks.size(), full_blocks);
  EXPECT_EQ(rec->torn + rec->corrupt + rec->other_layout + rec->duplicates, 0u);
  EXPECT_EQ(engine->leader().chain().stats().restored_disk_blocks, full_blocks);
  EXPECT_EQ(engine->leader().disk_pool()->stats().registered, full_blocks);
  EXPECT_EQ(engine->leader().host_pool()->stats().registered, 0u) << "G2 does not survive a restart";
  const auto& m = *engine->worker().metrics();  // the leader and the worker share it here
  EXPECT_EQ(m.disk_restored_blocks.load(), full_blocks);
  EXPECT_EQ(m.disk_recovery_blocks[static_cast<size_t>(DiskRecoveryResult::kVerified)].load(), full_blocks);

  for (size_t i = 0; i < prompts.size(); ++i) {
    auto out = engine->RunRequest("again-" + std::to_string(i), prompts[i]);
    ASSERT_TRUE(out) << out.error().ToString();
    const uint64_t blocks = prompts[i].size() / kPage;
    EXPECT_EQ(out->disk_blocks, blocks) << "prompt " << i << ": every full block is a G3 hit";
    EXPECT_EQ(out->loaded_tokens, blocks * kPage);
    EXPECT_EQ(out->load_errors, 0u);
    EXPECT_EQ(out->mismatched_blocks, 0u) << "a restored block was loaded with wrong bytes";
  }
  // A prefix the first engine never saw is not invented.
  auto fresh = engine->RunRequest("fresh", Prompt(9, 3));
  ASSERT_TRUE(fresh) << fresh.error().ToString();
  EXPECT_EQ(fresh->loaded_tokens, 0u);
}

TEST(WarmRestart, DiskOnlyStoresAreRestoredToo) {
  TempDir dir;
  const auto prompt = Prompt(4, 5);
  {
    auto engine = Start(Persistent(dir.path(), /*with_host=*/false), Small());
    Fill(*engine, {prompt});
    EXPECT_EQ(engine->leader().chain().stats().store_disk_blocks, 5u);
  }
  auto engine = Start(Persistent(dir.path(), false), Small());
  auto out = engine->RunRequest("again", prompt);
  ASSERT_TRUE(out) << out.error().ToString();
  EXPECT_EQ(out->disk_blocks, 5u);
  EXPECT_EQ(out->mismatched_blocks, 0u);
  EXPECT_EQ(out->load_errors, 0u);
}

TEST(WarmRestart, ATornSlotIsDroppedCountedAndTheChainMatchesUpToIt) {
  TempDir dir;
  const auto prompt = Prompt(5, 6);
  uint32_t torn_slot = 0;
  uint64_t layout_fingerprint = 0, file_key = 0;
  DiskSlotGeometry geometry;
  {
    auto engine = Start(Persistent(dir.path()), Small());
    Fill(*engine, {prompt});
    for (const auto& [id, key] : engine->leader().disk_pool()->RegisteredBlocks())
      if (key.position == 3) torn_slot = id.value();
    const Layout& g3 = *engine->worker().disk_memory().layout;
    geometry = {kDiskBlocks, g3.dims().block_bytes(), g3.block_stride()};
    file_key = PersistentDiskFileKey(Small().remote_descriptor, 0, 1);
    layout_fingerprint = PersistentDiskLayoutFingerprint(Small().remote_descriptor, 0, 1,
                                                         engine->worker().block_format(), geometry.block_bytes);
  }
  {
    // A write of block 3's slot that a crash cut off: its record says "writing", its bytes are
    // half old, half new. Done through the file's own API while no engine holds it.
    DiskStorageOptions options;
    options.directory = dir.path();
    options.persistent = true;
    options.disable_o_direct = true;
    auto storage = DiskStorage::OpenPersistent(options, geometry, layout_fingerprint, file_key);
    ASSERT_TRUE(storage) << storage.error().ToString();
    ASSERT_EQ((*storage)->recovery().blocks.size(), 6u) << "opened the engine's own file";
    ASSERT_TRUE((*storage)->slot_records()->MarkWriting(torn_slot));
    std::vector<uint8_t> half(4096, 0x5a);
    ASSERT_EQ(pwrite((*storage)->fd(), half.data(), half.size(), static_cast<off_t>(torn_slot * geometry.block_stride)),
              4096);
  }
  auto engine = Start(Persistent(dir.path()), Small());
  const DiskRecovery* rec = engine->worker().disk_recovery();
  ASSERT_NE(rec, nullptr);
  EXPECT_EQ(rec->torn, 1u);
  EXPECT_EQ(rec->blocks.size(), 5u);
  EXPECT_EQ(engine->worker().metrics()->disk_recovery_blocks[static_cast<size_t>(DiskRecoveryResult::kTorn)].load(),
            1u);
  EXPECT_EQ(engine->leader().chain().stats().restored_disk_blocks, 5u);
  for (const auto& b : rec->blocks) EXPECT_NE(b.slot, torn_slot);
  auto out = engine->RunRequest("again", prompt);
  ASSERT_TRUE(out) << out.error().ToString();
  EXPECT_EQ(out->disk_blocks, 3u) << "blocks 0..2 hit; block 3 was torn, so the match stops there";
  EXPECT_EQ(out->mismatched_blocks, 0u);
  EXPECT_EQ(out->load_errors, 0u);
}

TEST(WarmRestart, AClaimTheWorkerDroppedIsALoadErrorNeverAWrongByte) {
  TempDir dir;
  const auto prompt = Prompt(7, 5);
  uint32_t bad_slot = 0;
  uint64_t stride = 0;
  std::string bin;
  {
    auto engine = Start(Persistent(dir.path()), Small());
    Fill(*engine, {prompt});
    for (const auto& [id, key] : engine->leader().disk_pool()->RegisteredBlocks())
      if (key.position == 1) bad_slot = id.value();
    stride = engine->worker().disk_memory().layout->block_stride();
    bin = PersistentDiskFileStem(dir.path(), PersistentDiskFileKey(Small().remote_descriptor, 0, 1)) + ".bin";
  }
  {
    // Block 1's bytes change on disk behind kvbm's back; its record still says valid.
    int fd = open(bin.c_str(), O_RDWR);
    ASSERT_GE(fd, 0) << bin;
    uint8_t byte = 0;
    const off_t at = static_cast<off_t>(bad_slot * stride + 100);
    ASSERT_EQ(pread(fd, &byte, 1, at), 1);
    byte ^= 0x10;
    ASSERT_EQ(pwrite(fd, &byte, 1, at), 1);
    close(fd);
  }
  // The leader reads the records before the worker has verified them (the order no engine kvbm
  // drives uses): it restores the changed block; the worker drops it as corrupt.
  SimEngineOptions early = Small();
  early.leader_before_worker_tiers = true;
  auto engine = Start(Persistent(dir.path()), early);
  EXPECT_EQ(engine->worker().disk_recovery()->corrupt, 1u);
  EXPECT_EQ(engine->leader().chain().stats().restored_disk_blocks, 5u);
  auto out = engine->RunRequest("again", prompt);
  ASSERT_TRUE(out) << out.error().ToString();
  EXPECT_EQ(out->disk_blocks, 5u) << "the leader promised all five";
  EXPECT_EQ(out->load_errors, 1u) << "the changed block failed the worker's verification";
  EXPECT_EQ(out->mismatched_blocks, 0u) << "and was recomputed, never served";
  EXPECT_EQ(engine->leader().chain().stats().load_errors, 1u);
  // The leader forgot it: the next match stops before it, and nothing fails any more.
  engine->worker().WaitIdle();
  auto next = engine->RunRequest("next", prompt);
  ASSERT_TRUE(next) << next.error().ToString();
  EXPECT_EQ(next->load_errors, 0u);
  EXPECT_EQ(next->mismatched_blocks, 0u);
}

TEST(WarmRestart, AnotherModelOrLayoutRestoresNothing) {
  TempDir dir;
  const auto prompt = Prompt(6, 4);
  {
    auto engine = Start(Persistent(dir.path()), Small());
    Fill(*engine, {prompt});
  }
  {
    // Another model: another file; the first one's blocks are never looked at.
    auto engine = Start(Persistent(dir.path()), Small("model=other|kv_dtype=bfloat16|block=16"));
    EXPECT_TRUE(engine->worker().disk_recovery()->reset);
    EXPECT_EQ(engine->leader().chain().stats().restored_disk_blocks, 0u);
    auto out = engine->RunRequest("other-model", prompt);
    ASSERT_TRUE(out) << out.error().ToString();
    EXPECT_EQ(out->loaded_tokens, 0u);
  }
  {
    // The same model name and block bytes, another block format (1-byte elements, twice as many
    // per token): the same file, but its blocks would be misread, so it starts empty.
    SimEngineOptions other = Small();
    other.dtype_bytes = 1;
    other.inner_dim = 128;
    auto engine = Start(Persistent(dir.path()), other);
    ASSERT_EQ(engine->worker().bytes_per_block(), uint64_t{2} * 2 * kPage * 64 * 2) << "same geometry as Small()";
    const DiskRecovery* rec = engine->worker().disk_recovery();
    EXPECT_TRUE(rec->reset);
    EXPECT_NE(rec->reset_reason.find("another layout"), std::string::npos) << rec->reset_reason;
    EXPECT_EQ(engine->leader().chain().stats().restored_disk_blocks, 0u);
    auto out = engine->RunRequest("other-layout", prompt);
    ASSERT_TRUE(out) << out.error().ToString();
    EXPECT_EQ(out->loaded_tokens, 0u);
  }
}

TEST(WarmRestart, PoolRestoreRegistersAtTheGivenSlotsAndKeepsLeafFirst) {
  auto pool = BlockPool::Create(TierId::kDisk, 8, EvictionPolicy::kLeafFirst);
  auto key = [](uint64_t seq, std::optional<uint64_t> parent, uint32_t pos) {
    return BlockKey{SequenceHash(seq), seq * 7,
                    parent ? std::optional<SequenceHash>(SequenceHash(*parent)) : std::nullopt, pos};
  };
  // A chain 10 -> 11 -> 12 given child first, one slot twice, one key twice, one slot out of range.
  std::vector<std::pair<BlockId, BlockKey>> blocks = {
      {BlockId(5), key(12, 11, 2)}, {BlockId(2), key(11, 10, 1)}, {BlockId(6), key(10, std::nullopt, 0)},
      {BlockId(5), key(13, 12, 3)}, {BlockId(7), key(11, 10, 1)}, {BlockId(9), key(14, std::nullopt, 0)}};
  EXPECT_EQ(pool->Restore(blocks), 3u);
  auto stats = pool->stats();
  EXPECT_EQ(stats.registered, 3u);
  EXPECT_EQ(stats.free, 5u);
  EXPECT_EQ(stats.inactive, 3u);
  std::vector<BlockKey> chain = {key(10, std::nullopt, 0), key(11, 10, 1), key(12, 11, 2)};
  {
    BlockRun run = pool->MatchPrefix(chain);
    ASSERT_EQ(run.size(), 3u);
    EXPECT_EQ(run.id(0).value(), 6u);
    EXPECT_EQ(run.id(1).value(), 2u);
    EXPECT_EQ(run.id(2).value(), 5u);
  }
  EXPECT_EQ(pool->EvictionOrder(), std::vector<SequenceHash>{SequenceHash(12)}) << "only the leaf is evictable";
  // The restored slots are never handed out while free ones remain.
  auto fresh = pool->Allocate(5);
  ASSERT_TRUE(fresh);
  for (const MutableBlock& b : *fresh) EXPECT_TRUE(b.id().value() != 2 && b.id().value() != 5 && b.id().value() != 6);
  EXPECT_EQ(pool->Restore(blocks), 0u) << "occupied slots and held keys are skipped";
}

TEST(WarmRestart, PersistentModeWithoutAModelDescriptorIsRefused) {
  TempDir dir;
  try {
    Start(Persistent(dir.path()), Small(""));
    FAIL() << "a persistent G3 without a model descriptor must be refused";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("DYN_KVBM_DISK_PERSISTENT"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(std::filesystem::is_empty(dir.path())) << "nothing was created";
}

}  // namespace
}  // namespace kvbm
