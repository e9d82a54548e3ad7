#include "core/model/model_facts.h"

#include "core/model/tensor_roles.h"

namespace dsmoe {

ParameterCount CountParameters(const ModelConfig& c) {
  ParameterCount count;
  // Every role's size times the number of tensors of that role (no names built: a fuzzed
  // config may have millions of expert tensors).
  for (const TensorRoleInfo& role : TensorRoleTable()) {
    int64_t size = 1;
    for (int64_t d : role.shape(c)) size *= d;
    int64_t instances = 0;
    if (role.scope == TensorScope::kModel) {
      instances = role.present(c, -1) ? 1 : 0;
    } else {
      for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
        if (role.present(c, layer)) ++instances;
      }
      if (role.scope == TensorScope::kRoutedExpert) instances *= c.n_routed_experts;
    }
    count.total += size * instances;
  }
  // Active, as the DeepSeekMoE paper counts it (16B: 2.8B): all but the routed experts a token
  // does not choose. (Of the embedding table a token reads one row; weight bytes read per
  // token are the benchmark's business.)
  const int64_t expert = 3 * c.hidden_size * c.moe_intermediate_size;
  count.active =
      count.total - c.NumMoeLayers() * (c.n_routed_experts - c.num_experts_per_tok) * expert;
  return count;
}

}  // namespace dsmoe
