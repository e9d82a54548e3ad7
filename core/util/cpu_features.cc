#include "core/util/cpu_features.h"

#include <cstdlib>
#include <cstring>

namespace dsmoe {

namespace {
CpuFeatures Probe() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.f16c = f.avx2;  // every AVX2 CPU shipped has F16C; gcc 12 cannot probe it by name.
#endif
  // DSMOE_FORCE_SCALAR=1 pins the portable kernels (for debugging and A/B measurement).
  if (const char* force = std::getenv("DSMOE_FORCE_SCALAR");
      force && std::strcmp(force, "1") == 0) {
    f = CpuFeatures{};
  }
  return f;
}
}  // namespace

std::string CpuFeatures::ToString() const {
  std::string s;
  if (avx2) s += "avx2 ";
  if (fma) s += "fma ";
  if (f16c) s += "f16c ";
  if (s.empty()) return "scalar";
  s.pop_back();
  return s;
}

const CpuFeatures& GetCpuFeatures() {
  static const CpuFeatures features = Probe();
  return features;
}

}  // namespace dsmoe
