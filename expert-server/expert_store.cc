#include "expert-server/expert_store.h"

#include <vector>

#include "core/util/thread_pool.h"
#ifdef DSMOE_WITH_CUDA
#include "expert-server/cuda_expert_store.h"
#endif

namespace dsmoe {

absl::StatusOr<uint64_t> ExpertStore::OpenChannel(const std::string&, Deadline) {
#ifdef DSMOE_WITH_CUDA
  return absl::FailedPreconditionError(
      "this expert server holds its experts on the CPU: the NCCL transport needs --device cuda");
#else
  return absl::FailedPreconditionError(
      "this build of dsmoe has no CUDA backend, hence no NCCL transport");
#endif
}

absl::Status ExpertStore::RunAssignmentsOverChannel(uint64_t channel, int64_t, int64_t,
                                                    const ExpertAssignments&, Deadline) {
  return NoSuchChannel(channel);
}

absl::Status ExpertStore::NoSuchChannel(uint64_t channel) {
  return absl::NotFoundError(absl::StrCat("no NCCL channel ", channel, " is open here"));
}

namespace {

// Experts in host memory, computed by the CPU kernels. The executor reads a composite of views:
// the experts loaded at start-up point into that load's buffer, each later load's into its own
// group (owner_). A change swaps views; a group is freed with its last expert.
class CpuExpertStore final : public ExpertStore {
 public:
  CpuExpertStore(std::unique_ptr<ModelWeights> weights, const ExpertStoreOptions& options)
      : ExpertStore(options),
        weights_(std::move(weights)),
        pool_(options.threads),
        executor_(*weights_, pool_, MaxAssignments(options, weights_->config())),
        initially_held_(LoadedExperts(*weights_)) {
    owner_.resize(weights_->layers.size());
    for (size_t l = 0; l < weights_->layers.size(); ++l)
      owner_[l].resize(weights_->layers[l].routed.size());
  }

  const ModelConfig& config() const override { return weights_->config(); }

  ExpertSet InitiallyHeld() const override { return initially_held_; }

  absl::Status RunAssignments(int64_t layer, const float* x, int64_t T,
                              const ExpertAssignments& assignments, float* out) override {
    return executor_.RunAssignments(layer, x, T, assignments, out);
  }

  bool PrepareIsSlow(const PlacementChange& change) const override {
    return !change.to_load.empty();  // dropping is a swap of views
  }

  absl::StatusOr<Commit> Prepare(const PlacementChange& change) override {
    std::shared_ptr<ModelWeights> loaded;
    if (!change.to_load.empty()) {
      DSMOE_ASSIGN_OR_RETURN(
          std::unique_ptr<ModelWeights> w,
          ModelWeights::Load(options_.model_dir, WeightSelection::RoutedExperts(change.to_load)));
      loaded = std::move(w);
    }
    return Commit([this, loaded, change] { Swap(loaded, change); });
  }

 private:
  void Swap(const std::shared_ptr<ModelWeights>& loaded, const PlacementChange& change) {
    for (const auto& [l, e] : change.to_load) {
      weights_->layers[l].routed[e] = loaded->layers[l].routed[e];
      owner_[l][e] = loaded;
    }
    for (const auto& [l, e] : change.to_drop) {
      weights_->layers[l].routed[e] = MlpWeights{};
      owner_[l][e].reset();
    }
  }

  std::unique_ptr<ModelWeights> weights_;
  ThreadPool pool_;
  LocalExpertExecutor executor_;
  const ExpertSet initially_held_;
  // [layer][expert]: the loaded group a view points into (null: weights_ itself, or not held).
  std::vector<std::vector<std::shared_ptr<ModelWeights>>> owner_;
};

}  // namespace

ExpertSet LoadedExperts(const ModelWeights& weights) {
  ExpertSet loaded;
  for (size_t l = 0; l < weights.layers.size(); ++l) {
    const auto& routed = weights.layers[l].routed;
    for (size_t e = 0; e < routed.size(); ++e) {
      if (routed[e].loaded()) loaded.insert({l, e});
    }
  }
  return loaded;
}

absl::StatusOr<std::unique_ptr<ExpertStore>> OpenExpertStore(const ExpertStoreOptions& options,
                                                             const WeightSelection& selection) {
  if (options.device.is_cuda()) {
#ifdef DSMOE_WITH_CUDA
    return cuda::OpenCudaExpertStore(options, selection);
#else
    return NoCudaBackendError(options.device);
#endif
  }
  DSMOE_ASSIGN_OR_RETURN(std::unique_ptr<ModelWeights> weights,
                         ModelWeights::Load(options.model_dir, selection));
  return std::unique_ptr<ExpertStore>(new CpuExpertStore(std::move(weights), options));
}

}  // namespace dsmoe
