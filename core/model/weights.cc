#include "core/model/weights.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>

#include "core/model/tensor_roles.h"

namespace dsmoe {

namespace {

// Looks the tensors of a role up by name (tensor_roles.h) and checks their shapes against what
// the config implies.
class TensorLoader {
 public:
  TensorLoader(const Checkpoint& ckpt, const ModelConfig& config) : ckpt_(ckpt), config_(config) {}

  absl::StatusOr<MatrixView> Matrix(TensorRole role, int64_t layer = -1, int64_t expert = -1) {
    const std::string name = TensorName(role, layer, expert);
    const std::vector<int64_t> want = TensorShape(role, config_);
    const char* why = RoleInfo(role).shape_why;
    DSMOE_ASSIGN_OR_RETURN(TensorView t, ckpt_.Tensor(name));
    if (t.shape != want) return WrongShape(name, t.shape, want, why);
    const int64_t rows = want[0], cols = want[1];
    if (t.dtype != DType::kI8) return MatrixView{t.dtype, rows, cols, t.data};
    // Q8_0 (dsmoe quantize): int8 values with an F16 scale per block of 32 along each row.
    const std::string scale_name = Q8ScaleName(name);
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

  absl::StatusOr<std::vector<float>> Vector(TensorRole role, int64_t layer = -1) {
    const std::string name = TensorName(role, layer);
    const std::vector<int64_t> want = TensorShape(role, config_);
    DSMOE_ASSIGN_OR_RETURN(TensorView t, ckpt_.Tensor(name));
    if (t.shape != want) return WrongShape(name, t.shape, want, RoleInfo(role).shape_why);
    std::vector<float> v(want[0]);
    for (int64_t i = 0; i < want[0]; ++i) v[i] = LoadAsF32(t.data, t.dtype, i);
    return v;
  }

  absl::StatusOr<MlpWeights> Mlp(const MlpRoles& roles, int64_t layer, int64_t expert = -1) {
    MlpWeights m;
    DSMOE_ASSIGN_OR_RETURN(m.gate, Matrix(roles.gate, layer, expert));
    DSMOE_ASSIGN_OR_RETURN(m.up, Matrix(roles.up, layer, expert));
    DSMOE_ASSIGN_OR_RETURN(m.down, Matrix(roles.down, layer, expert));
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
  const ModelConfig& config_;
};

// A layer's attention-side tensors: norms, attention, and the dense MLP or the router and
// shared experts.
absl::Status LoadAttentionSide(TensorLoader& load, const ModelConfig& c, int64_t layer,
                               LayerWeights& L) {
  DSMOE_ASSIGN_OR_RETURN(L.input_norm, load.Vector(TensorRole::kInputNorm, layer));
  DSMOE_ASSIGN_OR_RETURN(L.post_attention_norm, load.Vector(TensorRole::kPostAttentionNorm, layer));
  LinearWeights* projections[] = {&L.attention.q, &L.attention.k, &L.attention.v, &L.attention.o};
  for (size_t p = 0; p < std::size(projections); ++p) {
    const ProjectionRoles& roles = kAttentionProjections[p];
    DSMOE_ASSIGN_OR_RETURN(projections[p]->weight, load.Matrix(roles.weight, layer));
    if (HasTensor(roles.bias, c, layer)) {
      DSMOE_ASSIGN_OR_RETURN(projections[p]->bias, load.Vector(roles.bias, layer));
    }
  }
  if (HasTensor(TensorRole::kDenseGate, c, layer)) {
    DSMOE_ASSIGN_OR_RETURN(L.dense, load.Mlp(kDenseMlpRoles, layer));
  }
  if (HasTensor(TensorRole::kRouter, c, layer)) {
    DSMOE_ASSIGN_OR_RETURN(L.router, load.Matrix(TensorRole::kRouter, layer));
  }
  if (HasTensor(TensorRole::kSharedGate, c, layer)) {
    DSMOE_ASSIGN_OR_RETURN(L.shared, load.Mlp(kSharedMlpRoles, layer));
  }
  return absl::OkStatus();
}

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
  TensorLoader load(*checkpoint_, c);
  if (selection.attention_side) {
    DSMOE_ASSIGN_OR_RETURN(embed_tokens, load.Matrix(TensorRole::kTokenEmbedding));
    DSMOE_ASSIGN_OR_RETURN(final_norm, load.Vector(TensorRole::kFinalNorm));
    if (HasTensor(TensorRole::kLmHead, c)) {
      DSMOE_ASSIGN_OR_RETURN(lm_head, load.Matrix(TensorRole::kLmHead));
    } else {
      lm_head = embed_tokens;  // tie_word_embeddings
    }
  }
  layers.resize(c.num_hidden_layers);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    LayerWeights& L = layers[i];
    L.is_moe = c.IsMoeLayer(i);
    if (selection.attention_side) DSMOE_RETURN_IF_ERROR(LoadAttentionSide(load, c, i, L));
    if (!HasTensor(TensorRole::kExpertGate, c, i)) continue;
    L.routed.resize(c.n_routed_experts);
    for (int64_t e = 0; e < c.n_routed_experts; ++e) {
      if (!selection.WantsExpert(i, e)) continue;
      DSMOE_ASSIGN_OR_RETURN(L.routed[e], load.Mlp(kRoutedExpertRoles, i, e));
    }
  }
  return absl::OkStatus();
}

}  // namespace dsmoe
