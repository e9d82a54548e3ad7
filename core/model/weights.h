// The model's weights as named views into a checkpoint, checked against the config.
//
// Tensor names and shapes are exactly Hugging Face's DeepseekForCausalLM, as listed once in
// core/model/tensor_roles.h.
#pragma once

#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "core/io/checkpoint.h"
#include "core/model/config.h"
#include "core/tensor/tensor.h"
#include "core/util/huge_pages.h"
#include "core/util/status.h"

namespace dsmoe {

struct LinearWeights {
  MatrixView weight;        // [out, in]
  std::vector<float> bias;  // [out] or empty
};

// A SwiGLU MLP: down(silu(gate(x)) · up(x)). Dense layers, each routed expert and the shared
// experts (one MLP of width n_shared · moe_intermediate_size) all have this form.
struct MlpWeights {
  MatrixView gate;  // [width, H]
  MatrixView up;    // [width, H]
  MatrixView down;  // [H, width]
  int64_t width() const { return gate.rows; }
  bool loaded() const { return !gate.empty(); }
};

struct AttentionWeights {
  LinearWeights q, k, v, o;
};

struct LayerWeights {
  std::vector<float> input_norm;           // [H]
  std::vector<float> post_attention_norm;  // [H]
  AttentionWeights attention;
  bool is_moe = false;
  MlpWeights dense;                // dense layers only
  MatrixView router;               // MoE layers: the gate, [n_routed, H]
  MlpWeights shared;               // MoE layers with shared experts
  std::vector<MlpWeights> routed;  // MoE layers: [n_routed]; not loaded() if not selected
};

// Which tensors a process needs: an attention server takes everything but the routed experts,
// an expert server only its routed experts, the single-process engine all of them.
struct WeightSelection {
  bool attention_side = true;  // embeddings, norms, attention, dense MLPs, routers, shared, head
  bool all_routed_experts = true;
  std::set<std::pair<int64_t, int64_t>> routed_experts;  // (layer, expert), if not all

  static WeightSelection Everything() { return {}; }
  // Only the routed experts `experts` (an expert server's share); none: the config alone.
  static WeightSelection RoutedExperts(std::set<std::pair<int64_t, int64_t>> experts = {}) {
    WeightSelection s;
    s.attention_side = false;
    s.all_routed_experts = false;
    s.routed_experts = std::move(experts);
    return s;
  }
  bool WantsExpert(int64_t layer, int64_t expert) const {
    return all_routed_experts || routed_experts.count({layer, expert}) != 0;
  }
};

struct WeightLoadOptions {
  // Copy the selected weights, in the order the forward pass reads them, into one anonymous
  // buffer advised for transparent huge pages, then drop the file mappings. Off: the views
  // point into the memory-mapped checkpoint (4 KiB pages; nothing is copied).
  bool copy_to_huge_pages = true;
};

// Const after Load; thread-safe. Owns the memory the views point into: the weight buffer, or
// the checkpoint's mappings.
class ModelWeights {
 public:
  static absl::StatusOr<std::unique_ptr<ModelWeights>> Load(
      const std::string& dir, const WeightSelection& selection = WeightSelection::Everything(),
      const WeightLoadOptions& options = {});

  // Every weight matrix, in forward order (embeddings, layer by layer, head); a matrix seen
  // twice (tied embeddings) is visited twice.
  template <class Fn>
  void ForEachMatrix(Fn&& fn);
  // Bytes of all distinct loaded weight matrices.
  size_t MatrixBytes();
  bool in_huge_pages() const { return buffer_ != nullptr; }

  const ModelConfig& config() const { return config_; }
  const GenerationConfig& generation_config() const { return generation_config_; }
  const Checkpoint& checkpoint() const { return *checkpoint_; }

  MatrixView embed_tokens;        // [V, H]
  std::vector<float> final_norm;  // [H]
  MatrixView lm_head;             // [V, H]; the embedding matrix when tie_word_embeddings
  std::vector<LayerWeights> layers;

 private:
  ModelWeights() = default;
  absl::Status LoadTensors(const WeightSelection& selection);

  absl::Status CopyToHugePages();

  ModelConfig config_;
  GenerationConfig generation_config_;
  std::unique_ptr<Checkpoint> checkpoint_;
  std::unique_ptr<HugePageBuffer> buffer_;
};

template <class Fn>
void ModelWeights::ForEachMatrix(Fn&& fn) {
  auto mlp = [&](MlpWeights& m) {
    if (!m.loaded()) return;
    fn(m.gate);
    fn(m.up);
    fn(m.down);
  };
  if (!embed_tokens.empty()) fn(embed_tokens);
  for (LayerWeights& L : layers) {
    for (LinearWeights* lw : {&L.attention.q, &L.attention.k, &L.attention.v, &L.attention.o}) {
      if (!lw->weight.empty()) fn(lw->weight);
    }
    mlp(L.dense);
    if (!L.router.empty()) fn(L.router);
    mlp(L.shared);
    for (MlpWeights& m : L.routed) mlp(m);
  }
  if (!lm_head.empty()) fn(lm_head);
}

}  // namespace dsmoe
