// The Mooncake trace reader (include/kvbm/trace.h).
#include "kvbm/trace.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>
#include <unordered_set>

namespace kvbm {
namespace {

// A strict reader of exactly one flat JSON object per line with the four Mooncake keys.

class LineParser {
 public:
  LineParser(std::string_view text, size_t line) : s_(text), line_(line) {}

  Result<TraceRequest> Parse() {
    TraceRequest r;
    bool seen[4] = {false, false, false, false};
    static constexpr const char* kKeys[4] = {"timestamp", "input_length", "output_length",
                                             "hash_ids"};
    SkipWs();
    if (!Eat('{')) return Fail("expected '{' at the start of the object");
    SkipWs();
    if (Eat('}'))
      return Fail("empty object (expected timestamp, input_length, output_length, hash_ids)");
    while (true) {
      SkipWs();
      auto key = ParseString();
      if (!key) return std::unexpected(key.error());
      SkipWs();
      if (!Eat(':')) return Fail(fmt::format("expected ':' after key \"{}\"", *key));
      SkipWs();
      int which = -1;
      for (int k = 0; k < 4; ++k)
        if (*key == kKeys[k]) which = k;
      if (which < 0)
        return Fail(fmt::format(
            "unexpected key \"{}\" (expected timestamp, input_length, output_length, hash_ids)",
            *key));
      if (seen[which]) return Fail(fmt::format("key \"{}\" appears twice", *key));
      seen[which] = true;
      if (which == 0) {
        auto v = ParseNumber(*key);
        if (!v) return std::unexpected(v.error());
        if (*v < 0) return Fail(fmt::format("\"timestamp\" must be >= 0, got {}", *v));
        r.timestamp_ms = *v;
      } else if (which == 1 || which == 2) {
        auto v = ParseUnsigned(*key);
        if (!v) return std::unexpected(v.error());
        (which == 1 ? r.input_length : r.output_length) = *v;
      } else {
        if (!Eat('[')) return Fail("\"hash_ids\" must be an array of non-negative integers");
        SkipWs();
        if (!Eat(']')) {
          while (true) {
            SkipWs();
            auto v = ParseUnsigned("hash_ids[]");
            if (!v) return std::unexpected(v.error());
            r.hash_ids.push_back(*v);
            SkipWs();
            if (Eat(',')) continue;
            if (Eat(']')) break;
            return Fail("expected ',' or ']' in \"hash_ids\"");
          }
        }
      }
      SkipWs();
      if (Eat(',')) continue;
      if (Eat('}')) break;
      return Fail("expected ',' or '}' after a value");
    }
    SkipWs();
    if (pos_ != s_.size()) return Fail("trailing characters after the object");
    for (int k = 0; k < 4; ++k)
      if (!seen[k]) return Fail(fmt::format("missing key \"{}\"", kKeys[k]));
    uint64_t want = (r.input_length + kTraceBlockTokens - 1) / kTraceBlockTokens;
    if (r.hash_ids.size() != want)
      return Fail(fmt::format("{} hash_ids for input_length {} (expected ceil({}/{}) = {})",
                              r.hash_ids.size(), r.input_length, r.input_length, kTraceBlockTokens,
                              want));
    return r;
  }

 private:
  std::unexpected<Error> Fail(const std::string& what) const {
    return MakeError(ErrorCode::kInvalidArgument, fmt::format("trace line {}: {}", line_, what));
  }
  void SkipWs() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\r')) ++pos_;
  }
  bool Eat(char c) {
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  Result<std::string> ParseString() {
    if (!Eat('"')) return Fail("expected a quoted key");
    size_t start = pos_;
    while (pos_ < s_.size() && s_[pos_] != '"') {
      if (s_[pos_] == '\\') return Fail("escapes in keys are not supported");
      ++pos_;
    }
    if (pos_ >= s_.size()) return Fail("unterminated string");
    std::string out(s_.substr(start, pos_ - start));
    ++pos_;
    return out;
  }
  Result<uint64_t> ParseUnsigned(std::string_view key) {
    if (pos_ < s_.size() && s_[pos_] == '-') return Fail(fmt::format("\"{}\" must be >= 0", key));
    uint64_t v = 0;
    auto [end, ec] = std::from_chars(s_.data() + pos_, s_.data() + s_.size(), v);
    if (ec != std::errc() || end == s_.data() + pos_)
      return Fail(fmt::format("\"{}\" must be a non-negative integer", key));
    pos_ = static_cast<size_t>(end - s_.data());
    if (pos_ < s_.size() && (s_[pos_] == '.' || s_[pos_] == 'e' || s_[pos_] == 'E'))
      return Fail(fmt::format("\"{}\" must be an integer", key));
    return v;
  }
  Result<double> ParseNumber(std::string_view key) {
    double v = 0;
    auto [end, ec] = std::from_chars(s_.data() + pos_, s_.data() + s_.size(), v);
    if (ec != std::errc() || end == s_.data() + pos_ || !std::isfinite(v))
      return Fail(fmt::format("\"{}\" must be a number", key));
    pos_ = static_cast<size_t>(end - s_.data());
    return v;
  }

  std::string_view s_;
  size_t line_;
  size_t pos_ = 0;
};

uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t CeilDiv(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

// Collects requests line by line; shared by the in-memory and the streaming reader so both
// number lines and apply the limits the same way.
class TraceBuilder {
 public:
  explicit TraceBuilder(size_t limit) : limit_(limit) {}

  bool full() const { return limit_ != 0 && trace_.requests.size() >= limit_; }

  // One line, newline excluded; `line_no` is 1-based.
  Status AddLine(std::string_view line, size_t line_no) {
    if (line.size() > kMaxTraceLineBytes) return TooLong(line_no);
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) return {};
    auto r = LineParser(line, line_no).Parse();
    if (!r) return std::unexpected(r.error());
    trace_.block_refs += r->hash_ids.size();
    trace_.input_tokens += r->input_length;
    trace_.requests.push_back(std::move(*r));
    return {};
  }

  static std::unexpected<Error> TooLong(size_t line_no) {
    return MakeError(ErrorCode::kInvalidArgument,
                     fmt::format("trace line {}: longer than {} bytes (is this a Mooncake JSONL "
                                 "trace?)",
                                 line_no, kMaxTraceLineBytes));
  }

  Result<Trace> Finish() {
    if (trace_.requests.empty())
      return MakeError(ErrorCode::kInvalidArgument,
                       "no requests: the trace is empty (a Mooncake trace has one JSON object "
                       "per line)");
    std::stable_sort(trace_.requests.begin(), trace_.requests.end(),
                     [](const TraceRequest& a, const TraceRequest& b) {
                       return a.timestamp_ms < b.timestamp_ms;
                     });
    return std::move(trace_);
  }

 private:
  size_t limit_;
  Trace trace_;
};

// Closes a descriptor on scope exit.
struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) close(fd);
  }
};

}  // namespace

