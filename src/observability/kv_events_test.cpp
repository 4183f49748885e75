// KV events: a real BlockPool + BlockRegistry, the real publisher, a real ZeroMQ SUB socket,
// msgpack decoding of what actually went over the wire.
#include <gtest/gtest.h>

#include <chrono>
#include <map>
#include <msgpack.hpp>
#include <mutex>
#include <set>
#include <thread>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "kvbm/observability.h"

namespace kvbm {
namespace {

using namespace std::chrono_literals;

// One decoded event, in a form independent of the encoding.
struct WireEvent {
  std::string tag;
  std::vector<uint64_t> hashes;
  std::optional<uint64_t> parent;
  std::vector<uint32_t> tokens;
  uint32_t block_size = 0;
  std::string medium;
  bool operator==(const WireEvent&) const = default;
};

std::string Str(const msgpack::object& o) {
  EXPECT_EQ(o.type, msgpack::type::STR);
  return std::string(o.via.str.ptr, o.via.str.size);
}

std::vector<uint64_t> U64Array(const msgpack::object& o) {
  std::vector<uint64_t> v;
  EXPECT_EQ(o.type, msgpack::type::ARRAY);
  for (uint32_t i = 0; i < o.via.array.size; ++i) {
    EXPECT_EQ(o.via.array.ptr[i].type, msgpack::type::POSITIVE_INTEGER);
    v.push_back(o.via.array.ptr[i].via.u64);
  }
  return v;
}

// vLLM's positional layout: ["BlockStored", hashes, parent, token_ids, block_size, lora_id,
// medium, lora_name], ["BlockRemoved", hashes, medium], ["AllBlocksCleared"].
WireEvent DecodeArrayEvent(const msgpack::object& o) {
  WireEvent e;
  EXPECT_EQ(o.type, msgpack::type::ARRAY);
  const msgpack::object* f = o.via.array.ptr;
  e.tag = Str(f[0]);
  if (e.tag == "BlockStored") {
    EXPECT_EQ(o.via.array.size, 8u);
    e.hashes = U64Array(f[1]);
    if (f[2].type != msgpack::type::NIL) e.parent = f[2].via.u64;
    for (uint64_t t : U64Array(f[3])) e.tokens.push_back(static_cast<uint32_t>(t));
    e.block_size = static_cast<uint32_t>(f[4].via.u64);
    EXPECT_EQ(f[5].type, msgpack::type::NIL);  // lora_id
    e.medium = Str(f[6]);
    EXPECT_EQ(f[7].type, msgpack::type::NIL);  // lora_name
  } else if (e.tag == "BlockRemoved") {
    EXPECT_EQ(o.via.array.size, 3u);
    e.hashes = U64Array(f[1]);
    e.medium = Str(f[2]);
  } else {
    EXPECT_EQ(e.tag, "AllBlocksCleared");
    EXPECT_EQ(o.via.array.size, 1u);
  }
  return e;
}

WireEvent DecodeMapEvent(const msgpack::object& o) {
  EXPECT_EQ(o.type, msgpack::type::MAP);
  std::map<std::string, const msgpack::object*> fields;
  for (uint32_t i = 0; i < o.via.map.size; ++i)
    fields[Str(o.via.map.ptr[i].key)] = &o.via.map.ptr[i].val;
  WireEvent e;
  e.tag = Str(*fields.at("type"));
  if (e.tag == "BlockStored") {
    EXPECT_EQ(fields.size(), 8u);
    e.hashes = U64Array(*fields.at("block_hashes"));
    if (fields.at("parent_block_hash")->type != msgpack::type::NIL)
      e.parent = fields.at("parent_block_hash")->via.u64;
    for (uint64_t t : U64Array(*fields.at("token_ids")))
      e.tokens.push_back(static_cast<uint32_t>(t));
    e.block_size = static_cast<uint32_t>(fields.at("block_size")->via.u64);
    EXPECT_EQ(fields.at("lora_id")->type, msgpack::type::NIL);
    EXPECT_EQ(fields.at("lora_name")->type, msgpack::type::NIL);
    e.medium = Str(*fields.at("medium"));
  } else if (e.tag == "BlockRemoved") {
    EXPECT_EQ(fields.size(), 3u);
    e.hashes = U64Array(*fields.at("block_hashes"));
    e.medium = Str(*fields.at("medium"));
  } else {
    EXPECT_EQ(fields.size(), 1u);
  }
  return e;
}

// A SUB socket on the publisher's endpoint that checks framing and decodes batches.
class Subscriber {
 public:
  Subscriber(const std::string& endpoint, const std::string& topic, KvEventEncoding enc)
      : socket_(ctx_, zmq::socket_type::sub), topic_(topic), enc_(enc) {
    socket_.set(zmq::sockopt::rcvhwm, 0);  // unlimited: the test must see every message
    socket_.set(zmq::sockopt::subscribe, topic);
    socket_.connect(endpoint);
  }

