// The forward pass of a DeepSeekMoE model over a batch of tokens from any number of sequences,
// exactly as Hugging Face's DeepseekForCausalLM computes it, in fp32 (the KV cache may store its
// keys and values in bf16, RunnerOptions::kv_dtype; attention still computes in fp32):
//
//   h = embed(tokens)                                                  [T, H]
//   per layer:  h += o_proj(attention(rope(q), rope(k), v | KV cache))  pre-norm
//               h += mlp(rms_norm(h))     dense layers: one SwiGLU MLP
//                                          MoE layers:   Σ_topk w·routed_expert + shared_experts
//   logits = lm_head(rms_norm(h))                                      [rows wanted, V]
//
// Each token carries its sequence's KV-cache slot and its position, so one call can hold a
// prompt chunk of one sequence and decode steps of others (continuous batching). Its K/V are
// written to the cache before attention, and token p attends to positions [0, p] of its slot:
// that is the causal mask, across calls and within one.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "core/model/block_manager.h"
#include "core/model/forward_batch.h"
#include "core/model/forward_profile.h"
#include "core/model/gate.h"
#include "core/model/kv_cache.h"
#include "core/model/mlp.h"
#include "core/model/rope.h"
#include "core/model/routed_experts.h"
#include "core/model/weights.h"
#include "core/util/status.h"
#include "core/util/thread_pool.h"

namespace dsmoe {

// The CPU runner has no options beyond the limits it is sized for.
using RunnerOptions = BatchLimits;

// Sees the routing of every MoE layer (for `dsmoe route`, and expert-load accounting).
class RoutingObserver {
 public:
  virtual ~RoutingObserver() = default;
  // experts/weights: [T, k] as RouteTokens produced them.
  virtual void OnRouting(int64_t layer, int64_t T, int64_t k, const int32_t* experts,
                         const float* weights) = 0;
  // logits: [T, num_experts], the gate's raw scores before top-k, called just before OnRouting
  // of the same layer (for `dsmoe route` and tests that must tell a clear choice from a
  // near-tie that rounding may flip). The CPU runner reports them; others may not.
  virtual void OnGateLogits(int64_t /*layer*/, int64_t /*T*/, int64_t /*num_experts*/,
                            const float* /*logits*/) {}
};

// What a scheduler drives: forward passes over batches of tokens from many sequences, each in
// its KV-cache slot, on the CPU (ModelRunner) or a GPU (cuda::CudaModelRunner).
class BatchRunner {
 public:
  virtual ~BatchRunner() = default;
  // Writes logits for batch.logit_rows into `logits` ([logit_rows.size(), vocab]). Tokens must
  // extend their slot's sequence: position p of a slot requires positions [0, p) written by
  // this or earlier calls.
  virtual absl::Status Forward(const ForwardBatch& batch, float* logits) = 0;
  // The sequence in `slot` is finished or preempted: its pages go back to the pool.
  virtual void ReleaseSlot(int32_t slot) = 0;
  // The KV cache's pages and block tables. A scheduler grows a slot before a Forward that
  // writes new positions to it (admission, preemption); Forward reserves what is missing.
  virtual BlockManager& blocks() = 0;
  // Bytes the KV cache's pages take.
  virtual size_t kv_cache_bytes() const = 0;
  // Whether a scheduler may give this runner's slots cached prefix pages shared with other
  // slots (BlockManager's prefix cache), i.e. that it was shown to produce the same output.
  virtual bool supports_prefix_caching() const { return true; }
  // Called (on the Forward thread) with every MoE layer's routing. Null: nobody.
  virtual void set_routing_observer(RoutingObserver* observer) = 0;
  virtual const ModelConfig& config() const = 0;
  virtual int64_t max_context() const = 0;  // positions per slot
  // Time spent per phase over every Forward so far (the Forward thread); null: not measured.
  virtual const ForwardProfile* profile() const { return nullptr; }
};

// Thread-compatible: one owner thread calls Forward. Owns its KV cache and activation arena,
// sized once at creation; Forward itself does not allocate.
class ModelRunner final : public BatchRunner {
 public:
  // REQUIRES: weights (with the attention side loaded), pool and, if given, experts outlive
  // the runner. experts == nullptr: routed experts are computed locally from `weights`.
  static absl::StatusOr<std::unique_ptr<ModelRunner>> Create(
      const ModelWeights& weights, ThreadPool& pool, const RunnerOptions& options,
      RoutedExpertExecutor* experts = nullptr);

