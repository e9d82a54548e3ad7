#include "core/model/weights.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>

namespace dsmoe {

namespace {

// Looks tensors up by name and checks their shapes against what the config implies.
class TensorLoader {
 public:
  explicit TensorLoader(const Checkpoint& ckpt) : ckpt_(ckpt) {}

  absl::StatusOr<MatrixView> Matrix(const std::string& name, int64_t rows, int64_t cols,
                                    const char* why) {
    DSMOE_ASSIGN_OR_RETURN(TensorView t, ckpt_.Tensor(name));
    if (t.shape != std::vector<int64_t>{rows, cols}) {
      return WrongShape(name, t.shape, {rows, cols}, why);
    }
    if (t.dtype != DType::kI8) return MatrixView{t.dtype, rows, cols, t.data};
    // Q8_0 (dsmoe quantize): int8 values with an F16 scale per block of 32 along each row.
    const std::string scale_name = name + "_scale";
    if (cols % kQ8Block != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(ckpt_.dir(), ": tensor '", name, "' is I8 but its ", cols,
                       " columns are not a multiple of the Q8_0 block of ", kQ8Block));
    }
    DSMOE_ASSIGN_OR_RETURN(TensorView scales, ckpt_.Tensor(scale_name));
    if (scales.dtype != DType::kF16) {
      return absl::InvalidArgumentError(absl::StrCat(ckpt_.dir(), ": tensor '", scale_name,
                                                     "' must be F16, is ",
                                                     std::string(DTypeName(scales.dtype))));
    }
    if (scales.shape != std::vector<int64_t>{rows, cols / kQ8Block}) {
      return WrongShape(scale_name, scales.shape, {rows, cols / kQ8Block},
                        "Q8_0 scales: one per 32 weights");
    }
    return MatrixView{DType::kQ8_0, rows, cols, t.data, static_cast<const uint16_t*>(scales.data)};
  }

  absl::StatusOr<std::vector<float>> Vector(const std::string& name, int64_t n, const char* why) {
    DSMOE_ASSIGN_OR_RETURN(TensorView t, ckpt_.Tensor(name));
    if (t.shape != std::vector<int64_t>{n}) return WrongShape(name, t.shape, {n}, why);
    std::vector<float> v(n);
    for (int64_t i = 0; i < n; ++i) v[i] = LoadAsF32(t.data, t.dtype, i);
    return v;
  }

  absl::StatusOr<MlpWeights> Mlp(const std::string& prefix, int64_t hidden, int64_t width,
                                 const char* why) {
    MlpWeights m;
    DSMOE_ASSIGN_OR_RETURN(m.gate, Matrix(prefix + ".gate_proj.weight", width, hidden, why));
    DSMOE_ASSIGN_OR_RETURN(m.up, Matrix(prefix + ".up_proj.weight", width, hidden, why));
    DSMOE_ASSIGN_OR_RETURN(m.down, Matrix(prefix + ".down_proj.weight", hidden, width, why));
    return m;
  }

