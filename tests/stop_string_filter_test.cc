// StopStringFilter against hand-computed releases: for each piece pushed, the text the gateway
// may send at that moment, then what Finish releases.
#include "gateway/stop_string_filter.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace dsmoe {
namespace {

// Pushes `pieces` one by one; returns what each Push released, then (unless a stop string was
// found) what Finish released.
std::vector<std::string> Filter(const std::vector<std::string>& stops,
                                const std::vector<std::string>& pieces, bool* stopped) {
  StopStringFilter filter(stops);
  std::vector<std::string> out;
  for (const std::string& p : pieces) out.push_back(filter.Push(p));
  *stopped = filter.stopped();
  out.push_back(filter.Finish());
  return out;
}

using Out = std::vector<std::string>;

TEST(StopStringFilter, NoStopStringsPassEverythingAtOnce) {
  bool stopped;
  EXPECT_EQ(Filter({}, {"Hel", "lo", " world"}, &stopped), (Out{"Hel", "lo", " world", ""}));
  EXPECT_FALSE(stopped);
}

TEST(StopStringFilter, TextThatCannotBeginAStopIsNotHeld) {
  bool stopped;
  EXPECT_EQ(Filter({"END"}, {"abc", "def"}, &stopped), (Out{"abc", "def", ""}));
  EXPECT_FALSE(stopped);
}

TEST(StopStringFilter, StopStringSplitAcrossPieces) {
  bool stopped;
  // "x" goes out; "E" and "EN" could begin "END"; "D" completes it: nothing after "x".
  EXPECT_EQ(Filter({"END"}, {"xE", "N", "D tail"}, &stopped), (Out{"x", "", "", ""}));
  EXPECT_TRUE(stopped);
}

TEST(StopStringFilter, HeldTextIsReleasedWhenItStopsMatching) {
  bool stopped;
  // "EN" is held, then "ENx" cannot begin "END" any more.
  EXPECT_EQ(Filter({"END"}, {"aEN", "x"}, &stopped), (Out{"a", "ENx", ""}));
  EXPECT_FALSE(stopped);
}

TEST(StopStringFilter, HeldTextIsReleasedAtTheEnd) {
  bool stopped;
  EXPECT_EQ(Filter({"END"}, {"aEN"}, &stopped), (Out{"a", "EN"}));
  EXPECT_FALSE(stopped);
}

TEST(StopStringFilter, OverlappingPrefixHoldsOnlyWhatCanStillMatch) {
  bool stopped;
  // Stop "aab": after "aa", "aa" is held; "a" arrives: "aaa" — the first "a" can no longer
  // begin "aab" (it would need "aab" at 0, but "aaa" has "a" at 2), the tail "aa" still can.
  EXPECT_EQ(Filter({"aab"}, {"aa", "a", "b"}, &stopped), (Out{"", "a", "", ""}));
  EXPECT_TRUE(stopped);
}

TEST(StopStringFilter, SelfOverlappingStopIsFoundAfterAFalseStart) {
  bool stopped;
  // "abab" against stop "abac": "aba" held, "b" breaks it at 0, but "ab" may begin it again.
  EXPECT_EQ(Filter({"abac"}, {"aba", "b", "ac!"}, &stopped), (Out{"", "ab", "", ""}));
  EXPECT_TRUE(stopped);
}

TEST(StopStringFilter, TheEarliestOfSeveralStopsWins) {
  bool stopped;
  EXPECT_EQ(Filter({"b", "ab"}, {"xab"}, &stopped), (Out{"x", ""}));
  EXPECT_TRUE(stopped);
  EXPECT_EQ(Filter({"cd", "b"}, {"a", "bcd"}, &stopped), (Out{"a", "", ""}));
  EXPECT_TRUE(stopped);
}

TEST(StopStringFilter, TheLongestPossibleBeginningAmongStopsIsHeld) {
  bool stopped;
  // "abc" could begin "abcd" (hold 3) and ends in "c", a beginning of "cx" (hold 1): hold 3.
  EXPECT_EQ(Filter({"cx", "abcd"}, {"zabc", "q"}, &stopped), (Out{"z", "abcq", ""}));
  EXPECT_FALSE(stopped);
  // Then "x" completes "cx" inside the held text: what precedes it goes out.
  EXPECT_EQ(Filter({"cx", "abcd"}, {"zabc", "x"}, &stopped), (Out{"z", "ab", ""}));
  EXPECT_TRUE(stopped);
}

TEST(StopStringFilter, StopAtTheVeryStart) {
  bool stopped;
  EXPECT_EQ(Filter({"Hi"}, {"Hi there"}, &stopped), (Out{"", ""}));
  EXPECT_TRUE(stopped);
  EXPECT_EQ(Filter({"Hi"}, {"H", "i", "more"}, &stopped), (Out{"", "", "", ""}));
  EXPECT_TRUE(stopped);
}

TEST(StopStringFilter, NothingIsReleasedAfterAStop) {
  StopStringFilter filter({"."});
  EXPECT_EQ(filter.Push("one. two"), "one");
  EXPECT_EQ(filter.Push("three"), "");
  EXPECT_EQ(filter.Finish(), "");
  EXPECT_TRUE(filter.stopped());
}

TEST(StopStringFilter, Utf8StopStringsAndText) {
  bool stopped;
  // "é" is C3 A9, "日本" is E6 97 A5 E6 9C AC. Stop "本語": "日" goes out, "本" is held.
  EXPECT_EQ(Filter({"本語"}, {"é日本", "語です"}, &stopped), (Out{"é日", "", ""}));
  EXPECT_TRUE(stopped);
  // A multi-byte stop never holds back part of another character: "ä" (C3 A4) shares its
  // first byte with "é" (C3 A9), but only whole characters arrive, so "ä" is not a beginning.
  EXPECT_EQ(Filter({"éx"}, {"aä", "é", "y"}, &stopped), (Out{"aä", "", "éy", ""}));
  EXPECT_FALSE(stopped);
}

}  // namespace
}  // namespace dsmoe
