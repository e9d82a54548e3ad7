#include "core/model/cuda/device_weights.h"

#include <cuda_runtime.h>

#include <cstring>
#include <functional>

#include "core/ops/cuda/cuda_status.h"
#include "core/tensor/dtype.h"

namespace dsmoe::cuda {

namespace {

// Two passes over the weights: the first only records each piece's size, offset and how to
// fill it, so the whole model takes one cudaMalloc; the second fills a host staging buffer per
// piece and copies it up.
class Uploader {
 public:
  using Fill = std::function<void(uint8_t* host, const uint8_t* device_base)>;

  // Returns the piece's offset in the arena (256-byte aligned, as cudaMalloc's own).
  size_t Add(size_t bytes, Fill fill) {
    const size_t offset = (size_ + 255) / 256 * 256;
    size_ = offset + bytes;
    pieces_.push_back({offset, bytes, std::move(fill)});
    return offset;
  }
  size_t size() const { return size_; }

  absl::Status CopyTo(uint8_t* device_base) {
    std::vector<uint8_t> host;
    for (const Piece& p : pieces_) {
      host.resize(p.bytes);
      p.fill(host.data(), device_base);
      DSMOE_CUDA_RETURN_IF_ERROR(
          cudaMemcpy(device_base + p.offset, host.data(), p.bytes, cudaMemcpyHostToDevice),
          "uploading weights");
    }
    return absl::OkStatus();
  }

 private:
  struct Piece {
    size_t offset, bytes;
    Fill fill;
  };
  std::vector<Piece> pieces_;
  size_t size_ = 0;
};

void ToBf16(const MatrixView& m, uint16_t* out) {
  const size_t n = static_cast<size_t>(m.rows * m.cols);
  if (m.dtype == DType::kBF16) {
    std::memcpy(out, m.data, n * 2);
    return;
  }
  if (m.dtype == DType::kQ8_0) {  // dequantized: the GPU computes in bf16
    for (int64_t r = 0; r < m.rows; ++r)
      for (int64_t k = 0; k < m.cols; ++k) out[r * m.cols + k] = F32ToBf16(m.At(r, k));
    return;
  }
  for (size_t i = 0; i < n; ++i) out[i] = F32ToBf16(LoadAsF32(m.data, m.dtype, i));
}

size_t Bf16Bytes(const MatrixView& m) { return static_cast<size_t>(m.rows * m.cols) * 2; }

// Pointers are patched in once the arena's base is known.
template <class T>
struct Patch {
  const T** field;
  size_t offset;
};

constexpr size_t kNone = ~size_t{0};

// Offsets of a MoE layer's per-group matrices (routed experts, then the shared expert), and of
// the pointer tables the grouped kernels read.
struct GroupOffsets {
  std::vector<size_t> gate_up, down;
  std::vector<int32_t> width;
  size_t gate_up_table = 0, down_table = 0, width_table = 0;
};

}  // namespace

// Plans every piece of a DeviceWeights in an Uploader (first pass), then uploads them and
// points the fields at the arena (second pass).
class DeviceWeightsBuilder {
 public:
  DeviceWeightsBuilder(const ModelWeights& weights, const DeviceWeightParts& parts)
      : weights_(weights), parts_(parts), dw_(new DeviceWeights()) {}

  absl::StatusOr<std::unique_ptr<DeviceWeights>> Build() {
    if (parts_.attention_side) PlanEmbeddingsAndHead();
    dw_->layers.resize(weights_.layers.size());
    group_offsets_.resize(weights_.layers.size());
    for (size_t i = 0; i < weights_.layers.size(); ++i) {
      dw_->layers[i].is_moe = weights_.layers[i].is_moe;
      if (parts_.attention_side) PlanAttentionSide(weights_.layers[i], dw_->layers[i]);
      if (weights_.layers[i].is_moe) PlanGroups(weights_.layers[i], i);
    }
    return Upload();
  }