Result<Trace> ParseMooncakeTrace(std::string_view text, size_t limit) {
  TraceBuilder builder(limit);
  size_t line_no = 0;
  size_t pos = 0;
  while (pos < text.size() && !builder.full()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string_view::npos) nl = text.size();
    std::string_view line = text.substr(pos, nl - pos);
    pos = nl + 1;
    ++line_no;
    if (auto s = builder.AddLine(line, line_no); !s) return std::unexpected(s.error());
  }
  return builder.Finish();
}

Result<Trace> ReadMooncakeTrace(const std::string& path, size_t limit) {
  auto io_error = [&path](int err) {
    return MakeError(ErrorCode::kIoError,
                     fmt::format("cannot read trace {}: {}", path, std::strerror(err)));
  };
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return io_error(errno);
  FdCloser closer{fd};
  struct stat st {};
  if (fstat(fd, &st) != 0) return io_error(errno);
  if (S_ISDIR(st.st_mode)) return io_error(EISDIR);

  auto with_path = [&path](const Error& e) {
    return MakeError(e.code(), path + ": " + e.message());
  };
  TraceBuilder builder(limit);
  std::string line;  // the current line so far; never longer than kMaxTraceLineBytes + chunk
  std::vector<char> chunk(64 * 1024);
  size_t line_no = 1;
  while (!builder.full()) {
    const ssize_t n = read(fd, chunk.data(), chunk.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return io_error(errno);
    }
    if (n == 0) break;
    std::string_view data(chunk.data(), static_cast<size_t>(n));
    while (!data.empty() && !builder.full()) {
      const size_t nl = data.find('\n');
      const std::string_view piece = data.substr(0, nl);
      if (line.size() + piece.size() > kMaxTraceLineBytes)
        return with_path(TraceBuilder::TooLong(line_no).error());
      if (nl == std::string_view::npos) {
        line.append(piece);
        break;
      }
      data.remove_prefix(nl + 1);
      Status s = line.empty() ? builder.AddLine(piece, line_no)
                              : builder.AddLine(line.append(piece), line_no);
      if (!s) return with_path(s.error());
      line.clear();
      ++line_no;
    }
  }
  if (!line.empty() && !builder.full()) {
    if (auto s = builder.AddLine(line, line_no); !s) return with_path(s.error());
  }
  auto trace = builder.Finish();
  if (!trace) return with_path(trace.error());
  return trace;
}

uint64_t Trace::DistinctFullPages(uint32_t page_size) const {
  // A full page is identified by the trace block holding its last token and its end offset in
  // that block: hash ids are chained, so the id fixes every token before it.
  std::unordered_set<uint64_t> seen;
  seen.reserve(block_refs * 2);
  for (const TraceRequest& r : requests) {
    for (uint64_t end = page_size; end <= r.input_length; end += page_size) {
      uint64_t block = (end - 1) / kTraceBlockTokens;
      uint64_t offset = end - block * kTraceBlockTokens;  // 1..512
      seen.insert(SplitMix64(r.hash_ids[block]) ^ (offset * 0x100000001B3ull));
    }
  }
  return seen.size();
}

uint64_t Trace::TotalPages(uint32_t page_size) const {
  uint64_t n = 0;
  for (const TraceRequest& r : requests) n += CeilDiv(r.input_length + r.output_length, page_size);
  return n;
}

void SynthesizeTokens(const TraceRequest& request, std::vector<Token>& out) {
  out.resize(request.input_length);
  for (uint64_t i = 0; i < request.input_length; ++i) {
    uint64_t h = request.hash_ids[i / kTraceBlockTokens];
    out[i] =
        static_cast<Token>(SplitMix64(h * kTraceBlockTokens + i % kTraceBlockTokens) & 0x7fffffffu);
  }
}

}  // namespace kvbm
