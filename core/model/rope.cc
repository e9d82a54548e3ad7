#include "core/model/rope.h"

#include <cmath>

namespace dsmoe {

RopeTable::RopeTable(const ModelConfig& c, int64_t max_context)
    : head_dim_(c.head_dim()), max_context_(max_context) {
  const int64_t half = head_dim_ / 2;
  cos_.Resize(max_context * half);
  sin_.Resize(max_context * half);
  const double pos_scale =
      c.rope_scaling.type == RopeScaling::Type::kLinear ? 1.0 / c.rope_scaling.factor : 1.0;
  for (int64_t p = 0; p < max_context; ++p) {
    for (int64_t i = 0; i < half; ++i) {
      const double inv_freq =
          std::pow(c.rope_theta, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim_));
      const double angle = static_cast<double>(p) * pos_scale * inv_freq;
      cos_[p * half + i] = static_cast<float>(std::cos(angle));
      sin_[p * half + i] = static_cast<float>(std::sin(angle));
    }
  }
}

void RopeTable::Apply(float* x, int64_t T, int64_t num_heads,
                      std::span<const int32_t> positions) const {
  const int64_t hd = head_dim_, half = hd / 2;
  for (int64_t t = 0; t < T; ++t) {
    const float* cos = cos_.data() + positions[t] * half;
    const float* sin = sin_.data() + positions[t] * half;
    for (int64_t h = 0; h < num_heads; ++h) {
      float* v = x + (t * num_heads + h) * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i] + a * sin[i];
      }
    }
  }
}

}  // namespace dsmoe