 private:
  absl::Status WrongShape(const std::string& name, const std::vector<int64_t>& got,
                          const std::vector<int64_t>& want, const char* why) {
    return absl::InvalidArgumentError(absl::StrCat(ckpt_.dir(), ": tensor '", name, "' has shape ",
                                                   ShapeToString(got), ", expected ",
                                                   ShapeToString(want), " (", why, ")"));
  }
  const Checkpoint& ckpt_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ModelWeights>> ModelWeights::Load(const std::string& dir,
                                                                 const WeightSelection& selection,
                                                                 const WeightLoadOptions& options) {
  auto w = std::unique_ptr<ModelWeights>(new ModelWeights());
  DSMOE_ASSIGN_OR_RETURN(w->checkpoint_, Checkpoint::Open(dir));
  const std::string config_path = (std::filesystem::path(dir) / "config.json").string();
  DSMOE_ASSIGN_OR_RETURN(std::string config_text, w->checkpoint_->ReadJsonFile("config.json"));
  DSMOE_ASSIGN_OR_RETURN(w->config_, ModelConfig::FromJson(config_text, config_path));
  auto gen_text = w->checkpoint_->ReadJsonFile("generation_config.json");
  if (gen_text.ok()) {
    DSMOE_ASSIGN_OR_RETURN(
        w->generation_config_,
        GenerationConfig::FromJson(*gen_text,
                                   (std::filesystem::path(dir) / "generation_config.json").string(),
                                   w->config_));
  } else {
    w->generation_config_ = GenerationConfig::FromModel(w->config_);
  }
  DSMOE_RETURN_IF_ERROR(w->LoadTensors(selection));
  if (options.copy_to_huge_pages) DSMOE_RETURN_IF_ERROR(w->CopyToHugePages());
  return w;
}

size_t ModelWeights::MatrixBytes() {
  std::set<const void*> seen;
  size_t bytes = 0;
  ForEachMatrix([&](MatrixView& m) {
    if (seen.insert(m.data).second) bytes += m.NumBytes() + m.ScaleBytes();
  });
  return bytes;
}

absl::Status ModelWeights::CopyToHugePages() {
  constexpr size_t kAlign = 64;  // cache line: rows of a matrix start aligned when cols allow
  auto padded = [](size_t n) { return (n + kAlign - 1) / kAlign * kAlign; };
  size_t total = 0;
  std::set<const void*> seen;
  ForEachMatrix([&](MatrixView& m) {
    if (seen.insert(m.data).second) total += padded(m.NumBytes()) + padded(m.ScaleBytes());
  });
  DSMOE_ASSIGN_OR_RETURN(buffer_, HugePageBuffer::Allocate(total));
  std::map<const void*, MatrixView> moved;  // old data → the copy, so tied matrices stay one copy
  size_t offset = 0;
  auto copy = [&](const void* src, size_t bytes) {
    std::byte* dst = buffer_->data() + offset;
    std::memcpy(dst, src, bytes);
    offset += padded(bytes);
    // Drop the source pages from this process at once (they stay in the page cache), so the
    // resident size never holds the weights twice.
    const uintptr_t page = 4096, begin = reinterpret_cast<uintptr_t>(src);
    const uintptr_t first = (begin + page - 1) / page * page, last = (begin + bytes) / page * page;
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
    return dst;
  };
  ForEachMatrix([&](MatrixView& m) {
    auto it = moved.find(m.data);
    if (it == moved.end()) {
      MatrixView copied = m;
      copied.data = copy(m.data, m.NumBytes());  // a Q8_0 matrix's scales follow its values
      if (m.scales != nullptr)
        copied.scales = reinterpret_cast<const uint16_t*>(copy(m.scales, m.ScaleBytes()));
      it = moved.emplace(m.data, copied).first;
    }
    m = it->second;
  });
  // Nothing points into the file mappings any more: unmap them, so the weights are resident once.
  checkpoint_->ReleaseMappings();
  return absl::OkStatus();
}

absl::Status ModelWeights::LoadTensors(const WeightSelection& selection) {
  const ModelConfig& c = config_;
  TensorLoader load(*checkpoint_);
  const int64_t H = c.hidden_size, V = c.vocab_size, hd = c.head_dim();
  const int64_t q_out = c.num_attention_heads * hd, kv_out = c.num_key_value_heads * hd;

  if (selection.attention_side) {
    DSMOE_ASSIGN_OR_RETURN(
        embed_tokens, load.Matrix("model.embed_tokens.weight", V, H, "vocab_size × hidden_size"));
    DSMOE_ASSIGN_OR_RETURN(final_norm, load.Vector("model.norm.weight", H, "hidden_size"));
    if (c.tie_word_embeddings) {
      lm_head = embed_tokens;
    } else {
      DSMOE_ASSIGN_OR_RETURN(lm_head,
                             load.Matrix("lm_head.weight", V, H,
                                         "vocab_size × hidden_size; tie_word_embeddings is false"));
    }
  }

  layers.resize(c.num_hidden_layers);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    LayerWeights& L = layers[i];
    const std::string p = absl::StrCat("model.layers.", i, ".");
    L.is_moe = c.IsMoeLayer(i);
    if (selection.attention_side) {
      DSMOE_ASSIGN_OR_RETURN(L.input_norm,
                             load.Vector(p + "input_layernorm.weight", H, "hidden_size"));
      DSMOE_ASSIGN_OR_RETURN(L.post_attention_norm,
                             load.Vector(p + "post_attention_layernorm.weight", H, "hidden_size"));
      struct Proj {
        const char* name;
        int64_t out, in;
        LinearWeights* dst;
        const char* why;
      };
      for (const Proj& pr :
           {Proj{"q_proj", q_out, H, &L.attention.q, "num_attention_heads·head_dim × hidden_size"},
            Proj{"k_proj", kv_out, H, &L.attention.k, "num_key_value_heads·head_dim × hidden_size"},
            Proj{"v_proj", kv_out, H, &L.attention.v, "num_key_value_heads·head_dim × hidden_size"},
            Proj{"o_proj", H, q_out, &L.attention.o,
                 "hidden_size × num_attention_heads·head_dim"}}) {
        const std::string base = p + "self_attn." + pr.name;
        DSMOE_ASSIGN_OR_RETURN(pr.dst->weight,
                               load.Matrix(base + ".weight", pr.out, pr.in, pr.why));
        if (c.attention_bias) {
          DSMOE_ASSIGN_OR_RETURN(pr.dst->bias,
                                 load.Vector(base + ".bias", pr.out, "attention_bias is true"));
        }
      }
      if (!L.is_moe) {
        DSMOE_ASSIGN_OR_RETURN(
            L.dense, load.Mlp(p + "mlp", H, c.intermediate_size, "dense layer: intermediate_size"));
      } else {
        DSMOE_ASSIGN_OR_RETURN(L.router, load.Matrix(p + "mlp.gate.weight", c.n_routed_experts, H,
                                                     "router: n_routed_experts × hidden_size"));
        if (c.n_shared_experts > 0) {
          DSMOE_ASSIGN_OR_RETURN(
              L.shared, load.Mlp(p + "mlp.shared_experts", H, c.shared_intermediate_size(),
                                 "shared experts: n_shared_experts·moe_intermediate_size"));
        }
      }
    }
    if (L.is_moe) {
      L.routed.resize(c.n_routed_experts);
      for (int64_t e = 0; e < c.n_routed_experts; ++e) {
        if (!selection.WantsExpert(i, e)) continue;
        DSMOE_ASSIGN_OR_RETURN(
            L.routed[e], load.Mlp(absl::StrCat(p, "mlp.experts.", e), H, c.moe_intermediate_size,
                                  "routed expert: moe_intermediate_size"));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace dsmoe
