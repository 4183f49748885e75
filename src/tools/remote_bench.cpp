#include "kvbm/remote_bench.h"

#include <fmt/format.h>

#include <algorithm>
#include <optional>
#include <cstring>
#include <random>
#include <set>
#include <span>
#include <string_view>
#include <utility>

#include "kvbm/remote_block.h"

namespace kvbm {

using Clock = std::chrono::steady_clock;

RemoteBench::RemoteBench(const RemoteBenchOptions& options) : options_(options) {}
RemoteBench::~RemoteBench() = default;

Result<std::unique_ptr<RemoteBench>> RemoteBench::Create(const RemoteBenchOptions& options) {
  if (options.block_bytes == 0 || options.num_blocks == 0 || options.batch_blocks == 0)
    return MakeError(ErrorCode::kInvalidArgument,
                     fmt::format("kvbm bench remote: block bytes ({}), blocks ({}) and batch ({}) must be > 0",
                                 options.block_bytes, options.num_blocks, options.batch_blocks));
  if (auto s = ValidateRemoteNamespace(options.name_space); !s) return std::unexpected(s.error());
  std::unique_ptr<RemoteBench> b(new RemoteBench(options));
  RedisClusterOptions ro;
  ro.seeds = options.seeds;
  ro.connect_timeout = ro.command_timeout = ro.call_timeout = options.timeout;
  auto client = RedisCluster::Connect(ro);
  if (!client) return std::unexpected(client.error());
  b->client_ = std::move(*client);
  std::random_device rd;
  std::mt19937_64 rng((uint64_t{rd()} << 32) ^ rd());
  b->fingerprint_ = rng();
  for (uint64_t i = 0; i < options.num_blocks; ++i)
    b->keys_.push_back(RemoteBlockKey(options.name_space, b->fingerprint_, i));
  b->seed_.resize(options.block_bytes * options.num_blocks);
  for (size_t i = 0; i + 8 <= b->seed_.size(); i += 8) {
    uint64_t v = rng();
    std::memcpy(b->seed_.data() + i, &v, 8);
  }
  b->g2_ = b->seed_;
  return b;
}

uint64_t RemoteBench::bytes() const { return options_.block_bytes * options_.num_blocks; }
uint64_t RemoteBench::value_bytes() const { return kRemoteBlockHeaderBytes + options_.block_bytes; }

uint32_t RemoteBench::masters() const {
  std::set<std::string> m;
  for (uint32_t slot = 0; slot < kRedisClusterSlots; ++slot)
    if (auto a = client_->MasterOf(static_cast<uint16_t>(slot))) m.insert(a->ToString());
  return static_cast<uint32_t>(m.size());
}

Result<double> RemoteBench::PutSeconds() {
  const uint64_t bs = options_.block_bytes;
  const auto start = Clock::now();
  std::vector<RemoteBlockHeader> headers;
  std::vector<RedisSetItem> items;
  for (uint64_t first = 0; first < options_.num_blocks; first += options_.batch_blocks) {
    const uint64_t end = std::min<uint64_t>(first + options_.batch_blocks, options_.num_blocks);
    // As the worker's StartRemotePut: a header per block (its checksum over the bytes), then one
    // pipelined SET call sending header and bytes from the G2 block itself.
    headers.clear();
    items.clear();
    for (uint64_t i = first; i < end; ++i)
      headers.push_back(EncodeRemoteBlockHeader(fingerprint_, i, std::span<const uint8_t>(g2_.data() + i * bs, bs)));
    for (uint64_t i = first; i < end; ++i)
      items.push_back({keys_[i],
                       std::string_view(reinterpret_cast<const char*>(headers[i - first].data()), kRemoteBlockHeaderBytes),
                       std::string_view(reinterpret_cast<const char*>(g2_.data() + i * bs), bs)});
    if (auto s = client_->SetParts(items); !s) return std::unexpected(s.error());
  }
  return std::chrono::duration<double>(Clock::now() - start).count();
}

Result<double> RemoteBench::GetSeconds() {
  const uint64_t bs = options_.block_bytes;
  const auto start = Clock::now();
  for (uint64_t first = 0; first < options_.num_blocks; first += options_.batch_blocks) {
    const uint64_t end = std::min<uint64_t>(first + options_.batch_blocks, options_.num_blocks);
    // As the worker's StartFetch: one pipelined GET call, every value verified and copied into
    // its G2 block straight from the reply.
    std::optional<Error> bad;
    auto st = client_->GetEach(
        std::span<const std::string>(keys_).subspan(first, end - first),
        [&](size_t k, std::optional<std::string_view> v) {
          const uint64_t i = first + k;
          if (bad) return;
          if (!v) {
            bad = Error(ErrorCode::kNotFound,
                        fmt::format("kvbm bench remote: block {} is gone from G4 (evicted? check maxmemory)", i));
            return;
          }
          auto bytes = DecodeRemoteBlock(*v, fingerprint_, i, bs);
          if (!bytes) {
            bad = bytes.error();
            return;
          }
          std::memcpy(g2_.data() + i * bs, bytes->data(), bs);
        });
    if (!st) return std::unexpected(st.error());
    if (bad) return std::unexpected(*bad);
  }
  return std::chrono::duration<double>(Clock::now() - start).count();
}

Result<uint64_t> RemoteBench::Verify() {
  std::fill(g2_.begin(), g2_.end(), uint8_t{0});
  if (auto r = GetSeconds(); !r) return std::unexpected(r.error());
  uint64_t wrong = 0;
  const uint64_t bs = options_.block_bytes;
  for (uint64_t i = 0; i < options_.num_blocks; ++i)
    if (std::memcmp(g2_.data() + i * bs, seed_.data() + i * bs, bs) != 0) ++wrong;
  return wrong;
}

Status RemoteBench::Clear() {
  auto r = client_->Del(keys_);
  if (!r) return std::unexpected(r.error());
  return {};
}

}  // namespace kvbm
