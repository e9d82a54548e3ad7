// Non-owning views of tensors. Weights live in memory-mapped checkpoint files owned by
// io::Checkpoint; everything above holds these views, never copies.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor/dtype.h"

namespace dsmoe {

// Any-rank read-only view, as found in a checkpoint.
struct TensorView {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;

  int64_t NumElements() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  size_t NumBytes() const { return static_cast<size_t>(NumElements()) * DTypeSize(dtype); }
  bool empty() const { return data == nullptr; }
};

std::string ShapeToString(const std::vector<int64_t>& shape);

// A row-major 2-D weight matrix [rows, cols] in any DType; a linear layer computes
// y = x · Wᵀ, so each output feature is one contiguous row.
struct MatrixView {
  DType dtype = DType::kF32;
  int64_t rows = 0;
  int64_t cols = 0;
  const void* data = nullptr;

  const void* Row(int64_t r) const {
    return static_cast<const char*>(data) + static_cast<size_t>(r * cols) * DTypeSize(dtype);
  }
  size_t NumBytes() const { return static_cast<size_t>(rows * cols) * DTypeSize(dtype); }
  bool empty() const { return data == nullptr; }
  // Rows [begin, begin + count) as a matrix of their own (e.g. a tensor-parallel slice).
  MatrixView RowSlice(int64_t begin, int64_t count) const {
    return MatrixView{dtype, count, cols, Row(begin)};
  }
};

// Float32 storage owned by whoever holds it (activations, small per-layer vectors),
// 64-byte aligned for vector loads.
class FloatBuffer {
 public:
  FloatBuffer() = default;
  explicit FloatBuffer(size_t n) { Resize(n); }
  void Resize(size_t n);
  float* data() { return data_.get(); }
  const float* data() const { return data_.get(); }
  size_t size() const { return size_; }
  float& operator[](size_t i) { return data_[i]; }
  float operator[](size_t i) const { return data_[i]; }

 private:
  struct Free {
    void operator()(float* p) const;
  };
  std::unique_ptr<float[], Free> data_;
  size_t size_ = 0;
};

}  // namespace dsmoe
