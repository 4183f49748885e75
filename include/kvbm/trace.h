// Request traces in the Mooncake format (FAST'25), the input of `kvbm replay` (kvbm/replay.h).
//
// Format: one JSON object per line with exactly the keys `timestamp` (ms), `input_length`,
// `output_length` (tokens) and `hash_ids` (one id per 512-token block of the prompt, chained
// prefix ids: equal ids mean equal prefixes). The parser is strict: a silently misread trace
// gives plausible, wrong hit rates. Tokens are synthesised per id (SynthesizeTokens), so equal
// ids give equal sequence hashes.
//
// Thread safety: every function is re-entrant; a Trace is immutable after parsing and may be
// shared by concurrent readers. Ownership: a Trace owns its requests; the parser keeps no
// reference to its input.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "kvbm/error.h"
#include "kvbm/tokens.h"

namespace kvbm {

// Tokens per trace block (one hash id); fixed by the Mooncake format.
inline constexpr uint32_t kTraceBlockTokens = 512;

struct TraceRequest {
  double timestamp_ms = 0;
  uint64_t input_length = 0;
  uint64_t output_length = 0;
  std::vector<uint64_t> hash_ids;
};

struct Trace {
  std::vector<TraceRequest> requests;  // sorted by timestamp (stable)
  uint64_t block_refs = 0;             // sum of len(hash_ids)
  uint64_t input_tokens = 0;
  // Distinct full pages of `page_size` tokens over all prompts (what "unlimited" must hold).
  uint64_t DistinctFullPages(uint32_t page_size) const;
  // Sum over requests of ceil((input + output) / page_size): G1 never evicts at this size.
  uint64_t TotalPages(uint32_t page_size) const;
};

// The longest line accepted, newline excluded. A Mooncake line is ~8 bytes per 512 prompt
// tokens, so 1 MiB is a prompt of ~60M tokens; anything longer is not a trace (/dev/zero, a
// binary file) and is refused before it can grow the process.
inline constexpr size_t kMaxTraceLineBytes = size_t{1} << 20;

// Parses JSONL text. Blank lines are skipped; `limit` > 0 keeps the first `limit` requests.
// InvalidArgument naming the 1-based line for malformed JSON, a missing, repeated or unknown
// key, a negative or non-integer length, len(hash_ids) != ceil(input_length / 512), a line
// longer than kMaxTraceLineBytes; and for a text without any request ("no requests").
Result<Trace> ParseMooncakeTrace(std::string_view text, size_t limit = 0);
// Reads and parses a file line by line, never holding more than one line beyond the parsed
// requests. IoError naming the path when it cannot be opened or read (a directory included);
// the parser's errors prefixed with the path.
Result<Trace> ReadMooncakeTrace(const std::string& path, size_t limit = 0);

// The prompt tokens of `request`: block id h contributes tokens derived from (h, position)
// only, the last block cut to input_length. Pure; `out` is overwritten.
void SynthesizeTokens(const TraceRequest& request, std::vector<Token>& out);

}  // namespace kvbm
