#include "gateway/stop_string_filter.h"

#include <algorithm>
#include <utility>

namespace dsmoe {

StopStringFilter::StopStringFilter(std::vector<std::string> stops) : stops_(std::move(stops)) {}

std::string StopStringFilter::Push(std::string_view piece) {
  if (stopped_) return {};
  held_.append(piece);
  // The earliest stop string wins: with "ab" and "b" in "xab", the output is "x".
  size_t cut = std::string::npos;
  for (const std::string& stop : stops_) cut = std::min(cut, held_.find(stop));
  if (cut != std::string::npos) {
    stopped_ = true;
    std::string out = held_.substr(0, cut);
    held_.clear();
    return out;
  }
  // Hold back the longest tail of held_ that is a proper prefix of some stop string: a stop
  // string that begins before that tail either lies whole in held_ (found above) or would run
  // past its end, and then its beginning would be such a tail.
  size_t keep = 0;
  for (const std::string& stop : stops_) {
    for (size_t n = std::min(stop.size() - 1, held_.size()); n > keep; --n) {
      if (held_.compare(held_.size() - n, n, stop, 0, n) == 0) {
        keep = n;
        break;
      }
    }
  }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string StopStringFilter::Finish() {
  std::string out;
  out.swap(held_);
  return out;
}

}  // namespace dsmoe
