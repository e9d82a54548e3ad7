// Command-line helpers shared by the benchmarks.
#pragma once

#include <sstream>
#include <string>
#include <vector>

namespace dsmoe::bench {

// "a,b,c" → {"a", "b", "c"} (the benchmarks' list flags: --presets, --dtypes, --threads, ...).
inline std::vector<std::string> SplitList(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(item);
  return out;
}

}  // namespace dsmoe::bench
