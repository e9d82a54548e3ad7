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
  const uint16_t* scales = nullptr;  // kQ8_0 only: F16 [rows, cols / kQ8Block]

  const void* Row(int64_t r) const {
    return static_cast<const char*>(data) + static_cast<size_t>(r * cols) * DTypeSize(dtype);
  }
  const uint16_t* RowScales(int64_t r) const { return scales + r * (cols / kQ8Block); }
  // Element (r, k) as fp32, whatever the dtype (slow: for references and tests).
  float At(int64_t r, int64_t k) const {
    if (dtype == DType::kQ8_0) {
      return static_cast<float>(static_cast<const int8_t*>(Row(r))[k]) *
             F16ToF32(RowScales(r)[k / kQ8Block]);
    }
    return LoadAsF32(Row(r), dtype, k);
  }
  // Bytes of the values, and of the Q8_0 scales (0 for other dtypes).
  size_t NumBytes() const { return static_cast<size_t>(rows * cols) * DTypeSize(dtype); }
  size_t ScaleBytes() const {
    return dtype == DType::kQ8_0 ? static_cast<size_t>(rows * (cols / kQ8Block)) * sizeof(uint16_t)
                                 : 0;
  }
  bool empty() const { return data == nullptr; }
  // Rows [begin, begin + count) as a matrix of their own (e.g. a tensor-parallel slice).
  MatrixView RowSlice(int64_t begin, int64_t count) const {
    return MatrixView{dtype, count, cols, Row(begin),
                      scales == nullptr ? nullptr : RowScales(begin)};
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
