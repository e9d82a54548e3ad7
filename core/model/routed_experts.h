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

  // The same computation split in two, so the caller can compute the shared experts while the
  // routed ones are in flight: Start may send work elsewhere and return; Finish waits and
  // writes `out`. The inputs must stay untouched until Finish returns.
  //
  // Up to lanes() computations may be in flight at once, one per lane (the model runner's
  // micro-batches: one micro-batch's routed experts compute on the expert servers while the
  // next runs its attention). Each lane alternates Start and Finish. By default there is one
  // lane, Start only records its arguments and Finish calls Run.
  virtual int lanes() const { return 1; }
  virtual absl::Status Start(int lane, int64_t layer, const float* x, int64_t T,
                             const int32_t* experts, const float* weights, int64_t k) {
    if (lane != 0) return absl::InvalidArgumentError("this executor has one lane");
    pending_ = {layer, x, T, experts, weights, k};
    return absl::OkStatus();
  }
  virtual absl::Status Finish(int lane, float* out) {
    if (lane != 0) return absl::InvalidArgumentError("this executor has one lane");
    return Run(pending_.layer, pending_.x, pending_.T, pending_.experts, pending_.weights,
               pending_.k, out);
  }

 private:
  struct Pending {
    int64_t layer = 0;
    const float* x = nullptr;
    int64_t T = 0;
    const int32_t* experts = nullptr;
    const float* weights = nullptr;
    int64_t k = 0;
  } pending_;
};

// One (token, expert, weight) triple of a batch: what an expert server receives.
struct ExpertAssignments {
  const int32_t* token = nullptr;   // row of x
  const int32_t* expert = nullptr;  // routed expert index within the layer
  const float* weight = nullptr;
  int64_t size = 0;
};

// Computes routed experts in this process: tokens are grouped by expert, and every chosen expert
// runs once over all its tokens (RunMlps). Thread-compatible; no allocation per call.
class LocalExpertExecutor final : public RoutedExpertExecutor {
 public:
  // REQUIRES: `weights` and `pool` outlive this. At most `max_assignments` (token, expert)
  // pairs per call.
  LocalExpertExecutor(const ModelWeights& weights, ThreadPool& pool, int64_t max_assignments);

  absl::Status Run(int64_t layer, const float* x, int64_t T, const int32_t* experts,
                   const float* weights, int64_t k, float* out) override;

  // out[t] = Σ over the assignments of token t of weight · expert(x[t]), for t in [0, T);
  // tokens without assignments get zeros. FailedPrecondition if an expert is not loaded here.
  absl::Status RunAssignments(int64_t layer, const float* x, int64_t T,
                              const ExpertAssignments& assignments, float* out);

  int64_t max_assignments() const { return max_assignments_; }

 private:
  absl::Status Compute(int64_t layer, const float* x, int64_t T, const ExpertAssignments& a,
                       float* out);

  const ModelWeights& weights_;
  ThreadPool& pool_;
  int64_t max_assignments_;
  std::vector<int64_t> expert_count_;  // [E + 1]: counts, then start offsets, then cursors
  std::vector<int64_t> slot_of_;       // [max_assignments]: assignment → grouped row
  std::vector<int32_t> token_of_;      // [max_assignments]: scratch for Run's implicit tokens
  std::vector<MlpJob> jobs_;           // [E]
  FloatBuffer gathered_, act_, up_, expert_out_;
};

}  // namespace dsmoe
