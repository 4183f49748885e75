// KV events in vLLM's wire format on a ZeroMQ PUB socket.
//
// Wire format (vllm/distributed/kv_events.py, ZmqEventPublisher): every message has three
// frames, [topic, seq, payload]; seq is the batch number as 8 bytes big-endian, from 0; payload
// is msgpack of KVEventBatch, a positional array [ts (float64 seconds since the epoch), events,
// data_parallel_rank]. Each event is tagged with its class name; see KvEventEncoding.
//
// Threads: the registry sink (any thread, under the registry's lock) only appends to Queue;
// the publisher thread owns the socket and is the only one to touch it after Create.
#include <fmt/format.h>

#include <bit>
#include <condition_variable>
#include <deque>
#include <msgpack.hpp>
#include <mutex>
#include <thread>
#include <vector>
#include <zmq.hpp>

#include "kvbm/log.h"
#include "kvbm/observability.h"

namespace kvbm {

std::string_view KvEventMedium(TierId tier) {
  switch (tier) {
    case TierId::kDevice:
      return "GPU";  // vLLM's MEDIUM_GPU
    case TierId::kHost:
      return "CPU";  // vLLM's CPULoadStoreSpec.medium()
    case TierId::kDisk:
      return "DISK";
    case TierId::kRemote:
      return "REMOTE";
  }
  return "UNKNOWN";
}

namespace {

struct QueuedEvent {
  bool all_cleared = false;
  KvEvent event;
};

// Shared between the publisher and every registry sink it installed, so a sink that outlives
// the publisher only counts what it can no longer deliver.
struct EventQueue {
  std::mutex mu;
  std::condition_variable has_work;    // publisher thread waits here
  std::condition_variable progressed;  // Flush waits here
  std::deque<QueuedEvent> items;       // GUARDED_BY(mu)
  bool closed = false;                 // GUARDED_BY(mu)
  uint64_t accepted = 0;               // GUARDED_BY(mu) events ever queued
  uint64_t done = 0;                   // GUARDED_BY(mu) events handed to the socket (or lost there)
  size_t capacity = 0;
  size_t wake_at = 1;  // batch size at which the publisher is woken early
  std::atomic<uint64_t> dropped{0};
  std::shared_ptr<KvbmMetrics> metrics;

  void CountDrop(uint64_t n, const char* why) {
    const uint64_t before = dropped.fetch_add(n);
    if (metrics) metrics->kv_events_dropped.fetch_add(n, std::memory_order_relaxed);
    // Log the first loss and then at each power of two, so a flood cannot flood the log too.
    const uint64_t after = before + n;
    if (before == 0 || (std::bit_floor(after) > before)) {
      Log(LogLevel::kWarn, "kvbm KV events: {} event(s) dropped ({}); {} dropped in all", n, why,
          after);
    }
  }

