#include "core/tensor/dtype.h"

#include <cmath>

namespace dsmoe {

std::string_view DTypeName(DType t) {
  switch (t) {
    case DType::kF32:
      return "F32";
    case DType::kBF16:
      return "BF16";
    case DType::kF16:
      return "F16";
    case DType::kI8:
      return "I8";
    case DType::kQ8_0:
      return "Q8_0";
  }
  return "?";
}

std::optional<DType> ParseDTypeName(std::string_view name) {
  if (name == "F32") return DType::kF32;
  if (name == "BF16") return DType::kBF16;
  if (name == "F16") return DType::kF16;
  if (name == "I8") return DType::kI8;
  return std::nullopt;
}

uint16_t F32ToF16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: infinity
  if (abs < 0x38800000u) {                        // below 2^-14: subnormal or zero
    // Scale into the subnormal grid (2^-24 per step) and round to nearest even.
    const float scaled = std::fabs(f) * 16777216.0f;  // exact: power-of-two scale
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));
  }
  const uint32_t mant_round = abs + 0xfffu + ((abs >> 13) & 1u);
  return sign | static_cast<uint16_t>((mant_round - 0x38000000u) >> 13);
}

}  // namespace dsmoe
