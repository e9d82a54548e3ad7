// Load accounting: routed (token, expert) assignments per (layer, routed expert) over a sliding
// window of recent time, from the routing the attention servers do. What the imbalance gauge
// and the placement planner read.
//
// The window is num_buckets sub-windows of window_seconds / num_buckets each, so old load
// leaves it in steps rather than all at once.
//
// Thread-safety: Add may be called by one thread at a time (the runner's owner); Counts may run
// on any thread concurrently with it (the buckets are atomics; a bucket being recycled while
// read can make one reading slightly off).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

namespace dsmoe::router {

struct LoadWindowOptions {
  double window_seconds = 60;
  int num_buckets = 6;
  // Monotonic nanoseconds; injectable so tests can move time.
  std::function<int64_t()> now_ns = [] {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  };
};

class LoadWindow {
 public:
  // `tracked[l]`: whether layer l is counted (the MoE layers); each has num_experts experts.
  LoadWindow(const std::vector<bool>& tracked, int64_t num_experts, LoadWindowOptions options);

  // Adds counts[e] assignments to expert e of `layer` (counts has num_experts entries).
  void Add(int64_t layer, const int64_t* counts);
  // Assignments per expert of `layer` within the window ([num_experts]; zeros if not tracked).
  std::vector<int64_t> Counts(int64_t layer) const;

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  int64_t num_experts() const { return num_experts_; }
  bool tracked(int64_t layer) const {
    return layer >= 0 && layer < num_layers() && layers_[layer].window != nullptr;
  }

 private:
  struct Layer {
    std::unique_ptr<std::atomic<int64_t>[]> window;        // [num_buckets, E]; null: untracked
    std::unique_ptr<std::atomic<int64_t>[]> bucket_epoch;  // [num_buckets]: sub-window held
  };
  int64_t Epoch() const;

  LoadWindowOptions options_;
  int64_t num_experts_;
  int64_t bucket_ns_;
  std::vector<Layer> layers_;
};

}  // namespace dsmoe::router
