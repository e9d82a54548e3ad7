#include "expert-server/client/nccl_transport.h"

#ifdef DSMOE_WITH_CUDA
#include "expert-server/client/nccl_links.h"
#endif

namespace dsmoe {

absl::StatusOr<std::unique_ptr<DispatchSideChannel>> OpenNcclTransport(const Device& device,
                                                                       ExpertServerPool& pool,
                                                                       int64_t hidden,
                                                                       int64_t max_rows,
                                                                       Logger* logger) {
#ifdef DSMOE_WITH_CUDA
  if (!device.is_cuda()) {
    return absl::FailedPreconditionError(
        "the NCCL transport runs GPU to GPU, and this attention server computes on the CPU "
        "(--device cpu)");
  }
  NcclLinksOptions options;
  options.device = device.index;
  options.hidden = hidden;
  options.max_rows = max_rows;
  options.logger = logger;
  return std::unique_ptr<DispatchSideChannel>(new NcclLinks(pool, options));
#else
  (void)device, (void)pool, (void)hidden, (void)max_rows, (void)logger;
  return absl::FailedPreconditionError(
      "this build of dsmoe has no CUDA backend, hence no NCCL transport");
#endif
}

}  // namespace dsmoe