  absl::Status Forward(const ForwardBatch& batch, float* logits) override;
  void ReleaseSlot(int32_t slot) override { kv_cache_.blocks().Release(slot); }
  BlockManager& blocks() override { return kv_cache_.blocks(); }
  size_t kv_cache_bytes() const override { return kv_cache_.NumBytes(); }
  void set_routing_observer(RoutingObserver* observer) override { observer_ = observer; }
  // Device-limited routing (gate.h) from the next Forward on; null: off (the default). Call
  // between Forwards. INVALID_ARGUMENT unless it covers this model's layers and experts. Clears
  // the prefix cache (cached keys and values were computed under the old routing).
  absl::Status set_device_limited_routing(std::shared_ptr<const DeviceLimitedRouting> routing);
  const ModelConfig& config() const override { return config_; }
  int64_t max_context() const override { return options_.max_context; }
  const ForwardProfile* profile() const override { return &profile_; }
  // The options resolved: max_context concrete, kv_dtype kF32 or kBF16.
  const RunnerOptions& options() const { return options_; }
  KvCache& kv_cache() { return kv_cache_; }

 private:
  ModelRunner(const ModelWeights& weights, ThreadPool& pool, const RunnerOptions& options,
              int64_t num_kv_pages);

  // A contiguous range of a Forward's tokens that goes through the layers as one unit, with
  // its own rows of the activation arena and its own lane of the routed-expert executor.
  struct MicroBatch {
    int64_t first = 0, size = 0;    // tokens [first, first + size) of the batch
    int lane = 0;                   // RoutedExpertExecutor lane
    bool routed_in_flight = false;  // Started, not yet Finished
  };
  // A layer for micro-batch `mb` (`batch` is its slice) up to its routed experts: attention,
  // then a dense MLP whole, or the gate, the routed experts started and the shared experts.
  absl::Status BeginLayer(int64_t layer, const ForwardBatch& batch, MicroBatch& mb,
                          PhaseClock& clock);
  // The rest of a MoE layer: waits for the routed experts and adds them and the shared
  // experts to the residual stream. Nothing for a dense layer.
  absl::Status EndLayer(int64_t layer, MicroBatch& mb, PhaseClock& clock);
  // Attention of `batch` (a micro-batch whose rows start at `first` in the arena).
  void Attention(int64_t layer, const ForwardBatch& batch, int64_t first);

  const ModelWeights& weights_;
  const ModelConfig& config_;
  ThreadPool& pool_;
  RunnerOptions options_;
  GateParams gate_;
  std::shared_ptr<const DeviceLimitedRouting> device_limit_;  // null: off
  std::unique_ptr<LocalExpertExecutor> local_experts_;
  RoutedExpertExecutor* experts_ = nullptr;
  RoutingObserver* observer_ = nullptr;
  KvCache kv_cache_;
  RopeTable rope_;
  // Activation arena, [max_batch_tokens, ·] each.
  FloatBuffer hidden_, normed_, q_, k_, v_, attn_, proj_, shared_out_;
  FloatBuffer mlp_act_, mlp_up_;  // [T, max(intermediate, shared width)]
  FloatBuffer router_logits_, route_weights_, gate_scratch_;
  std::vector<int32_t> route_experts_;
  FloatBuffer scores_;  // [threads, AttentionScratch()] attention scores
  // Runs of up to 8 consecutive tokens of one sequence (consecutive positions): the units
  // attention works on, each run reading its sequence's cache once for all its tokens.
  std::vector<int32_t> attention_runs_;    // first token of each run, then T (one past the last)
  std::vector<MicroBatch> micro_batches_;  // of the Forward in progress
  ForwardProfile profile_;
  int64_t AttentionScratch() const;
};

}  // namespace dsmoe
