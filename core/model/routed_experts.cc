#include "core/model/routed_experts.h"

#include <algorithm>
#include <cstring>

#include "core/ops/kernels.h"

namespace dsmoe {

LocalExpertExecutor::LocalExpertExecutor(const ModelWeights& weights, ThreadPool& pool,
                                         int64_t max_assignments)
    : weights_(weights), pool_(pool), max_assignments_(max_assignments) {
  const ModelConfig& c = weights.config();
  expert_count_.resize(std::max<int64_t>(c.n_routed_experts, 1) + 1);
  slot_of_.resize(max_assignments_);
  token_of_.resize(max_assignments_);
  jobs_.resize(std::max<int64_t>(c.n_routed_experts, 1));
  if (c.n_routed_experts > 0) {
    const size_t h = static_cast<size_t>(max_assignments_ * c.hidden_size);
    const size_t w = static_cast<size_t>(max_assignments_ * c.moe_intermediate_size);
    gathered_.Resize(h);
    expert_out_.Resize(h);
    act_.Resize(w);
    up_.Resize(w);
  }
}

absl::Status LocalExpertExecutor::Run(int64_t layer, const float* x, int64_t T,
                                      const int32_t* experts, const float* weights, int64_t k,
                                      float* out) {
  if (T * k > max_assignments_) {
    return absl::InvalidArgumentError(absl::StrCat("routed experts: ", T, " tokens × top-", k,
                                                   " exceed this executor's capacity of ",
                                                   max_assignments_, " assignments"));
  }
  for (int64_t a = 0; a < T * k; ++a) token_of_[a] = static_cast<int32_t>(a / k);
  return Compute(layer, x, T, {token_of_.data(), experts, weights, T * k}, out);
}

absl::Status LocalExpertExecutor::RunAssignments(int64_t layer, const float* x, int64_t T,
                                                 const ExpertAssignments& a, float* out) {
  if (a.size > max_assignments_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        a.size, " expert assignments exceed the limit of ", max_assignments_, " per call"));
  }
  for (int64_t i = 0; i < a.size; ++i) {
    if (a.token[i] < 0 || a.token[i] >= T) {
      return absl::InvalidArgumentError(
          absl::StrCat("assignment ", i, " names token ", a.token[i], " of a batch of ", T));
    }
  }
  return Compute(layer, x, T, a, out);
}

absl::Status LocalExpertExecutor::Compute(int64_t layer, const float* x, int64_t T,
                                          const ExpertAssignments& a, float* out) {
  const ModelConfig& c = weights_.config();
  const int64_t H = c.hidden_size, E = c.n_routed_experts, I = c.moe_intermediate_size;
  if (layer < 0 || layer >= c.num_hidden_layers || !weights_.layers[layer].is_moe) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is not a MoE layer"));
  }
  const LayerWeights& L = weights_.layers[layer];

  // Counting sort of the assignments by expert: rows of one expert become contiguous.
  std::fill(expert_count_.begin(), expert_count_.end(), 0);
  for (int64_t i = 0; i < a.size; ++i) {
    const int32_t e = a.expert[i];
    if (e < 0 || e >= E) {
      return absl::InvalidArgumentError(absl::StrCat("expert index ", e, " outside [0, ", E, ")"));
    }
    if (!L.routed[e].loaded()) {
      return absl::FailedPreconditionError(absl::StrCat("routed expert (layer ", layer, ", expert ",
                                                        e, ") is not held by this process"));
    }
    ++expert_count_[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) expert_count_[e + 1] += expert_count_[e];  // → start offsets
  std::vector<int64_t>& cursor = expert_count_;
  for (int64_t i = 0; i < a.size; ++i) {
    const int64_t row = cursor[a.expert[i]]++;
    slot_of_[i] = row;
    std::memcpy(gathered_.data() + row * H, x + a.token[i] * H, sizeof(float) * H);
  }
  // After the scatter, cursor[e] is the end of expert e's rows = the start of e + 1.
  int64_t num_jobs = 0, start = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t end = cursor[e];
    if (end > start) {
      jobs_[num_jobs++] = MlpJob{&L.routed[e],
                                 gathered_.data() + start * H,
                                 end - start,
                                 act_.data() + start * I,
                                 up_.data() + start * I,
                                 expert_out_.data() + start * H};
    }
    start = end;
  }
  RunMlps(pool_, jobs_.data(), num_jobs, H);

  // Combine on the expert side, in assignment order, so the sum is deterministic.
  const ops::KernelTable& kern = ops::Kernels();
  std::memset(out, 0, sizeof(float) * T * H);
  for (int64_t i = 0; i < a.size; ++i) {
    kern.axpy(a.weight[i], expert_out_.data() + slot_of_[i] * H, out + a.token[i] * H, H);
  }
  return absl::OkStatus();
}

}  // namespace dsmoe
