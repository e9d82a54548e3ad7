#include "expert-server/cuda_expert_store.h"

#include <map>
#include <mutex>

#include "core/model/cuda/cuda_expert_executor.h"
#include "core/ops/cuda/cuda_status.h"
#include "expert-server/nccl_channel.h"

namespace dsmoe::cuda {
namespace {

// Reads `experts` from the checkpoint (mapped, not copied: the device copy is what serves) and
// uploads them to one executor.
absl::StatusOr<std::unique_ptr<CudaExpertExecutor>> Upload(const ExpertStoreOptions& options,
                                                           const WeightSelection& selection,
                                                           std::unique_ptr<ModelConfig>* config,
                                                           ExpertSet* held) {
  WeightLoadOptions mapped;
  mapped.placement = WeightLoadOptions::Placement::kMap;
  mapped.populate = false;
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
  // Channels kept open at most. An attention server that closed its side after a failure, or
  // went away, leaves ours behind: past this, the least recently used one is dropped.
  static constexpr size_t kMaxChannels = 64;

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

  // Any real change re-uploads the whole new set (which also frees what it drops).
  bool PrepareIsSlow(const PlacementChange& change) const override {
    return !change.to_load.empty() || !change.to_drop.empty();
  }

  absl::StatusOr<uint64_t> OpenChannel(const std::string& unique_id, Deadline deadline) override {
    DSMOE_ASSIGN_OR_RETURN(std::unique_ptr<nccl::Channel> channel,
                           nccl::Channel::Join(unique_id, 1, options_.device.index, deadline));
    std::lock_guard<std::mutex> lock(channels_mu_);
    if (channels_.size() >= kMaxChannels) {
      auto oldest = channels_.begin();
      for (auto it = channels_.begin(); it != channels_.end(); ++it) {
        if (it->second.last_used < oldest->second.last_used) oldest = it;
      }
      channels_.erase(oldest);  // a computation using it keeps its reference until done
    }
    const uint64_t id = ++last_channel_;
    channels_[id] = {std::shared_ptr<nccl::Channel>(std::move(channel)),
                     std::chrono::steady_clock::now()};
    return id;
  }

  absl::Status RunAssignmentsOverChannel(uint64_t id, int64_t layer, int64_t T,
                                         const ExpertAssignments& assignments,
                                         Deadline deadline) override {
    std::shared_ptr<nccl::Channel> channel;
    {
      std::lock_guard<std::mutex> lock(channels_mu_);
      auto it = channels_.find(id);
      if (it == channels_.end()) return NoSuchChannel(id);
      channel = it->second.channel;
      it->second.last_used = std::chrono::steady_clock::now();
    }
    const size_t n = static_cast<size_t>(T * config_->hidden_size);
    CudaExpertExecutor::DeviceIo io;
    // The channel has its own stream: each transfer is waited for on the host, which orders it
    // against the executor's stream.
    io.receive = [&](float* x, cudaStream_t) {
      DSMOE_RETURN_IF_ERROR(channel->Exchange(nullptr, 0, x, n));
      return channel->Wait(deadline);
    };
    io.send = [&](const float* out, cudaStream_t s) {
      DSMOE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s), "routed experts");
      DSMOE_RETURN_IF_ERROR(channel->Exchange(out, n, nullptr, 0));
      return channel->Wait(deadline);
    };
    return executor_->RunAssignments(layer, T, assignments, io);
  }

  void CloseChannel(uint64_t id) override {
    std::lock_guard<std::mutex> lock(channels_mu_);
    channels_.erase(id);
  }

  absl::StatusOr<Commit> Prepare(const PlacementChange& change) override {
    if (!PrepareIsSlow(change)) return Commit([] {});  // the same set again
    DSMOE_ASSIGN_OR_RETURN(
        std::unique_ptr<CudaExpertExecutor> next,
        Upload(options_, WeightSelection::RoutedExperts(change.target), nullptr, nullptr));
    // std::function needs a copyable callable: the executor travels in a shared_ptr.
    auto holder = std::make_shared<std::unique_ptr<CudaExpertExecutor>>(std::move(next));
    return Commit([this, holder] { executor_.swap(*holder); });  // the old one freed with holder
  }

 private:
  explicit CudaExpertStore(const ExpertStoreOptions& options) : ExpertStore(options) {}

  std::unique_ptr<ModelConfig> config_;
  ExpertSet initially_held_;
  std::unique_ptr<CudaExpertExecutor> executor_;
  struct ChannelEntry {
    std::shared_ptr<nccl::Channel> channel;  // used only under the service's compute lock
    std::chrono::steady_clock::time_point last_used;
  };
  std::mutex channels_mu_;  // guards the map
  std::map<uint64_t, ChannelEntry> channels_;
  uint64_t last_channel_ = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ExpertStore>> OpenCudaExpertStore(const ExpertStoreOptions& options,
                                                                 const WeightSelection& selection) {
  return CudaExpertStore::Open(options, selection);
}

}  // namespace dsmoe::cuda
