// libFuzzer target: the Mooncake trace parser (ParseMooncakeTrace, src/tools/trace.cpp), fed
// whatever file a user names to `kvbm replay`.
// Properties: no crash, leak or undefined behaviour; an accepted trace is internally consistent
// (every request has ceil(input_length / 512) hash ids, the totals add up, it is sorted) and the
// per-trace figures the replay derives from it are computable; a refused one says why.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "kvbm/trace.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // The first byte picks a request limit (0 = all), the rest is the trace text.
  const size_t limit = size > 0 ? data[0] % 8 : 0;
  const std::string_view text(reinterpret_cast<const char*>(data) + (size > 0), size - (size > 0));
  auto trace = kvbm::ParseMooncakeTrace(text, limit);
  if (!trace) {
    if (trace.error().message().empty()) std::abort();
    return 0;
  }
  if (trace->requests.empty()) std::abort();  // an empty trace is an error, not a result
  if (limit != 0 && trace->requests.size() > limit) std::abort();
  uint64_t refs = 0, tokens = 0;
  for (const kvbm::TraceRequest& r : trace->requests) {
    const uint64_t want =
        r.input_length / kvbm::kTraceBlockTokens + (r.input_length % kvbm::kTraceBlockTokens != 0);
    if (r.hash_ids.size() != want || !(r.timestamp_ms >= 0)) std::abort();
    refs += r.hash_ids.size();
    tokens += r.input_length;
  }
  if (refs != trace->block_refs || tokens != trace->input_tokens) std::abort();
  if (!std::is_sorted(trace->requests.begin(), trace->requests.end(),
                      [](const auto& a, const auto& b) { return a.timestamp_ms < b.timestamp_ms; }))
    std::abort();
  if (trace->DistinctFullPages(kvbm::kTraceBlockTokens) > trace->block_refs) std::abort();
  (void)trace->TotalPages(16);
  // Synthesised tokens for the small requests (a huge input_length is valid but slow here).
  std::vector<kvbm::Token> tokens_out;
  for (const kvbm::TraceRequest& r : trace->requests)
    if (r.input_length <= 4 * kvbm::kTraceBlockTokens) {
      kvbm::SynthesizeTokens(r, tokens_out);
      if (tokens_out.size() != r.input_length) std::abort();
    }
  return 0;
}
