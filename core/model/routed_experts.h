// How a MoE layer reaches its routed experts. The model runner gates each token, then hands the
// hidden states and the chosen (expert, weight) pairs to a RoutedExpertExecutor, which returns
// one weighted sum per token. The in-process executor below computes them from local weights;
// the cluster's executors send them to expert servers (over gRPC, or NCCL) instead — the
// model code is the same either way.
#pragma once

#include <cstdint>
#include <vector>

#include "core/model/mlp.h"
#include "core/model/weights.h"
#include "core/util/status.h"
#include "core/util/thread_pool.h"

namespace dsmoe {

class RoutedExpertExecutor {
 public:
  virtual ~RoutedExpertExecutor() = default;
  // out[t] = Σ_j weights[t·k + j] · expert_{experts[t·k + j]}(x[t])  for t in [0, T).
  // x and out are [T, hidden]. `layer` is the checkpoint's layer index.
  virtual absl::Status Run(int64_t layer, const float* x, int64_t T, const int32_t* experts,
                           const float* weights, int64_t k, float* out) = 0;
};

// Computes routed experts in this process: tokens are grouped by expert, and every chosen expert
// runs once over all its tokens (RunMlps). Thread-compatible; no allocation per call.
class LocalExpertExecutor final : public RoutedExpertExecutor {
 public:
  // REQUIRES: `weights` and `pool` outlive this. `max_tokens` bounds T per call.
  LocalExpertExecutor(const ModelWeights& weights, ThreadPool& pool, int64_t max_tokens);

  absl::Status Run(int64_t layer, const float* x, int64_t T, const int32_t* experts,
                   const float* weights, int64_t k, float* out) override;

 private:
  const ModelWeights& weights_;
  ThreadPool& pool_;
  int64_t max_tokens_;
  int64_t max_assignments_;
  std::vector<int64_t> expert_count_;   // [E] then prefix offsets
  std::vector<int64_t> slot_of_;        // [max_assignments]: assignment → grouped row
  std::vector<MlpJob> jobs_;            // [E]
  FloatBuffer gathered_, act_, up_, expert_out_;
};

}  // namespace dsmoe