  void Push(QueuedEvent item) {
    std::unique_lock lock(mu);
    if (closed) {
      lock.unlock();
      CountDrop(1, "publisher stopped");
      return;
    }
    if (items.size() >= capacity) {
      lock.unlock();
      CountDrop(1, "publisher queue full");
      return;
    }
    items.push_back(std::move(item));
    ++accepted;
    const size_t size = items.size();
    lock.unlock();
    if (size == 1 || size == wake_at) has_work.notify_one();
  }
};

using Packer = msgpack::packer<msgpack::sbuffer>;

void PackStr(Packer& pk, std::string_view s) {
  pk.pack_str(static_cast<uint32_t>(s.size()));
  pk.pack_str_body(s.data(), static_cast<uint32_t>(s.size()));
}

// Field order is vLLM's declaration order; in kArray it is the wire order too.
void PackStored(Packer& pk, const KvEvent& e, uint32_t default_block_size, KvEventEncoding enc) {
  const uint32_t block_size =
      e.tokens.empty() ? default_block_size : static_cast<uint32_t>(e.tokens.size());
  auto field = [&](std::string_view name) {
    if (enc == KvEventEncoding::kMap) PackStr(pk, name);
  };
  // extra_keys only when the block has any: a text block's event is as before.
  const bool extra = !e.inputs.empty();
  const uint32_t fields = extra ? 9 : 8;
  if (enc == KvEventEncoding::kArray) {
    pk.pack_array(fields);
    PackStr(pk, "BlockStored");
  } else {
    pk.pack_map(fields);
    PackStr(pk, "type");
    PackStr(pk, "BlockStored");
  }
  field("block_hashes");
  pk.pack_array(1);
  pk.pack_uint64(e.key.sequence_hash.value());
  field("parent_block_hash");
  if (e.key.parent) {
    pk.pack_uint64(e.key.parent->value());
  } else {
    pk.pack_nil();
  }
  field("token_ids");
  pk.pack_array(static_cast<uint32_t>(e.tokens.size()));
  for (Token t : e.tokens) pk.pack_uint32(t);
  field("block_size");
  pk.pack_uint32(block_size);
  field("lora_id");
  pk.pack_nil();
  field("medium");
  PackStr(pk, KvEventMedium(e.tier));
  field("lora_name");
  if (e.inputs.lora_name) {
    PackStr(pk, *e.inputs.lora_name);
  } else {
    pk.pack_nil();
  }
  if (extra) {
    // vLLM's untagged per-block list: LoRA name, (identifier, offset) pairs, cache salt,
    // embeddings digest; one entry, as each event names one block.
    const BlockInputs& in = e.inputs;
    field("extra_keys");
    pk.pack_array(1);
    pk.pack_array(static_cast<uint32_t>(in.multimodal.size() + (in.lora_name ? 1 : 0) + (in.cache_salt ? 1 : 0) +
                                        (in.embeds ? 1 : 0)));
    if (in.lora_name) PackStr(pk, *in.lora_name);
    for (const auto& [id, offset] : in.multimodal) {
      pk.pack_array(2);
      PackStr(pk, id);
      pk.pack_int64(offset);
    }
    if (in.cache_salt) PackStr(pk, *in.cache_salt);
    if (in.embeds) {
      uint64_t words[2] = {in.embeds->low, in.embeds->high};
      pk.pack_bin(sizeof(words));
      pk.pack_bin_body(reinterpret_cast<const char*>(words), sizeof(words));
    }
  }
}

void PackRemoved(Packer& pk, const KvEvent& e, KvEventEncoding enc) {
  if (enc == KvEventEncoding::kArray) {
    pk.pack_array(3);
    PackStr(pk, "BlockRemoved");
    pk.pack_array(1);
    pk.pack_uint64(e.key.sequence_hash.value());
    PackStr(pk, KvEventMedium(e.tier));
  } else {
    pk.pack_map(3);
    PackStr(pk, "type");
    PackStr(pk, "BlockRemoved");
    PackStr(pk, "block_hashes");
    pk.pack_array(1);
    pk.pack_uint64(e.key.sequence_hash.value());
    PackStr(pk, "medium");
    PackStr(pk, KvEventMedium(e.tier));
  }
}

void PackCleared(Packer& pk, KvEventEncoding enc) {
  if (enc == KvEventEncoding::kArray) {
    pk.pack_array(1);
  } else {
    pk.pack_map(1);
    PackStr(pk, "type");
  }
  PackStr(pk, "AllBlocksCleared");
}

}  // namespace

struct KvEventPublisher::Impl {
  Options options;
  std::string bound_endpoint;
  zmq::context_t context{1};
  zmq::socket_t socket;
  std::shared_ptr<EventQueue> queue;
  std::thread thread;
  bool stop = false;  // GUARDED_BY(queue->mu)
  std::atomic<uint64_t> published_events{0};
  std::atomic<uint64_t> published_batches{0};
  uint64_t next_seq = 0;  // publisher thread only

  std::string Encode(const std::vector<QueuedEvent>& batch) const {
    msgpack::sbuffer buf(64 + batch.size() * 96);
    Packer pk(buf);
    pk.pack_array(3);
    const double ts =
        std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    pk.pack_double(ts);
    pk.pack_array(static_cast<uint32_t>(batch.size()));
    for (const QueuedEvent& q : batch) {
      if (q.all_cleared) {
        PackCleared(pk, options.encoding);
      } else if (q.event.kind == KvEvent::Kind::kStored) {
        PackStored(pk, q.event, options.block_size, options.encoding);
      } else {
        PackRemoved(pk, q.event, options.encoding);
      }
    }
    pk.pack_int64(options.data_parallel_rank);
    return std::string(buf.data(), buf.size());
  }

  void Send(const std::vector<QueuedEvent>& batch) {
    const std::string payload = Encode(batch);
    unsigned char seq[8];
    for (int i = 0; i < 8; ++i) seq[i] = static_cast<unsigned char>(next_seq >> (56 - 8 * i));
    try {
      socket.send(zmq::buffer(options.topic), zmq::send_flags::sndmore);
      socket.send(zmq::buffer(seq, sizeof(seq)), zmq::send_flags::sndmore);
      socket.send(zmq::buffer(payload), zmq::send_flags::none);
      ++next_seq;
      published_events.fetch_add(batch.size(), std::memory_order_relaxed);
      published_batches.fetch_add(1, std::memory_order_relaxed);
      if (options.metrics)
        options.metrics->kv_events_published.fetch_add(batch.size(), std::memory_order_relaxed);
    } catch (const zmq::error_t& e) {
      queue->CountDrop(batch.size(), e.what());
    }
  }

