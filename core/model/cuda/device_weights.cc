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

}  // namespace

absl::StatusOr<std::unique_ptr<DeviceWeights>> DeviceWeights::Create(
    const ModelWeights& weights, const DeviceWeightParts& parts) {
  const ModelConfig& c = weights.config();
  const int64_t H = c.hidden_size;
  if (parts.attention_side && weights.embed_tokens.empty()) {
    return absl::FailedPreconditionError("GPU upload: the attention-side weights are not loaded");
  }
  auto dw = std::unique_ptr<DeviceWeights>(new DeviceWeights());
  Uploader up;
  std::vector<Patch<uint16_t>> patch16;
  std::vector<Patch<float>> patch32;

  auto add_matrix = [&](const uint16_t** field, std::vector<MatrixView> parts_of) {
    size_t bytes = 0;
    for (const MatrixView& m : parts_of) bytes += Bf16Bytes(m);
    const size_t off = up.Add(bytes, [parts_of](uint8_t* host, const uint8_t*) {
      uint16_t* out = reinterpret_cast<uint16_t*>(host);
      for (const MatrixView& m : parts_of) {
        ToBf16(m, out);
        out += m.rows * m.cols;
      }
    });
    patch16.push_back({field, off});
    return off;
  };
  auto add_floats = [&](const float** field, std::vector<float> values) {
    const size_t off =
        up.Add(values.size() * sizeof(float), [values](uint8_t* host, const uint8_t*) {
          std::memcpy(host, values.data(), values.size() * sizeof(float));
        });
    patch32.push_back({field, off});
  };
  auto add_matrix_f32 = [&](const float** field, const MatrixView& m) {
    const size_t off = up.Add(static_cast<size_t>(m.rows * m.cols) * sizeof(float),
                              [m](uint8_t* host, const uint8_t*) {
                                float* out = reinterpret_cast<float*>(host);
                                for (int64_t r = 0; r < m.rows; ++r) {
                                  for (int64_t k = 0; k < m.cols; ++k)
                                    out[r * m.cols + k] = m.At(r, k);
                                }
                              });
    patch32.push_back({field, off});
  };

  if (parts.attention_side) {
    add_matrix(&dw->embed_tokens, {weights.embed_tokens});
    add_floats(&dw->final_norm, weights.final_norm);
    if (weights.lm_head.data == weights.embed_tokens.data) {
      dw->lm_head = nullptr;  // tied: set to the embedding below
    } else {
      add_matrix(&dw->lm_head, {weights.lm_head});
    }
  }
  dw->layers.resize(weights.layers.size());
  // Offsets of each MoE layer's per-group matrices, for the pointer tables.
  struct GroupOffsets {
    std::vector<size_t> gate_up, down;
    std::vector<int32_t> width;
    size_t gate_up_table = 0, down_table = 0, width_table = 0;
  };
  std::vector<GroupOffsets> group_offsets(weights.layers.size());
  constexpr size_t kNone = ~size_t{0};

  for (size_t i = 0; i < weights.layers.size(); ++i) {
    const LayerWeights& L = weights.layers[i];
    DeviceLayer& D = dw->layers[i];
    D.is_moe = L.is_moe;
    if (parts.attention_side) {
      add_floats(&D.input_norm, L.input_norm);
      add_floats(&D.post_attention_norm, L.post_attention_norm);
      const AttentionWeights& a = L.attention;
      add_matrix(&D.qkv, {a.q.weight, a.k.weight, a.v.weight});
      add_matrix(&D.o, {a.o.weight});
      if (!a.q.bias.empty()) {
        std::vector<float> b = a.q.bias;
        b.insert(b.end(), a.k.bias.begin(), a.k.bias.end());
        b.insert(b.end(), a.v.bias.begin(), a.v.bias.end());
        add_floats(&D.qkv_bias, b);
      }
      if (!a.o.bias.empty()) add_floats(&D.o_bias, a.o.bias);
      if (!L.is_moe) {
        add_matrix(&D.dense.gate_up, {L.dense.gate, L.dense.up});
        add_matrix(&D.dense.down, {L.dense.down});
        D.dense.width = L.dense.width();
      } else {
        add_matrix_f32(&D.router, L.router);
      }
    }
    if (!L.is_moe) continue;
    const int64_t E = c.n_routed_experts;
    D.has_shared = parts.attention_side && L.shared.loaded();
    const int64_t G = E + (D.has_shared ? 1 : 0);
    GroupOffsets& g = group_offsets[i];
    g.gate_up.assign(G, kNone);
    g.down.assign(G, kNone);
    g.width.assign(G, 0);
    D.routed_loaded.assign(E, false);
    int max_width = 0;
    auto add_group = [&](int64_t idx, const MlpWeights& m) {
      static const uint16_t* unused = nullptr;  // the tables hold the pointers, not a field
      g.gate_up[idx] = add_matrix(&unused, {m.gate, m.up});
      patch16.pop_back();
      g.down[idx] = add_matrix(&unused, {m.down});
      patch16.pop_back();
      g.width[idx] = static_cast<int32_t>(m.width());
      max_width = std::max(max_width, static_cast<int>(m.width()));
    };
    if (parts.routed_experts) {
      for (int64_t e = 0; e < E; ++e) {
        if (!L.routed[e].loaded()) continue;
        add_group(e, L.routed[e]);
        D.routed_loaded[e] = true;
      }
    }
    if (D.has_shared) add_group(E, L.shared);
    // Pointer tables, filled in the second pass once the arena's address is known.
    auto table = [&](const std::vector<size_t>& offsets) {
      return up.Add(offsets.size() * sizeof(void*), [offsets](uint8_t* host, const uint8_t* base) {
        const uint8_t** out = reinterpret_cast<const uint8_t**>(host);
        for (size_t j = 0; j < offsets.size(); ++j)
          out[j] = offsets[j] == kNone ? nullptr : base + offsets[j];
      });
    };
    g.gate_up_table = table(g.gate_up);
    g.down_table = table(g.down);
    const std::vector<int32_t> widths = g.width;
    g.width_table =
        up.Add(widths.size() * sizeof(int32_t), [widths](uint8_t* host, const uint8_t*) {
          std::memcpy(host, widths.data(), widths.size() * sizeof(int32_t));
        });
    D.groups.num_groups = static_cast<int>(G);
    D.groups.max_width = (max_width + 7) / 8 * 8;
    D.groups.hidden = static_cast<int>(H);
  }

  void* arena = nullptr;
  DSMOE_CUDA_RETURN_IF_ERROR(cudaMalloc(&arena, std::max<size_t>(up.size(), 256)),
                             "allocating GPU memory for the weights");
  dw->arena_ = arena;
  dw->num_bytes_ = up.size();
  uint8_t* base = static_cast<uint8_t*>(arena);
  DSMOE_RETURN_IF_ERROR(up.CopyTo(base));
  for (const auto& p : patch16) *p.field = reinterpret_cast<const uint16_t*>(base + p.offset);
  for (const auto& p : patch32) *p.field = reinterpret_cast<const float*>(base + p.offset);
  if (parts.attention_side && dw->lm_head == nullptr) dw->lm_head = dw->embed_tokens;
  for (size_t i = 0; i < weights.layers.size(); ++i) {
    DeviceLayer& D = dw->layers[i];
    if (!D.is_moe) continue;
    const GroupOffsets& g = group_offsets[i];
    D.groups.gate_up = reinterpret_cast<const uint16_t* const*>(base + g.gate_up_table);
    D.groups.down = reinterpret_cast<const uint16_t* const*>(base + g.down_table);
    D.groups.width = reinterpret_cast<const int32_t*>(base + g.width_table);
  }
  return dw;
}

DeviceWeights::~DeviceWeights() {
  if (arena_ != nullptr) cudaFree(arena_);
}

}  // namespace dsmoe::cuda
