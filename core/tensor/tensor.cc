#include "core/tensor/tensor.h"

#include <cstdlib>
#include <cstring>
#include <new>

namespace dsmoe {

std::string ShapeToString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

void FloatBuffer::Free::operator()(float* p) const { std::free(p); }

void FloatBuffer::Resize(size_t n) {
  size_ = n;
  if (n == 0) {
    data_.reset();
    return;
  }
  const size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (p == nullptr) throw std::bad_alloc();
  std::memset(p, 0, bytes);
  data_.reset(static_cast<float*>(p));
}

}  // namespace dsmoe