  // Receives one message (false on timeout) and appends its events.
  bool ReceiveOne(std::chrono::milliseconds timeout, std::vector<WireEvent>& out) {
    socket_.set(zmq::sockopt::rcvtimeo, static_cast<int>(timeout.count()));
    std::vector<zmq::message_t> parts;
    auto n = zmq::recv_multipart(socket_, std::back_inserter(parts));
    if (!n) return false;
    EXPECT_EQ(parts.size(), 3u);
    EXPECT_EQ(parts[0].to_string(), topic_);
    EXPECT_EQ(parts[1].size(), 8u);
    uint64_t seq = 0;
    for (size_t i = 0; i < 8; ++i) seq = (seq << 8) | parts[1].data<unsigned char>()[i];
    if (!first_) {
      EXPECT_EQ(seq, next_seq_) << "a batch went missing";
    }
    first_ = false;
    next_seq_ = seq + 1;
    msgpack::object_handle oh = msgpack::unpack(parts[2].data<char>(), parts[2].size());
    const msgpack::object& batch = oh.get();
    EXPECT_EQ(batch.type, msgpack::type::ARRAY);
    EXPECT_EQ(batch.via.array.size, 3u);  // [ts, events, data_parallel_rank]
    EXPECT_EQ(batch.via.array.ptr[0].type, msgpack::type::FLOAT64);
    const double now =
        std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    EXPECT_NEAR(batch.via.array.ptr[0].via.f64, now, 60.0);
    EXPECT_EQ(batch.via.array.ptr[2].via.u64, rank_);
    const msgpack::object& events = batch.via.array.ptr[1];
    EXPECT_EQ(events.type, msgpack::type::ARRAY);
    EXPECT_GT(events.via.array.size, 0u);
    ++batches_;
    for (uint32_t i = 0; i < events.via.array.size; ++i) {
      out.push_back(enc_ == KvEventEncoding::kArray ? DecodeArrayEvent(events.via.array.ptr[i])
                                                    : DecodeMapEvent(events.via.array.ptr[i]));
    }
    return true;
  }

  // PUB/SUB slow joiner: messages sent before the subscription reaches the publisher are lost.
  // Send AllBlocksCleared probes until one arrives, then drain the rest of the probes.
  void Handshake(KvEventPublisher& pub) {
    std::vector<WireEvent> got;
    for (int i = 0; i < 200 && got.empty(); ++i) {
      pub.EnqueueAllCleared();
      ReceiveOne(20ms, got);
    }
    ASSERT_FALSE(got.empty()) << "subscriber never connected";
    ASSERT_TRUE(pub.Flush(2s));
    while (ReceiveOne(100ms, got)) {
    }
    for (const auto& e : got) ASSERT_EQ(e.tag, "AllBlocksCleared");
  }

  void set_rank(uint64_t r) { rank_ = r; }
  uint64_t batches() const { return batches_; }

