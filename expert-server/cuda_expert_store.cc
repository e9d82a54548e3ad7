#include "expert-server/cuda_expert_store.h"

#include "core/model/cuda/cuda_expert_executor.h"

namespace dsmoe::cuda {
namespace {

// Reads `experts` from the checkpoint (mapped, not copied: the device copy is what serves) and
// uploads them to one executor.
absl::StatusOr<std::unique_ptr<CudaExpertExecutor>> Upload(const ExpertStoreOptions& options,
                                                           const WeightSelection& selection,
                                                           std::unique_ptr<ModelConfig>* config,
                                                           ExpertSet* held) {
  WeightLoadOptions mapped;
  mapped.copy_to_huge_pages = false;
  DSMOE_ASSIGN_OR_RETURN(std::unique_ptr<ModelWeights> weights,
                         ModelWeights::Load(options.model_dir, selection, mapped));
  if (config != nullptr) *config = std::make_unique<ModelConfig>(weights->config());
  if (held != nullptr) *held = LoadedExperts(*weights);
  return CudaExpertExecutor::Create(*weights, options.device.index, options.max_tokens);
}

// The device holds one executor per placement: a change uploads the whole new set into a new
// executor while the old one serves, then swaps them. That needs room for both sets at once for
// the length of the upload, and in return no computation ever waits for an upload, and a
// change that fails to upload leaves the serving set untouched.
class CudaExpertStore final : public ExpertStore {
 public:
  static absl::StatusOr<std::unique_ptr<ExpertStore>> Open(const ExpertStoreOptions& options,
                                                           const WeightSelection& selection) {
    auto store = std::unique_ptr<CudaExpertStore>(new CudaExpertStore(options));
    DSMOE_ASSIGN_OR_RETURN(store->executor_,
                           Upload(options, selection, &store->config_, &store->initially_held_));
    return std::unique_ptr<ExpertStore>(std::move(store));
  }

  const ModelConfig& config() const override { return *config_; }
  ExpertSet InitiallyHeld() const override { return initially_held_; }

  absl::Status RunAssignments(int64_t layer, const float* x, int64_t T,
                              const ExpertAssignments& assignments, float* out) override {
    return executor_->RunAssignments(layer, x, T, assignments, out);
  }

  bool PrepareIsSlow(const PlacementChange&) const override { return true; }

  absl::StatusOr<Commit> Prepare(const PlacementChange& change) override {
    DSMOE_ASSIGN_OR_RETURN(std::unique_ptr<CudaExpertExecutor> next,
                           Upload(options_, ExpertsOnly(change.target), nullptr, nullptr));
    // std::function needs a copyable callable: the executor travels in a shared_ptr.
    auto holder = std::make_shared<std::unique_ptr<CudaExpertExecutor>>(std::move(next));
    return Commit([this, holder] { executor_.swap(*holder); });  // the old one freed with holder
  }

 private:
  explicit CudaExpertStore(const ExpertStoreOptions& options) : options_(options) {}

  ExpertStoreOptions options_;
  std::unique_ptr<ModelConfig> config_;
  ExpertSet initially_held_;
  std::unique_ptr<CudaExpertExecutor> executor_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ExpertStore>> OpenCudaExpertStore(const ExpertStoreOptions& options,
                                                                 const WeightSelection& selection) {
  return CudaExpertStore::Open(options, selection);
}

}  // namespace dsmoe::cuda
