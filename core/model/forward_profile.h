// Where forward passes spend their time, by phase, summed over calls: what the step-time model
// of docs/disaggregation.md is fitted from (how long the attention side works per layer, how
// long it waits for the routed experts), and what attention servers export
// (dsmoe_forward_phase_seconds_total).
#pragma once

#include <array>
#include <chrono>
#include <cstddef>

namespace dsmoe {

enum class ForwardPhase {
  kEmbed,       // token embeddings
  kAttention,   // norm, Q/K/V projections, RoPE, KV-cache writes, attention, O projection
  kGate,        // the FFN norm, router logits and top-k
  kDispatch,    // starting the routed experts (RoutedExpertExecutor::Start: plan, send)
  kShared,      // the shared experts
  kDense,       // dense layers' MLP
  kRoutedWait,  // waiting for the routed experts (Finish): local compute, or the expert servers
  kCombine,     // adding routed and shared outputs to the residual stream
  kLogits,      // final norm and LM head
  kCount,
};

// The label of a phase: "embed", "attention", ..., "logits".
const char* ForwardPhaseName(ForwardPhase phase);

struct ForwardProfile {
  std::array<double, static_cast<size_t>(ForwardPhase::kCount)> seconds{};

  double& operator[](ForwardPhase p) { return seconds[static_cast<size_t>(p)]; }
  double operator[](ForwardPhase p) const { return seconds[static_cast<size_t>(p)]; }
};

// Charges the time since the previous lap (or construction) to a phase of `profile`: one
// clock read per phase boundary.
class PhaseClock {
 public:
  explicit PhaseClock(ForwardProfile& profile)
      : profile_(profile), last_(std::chrono::steady_clock::now()) {}
  void Lap(ForwardPhase phase) {
    const auto now = std::chrono::steady_clock::now();
    profile_[phase] += std::chrono::duration<double>(now - last_).count();
    last_ = now;
  }

 private:
  ForwardProfile& profile_;
  std::chrono::steady_clock::time_point last_;
};

}  // namespace dsmoe
