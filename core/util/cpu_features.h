// What the running CPU can do, probed once. Kernels are chosen at run time from this, so one
// binary runs on any x86-64 and uses AVX2/FMA/F16C where present.
#pragma once

#include <string>

namespace dsmoe {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;

  // True when the AVX2 kernels (which also use FMA and F16C) may run.
  bool HasAvx2Kernels() const { return avx2 && fma && f16c; }
  std::string ToString() const;
};

// Thread-safe; probes on first call.
const CpuFeatures& GetCpuFeatures();

}  // namespace dsmoe
