// What the running CPU can do, probed once. Kernels are chosen at run time from this, so one
// binary runs on any x86-64 and uses AVX2/FMA/F16C or AVX-512 where present.
#pragma once

#include <string>

namespace dsmoe {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  // AVX-512 bits count only when the OS also saves the opmask and zmm registers (XCR0 bits
  // 5–7): a CPU that has them under an OS that does not would fault on the first zmm use.
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512vnni = false;
  bool avx512bf16 = false;
  // AMX: the CPU has the tiles and the OS enabled their state in XCR0 (bits 17–18). Linux also
  // wants each process to ask for the tile state (arch_prctl ARCH_REQ_XCOMP_PERM) before use.
  bool amx_tile = false;
  bool amx_bf16 = false;
  bool amx_int8 = false;
  // The vendor is AMD ("AuthenticAMD"): equal feature bits do not mean equal costs (Zen 4 runs
  // 512-bit FMAs double-pumped but `vdpbf16ps` at full rate), so some kernel choices use it.
  bool amd = false;

  // True when the AVX2 kernels (which also use FMA and F16C) may run.
  bool HasAvx2Kernels() const { return avx2 && fma && f16c; }
  // True when the AVX-512 kernels may run: F/BW/VL for the vectors and masks, VNNI for Q8_0,
  // BF16 for `vdpbf16ps`, and FMA/F16C, which the file is also compiled for (Zen 4, Ice Lake
  // server and later; Skylake-X lacks VNNI/BF16 and keeps the AVX2 kernels).
  bool HasAvx512Kernels() const {
    return HasAvx2Kernels() && avx512f && avx512bw && avx512vl && avx512vnni && avx512bf16;
  }
  std::string ToString() const;
};

// Thread-safe; probes on first call.
const CpuFeatures& GetCpuFeatures();

}  // namespace dsmoe
