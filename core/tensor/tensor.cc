#include "core/tensor/tensor.h"

#include <sys/mman.h>

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
  // Buffers of 2 MiB and more (the KV cache above all) go on transparent huge pages: attention
  // reads a head's rows one cache row apart, thousands of 4 KiB pages for a long context, and
  // the TLB misses of that walk cost more than the reads themselves.
  constexpr size_t kHugePage = size_t{2} << 20;
  const size_t alignment = n * sizeof(float) >= kHugePage ? kHugePage : 64;
  const size_t bytes = (n * sizeof(float) + alignment - 1) / alignment * alignment;
  void* p = std::aligned_alloc(alignment, bytes);
  if (p == nullptr) throw std::bad_alloc();
  if (alignment == kHugePage) (void)madvise(p, bytes, MADV_HUGEPAGE);  // advisory
  std::memset(p, 0, bytes);
  data_.reset(static_cast<float*>(p));
}

}  // namespace dsmoe
