#include "core/model/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

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

// Lowest id among the largest values; NaN never wins. Eight running maxima, so the compiler
// keeps them in one vector register (a single running maximum is one long dependency chain:
// 0.5 ms over a 102,400-entry vocabulary), then the first index holding the maximum.
int32_t ArgMax(const float* logits, int64_t n) {
  constexpr int kLanes = 8;
  float lane_max[kLanes];
  std::fill(lane_max, lane_max + kLanes, -std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j)
      lane_max[j] = logits[i + j] > lane_max[j] ? logits[i + j] : lane_max[j];
  }
  float max = *std::max_element(lane_max, lane_max + kLanes);
  for (; i < n; ++i) max = logits[i] > max ? logits[i] : max;
  for (int64_t k = 0; k < n; ++k) {
    if (logits[k] == max) return static_cast<int32_t>(k);
  }
  return 0;  // every logit NaN
}

Sampler::Sampler(int64_t vocab_size, const SamplingParams& params)
    : params_(params), rng_(params.seed), vocab_size_(vocab_size) {}

namespace {

// e^((logit - max) / T) as the draw's weight; a NaN logit weighs nothing.
inline float Weight(float logit, float max, float inv_t) {
  return logit == logit ? std::exp((logit - max) * inv_t) : 0.0f;
}

// Descending value (a logit, or a probability weight), then ascending id: a strict total order,
// so that any partial sort or selection yields the prefix a full sort would. NaN logits were
// replaced by -inf before sorting.
inline bool ByLogit(const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

// `candidates` hold (probability weight, id). Moves the nucleus — the shortest prefix, in order
// of descending weight (then ascending id), whose mass reaches `target` — to the front and
// returns its length. A selection, not a sort: halve the unsettled range [lo, hi) around its
// median; if its better half alone reaches what is still needed the nucleus ends inside it,
// else that half is all in and the rest comes from the other. Linear time on average; only the
// last ≤ 64 candidates are sorted. The nucleus keeps the order the selection left (a fixed
// function of the logits, so a seed still reproduces its draws).
int64_t Nucleus(std::vector<std::pair<float, int32_t>>& candidates, double target) {
  auto begin = candidates.begin();
  int64_t lo = 0, hi = static_cast<int64_t>(candidates.size());
  double need = target;
  while (hi - lo > 64) {
    const int64_t mid = lo + (hi - lo) / 2;
    std::nth_element(begin + lo, begin + mid, begin + hi, ByLogit);
    double mass = 0.0;
    for (int64_t i = lo; i < mid; ++i) mass += candidates[i].first;
    if (mass >= need) {
      hi = mid;
    } else {
      need -= mass;
      lo = mid;
    }
  }
  std::sort(begin + lo, begin + hi, ByLogit);
  int64_t end = lo;
  while (end < hi && need > 0.0) need -= candidates[end++].first;
  return std::max<int64_t>(end, 1);
}

// Scratch of the draws, one per thread and sized to the largest vocabulary seen, not one per
// sequence: a server holding hundreds of sequences would otherwise keep ~1 MB each.
struct DrawScratch {
  std::vector<std::pair<float, int32_t>> candidates;  // (logit or weight, id)
  std::vector<float> weights;                         // per id
};

}  // namespace

int32_t Sampler::Sample(const float* logits) {
  if (params_.temperature == 0.0) return ArgMax(logits, vocab_size_);
  thread_local DrawScratch scratch;
  std::vector<std::pair<float, int32_t>>& candidates = scratch.candidates;
  std::vector<float>& weights = scratch.weights;
  const float inv_t = static_cast<float>(1.0 / params_.temperature);
  const float max = logits[ArgMax(logits, vocab_size_)];
  const bool top_k = params_.top_k > 0 && params_.top_k < vocab_size_;
  const bool top_p = params_.top_p < 1.0;
  if (!top_k && !top_p) {
    // Temperature alone: a draw from the whole vocabulary in id order. No order by logit is
    // needed, so none is made (sorting 102,400 candidates per token cost ~20 ms).
    weights.resize(vocab_size_);
    double total = 0.0;
    for (int64_t i = 0; i < vocab_size_; ++i) total += weights[i] = Weight(logits[i], max, inv_t);
    double r = std::uniform_real_distribution<double>(0.0, total)(rng_);
    for (int64_t i = 0; i < vocab_size_; ++i) {
      r -= weights[i];
      if (r < 0.0) return static_cast<int32_t>(i);
    }
    return ArgMax(logits, vocab_size_);  // rounding left r >= 0: the likeliest token
  }

  // The candidates: with top-k the k best by logit, in order (a partial sort); with top-p alone
  // the nucleus, found without sorting the vocabulary (see Nucleus below).
  double total = 0.0;  // the mass the nucleus is measured against
  candidates.clear();
  int64_t keep;
  if (top_k) {
    for (int64_t i = 0; i < vocab_size_; ++i) {
      const float l = logits[i];
      candidates.emplace_back(l == l ? l : -std::numeric_limits<float>::infinity(),
                              static_cast<int32_t>(i));
    }
    std::partial_sort(candidates.begin(), candidates.begin() + params_.top_k, candidates.end(),
                      ByLogit);
    candidates.resize(params_.top_k);
    for (auto& [weight, id] : candidates) total += weight = Weight(weight, max, inv_t);
    keep = static_cast<int64_t>(candidates.size());
    if (top_p) {
      // Nucleus: the smallest prefix whose mass reaches top_p (always at least one token).
      double mass = 0.0;
      keep = 0;
      while (keep < static_cast<int64_t>(candidates.size()) && mass < params_.top_p * total)
        mass += candidates[keep++].first;
      keep = std::max<int64_t>(keep, 1);
    }
  } else {
    weights.resize(vocab_size_);
    for (int64_t i = 0; i < vocab_size_; ++i) total += weights[i] = Weight(logits[i], max, inv_t);
    // The nucleus is a prefix of the order by probability, and the tokens lighter than
    // (1 - top_p) / V of the total together weigh less than 1 - top_p, so the heavier ones
    // alone reach top_p: the light tail (most of a real vocabulary) is not even a candidate.
    const double light = (1.0 - params_.top_p) * total / static_cast<double>(vocab_size_);
    for (int64_t i = 0; i < vocab_size_; ++i) {
      if (weights[i] >= light && weights[i] > 0.0f)
        candidates.emplace_back(weights[i], static_cast<int32_t>(i));
    }
    keep = Nucleus(candidates, params_.top_p * total);
  }
  double kept_mass = 0.0;
  for (int64_t i = 0; i < keep; ++i) kept_mass += candidates[i].first;
  double r = std::uniform_real_distribution<double>(0.0, kept_mass)(rng_);
  for (int64_t i = 0; i < keep; ++i) {
    r -= candidates[i].first;
    if (r < 0.0) return candidates[i].second;
  }
  return candidates[keep - 1].second;
}

}  // namespace dsmoe
