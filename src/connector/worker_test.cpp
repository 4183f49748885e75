#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

#include "kvbm/sim_engine.h"

namespace kvbm {
namespace {

KvbmConfig HostOnly(uint64_t blocks) {
  KvbmConfig c;
  c.cpu_cache_num_blocks = blocks;
  return c;
}

// One step that stores G1 block 0 into G2 slot 0 (sequence hash 7), the forward pass done.
void StoreBlock0(KvbmWorker& w) {
  StepMetadata store;
  store.host_blocks = 8;
  store.ops.push_back({1, OpKind::kStoreHost, "a", {{0, 0, 7}}});
  ASSERT_TRUE(w.BindStep(store).has_value());
  ASSERT_TRUE(w.ForwardPassDone().has_value());
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

// A request finished in the step whose metadata starts its load (an engine that aborts between
// UpdateStateAfterAlloc and BuildStepMetadata): it is reported as sent only once the load has
// stopped writing into its G1 blocks, never at once (the engine would hand them to another
// request while the load still writes).
TEST(Worker, FinishedInTheStepThatStartsItsLoadWaitsForTheLoad) {
  SimulatedEngine engine(HostOnly(8), SimEngineOptions{});
  KvbmWorker& w = engine.worker();
  StoreBlock0(w);
  w.SetLoadDelayForTesting(std::chrono::milliseconds(1000));
  StepMetadata m;
  m.host_blocks = 8;
  m.ops.push_back({2, OpKind::kLoadHost, "r", {{0, 5, 7}}});  // G2 slot 0 -> G1 block 5
  m.finished_while_loading = {"r"};
  ASSERT_TRUE(w.BindStep(m).has_value());
  auto [early_sending, early_recving] = w.GetFinished();
  EXPECT_TRUE(early_sending.empty()) << "reported as sent while its load was still in flight";
  EXPECT_TRUE(early_recving.empty());
  w.WaitIdle();
  auto [sending, recving] = w.GetFinished();
  EXPECT_EQ(sending, std::vector<std::string>{"r"});
  EXPECT_TRUE(recving.empty());  // reported once, as sent
}

// A synchronous load (the engine waits for it before the forward pass) waits for its own
// request's copies only, not for another request's slow load started earlier.
TEST(Worker, WaitForRequestLoadsWaitsForThoseRequestsOnly) {
  SimulatedEngine engine(HostOnly(8), SimEngineOptions{});
  KvbmWorker& w = engine.worker();
  const Layout& g1 = *w.device_layout();
  const uint64_t chunk = g1.dims().chunk_bytes();
  std::memset(w.device_memory().ChunkAddress(0, 0, 0), 0x5C, chunk);
  StoreBlock0(w);
  w.SetLoadDelayForTesting(std::chrono::milliseconds(2000));
  StepMetadata slow;
  slow.host_blocks = 8;
  slow.ops.push_back({2, OpKind::kLoadHost, "slow", {{0, 4, 7}}});
  ASSERT_TRUE(w.BindStep(slow).has_value());
  w.SetLoadDelayForTesting(std::chrono::milliseconds(0));
  StepMetadata fast;
  fast.host_blocks = 8;
  fast.ops.push_back({3, OpKind::kLoadHost, "fast", {{0, 5, 7}}});
  ASSERT_TRUE(w.BindStep(fast).has_value());
  auto t0 = std::chrono::steady_clock::now();
  std::vector<std::string> ids = {"fast"};
  w.WaitForRequestLoads(ids);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(1500)) << "waited for the slow load";
  auto [sending, recving] = w.GetFinished();
  EXPECT_EQ(recving, std::vector<std::string>{"fast"});
  EXPECT_EQ(std::memcmp(w.device_memory().ChunkAddress(5, 0, 0), w.device_memory().ChunkAddress(0, 0, 0), chunk), 0)
      << "the waited-for load's bytes are not in place";
  w.WaitIdle();
  auto [sending2, recving2] = w.GetFinished();
  EXPECT_EQ(recving2, std::vector<std::string>{"slow"});
}

// A host slot whose promotion (G3 -> G2) failed holds no block; writing it down to G3 again
// must not give a disk slot that verifies with the stale bytes the host slot still had (the
// checksum is computed over what is written). Seen by the soak with G4 fetches, whose slots are
// offloaded to G3 while the fetch may still be landing.
TEST(Worker, OffloadOfAHostSlotThatHoldsNoBlockIsNeverServedFromDisk) {
  KvbmConfig c = HostOnly(8);
  c.disk_cache_num_blocks = 8;
  c.disk_cache_dir = ::testing::TempDir();
  SimulatedEngine engine(c, SimEngineOptions{});
  KvbmWorker& w = engine.worker();
  const Layout& g1 = *w.device_layout();
  const uint64_t chunk = g1.dims().chunk_bytes();
  for (uint64_t l = 0; l < g1.dims().num_layers; ++l)
    for (uint64_t o = 0; o < g1.dims().outer_dim; ++o) std::memset(w.device_memory().ChunkAddress(0, l, o), 0xAB, chunk);
  auto step = [&](std::vector<TransferOp> ops) {
    StepMetadata m;
    m.host_blocks = 8;
    m.disk_blocks = 8;
    m.ops = std::move(ops);
    ASSERT_TRUE(w.BindStep(m).has_value());
    ASSERT_TRUE(w.ForwardPassDone().has_value());
    w.WaitIdle();
  };
  constexpr uint64_t kHash = 7;
  step({{1, OpKind::kStoreHost, "", {{0, 0, kHash}}}});    // G1 0 -> G2 0
  step({{2, OpKind::kOffloadDisk, "", {{0, 0, kHash}}}});  // G2 0 -> G3 0
  IoQueue& io = w.transfer_engine().io_queue();
  io.InjectFailure(w.disk_memory().fd, 0, uint64_t{1} << 40);
  step({{3, OpKind::kPromoteHost, "", {{0, 1, kHash}}}});  // G3 0 -> G2 1: fails, slot 1 holds nothing
  io.ClearFailures();
  step({{4, OpKind::kOffloadDisk, "", {{1, 1, kHash}}}});  // G2 1 -> G3 1
  StepMetadata load;
  load.host_blocks = 8;
  load.disk_blocks = 8;
  load.ops.push_back({5, OpKind::kLoadDisk, "r", {{1, 3, kHash}}});  // G3 1 -> G1 3
  ASSERT_TRUE(w.BindStep(load).has_value());
  w.WaitIdle();
  auto [sending, recving] = w.GetFinished();
  EXPECT_EQ(recving, std::vector<std::string>{"r"});
  EXPECT_EQ(w.TakeLoadErrors(), std::vector<uint32_t>{3}) << "G3 slot 1 was served, with bytes no store put there";
}

}  // namespace
}  // namespace kvbm

