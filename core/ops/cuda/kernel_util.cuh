// Helpers shared by the kernels: bf16 bits ↔ fp32 (scalars and 8-value, 16-byte vectors) and the
// row-pass size of the GEMV kernels.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace dsmoe::cuda {

__device__ __forceinline__ float Bf16BitsToFloat(uint16_t b) {
  return __bfloat162float(__ushort_as_bfloat16(b));
}

__device__ __forceinline__ uint16_t ToBf16Bits(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

// The 8 bf16 values of a 16-byte load, in memory order (bf16 is the top half of an fp32).
__device__ __forceinline__ void UnpackBf16x8(const uint4& v, float (&f)[8]) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(words[i] << 16);
    f[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}

// Rows the GEMV kernels dot with one read of a weight row, a compile-time bound: the smallest of
// 1, 2, 4, 8 that covers a batch of T tokens, so a decode step does not pay for predicated-off
// rows (a fixed 8 cost a batch of one ~25% on an H200).
inline int GemvRowsPerPass(int64_t T) { return T <= 1 ? 1 : T <= 2 ? 2 : T <= 4 ? 4 : 8; }

}  // namespace dsmoe::cuda
