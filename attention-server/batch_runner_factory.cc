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
  BatchLimits limits = options;  // the scheduler's limits, less its queue
  limits.num_slots += 1;         // + the scratch slot of ComputeLogits
  if (!device.is_cuda()) {
    DSMOE_ASSIGN_OR_RETURN(auto runner, ModelRunner::Create(weights, pool, limits, experts));
    return std::unique_ptr<BatchRunner>(std::move(runner));
  }
#ifdef DSMOE_WITH_CUDA
  cuda::CudaRunnerOptions co;
  static_cast<BatchLimits&>(co) = limits;
  co.device = device.index;
  co.page_size = limits.kv_page_tokens;
  co.max_graph_tokens = std::min<int64_t>(limits.max_batch_tokens, co.max_graph_tokens);
  DSMOE_ASSIGN_OR_RETURN(auto runner, cuda::CudaModelRunner::Create(weights, co, experts));
  return std::unique_ptr<BatchRunner>(std::move(runner));
#else
  return NoCudaBackendError(device);
#endif
}

}  // namespace dsmoe
