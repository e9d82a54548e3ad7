// Element types dsmoe reads from checkpoints, with exact scalar conversions to fp32.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace dsmoe {

// kI8 is a raw int8 tensor as stored; kQ8_0 is a weight matrix of int8 values with one F16
// scale per block of kQ8Block consecutive values along a row (llama.cpp's Q8_0 layout, stored
// in safetensors as an I8 tensor plus an F16 "<name>_scale" tensor [rows, cols / 32]).
enum class DType : uint8_t { kF32, kBF16, kF16, kI8, kQ8_0 };
inline constexpr int64_t kQ8Block = 32;

inline constexpr size_t DTypeSize(DType t) {
  return t == DType::kF32 ? 4 : (t == DType::kBF16 || t == DType::kF16) ? 2 : 1;
}

// Names as the safetensors header spells them.
std::string_view DTypeName(DType t);
std::optional<DType> ParseDTypeName(std::string_view name);

inline float Bf16ToF32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even, as torch does; NaN stays NaN.
inline uint16_t F32ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// IEEE half to single, subnormals included.
inline float F16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Single to half, round to nearest even (used to write F16 checkpoints).
uint16_t F32ToF16(float f);

// Element i of a row stored as `t`, as fp32.
inline float LoadAsF32(const void* data, DType t, size_t i) {
  switch (t) {
    case DType::kF32:
      return static_cast<const float*>(data)[i];
    case DType::kBF16:
      return Bf16ToF32(static_cast<const uint16_t*>(data)[i]);
    case DType::kF16:
      return F16ToF32(static_cast<const uint16_t*>(data)[i]);
    case DType::kI8:
      return static_cast<float>(static_cast<const int8_t*>(data)[i]);
    case DType::kQ8_0:
      break;  // needs its scales: see MatrixView::At
  }
  return 0.0f;
}

}  // namespace dsmoe