 private:
  size_t AddMatrix(const uint16_t** field, std::vector<MatrixView> parts_of) {
    size_t bytes = 0;
    for (const MatrixView& m : parts_of) bytes += Bf16Bytes(m);
    const size_t off = up_.Add(bytes, [parts_of](uint8_t* host, const uint8_t*) {
      uint16_t* out = reinterpret_cast<uint16_t*>(host);
      for (const MatrixView& m : parts_of) {
        ToBf16(m, out);
        out += m.rows * m.cols;
      }
    });
    if (field != nullptr) patch16_.push_back({field, off});
    return off;
  }
  void AddFloats(const float** field, std::vector<float> values) {
    const size_t off =
        up_.Add(values.size() * sizeof(float), [values](uint8_t* host, const uint8_t*) {
          std::memcpy(host, values.data(), values.size() * sizeof(float));
        });
    patch32_.push_back({field, off});
  }
  void AddMatrixF32(const float** field, const MatrixView& m) {
    const size_t off = up_.Add(static_cast<size_t>(m.rows * m.cols) * sizeof(float),
                               [m](uint8_t* host, const uint8_t*) {
                                 float* out = reinterpret_cast<float*>(host);
                                 for (int64_t r = 0; r < m.rows; ++r) {
                                   for (int64_t k = 0; k < m.cols; ++k)
                                     out[r * m.cols + k] = m.At(r, k);
                                 }
                               });
    patch32_.push_back({field, off});
  }
  // A table of device pointers into the arena, filled in the second pass once its address is
  // known (kNone: a null pointer, an expert this device does not hold).
  size_t AddPointerTable(const std::vector<size_t>& offsets) {
    return up_.Add(offsets.size() * sizeof(void*), [offsets](uint8_t* host, const uint8_t* base) {
      const uint8_t** out = reinterpret_cast<const uint8_t**>(host);
      for (size_t j = 0; j < offsets.size(); ++j)
        out[j] = offsets[j] == kNone ? nullptr : base + offsets[j];
    });
  }

  void PlanEmbeddingsAndHead() {
    AddMatrix(&dw_->embed_tokens, {weights_.embed_tokens});
    AddFloats(&dw_->final_norm, weights_.final_norm);
    if (weights_.lm_head.data == weights_.embed_tokens.data) {
      dw_->lm_head = nullptr;  // tied: set to the embedding once uploaded
    } else {
      AddMatrix(&dw_->lm_head, {weights_.lm_head});
    }
  }

  // Norms, attention (q, k, v as one matrix), the dense MLP or the router.
  void PlanAttentionSide(const LayerWeights& L, DeviceLayer& D) {
    AddFloats(&D.input_norm, L.input_norm);
    AddFloats(&D.post_attention_norm, L.post_attention_norm);
    const AttentionWeights& a = L.attention;
    AddMatrix(&D.qkv, {a.q.weight, a.k.weight, a.v.weight});
    AddMatrix(&D.o, {a.o.weight});
    if (!a.q.bias.empty()) {
      std::vector<float> b = a.q.bias;
      b.insert(b.end(), a.k.bias.begin(), a.k.bias.end());
      b.insert(b.end(), a.v.bias.begin(), a.v.bias.end());
      AddFloats(&D.qkv_bias, b);
    }
    if (!a.o.bias.empty()) AddFloats(&D.o_bias, a.o.bias);
    if (!L.is_moe) {
      AddMatrix(&D.dense.gate_up, {L.dense.gate, L.dense.up});
      AddMatrix(&D.dense.down, {L.dense.down});
      D.dense.width = L.dense.width();
    } else {
      AddMatrixF32(&D.router, L.router);
    }
  }