namespace kvbm {
namespace {

TensorShape DenseShape(std::vector<int64_t> shape) {
  TensorShape t{shape, std::vector<int64_t>(shape.size()), 2};
  int64_t s = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    t.strides[i] = s;
    s *= shape[i];
  }
  return t;
}

TEST(Worker, SecondEngineWithAnotherLayoutFingerprintIsRefused) {
  constexpr int64_t kBlocks = 8, kPage = 4, kHeads = 2, kDim = 8, kLayers = 2;
  std::vector<std::vector<uint16_t>> layers(kLayers, std::vector<uint16_t>(kBlocks * 2 * kPage * kHeads * kDim));
  DeviceTensors per_layer;
  for (auto& l : layers) {
    per_layer.layer_pointers.push_back(reinterpret_cast<uintptr_t>(l.data()));
    per_layer.layer_shapes.push_back(DenseShape({kBlocks, 2, kPage, kHeads, kDim}));
  }
  per_layer.num_blocks = kBlocks;
  per_layer.page_size = kPage;
  per_layer.element_order = "token,head,dim";
  KvbmWorker w(HostOnly(4), 0, 1);
  ASSERT_TRUE(w.RegisterKvCaches(per_layer).has_value());
  ASSERT_TRUE(w.AllocateTiers(4, 0).has_value());
  EXPECT_EQ(w.tier_block_format(), w.block_format());

  // The same blocks as one pool [blocks, layers, 2, heads * page * dim]: same fingerprint.
  std::vector<uint16_t> pool_mem(kBlocks * kLayers * 2 * kPage * kHeads * kDim);
  DeviceTensors pool;
  pool.pool = true;
  pool.layer_pointers = {reinterpret_cast<uintptr_t>(pool_mem.data())};
  pool.layer_shapes = {DenseShape({kBlocks, kLayers, 2, kHeads * kPage * kDim})};
  pool.num_blocks = kBlocks;
  pool.page_size = kPage;
  pool.element_order = "token,head,dim";
  ASSERT_TRUE(w.RegisterKvCaches(pool).has_value());
  EXPECT_TRUE(w.device_layout()->block_is_contiguous());

  pool.element_order = "head,token,dim";  // same sizes, other element order
  auto st = w.RegisterKvCaches(pool);
  ASSERT_FALSE(st.has_value());
  EXPECT_EQ(st.error().code(), ErrorCode::kFailedPrecondition);
  EXPECT_NE(st.error().message().find("layout fingerprint differs"), std::string::npos);
  EXPECT_NE(w.block_format().find("order=token,head,dim"), std::string::npos);  // unchanged
  EXPECT_FALSE(w.AllocateTiers(4, 0).has_value());  // once only
}

}  // namespace
}  // namespace kvbm

