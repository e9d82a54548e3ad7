#include "attention-server/batch_runner_factory.h"

#ifdef DSMOE_WITH_CUDA
#include "core/model/cuda/cuda_model_runner.h"
#endif

namespace dsmoe {

absl::StatusOr<std::unique_ptr<BatchRunner>> CreateBatchRunner(const Device& device,
                                                               const ModelWeights& weights,
                                                               ThreadPool& pool,
                                                               const SchedulerOptions& options,
                                                               RoutedExpertExecutor* experts) {
  const int64_t slots = options.num_slots + 1;  // + the scratch slot of ComputeLogits
  if (!device.is_cuda()) {
    RunnerOptions ro;
    ro.max_batch_tokens = options.max_batch_tokens;
    ro.num_slots = slots;
    ro.max_context = options.max_context;
    DSMOE_ASSIGN_OR_RETURN(auto runner, ModelRunner::Create(weights, pool, ro, experts));
    return std::unique_ptr<BatchRunner>(std::move(runner));
  }
#ifdef DSMOE_WITH_CUDA
  cuda::CudaRunnerOptions co;
  co.device = device.index;
  co.max_batch_tokens = options.max_batch_tokens;
  co.num_slots = slots;
  co.max_context = options.max_context;
  co.max_graph_tokens = std::min<int64_t>(options.max_batch_tokens, co.max_graph_tokens);
  DSMOE_ASSIGN_OR_RETURN(auto runner, cuda::CudaModelRunner::Create(weights, co, experts));
  return std::unique_ptr<BatchRunner>(std::move(runner));
#else
  return NoCudaBackendError(device);
#endif
}

}  // namespace dsmoe
