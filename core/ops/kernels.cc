#include "core/ops/kernels.h"

#include "core/util/cpu_features.h"

namespace dsmoe::ops {

const KernelTable& Kernels() {
  static const KernelTable& chosen = []() -> const KernelTable& {
    const KernelTable* avx2 = Avx2Kernels();
    if (avx2 != nullptr && GetCpuFeatures().HasAvx2Kernels()) return *avx2;
    return ReferenceKernels();
  }();
  return chosen;
}

}  // namespace dsmoe::ops
