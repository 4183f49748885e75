// The Mooncake trace reader's limits and its streaming file reader (include/kvbm/trace.h).
#include "kvbm/trace.h"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

namespace kvbm {
namespace {

std::string Line(double ts, uint64_t in, uint64_t out, const std::string& ids) {
  return fmt::format(
      "{{\"timestamp\": {}, \"input_length\": {}, \"output_length\": {}, \"hash_ids\": [{}]}}", ts,
      in, out, ids);
}

// A temporary directory removed with everything in it.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "kvbm_trace_XXXXXX").string();
    path = mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string Write(const std::string& name, const std::string& text) const {
    std::ofstream(path / name, std::ios::binary) << text;
    return (path / name).string();
  }
};

long RssKiB() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  return -1;
}

void ExpectError(const Result<Trace>& t, ErrorCode code,
                 std::initializer_list<const char*> needles) {
  ASSERT_FALSE(t);
  EXPECT_EQ(t.error().code(), code) << t.error().ToString();
  for (const char* n : needles)
    EXPECT_NE(t.error().message().find(n), std::string::npos) << t.error().message();
}

TEST(TraceReader, EmptyTextHasNoRequests) {
  for (const char* text : {"", "\n", "  \n\t\r\n\n"})
    ExpectError(ParseMooncakeTrace(text), ErrorCode::kInvalidArgument, {"no requests"});
}

TEST(TraceReader, OverlongLineIsRefusedNamingTheLine) {
  std::string text = Line(0, 10, 1, "0") + "\n" + std::string(kMaxTraceLineBytes + 1, ' ') + "x\n";
  ExpectError(ParseMooncakeTrace(text), ErrorCode::kInvalidArgument, {"line 2", "longer than"});
}

TEST(TraceReader, NonDecimalNumbersAreRefused) {
  for (const char* bad : {"0x10", "1e3", "+5", "0b1"}) {
    const std::string text = fmt::format(
        "{{\"timestamp\": 0, \"input_length\": {}, \"output_length\": 1, \"hash_ids\": [0]}}\n",
        bad);
    ExpectError(ParseMooncakeTrace(text), ErrorCode::kInvalidArgument, {"line 1"});
  }
  ExpectError(ParseMooncakeTrace(Line(0, 10, 1, "0x1") + "\n"), ErrorCode::kInvalidArgument,
              {"line 1", "hash_ids"});
}

// `kvbm replay /dev/zero --limit 5` grew without bound (issue 17): one endless line.
TEST(TraceReader, DevZeroIsRefusedWithBoundedMemory) {
  const long before = RssKiB();
  auto t = ReadMooncakeTrace("/dev/zero", 5);
  ExpectError(t, ErrorCode::kInvalidArgument, {"/dev/zero", "line 1", "longer than"});
  EXPECT_LT(RssKiB() - before, 16 * 1024) << "KiB grown while reading /dev/zero";
}

TEST(TraceReader, DirectoryEmptyAndMissingFilesAreErrorsNamingThePath) {
  TempDir dir;
  ExpectError(ReadMooncakeTrace(dir.path.string()), ErrorCode::kIoError,
              {dir.path.c_str(), "Is a directory"});
  const std::string empty = dir.Write("empty.jsonl", "");
  ExpectError(ReadMooncakeTrace(empty), ErrorCode::kInvalidArgument,
              {"empty.jsonl", "no requests"});
  const std::string blank = dir.Write("blank.jsonl", "\n\n  \n");
  ExpectError(ReadMooncakeTrace(blank), ErrorCode::kInvalidArgument,
              {"blank.jsonl", "no requests"});
  const std::string missing = (dir.path / "missing.jsonl").string();
  ExpectError(ReadMooncakeTrace(missing), ErrorCode::kIoError, {"missing.jsonl"});
  const std::string bad = dir.Write("bad.jsonl", Line(0, 10, 1, "0") + "\n{\"timestamp\": 1}\n");
  ExpectError(ReadMooncakeTrace(bad), ErrorCode::kInvalidArgument, {"bad.jsonl", "line 2"});
}

// The streaming reader reads in 64 KiB chunks: lines crossing chunk boundaries, CRLF, blank
// lines, no final newline and `limit` must give exactly what the in-memory parser gives.
TEST(TraceReader, StreamingReadEqualsInMemoryParse) {
  TempDir dir;
  std::string text;
  for (int i = 0; i < 4000; ++i) {
    std::string ids;
    const int blocks = 1 + i % 9;
    for (int b = 0; b < blocks; ++b) ids += fmt::format("{}{}", b ? ", " : "", (i * 7 + b) % 1000);
    text += Line((i * 37) % 1000, blocks * 512 - i % 100, i % 50, ids);
    text += i % 3 == 0 ? "\r\n" : "\n";
    if (i % 10 == 0) text += "\n";
  }
  text.pop_back();  // no final newline
  ASSERT_GT(text.size(), 3u * 64 * 1024);
  const std::string path = dir.Write("t.jsonl", text);
  for (size_t limit : {size_t{0}, size_t{1}, size_t{777}, size_t{4000}, size_t{5000}}) {
    auto mem = ParseMooncakeTrace(text, limit);
    auto file = ReadMooncakeTrace(path, limit);
    ASSERT_TRUE(mem) << mem.error().ToString();
    ASSERT_TRUE(file) << file.error().ToString();
    ASSERT_EQ(file->requests.size(), mem->requests.size()) << limit;
    EXPECT_EQ(file->requests.size(), limit == 0 || limit > 4000 ? 4000u : limit);
    EXPECT_EQ(file->block_refs, mem->block_refs);
    EXPECT_EQ(file->input_tokens, mem->input_tokens);
    for (size_t i = 0; i < mem->requests.size(); ++i) {
      EXPECT_EQ(file->requests[i].timestamp_ms, mem->requests[i].timestamp_ms);
      EXPECT_EQ(file->requests[i].input_length, mem->requests[i].input_length);
      EXPECT_EQ(file->requests[i].hash_ids, mem->requests[i].hash_ids);
    }
  }
  // An overlong line in the middle of a file is found by the streaming reader too.
  const std::string big =
      dir.Write("big.jsonl", Line(0, 10, 1, "0") + "\n" + std::string(3 * kMaxTraceLineBytes, '7'));
  ExpectError(ReadMooncakeTrace(big), ErrorCode::kInvalidArgument,
              {"big.jsonl", "line 2", "longer than"});
}

}  // namespace
}  // namespace kvbm
