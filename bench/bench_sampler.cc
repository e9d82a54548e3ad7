// The sampler on a vocabulary of DeepSeekMoE's size (102,400), per token: what choosing the
// next token costs beside a decode step, for the parameter sets clients send. Logits are
// shaped like a language model's (a few likely tokens, a long tail) from a fixed seed.
//
//   dsmoe_bench_sampler [--vocab 102400] [--draws 200]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_args.h"
#include "core/model/sampler.h"

int main(int argc, char** argv) {
  int64_t vocab = 102400, draws = 200;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--vocab") {
      vocab = std::stoll(argv[i + 1]);
    } else if (flag == "--draws") {
      draws = std::stoll(argv[i + 1]);
    } else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  if (vocab < 2 || draws < 1) {
    std::fprintf(stderr, "--vocab must be >= 2 and --draws >= 1\n");
    return 2;
  }
  // Logits: Gumbel-like tail plus a handful of strong candidates, different every draw.
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<std::vector<float>> logits(8, std::vector<float>(vocab));
  for (auto& l : logits) {
    for (auto& v : l) v = normal(rng);
    for (int j = 0; j < 8; ++j) l[rng() % vocab] += 12.0f - j;
  }
  struct Case {
    const char* name;
    dsmoe::SamplingParams params;
  };
  const Case cases[] = {
      {"greedy", {0.0, 0, 1.0, 1}},
      {"temperature 0.8", {0.8, 0, 1.0, 1}},
      {"temperature 0.8, top_p 0.95", {0.8, 0, 0.95, 1}},
      {"temperature 0.8, top_k 50", {0.8, 50, 1.0, 1}},
      {"temperature 0.8, top_k 50, top_p 0.9", {0.8, 50, 0.9, 1}},
      {"temperature 1.0, top_p 0.999 (flat tail)", {1.0, 0, 0.999, 1}},
  };
  std::printf("vocabulary %lld, %lld draws per case\n\n| parameters | µs per token |\n|---|---|\n",
              static_cast<long long>(vocab), static_cast<long long>(draws));
  for (const Case& c : cases) {
    dsmoe::Sampler sampler(vocab, c.params);
    int64_t sink = 0;
    double best =
        1e30;  // of 3 rounds: on a shared machine a round another process slowed says little
    for (int round = 0; round < 3; ++round) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int64_t d = 0; d < draws; ++d) sink += sampler.Sample(logits[d % logits.size()].data());
      best = std::min(
          best,
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    }
    std::printf("| %s | %.1f |\n", c.name, best / static_cast<double>(draws));
    if (sink < 0) std::printf("impossible\n");
  }
  return 0;
}
