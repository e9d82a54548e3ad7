#include "core/model/forward_profile.h"

namespace dsmoe {

const char* ForwardPhaseName(ForwardPhase phase) {
  switch (phase) {
    case ForwardPhase::kEmbed:
      return "embed";
    case ForwardPhase::kAttention:
      return "attention";
    case ForwardPhase::kGate:
      return "gate";
    case ForwardPhase::kDispatch:
      return "dispatch";
    case ForwardPhase::kShared:
      return "shared_experts";
    case ForwardPhase::kDense:
      return "dense_mlp";
    case ForwardPhase::kRoutedWait:
      return "routed_wait";
    case ForwardPhase::kCombine:
      return "combine";
    case ForwardPhase::kLogits:
      return "logits";
    case ForwardPhase::kCount:
      break;
  }
  return "unknown";
}

}  // namespace dsmoe
