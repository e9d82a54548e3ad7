#include "core/model/model_facts.h"

#include "core/model/tensor_roles.h"

namespace dsmoe {

namespace {

int64_t Elements(const TensorRoleInfo& role, const ModelConfig& c) {
  int64_t n = 1;
  for (int64_t d : role.shape(c)) n *= d;
  return n;
}

// How many tensors of `role` a checkpoint of `c` holds; routed-expert roles count
// `experts_per_layer` per MoE layer. No names are built: a fuzzed config may have millions of
// expert tensors.
int64_t Instances(const TensorRoleInfo& role, const ModelConfig& c, int64_t experts_per_layer) {
  if (role.scope == TensorScope::kModel) return role.present(c, -1) ? 1 : 0;
  int64_t layers = 0;
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    if (role.present(c, layer)) ++layers;
  }
  return role.scope == TensorScope::kRoutedExpert ? layers * experts_per_layer : layers;
}

}  // namespace

ParameterCount CountParameters(const ModelConfig& c) {
  ParameterCount count;
  for (const TensorRoleInfo& role : TensorRoleTable()) {
    count.total += Elements(role, c) * Instances(role, c, c.n_routed_experts);
    // Active, as the DeepSeekMoE paper counts it (16B: 2.8B): all but the routed experts a
    // token does not choose (the whole embedding table included).
    count.active += Elements(role, c) * Instances(role, c, c.num_experts_per_tok);
  }
  return count;
}

DecodeWeights CountDecodeWeights(const ModelConfig& c) {
  DecodeWeights w;
  for (const TensorRoleInfo& role : TensorRoleTable()) {
    const int64_t n = Elements(role, c) * Instances(role, c, c.num_experts_per_tok);
    if (role.kind == TensorKind::kLinear) w.matrices += n;
    if (role.kind == TensorKind::kRouter) w.routers += n;
  }
  if (!HasTensor(TensorRole::kLmHead, c)) w.matrices += c.vocab_size * c.hidden_size;  // tied
  w.matrices += c.hidden_size;  // the token's embedding row
  return w;
}

}  // namespace dsmoe
