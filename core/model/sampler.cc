#include "core/model/sampler.h"

#include <algorithm>
#include <cmath>

namespace dsmoe {

absl::Status SamplingParams::Validate() const {
  if (!(temperature >= 0.0) || !std::isfinite(temperature)) {
    return absl::InvalidArgumentError(absl::StrCat("temperature must be >= 0, got ", temperature));
  }
  if (top_k < 0) return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", top_k));
  if (!(top_p > 0.0 && top_p <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", top_p));
  }
  return absl::OkStatus();
}

int32_t ArgMax(const float* logits, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) best = logits[i] > logits[best] ? i : best;
  return static_cast<int32_t>(best);
}

Sampler::Sampler(int64_t vocab_size, const SamplingParams& params)
    : params_(params), rng_(params.seed), vocab_size_(vocab_size) {
  candidates_.reserve(vocab_size);
}

int32_t Sampler::Sample(const float* logits) {
  if (params_.temperature == 0.0) return ArgMax(logits, vocab_size_);
  candidates_.clear();
  for (int64_t i = 0; i < vocab_size_; ++i)
    candidates_.emplace_back(logits[i], static_cast<int32_t>(i));
  auto by_logit = [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  size_t keep = candidates_.size();
  if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < keep) {
    keep = static_cast<size_t>(params_.top_k);
    std::partial_sort(candidates_.begin(), candidates_.begin() + keep, candidates_.end(), by_logit);
  } else {
    std::sort(candidates_.begin(), candidates_.end(), by_logit);
  }
  // Softmax over the survivors at the given temperature (in double: tails matter for top-p).
  const double inv_t = 1.0 / params_.temperature;
  const double max = candidates_[0].first;
  double total = 0.0;
  std::vector<std::pair<float, int32_t>>& c = candidates_;
  for (size_t i = 0; i < keep; ++i) {
    const double p = std::exp((c[i].first - max) * inv_t);
    c[i].first = static_cast<float>(p);
    total += p;
  }
  // Nucleus: the smallest prefix whose mass reaches top_p (always at least one token).
  if (params_.top_p < 1.0) {
    double mass = 0.0;
    size_t n = 0;
    while (n < keep) {
      mass += c[n].first / total;
      ++n;
      if (mass >= params_.top_p) break;
    }
    keep = n;
    total = 0.0;
    for (size_t i = 0; i < keep; ++i) total += c[i].first;
  }
  std::uniform_real_distribution<double> uniform(0.0, total);
  double r = uniform(rng_);
  for (size_t i = 0; i < keep; ++i) {
    r -= c[i].first;
    if (r < 0.0) return c[i].second;
  }
  return c[keep - 1].second;
}

}  // namespace dsmoe