  // A MoE layer's groups for the grouped kernels: the routed experts held here, then the shared
  // expert (attention side), and their pointer and width tables.
  void PlanGroups(const LayerWeights& L, size_t layer) {
    DeviceLayer& D = dw_->layers[layer];
    const int64_t E = weights_.config().n_routed_experts;
    D.has_shared = parts_.attention_side && L.shared.loaded();
    const int64_t G = E + (D.has_shared ? 1 : 0);
    GroupOffsets& g = group_offsets_[layer];
    g.gate_up.assign(G, kNone);
    g.down.assign(G, kNone);
    g.width.assign(G, 0);
    D.routed_loaded.assign(E, false);
    int max_width = 0;
    auto add_group = [&](int64_t idx, const MlpWeights& m) {
      g.gate_up[idx] = AddMatrix(nullptr, {m.gate, m.up});  // the tables hold the pointers
      g.down[idx] = AddMatrix(nullptr, {m.down});
      g.width[idx] = static_cast<int32_t>(m.width());
      max_width = std::max(max_width, static_cast<int>(m.width()));
    };
    if (parts_.routed_experts) {
      for (int64_t e = 0; e < E; ++e) {
        if (!L.routed[e].loaded()) continue;
        add_group(e, L.routed[e]);
        D.routed_loaded[e] = true;
      }
    }
    if (D.has_shared) add_group(E, L.shared);
    g.gate_up_table = AddPointerTable(g.gate_up);
    g.down_table = AddPointerTable(g.down);
    const std::vector<int32_t> widths = g.width;
    g.width_table =
        up_.Add(widths.size() * sizeof(int32_t), [widths](uint8_t* host, const uint8_t*) {
          std::memcpy(host, widths.data(), widths.size() * sizeof(int32_t));
        });
    D.groups.num_groups = static_cast<int>(G);
    D.groups.max_width = (max_width + 7) / 8 * 8;
    D.groups.hidden = static_cast<int>(weights_.config().hidden_size);
  }

  // One cudaMalloc for the whole plan, every piece copied up, every pointer patched.
  absl::StatusOr<std::unique_ptr<DeviceWeights>> Upload() {
    void* arena = nullptr;
    DSMOE_CUDA_RETURN_IF_ERROR(cudaMalloc(&arena, std::max<size_t>(up_.size(), 256)),
                               "allocating GPU memory for the weights");
    dw_->arena_ = arena;
    dw_->num_bytes_ = up_.size();
    uint8_t* base = static_cast<uint8_t*>(arena);
    DSMOE_RETURN_IF_ERROR(up_.CopyTo(base));
    for (const auto& p : patch16_) *p.field = reinterpret_cast<const uint16_t*>(base + p.offset);
    for (const auto& p : patch32_) *p.field = reinterpret_cast<const float*>(base + p.offset);
    if (parts_.attention_side && dw_->lm_head == nullptr) dw_->lm_head = dw_->embed_tokens;
    for (size_t i = 0; i < dw_->layers.size(); ++i) {
      DeviceLayer& D = dw_->layers[i];
      if (!D.is_moe) continue;
      const GroupOffsets& g = group_offsets_[i];
      D.groups.gate_up = reinterpret_cast<const uint16_t* const*>(base + g.gate_up_table);
      D.groups.down = reinterpret_cast<const uint16_t* const*>(base + g.down_table);
      D.groups.width = reinterpret_cast<const int32_t*>(base + g.width_table);
    }
    return std::move(dw_);
  }

  const ModelWeights& weights_;
  const DeviceWeightParts parts_;
  std::unique_ptr<DeviceWeights> dw_;
  Uploader up_;
  std::vector<Patch<uint16_t>> patch16_;
  std::vector<Patch<float>> patch32_;
  std::vector<GroupOffsets> group_offsets_;  // [layer]; used for MoE layers only
};

absl::StatusOr<std::unique_ptr<DeviceWeights>> DeviceWeights::Create(
    const ModelWeights& weights, const DeviceWeightParts& parts) {
  if (parts.attention_side && weights.embed_tokens.empty()) {
    return absl::FailedPreconditionError("GPU upload: the attention-side weights are not loaded");
  }
  return DeviceWeightsBuilder(weights, parts).Build();
}

DeviceWeights::~DeviceWeights() {
  if (arena_ != nullptr) cudaFree(arena_);
}

}  // namespace dsmoe::cuda
