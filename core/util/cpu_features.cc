#include "core/util/cpu_features.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace dsmoe {

namespace {
#if defined(__x86_64__) || defined(__i386__)
// Which register states the OS saves on a context switch (XCR0). Inline assembly rather than
// _xgetbv(), which would need this file compiled with -mxsave.
uint64_t ReadXcr0() {
  uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

void ProbeAvx512AndAmx(CpuFeatures& f) {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || (ecx & (1u << 27)) == 0) return;  // no OSXSAVE
  const uint64_t xcr0 = ReadXcr0();
  constexpr uint64_t kAvxState = 0x6;           // SSE and AVX (ymm upper halves)
  constexpr uint64_t kAvx512State = 0xe0;       // opmask, zmm0-15 upper halves, zmm16-31
  constexpr uint64_t kAmxState = 0x3ull << 17;  // XTILECFG and XTILEDATA
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return;
  if ((xcr0 & (kAvxState | kAvx512State)) == (kAvxState | kAvx512State)) {
    f.avx512f = ebx & (1u << 16);
    f.avx512bw = ebx & (1u << 30);
    f.avx512vl = ebx & (1u << 31);
    f.avx512vnni = ecx & (1u << 11);
  }
  if ((xcr0 & kAmxState) == kAmxState) {
    f.amx_bf16 = edx & (1u << 22);
    f.amx_tile = edx & (1u << 24);
    f.amx_int8 = edx & (1u << 25);
  }
  const unsigned max_subleaf = eax;
  if (f.avx512f && max_subleaf >= 1 && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx))
    f.avx512bf16 = eax & (1u << 5);
}
#endif

CpuFeatures Probe() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.f16c = f.avx2;  // every AVX2 CPU shipped has F16C; gcc 12 cannot probe it by name.
  ProbeAvx512AndAmx(f);
  unsigned max_leaf = 0, vendor[3] = {0, 0, 0};
  if (__get_cpuid(0, &max_leaf, &vendor[0], &vendor[2], &vendor[1]))  // EBX, EDX, ECX: in order
    f.amd = std::memcmp(vendor, "AuthenticAMD", 12) == 0;
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
  const std::pair<bool, const char*> names[] = {{avx2, "avx2"},
                                                {fma, "fma"},
                                                {f16c, "f16c"},
                                                {avx512f, "avx512f"},
                                                {avx512bw, "avx512bw"},
                                                {avx512vl, "avx512vl"},
                                                {avx512vnni, "avx512vnni"},
                                                {avx512bf16, "avx512bf16"},
                                                {amx_tile, "amx_tile"},
                                                {amx_bf16, "amx_bf16"},
                                                {amx_int8, "amx_int8"},
                                                {amd, "amd"}};
  for (const auto& [present, name] : names) {
    if (!present) continue;
    s += name;
    s += ' ';
  }
  if (s.empty()) return "scalar";
  s.pop_back();
  return s;
}

const CpuFeatures& GetCpuFeatures() {
  static const CpuFeatures features = Probe();
  return features;
}

}  // namespace dsmoe
