// The forward pass of ModelRunner (core/model/model_runner.h) on one GPU: same contract — a batch
// of tokens from any number of sequences, each with its KV-cache slot and position — same
// semantics, bf16 weights and GEMM inputs with fp32 accumulation, fp32 residual stream:
//
//   h = embed(tokens)                                       [T, H] fp32
//   per layer:  xn = rms_norm(h)                            [T, H] bf16
//               qkv = xn·Wqkvᵀ                              [T, (nh+2nkv)·hd]  (cuBLAS/GEMV)
//               rope(q, k); cache[slot][pos] = k, v         (paged, bf16)
//               h += attention(q | cache)·Woᵀ               (cuBLAS, beta = 1)
//               xn = rms_norm(h)
//               dense:  h += down(silu(gate(xn))·up(xn))    (cuBLAS, SiLU-mul kernel)
//               MoE:    logits = xn·Wgateᵀ (fp32); (e, w) = top-k(softmax(logits))
//                       h += Σ w·routed(xn) + shared(xn)    (grouped GEMMs, one launch each)
//   logits = lm_head(rms_norm(h[logit_rows]))               [R, V] fp32 → host
//
// The gate is the CPU gate's only where CheckGpuGateSupports (core/model/gate.h) says so: Create
// refuses the other configs (group-limited top-k, a routed scaling factor) before touching the
// device.
//
// Routed experts run on this GPU, or, when a RoutedExpertExecutor is given, wherever it runs
// them (the hidden states and routing go to the host and back).
//
// Decode steps (every token's logits wanted, T <= max_graph_tokens, no external executor) are
// replayed from a CUDA graph captured on first use for each batch size: all data-dependent
// decisions (routing, page lookups, sequence lengths) are read from device memory.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "core/model/cuda/device_weights.h"
#include "core/model/cuda/paged_kv_cache.h"
#include "core/model/cuda/step_profiler.h"
#include "core/model/model_runner.h"
#include "core/ops/cuda/cublas_gemm.h"

namespace dsmoe::cuda {

// The limits the runner is sized for (BatchLimits), and the GPU's own options.
struct CudaRunnerOptions : BatchLimits {
  int device = 0;          // CUDA device index
  int64_t page_size = 16;  // KV-cache positions per page (a power of two)
  // KV-cache pages; 0: what BatchLimits::kv_cache_bytes buys (bf16), or with no budget enough
  // for every slot to reach max_context. The cache is bf16 whatever BatchLimits::kv_dtype says
  // but kF32, which Create refuses.
  int64_t num_pages = 0;
  bool use_cuda_graphs = true;     // replay decode steps from captured graphs
  int64_t max_graph_tokens = 256;  // largest decode batch that is captured
};

// Thread-compatible: one owner thread calls Forward. Owns its device memory (weights, KV cache,
// activation arena, all allocated in Create) and its stream; Forward allocates nothing on the
// device except when it captures a new graph.
class CudaModelRunner final : public BatchRunner {
 public:
  // REQUIRES: weights (attention side loaded; routed experts too unless `experts` is given) and
  // `experts` outlive the runner. FAILED_PRECONDITION "no CUDA device: ..." without a GPU, or
  // naming the config key when the GPU gate cannot route the model as the CPU gate does.
  static absl::StatusOr<std::unique_ptr<CudaModelRunner>> Create(
      const ModelWeights& weights, const CudaRunnerOptions& options,
      RoutedExpertExecutor* experts = nullptr);
  ~CudaModelRunner() override;
  CudaModelRunner(const CudaModelRunner&) = delete;
  CudaModelRunner& operator=(const CudaModelRunner&) = delete;

  // As ModelRunner::Forward: logits for batch.logit_rows into host_logits ([rows, vocab]).
  // Page-locked host_logits (cudaMallocHost) makes the copy a DMA.
  absl::Status Forward(const ForwardBatch& batch, float* host_logits) override;

