// What a token's logprobs cost on the attention server's loop thread (core/model/sampler.h
// ComputeLogprobs: a double log-sum-exp over the vocabulary and a bounded-heap top-N), side by
// side with what sampling the token costs already (Sampler::Sample, greedy and at T = 0.8) and
// with a full sort of the vocabulary (what a partial selection avoids), on random logits of
// the vocabulary sizes dsmoe serves. Per token, one thread; microseconds.
//
//   dsmoe_bench_logprobs
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "core/model/sampler.h"

namespace {

using namespace dsmoe;
using Clock = std::chrono::steady_clock;

// Microseconds per call of `fn`, the best of 5 rounds of `iters` calls.
template <class Fn>
double MicrosPerCall(int iters, Fn&& fn) {
  double best = 1e30;
  for (int round = 0; round < 5; ++round) {
    const auto t0 = Clock::now();
    for (int i = 0; i < iters; ++i) fn(i);
    best = std::min(best, std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  return best / iters;
}

}  // namespace

int main() {
  std::printf("%8s  %10s %10s %10s  %10s %10s  %10s\n", "vocab", "lp top=0", "lp top=5",
              "lp top=20", "greedy", "T=0.8", "full sort");
  for (int64_t V : {512, 32000, 102400, 129280}) {
    std::mt19937 rng(1);
    std::normal_distribution<float> normal(0.0f, 4.0f);
    std::vector<float> logits(V);
    for (float& x : logits) x = normal(rng);
    const int iters = V > 10000 ? 20 : 2000;
    TokenLogprobs lp;
    double lp_us[3];
    const int tops[3] = {0, 5, 20};
    for (int k = 0; k < 3; ++k) {
      lp_us[k] = MicrosPerCall(iters, [&](int i) {
        ComputeLogprobs(logits.data(), V, static_cast<int32_t>(i % V), tops[k], &lp);
      });
    }
    Sampler greedy(V, {}), tempered(V, {0.8, 0, 1.0, 1});
    volatile int32_t sink = 0;
    const double greedy_us =
        MicrosPerCall(iters, [&](int) { sink = greedy.Sample(logits.data()); });
    const double tempered_us =
        MicrosPerCall(iters, [&](int) { sink = tempered.Sample(logits.data()); });
    std::vector<std::pair<float, int32_t>> all(V);
    const double sort_us = MicrosPerCall(iters, [&](int) {
      for (int64_t i = 0; i < V; ++i) all[i] = {logits[i], static_cast<int32_t>(i)};
      std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a > b; });
    });
    (void)sink;
    std::printf("%8lld  %10.1f %10.1f %10.1f  %10.1f %10.1f  %10.1f\n", static_cast<long long>(V),
                lp_us[0], lp_us[1], lp_us[2], greedy_us, tempered_us, sort_us);
  }
  return 0;
}