 private:
  zmq::context_t ctx_{1};
  zmq::socket_t socket_;
  std::string topic_;
  KvEventEncoding enc_;
  // Probes may have been published (and lost) before we joined, so the first seq we see is
  // whatever it is; from then on it must be contiguous.
  uint64_t next_seq_ = 0;
  bool first_ = true;
  uint64_t rank_ = 0;
  uint64_t batches_ = 0;
};

// Records what the registry emitted, in its order, for an exact comparison with the wire.
struct Recorder {
  std::mutex mu;
  std::vector<WireEvent> events;
  void Attach(BlockRegistry& registry) {
    registry.AddSink([this](const KvEvent& e) {
      WireEvent w;
      w.tag = e.kind == KvEvent::Kind::kStored ? "BlockStored" : "BlockRemoved";
      w.hashes = {e.key.sequence_hash.value()};
      w.medium = std::string(KvEventMedium(e.tier));
      if (e.kind == KvEvent::Kind::kStored) {
        if (e.key.parent) w.parent = e.key.parent->value();
        w.tokens.assign(e.tokens.begin(), e.tokens.end());
        w.block_size = static_cast<uint32_t>(e.tokens.size());
      }
      std::lock_guard lock(mu);
      events.push_back(std::move(w));
    });
  }
};

uint64_t Mix(uint64_t x) {  // splitmix64: distinct, well-spread hashes
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

Result<std::unique_ptr<KvEventPublisher>> MakePublisher(KvEventEncoding enc,
                                                        std::shared_ptr<KvbmMetrics> metrics,
                                                        int64_t rank = 0) {
  KvEventPublisher::Options o;
  o.endpoint = "tcp://127.0.0.1:*";
  o.topic = "kv-events";
  o.block_size = 4;
  o.encoding = enc;
  o.metrics = std::move(metrics);
  o.data_parallel_rank = rank;
  return KvEventPublisher::Create(std::move(o));
}

// Registers `rounds` chains of `chain` blocks from each of `threads` threads on one pool that
// is far smaller than the total, so most blocks are evicted under pressure, then resets it.
// Returns every sequence hash registered.
std::vector<uint64_t> RunWorkload(const std::shared_ptr<BlockPool>& pool, int threads, int rounds,
                                  int chain) {
  std::vector<std::vector<uint64_t>> per_thread(threads);
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      for (int r = 0; r < rounds; ++r) {
        auto blocks = pool->Allocate(chain);
        ASSERT_TRUE(blocks) << blocks.error().ToString();
        std::vector<ImmutableBlock> held;
        std::optional<SequenceHash> parent;
        for (int b = 0; b < chain; ++b) {
          const uint64_t id =
              (static_cast<uint64_t>(t) << 40) | (static_cast<uint64_t>(r) << 8) | b;
          const SequenceHash h(Mix(id));
          const std::vector<Token> tokens = {static_cast<Token>(id), static_cast<Token>(b), 7u,
                                             70000u};
          ASSERT_TRUE((*blocks)[b].Complete(BlockKey{h, Mix(~id), parent}, tokens));
          auto reg = pool->Register(std::move((*blocks)[b]));
          ASSERT_TRUE(reg) << reg.error().ToString();
          held.push_back(std::move(*reg));
          per_thread[t].push_back(h.value());
          parent = h;
        }
      }
    });
  }
  for (auto& w : workers) w.join();
  std::vector<uint64_t> all;
  for (auto& v : per_thread) all.insert(all.end(), v.begin(), v.end());
  EXPECT_TRUE(pool->Reset());
  return all;
}

void ExpectStoredThenRemovedOncePerHash(const std::vector<WireEvent>& wire,
                                        const std::vector<uint64_t>& hashes) {
  std::map<uint64_t, int> stored_at, removed_at;
  for (size_t i = 0; i < wire.size(); ++i) {
    ASSERT_EQ(wire[i].hashes.size(), 1u);
    auto& where = wire[i].tag == "BlockStored" ? stored_at : removed_at;
    ASSERT_TRUE(where.emplace(wire[i].hashes[0], static_cast<int>(i)).second)
        << wire[i].tag << " twice for " << wire[i].hashes[0];
  }
  EXPECT_EQ(stored_at.size(), hashes.size());
  EXPECT_EQ(removed_at.size(), hashes.size());
  for (uint64_t h : hashes) {
    ASSERT_TRUE(stored_at.contains(h)) << h;
    ASSERT_TRUE(removed_at.contains(h)) << h;
    EXPECT_LT(stored_at[h], removed_at[h]) << h;
  }
}