  // Frees a finished sequence's KV-cache pages.
  void ReleaseSlot(int32_t slot) override { kv_->Release(slot); }
  BlockManager& blocks() override { return kv_->blocks(); }
  size_t kv_cache_bytes() const override { return kv_->num_bytes(); }
  // Off until verified on a GPU: the paged kernels read pages through the block tables and
  // should need nothing more, but no GPU test has compared shared-page output yet.
  bool supports_prefix_caching() const override { return false; }

  void set_routing_observer(RoutingObserver* observer) override { observer_ = observer; }
  // While set (not owned), Forward times its phases (benchmarks; per-phase profiles run without
  // CUDA graphs).
  void set_profiler(StepProfiler* profiler) { profiler_ = profiler; }
  const ModelConfig& config() const override { return config_; }
  int64_t max_context() const override { return options_.max_context; }
  const CudaRunnerOptions& options() const { return options_; }
  const PagedKvCache& kv_cache() const { return *kv_; }
  size_t weight_bytes() const { return dw_->num_bytes(); }
  int64_t num_graphs() const { return static_cast<int64_t>(graphs_.size()); }
  cudaStream_t stream() const { return stream_; }

 private:
  CudaModelRunner(const ModelWeights& weights, const CudaRunnerOptions& options);
  absl::Status Init(RoutedExpertExecutor* experts);
  absl::Status Validate(const ForwardBatch& batch) const;
  // Enqueues the whole pass for T tokens / R logit rows on stream_ (capturable when
  // !external_experts_).
  absl::Status Enqueue(int64_t T, int64_t R);
  absl::Status ExternalExperts(int64_t layer, int64_t T);
  // y[T, N] = x·Wᵀ (+ y when accumulate) on stream_: the GEMV kernel for decode-sized batches,
  // cuBLAS otherwise.
  absl::Status Project(const uint16_t* x, int64_t T, const uint16_t* w, int64_t N, int64_t K,
                       bool accumulate, float* y);
  absl::Status ProjectF32(const float* x, int64_t T, const float* w, int64_t N, int64_t K,
                          float* y);

  const ModelWeights& weights_;
  const ModelConfig& config_;
  CudaRunnerOptions options_;
  RoutedExpertExecutor* experts_ = nullptr;
  RoutingObserver* observer_ = nullptr;
  StepProfiler* profiler_ = nullptr;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<DeviceWeights> dw_;
  std::unique_ptr<PagedKvCache> kv_;
  std::unique_ptr<CublasGemm> gemm_;
  std::map<int64_t, cudaGraphExec_t> graphs_;  // decode graphs by batch size

  // Activation arena (one cudaMalloc), sized for max_batch_tokens.
  void* arena_ = nullptr;
  int32_t* d_inputs_ = nullptr;  // ids, slots, positions, logit_rows: [4, max_T]
  float *h_ = nullptr, *xn_f32_ = nullptr, *qkv_ = nullptr, *dense_gu_ = nullptr;
  uint16_t *xn_ = nullptr, *attn_ = nullptr, *dense_act_ = nullptr, *group_act_ = nullptr;
  float *router_logits_ = nullptr, *expert_out_ = nullptr, *logits_ = nullptr;
  float *rope_cos_ = nullptr, *rope_sin_ = nullptr;
  int32_t* route_experts_ = nullptr;  // [layers, max_T · k]
  float* route_weights_ = nullptr;    // [layers, max_T · k]
  GroupedPlan plan_;
  int32_t* h_inputs_ = nullptr;  // pinned staging of the four input arrays
  // External executor round trip (pinned host buffers).
  float *h_x_ = nullptr, *h_out_ = nullptr, *h_route_w_ = nullptr, *ext_out_ = nullptr;
  int32_t* h_route_e_ = nullptr;
  std::vector<int32_t> observed_experts_;
  std::vector<float> observed_weights_;
};

}  // namespace dsmoe::cuda
