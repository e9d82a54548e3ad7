// The gateway's stop strings over a stream of text pieces: text is released as soon as it can
// no longer be the beginning of a stop string, and nothing from the first stop string on is
// ever released. A stop string may span several pieces (and several upstream messages), and
// what was released cannot be taken back, so a tail that could begin a stop string is held
// until the next piece decides it.
//
// Works on bytes. The pieces come from a StreamingDecoder (whole UTF-8 characters) and stop
// strings are valid UTF-8 (proto3 strings), so a stop string starts at a character boundary
// and the released text never ends inside a character.
//
// Thread-compatible: one per stream.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace dsmoe {

class StopStringFilter {
 public:
  // REQUIRES: no stop string is empty (request validation refuses them). No stop strings:
  // every piece passes through at once.
  explicit StopStringFilter(std::vector<std::string> stops);

  // Adds `piece` and returns the text that may be sent now (possibly empty). Once a stop
  // string appears, stopped() is true, the text before it is returned (the stop string and
  // anything after it are dropped), and later calls return nothing.
  std::string Push(std::string_view piece);
  // The stream ended: returns the text still held back (empty after a stop).
  std::string Finish();

  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;  // received, not yet released: a possible beginning of a stop string
  bool stopped_ = false;
};

}  // namespace dsmoe