namespace kvbm {
namespace {

}  // namespace
bool KernelAllowsMbind(int node);  // src/memory/host_storage_test.cpp
namespace {

// The "THPeligible" line of /proc/self/smaps for the mapping that holds `addr`; -1 when absent.
int ThpEligible(const void* addr) {
  std::ifstream smaps("/proc/self/smaps");
  const auto a = reinterpret_cast<uintptr_t>(addr);
  std::string line;
  bool inside = false;
  while (std::getline(smaps, line)) {
    uintptr_t lo = 0, hi = 0;
    char dash = 0;
    std::istringstream head(line);
    if (head >> std::hex >> lo >> dash >> hi && dash == '-') {
      inside = lo <= a && a < hi;
      continue;
    }
    if (inside && line.starts_with("THPeligible:")) return std::stoi(line.substr(12));
  }
  return -1;
}

// G2 asks for transparent huge pages: an O_DIRECT block then lands in a few physically
// contiguous pages. With scattered 4 KiB pages every 2 MiB read was split into several
// requests, and G3 -> G2 ran at a third of the disk's bandwidth (BENCHMARKS.md).
TEST(Worker, G2IsOnTransparentHugePages) {
  std::ifstream mode_file("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string mode((std::istreambuf_iterator<char>(mode_file)), std::istreambuf_iterator<char>());
  if (mode.empty() || mode.find("[never]") != std::string::npos)
    GTEST_SKIP() << "transparent huge pages are off on this kernel";
  uint64_t blocks = 8;
  for (;;) {
    SimulatedEngine engine(HostOnly(blocks), SimEngineOptions{});
    const HostStorage* g2 = engine.worker().host_storage();
    ASSERT_NE(g2, nullptr);
    if (g2->size() < (8u << 20)) {  // too small to hold an aligned huge page: grow it
      blocks = blocks * ((8u << 20) / g2->size() + 1);
      continue;
    }
    EXPECT_EQ(ThpEligible(g2->data()), 1) << "G2 of " << g2->size() << " bytes";
    break;
  }
}

// DYN_KVBM_ENABLE_NUMA: G2 comes from the one host allocator bound to a node (here, without a
// GPU, the node of the allocating thread); off, it is placed by first touch.
TEST(Worker, EnableNumaBindsG2ToTheNodeWhereTheKernelAllows) {
  const int node = CurrentNumaNode();
  if (node < 0) GTEST_SKIP() << "getcpu does not report a NUMA node here";
  for (bool enable : {false, true}) {
    KvbmConfig c = HostOnly(8);
    if (enable) c.enable_numa = true;
    SimulatedEngine engine(c, SimEngineOptions{});
    const HostStorage* g2 = engine.worker().host_storage();
    ASSERT_NE(g2, nullptr);
    if (!enable) {
      EXPECT_EQ(g2->numa_node(), kNoNumaNode);
      continue;
    }
    if (!KernelAllowsMbind(node)) GTEST_SKIP() << "this kernel refuses mbind (no NUMA support or a seccomp filter)";
    EXPECT_EQ(g2->numa_node(), node);
  }
}

}  // namespace
}  // namespace kvbm