TEST(KvEventPublisher, EveryStoredAndRemovedEventArrivesExactlyUnderLoad) {
  auto metrics = std::make_shared<KvbmMetrics>();
  auto registry = std::make_shared<BlockRegistry>();
  auto pool = BlockPool::Create(TierId::kHost, 64, EvictionPolicy::kLru, registry);
  auto pub = MakePublisher(KvEventEncoding::kArray, metrics);
  ASSERT_TRUE(pub) << pub.error().ToString();
  Subscriber sub((*pub)->endpoint(), "kv-events", KvEventEncoding::kArray);
  sub.Handshake(**pub);
  const uint64_t probes = (*pub)->published_events();

  Recorder recorder;
  recorder.Attach(*registry);
  (*pub)->Attach(*registry);

  // 2 threads x 1250 rounds x 8 blocks = 20,000 hashes: 20,000 stored + 20,000 removed events.
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<uint64_t> hashes = RunWorkload(pool, 2, 1250, 8);
  const auto produce = std::chrono::steady_clock::now() - t0;
  ASSERT_EQ(hashes.size(), 20000u);
  EXPECT_GE(pool->stats().evictions, 20000u - 64u);
  ASSERT_EQ(recorder.events.size(), 40000u);

  std::vector<WireEvent> wire;
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  while (wire.size() < recorder.events.size() && std::chrono::steady_clock::now() < deadline) {
    sub.ReceiveOne(200ms, wire);
  }
  EXPECT_FALSE(sub.ReceiveOne(100ms, wire)) << "more events than the registry emitted";
  ASSERT_EQ(wire.size(), recorder.events.size());
  EXPECT_EQ(wire, recorder.events);  // same events, same order, same fields
  for (const auto& e : wire) {
    EXPECT_EQ(e.medium, "CPU");
    if (e.tag == "BlockStored") {
      EXPECT_EQ(e.block_size, 4u);
    }
  }
  ExpectStoredThenRemovedOncePerHash(wire, hashes);
  EXPECT_EQ((*pub)->dropped_events(), 0u);
  EXPECT_EQ(metrics->kv_events_dropped.load(), 0u);
  EXPECT_EQ((*pub)->published_events() - probes, 40000u);
  EXPECT_EQ(metrics->kv_events_published.load(), 40000u + probes);
  // Batching: far fewer messages than events.
  EXPECT_LT(sub.batches(), 40000u / 8);
  std::printf("[ perf ] 40000 events: produced in %.1f ms, %llu batches\n",
              std::chrono::duration<double, std::milli>(produce).count(),
              static_cast<unsigned long long>(sub.batches()));
}

TEST(KvEventPublisher, MapEncodingAndChainFields) {
  auto registry = std::make_shared<BlockRegistry>();
  auto pool = BlockPool::Create(TierId::kDisk, 4, EvictionPolicy::kLru, registry);
  auto pub = MakePublisher(KvEventEncoding::kMap, nullptr, 3);
  ASSERT_TRUE(pub);
  Subscriber sub((*pub)->endpoint(), "kv-events", KvEventEncoding::kMap);
  sub.set_rank(3);
  sub.Handshake(**pub);
  Recorder recorder;
  recorder.Attach(*registry);
  (*pub)->Attach(*registry);

  const std::vector<uint64_t> hashes = RunWorkload(pool, 1, 3, 2);  // 6 blocks through 4 slots
  (*pub)->EnqueueAllCleared();
  ASSERT_TRUE((*pub)->Flush(2s));
  std::vector<WireEvent> wire;
  while (wire.size() < recorder.events.size() + 1 && sub.ReceiveOne(2000ms, wire)) {
  }
  ASSERT_EQ(wire.size(), recorder.events.size() + 1);
  EXPECT_EQ(wire.back().tag, "AllBlocksCleared");
  wire.pop_back();
  EXPECT_EQ(wire, recorder.events);
  ExpectStoredThenRemovedOncePerHash(wire, hashes);
  // The second block of each chain names the first as its parent.
  EXPECT_FALSE(wire[0].parent.has_value());
  ASSERT_EQ(wire[1].tag, "BlockStored");
  EXPECT_EQ(wire[1].parent, wire[0].hashes[0]);
  EXPECT_EQ(wire[0].medium, "DISK");
}

