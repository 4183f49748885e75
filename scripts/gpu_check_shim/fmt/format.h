// A stand-in for fmt's fmt::format, used only by scripts/gpu_check.sh to build the GPU check
// on machines without libfmt (the lent GPU machines have no Debian dev packages). It supports
// what the few sources compiled there use: "{}" replaced by the next argument (streamed), with
// any format spec inside the braces ignored. Not part of kvbm's build.
#pragma once

#include <sstream>
#include <string>
#include <string_view>
#include <utility>

namespace fmt {

template <typename... Args>
using format_string = std::string_view;

namespace shim {
inline void Append(std::ostringstream& out, std::string_view& rest) { out << rest; rest = {}; }
template <typename T, typename... Rest>
void Append(std::ostringstream& out, std::string_view& rest, T&& value, Rest&&... more) {
  const size_t open = rest.find('{');
  const size_t close = open == std::string_view::npos ? open : rest.find('}', open);
  if (close == std::string_view::npos) {
    out << rest;
    rest = {};
    return;
  }
  out << rest.substr(0, open) << std::forward<T>(value);
  rest.remove_prefix(close + 1);
  Append(out, rest, std::forward<Rest>(more)...);
}
}  // namespace shim

template <typename... Args>
std::string format(std::string_view pattern, Args&&... args) {
  std::ostringstream out;
  shim::Append(out, pattern, std::forward<Args>(args)...);
  return out.str();
}

}  // namespace fmt