  void Run() {
    std::vector<QueuedEvent> batch;
    std::unique_lock lock(queue->mu);
    for (;;) {
      queue->has_work.wait(lock, [this] { return stop || !queue->items.empty(); });
      if (queue->items.empty()) break;  // stop requested and nothing left
      if (queue->items.size() < options.max_batch_events && !stop) {
        // Let a batch fill for a short while: fewer, larger messages under load, a bounded
        // delay when idle.
        const auto deadline = std::chrono::steady_clock::now() + options.max_batch_delay;
        queue->has_work.wait_until(lock, deadline, [this] {
          return stop || queue->items.size() >= options.max_batch_events;
        });
      }
      const size_t n = std::min(queue->items.size(), options.max_batch_events);
      batch.clear();
      for (size_t i = 0; i < n; ++i) {
        batch.push_back(std::move(queue->items.front()));
        queue->items.pop_front();
      }
      lock.unlock();
      Send(batch);
      lock.lock();
      queue->done += n;
      queue->progressed.notify_all();
    }
  }
};

KvEventPublisher::KvEventPublisher(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Result<std::unique_ptr<KvEventPublisher>> KvEventPublisher::Create(Options options) {
  if (options.endpoint.empty()) {
    return MakeError(ErrorCode::kInvalidArgument,
                     "DYN_KVBM_EVENTS_ENDPOINT is empty: no endpoint to publish on");
  }
  if (options.max_batch_events == 0 || options.queue_capacity == 0) {
    return MakeError(ErrorCode::kInvalidArgument,
                     "KvEventPublisher: max_batch_events and queue_capacity must be > 0");
  }
  auto impl = std::make_unique<Impl>();
  impl->socket = zmq::socket_t(impl->context, zmq::socket_type::pub);
  try {
    impl->socket.set(zmq::sockopt::sndhwm, options.send_hwm);
    // On close, give queued messages a moment to leave instead of dropping them at once.
    impl->socket.set(zmq::sockopt::linger, 1000);
    impl->socket.bind(options.endpoint);
    impl->bound_endpoint = impl->socket.get(zmq::sockopt::last_endpoint);
  } catch (const zmq::error_t& e) {
    const ErrorCode code =
        e.num() == EADDRINUSE ? ErrorCode::kUnavailable : ErrorCode::kInvalidArgument;
    return MakeError(
        code, fmt::format("DYN_KVBM_EVENTS_ENDPOINT=\"{}\": cannot bind the KV event socket: {}",
                          options.endpoint, e.what()));
  }
  impl->queue = std::make_shared<EventQueue>();
  impl->queue->capacity = options.queue_capacity;
  impl->queue->wake_at = options.max_batch_events;
  impl->queue->metrics = options.metrics;
  impl->options = std::move(options);
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->Run(); });
  Log(LogLevel::kInfo, "kvbm KV events: publishing on {}", raw->bound_endpoint);
  return std::unique_ptr<KvEventPublisher>(new KvEventPublisher(std::move(impl)));
}

KvEventPublisher::~KvEventPublisher() {
  if (!impl_) return;
  {
    std::lock_guard lock(impl_->queue->mu);
    impl_->queue->closed = true;  // later sink calls count a drop instead of queueing
    impl_->stop = true;
  }
  impl_->queue->has_work.notify_all();
  // The thread drains what was queued before it exits (it only breaks on an empty queue).
  if (impl_->thread.joinable()) impl_->thread.join();
  impl_->socket.close();  // lingers up to 1 s for the last messages
}

void KvEventPublisher::Attach(BlockRegistry& registry) {
  registry.AddSink([queue = impl_->queue](const KvEvent& e) {
    queue->Push(QueuedEvent{false, e});
  });
}

void KvEventPublisher::Enqueue(const KvEvent& event) {
  impl_->queue->Push(QueuedEvent{false, event});
}

void KvEventPublisher::EnqueueAllCleared() { impl_->queue->Push(QueuedEvent{true, KvEvent{}}); }

bool KvEventPublisher::Flush(std::chrono::milliseconds timeout) {
  std::unique_lock lock(impl_->queue->mu);
  const uint64_t target = impl_->queue->accepted;
  return impl_->queue->progressed.wait_for(lock, timeout,
                                           [&] { return impl_->queue->done >= target; });
}

const std::string& KvEventPublisher::endpoint() const { return impl_->bound_endpoint; }
uint64_t KvEventPublisher::published_events() const { return impl_->published_events.load(); }
uint64_t KvEventPublisher::published_batches() const { return impl_->published_batches.load(); }
uint64_t KvEventPublisher::dropped_events() const { return impl_->queue->dropped.load(); }

}  // namespace kvbm