TEST(KvEventPublisher, QueueOverflowIsCountedNotSilent) {
  auto metrics = std::make_shared<KvbmMetrics>();
  KvEventPublisher::Options o;
  o.endpoint = "tcp://127.0.0.1:*";
  o.queue_capacity = 10;
  o.max_batch_events = 1000;
  o.max_batch_delay = std::chrono::milliseconds(1500);  // the thread sits on the first batch
  o.metrics = metrics;
  auto pub = KvEventPublisher::Create(o);
  ASSERT_TRUE(pub);
  for (int i = 0; i < 100; ++i) {
    KvEvent e{KvEvent::Kind::kRemoved,
              TierId::kHost,
              BlockKey{SequenceHash(static_cast<uint64_t>(i)), 0, {}},
              {},
              0};
    (*pub)->Enqueue(e);
  }
  EXPECT_EQ((*pub)->dropped_events(), 90u);
  EXPECT_EQ(metrics->kv_events_dropped.load(), 90u);
  ASSERT_TRUE((*pub)->Flush(5s));
  EXPECT_EQ((*pub)->published_events(), 10u);
  EXPECT_EQ(metrics->kv_events_published.load(), 10u);
}

TEST(KvEventPublisher, RegistryOutlivingPublisherOnlyCountsDrops) {
  auto registry = std::make_shared<BlockRegistry>();
  auto pool = BlockPool::Create(TierId::kHost, 4, EvictionPolicy::kLru, registry);
  auto metrics = std::make_shared<KvbmMetrics>();
  {
    auto pub = MakePublisher(KvEventEncoding::kArray, metrics);
    ASSERT_TRUE(pub);
    (*pub)->Attach(*registry);
  }
  Recorder recorder;
  recorder.Attach(*registry);
  RunWorkload(pool, 1, 2, 2);  // the sink still fires; nothing to crash into
  ASSERT_GT(recorder.events.size(), 0u);
  // Every event the registry emitted after the publisher went is counted as dropped, none sent.
  EXPECT_EQ(metrics->kv_events_dropped.load(), recorder.events.size());
  EXPECT_EQ(metrics->kv_events_published.load(), 0u);
}

TEST(KvEventPublisher, BadEndpointNamesTheVariable) {
  for (const char* ep : {"tcp://256.1.1.1:5557", "bogus://x", ""}) {
    KvEventPublisher::Options o;
    o.endpoint = ep;
    auto pub = KvEventPublisher::Create(o);
    ASSERT_FALSE(pub) << ep;
    EXPECT_NE(pub.error().message().find("DYN_KVBM_EVENTS_ENDPOINT"), std::string::npos)
        << pub.error().message();
  }
  auto first = MakePublisher(KvEventEncoding::kArray, nullptr);
  ASSERT_TRUE(first);
  KvEventPublisher::Options o;
  o.endpoint = (*first)->endpoint();
  auto second = KvEventPublisher::Create(o);
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error().code(), ErrorCode::kUnavailable);
  EXPECT_NE(second.error().message().find((*first)->endpoint()), std::string::npos)
      << second.error().message();
}

TEST(KvEventPublisher, MediumNames) {
  EXPECT_EQ(KvEventMedium(TierId::kDevice), "GPU");
  EXPECT_EQ(KvEventMedium(TierId::kHost), "CPU");
  EXPECT_EQ(KvEventMedium(TierId::kDisk), "DISK");
  EXPECT_EQ(KvEventMedium(TierId::kRemote), "REMOTE");
}

}  // namespace
}  // namespace kvbm
