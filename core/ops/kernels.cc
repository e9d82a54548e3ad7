#include "core/ops/kernels.h"

#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/util/cpu_features.h"
#include "core/util/log.h"

namespace dsmoe::ops {

const KernelTable* KernelsNamed(std::string_view name) {
  const CpuFeatures& cpu = GetCpuFeatures();
  if (name == "reference") return &ReferenceKernels();
  if (name == "avx2") return cpu.HasAvx2Kernels() ? Avx2Kernels() : nullptr;
  if (name == "avx512") return cpu.HasAvx512Kernels() ? Avx512Kernels() : nullptr;
  if (name == "avx512bf16") return cpu.HasAvx512Kernels() ? Avx512Bf16DotKernels() : nullptr;
  return nullptr;
}

const KernelTable& ChooseKernels(const char* forced, Logger& logger) {
  const KernelTable* best = nullptr;
  // `vdpbf16ps` beats widening BF16 to fp32 where 512-bit FMAs are double-pumped (AMD Zen 4
  // and later), not on Intel's Xeons (see avx512_kernels.cc).
  const char* avx512 = GetCpuFeatures().amd ? "avx512bf16" : "avx512";
  for (const char* name : {avx512, "avx2"}) {
    if ((best = KernelsNamed(name)) != nullptr) break;
  }
  if (best == nullptr) best = &ReferenceKernels();
  if (forced == nullptr || *forced == '\0') return *best;
  if (const KernelTable* table = KernelsNamed(forced)) return *table;
  // A typo or a table this CPU lacks must not stop a server; say so and run the best.
  const std::string_view name = forced;
  const bool known =
      name == "reference" || name == "avx2" || name == "avx512" || name == "avx512bf16";
  logger.Log(LogLevel::kWarning,
             absl::StrCat("DSMOE_KERNELS=", forced, ": ",
                          known ? "this CPU cannot run that table"
                                : "not one of reference|avx2|avx512|avx512bf16",
                          " (CPU: ", GetCpuFeatures().ToString(), "); using ", best->name));
  return *best;
}

const KernelTable& Kernels() {
  static const KernelTable& chosen = ChooseKernels(std::getenv("DSMOE_KERNELS"), *DefaultLogger());
  return chosen;
}

}  // namespace dsmoe::ops
