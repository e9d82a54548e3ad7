#include "core/model/cuda/cuda_model_runner.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/model/gate.h"
#include "core/model/kv_cache.h"
#include "core/model/rope.h"
#include "core/ops/cuda/cuda_status.h"

namespace dsmoe::cuda {

namespace {

// Carves typed buffers out of one allocation: a first pass with base == nullptr only measures.
class ArenaLayout {
 public:
  explicit ArenaLayout(uint8_t* base) : base_(base) {}
  template <class T>
  T* Take(int64_t count) {
    const size_t offset = (size_ + 255) / 256 * 256;
    size_ = offset + static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T);
    return base_ == nullptr ? nullptr : reinterpret_cast<T*>(base_ + offset);
  }
  size_t size() const { return size_; }

 private:
  uint8_t* base_;
  size_t size_ = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<CudaModelRunner>> CudaModelRunner::Create(
    const ModelWeights& weights, const CudaRunnerOptions& options, RoutedExpertExecutor* experts) {
  const ModelConfig& c = weights.config();
  // The model before the device: a config the GPU cannot compute is refused on any machine.
  DSMOE_RETURN_IF_ERROR(CheckGpuGateSupports(c));
  DSMOE_RETURN_IF_ERROR(CheckCudaDevice(options.device));
  if (weights.embed_tokens.empty()) {
    return absl::FailedPreconditionError(
        "GPU model runner needs the attention-side weights loaded");
  }
  if (options.kv_dtype == KvDType::kF32) {  // kAuto and kBF16: its paged cache is bf16
    return absl::InvalidArgumentError(
        "the GPU runner's KV cache is bf16 only: KV dtype f32 is for the CPU runner");
  }
  if (c.head_dim() > 256 || c.head_dim() % 2 != 0) {
    return absl::UnimplementedError(
        absl::StrCat("GPU attention supports even head_dim <= 256, not ", c.head_dim()));
  }
  if (c.hidden_size % 8 != 0 || c.moe_intermediate_size % 8 != 0) {
    return absl::UnimplementedError(
        "GPU grouped GEMMs need hidden and expert widths divisible by 8");
  }
  if (experts == nullptr) {
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
      const LayerWeights& L = weights.layers[i];
      for (size_t e = 0; e < L.routed.size(); ++e) {
        if (L.is_moe && !L.routed[e].loaded()) {
          return absl::FailedPreconditionError(
              absl::StrCat("routed expert (layer ", i, ", expert ", e,
                           ") is not loaded; load every routed expert or give the runner a "
                           "RoutedExpertExecutor"));
        }
      }
    }
  }
  CudaRunnerOptions o = options;
  DSMOE_ASSIGN_OR_RETURN(static_cast<BatchLimits&>(o), options.Resolve(c));
  if (o.max_batch_tokens * std::max<int64_t>(c.num_experts_per_tok, 1) > 65536) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_batch_tokens ", o.max_batch_tokens, " × top-k ", c.num_experts_per_tok,
                     " exceeds the GPU grouping's 65536 assignments"));
  }
  DSMOE_CUDA_RETURN_IF_ERROR(cudaSetDevice(o.device), "cudaSetDevice");
  auto runner = std::unique_ptr<CudaModelRunner>(new CudaModelRunner(weights, o));
  DSMOE_RETURN_IF_ERROR(runner->Init(experts));
  return runner;
}

CudaModelRunner::CudaModelRunner(const ModelWeights& weights, const CudaRunnerOptions& options)
    : weights_(weights), config_(weights.config()), options_(options) {}

absl::Status CudaModelRunner::Init(RoutedExpertExecutor* experts) {
  const ModelConfig& c = config_;
  experts_ = experts;
  DSMOE_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "stream");
  DeviceWeightParts parts;
  parts.routed_experts = experts == nullptr;
  DSMOE_ASSIGN_OR_RETURN(dw_, DeviceWeights::Create(weights_, parts));
  int64_t num_pages = options_.num_pages;
  if (num_pages == 0 && options_.kv_cache_bytes > 0) {
    BatchLimits paged = options_;
    paged.kv_page_tokens = options_.page_size;
    DSMOE_ASSIGN_OR_RETURN(num_pages, NumKvPages(c, paged, KvElementBytes(KvDType::kBF16)));
  }
  DSMOE_ASSIGN_OR_RETURN(kv_, PagedKvCache::Create(c, options_.num_slots, options_.max_context,
                                                   options_.page_size, num_pages));
  DSMOE_ASSIGN_OR_RETURN(gemm_, CublasGemm::Create());

  const int64_t T = options_.max_batch_tokens, H = c.hidden_size, hd = c.head_dim();
  const int64_t nh = c.num_attention_heads, nkv = c.num_key_value_heads;
  const int64_t E = c.n_routed_experts, k = std::max<int64_t>(c.num_experts_per_tok, 1);
  const int64_t L = c.num_hidden_layers;
  int64_t dense_width = 0, group_width = 0;
  for (const DeviceLayer& D : dw_->layers) {
    if (!D.is_moe) dense_width = std::max(dense_width, D.dense.width);
    if (D.is_moe) group_width = std::max<int64_t>(group_width, D.groups.max_width);
  }
  const int64_t G = E + 1;
  auto layout = [&](uint8_t* base) {
    ArenaLayout a(base);
    d_inputs_ = a.Take<int32_t>(4 * T);
    h_ = a.Take<float>(T * H);
    xn_f32_ = a.Take<float>(T * H);
    xn_ = a.Take<uint16_t>(T * H);
    qkv_ = a.Take<float>(T * (nh + 2 * nkv) * hd);
    attn_ = a.Take<uint16_t>(T * nh * hd);
    dense_gu_ = a.Take<float>(T * 2 * dense_width);
    dense_act_ = a.Take<uint16_t>(T * dense_width);
    router_logits_ = a.Take<float>(T * E);
    route_experts_ = a.Take<int32_t>(L * T * k);
    route_weights_ = a.Take<float>(L * T * k);
    plan_.group_offset = a.Take<int32_t>(G + 1);
    plan_.cursor = a.Take<int32_t>(G);
    plan_.row_token = a.Take<int32_t>(T * (k + 1));
    plan_.assign_row = a.Take<int32_t>(T * k);
    plan_.tile_group = a.Take<int32_t>(MaxGroupedTiles(T, k, G));
    plan_.tile_row = a.Take<int32_t>(MaxGroupedTiles(T, k, G));
    plan_.num_tiles = a.Take<int32_t>(1);
    group_act_ = a.Take<uint16_t>(T * (k + 1) * group_width);
    expert_out_ = a.Take<float>(T * (k + 1) * H);
    logits_ = a.Take<float>(T * c.vocab_size);
    rope_cos_ = a.Take<float>(options_.max_context * hd / 2);
    rope_sin_ = a.Take<float>(options_.max_context * hd / 2);
    ext_out_ = a.Take<float>(experts_ != nullptr ? T * H : 1);
    return a.size();
  };
  const size_t bytes = layout(nullptr);
  DSMOE_CUDA_RETURN_IF_ERROR(cudaMalloc(&arena_, bytes), "allocating the activation arena");
  layout(static_cast<uint8_t*>(arena_));
  DSMOE_CUDA_RETURN_IF_ERROR(cudaMallocHost(&h_inputs_, 4 * T * sizeof(int32_t)), "pinned inputs");
  if (experts_ != nullptr) {
    DSMOE_CUDA_RETURN_IF_ERROR(cudaMallocHost(&h_x_, T * H * sizeof(float)), "pinned buffer");
    DSMOE_CUDA_RETURN_IF_ERROR(cudaMallocHost(&h_out_, T * H * sizeof(float)), "pinned buffer");
    DSMOE_CUDA_RETURN_IF_ERROR(cudaMallocHost(&h_route_w_, T * k * sizeof(float)), "pinned buffer");
    DSMOE_CUDA_RETURN_IF_ERROR(cudaMallocHost(&h_route_e_, T * k * sizeof(int32_t)),
                               "pinned buffer");
  }

  // The CPU runner's RoPE tables, uploaded.
  const RopeTable rope(c, options_.max_context);
  DSMOE_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(rope_cos_, rope.cos().data(), rope.cos().size_bytes(), cudaMemcpyHostToDevice),
      "RoPE table");
  DSMOE_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(rope_sin_, rope.sin().data(), rope.sin().size_bytes(), cudaMemcpyHostToDevice),
      "RoPE table");
  return absl::OkStatus();
}

CudaModelRunner::~CudaModelRunner() {
  for (auto& [t, exec] : graphs_) cudaGraphExecDestroy(exec);
  gemm_.reset();
  kv_.reset();
  dw_.reset();
  if (arena_ != nullptr) cudaFree(arena_);
  for (void* p :
       {static_cast<void*>(h_inputs_), static_cast<void*>(h_x_), static_cast<void*>(h_out_),
        static_cast<void*>(h_route_w_), static_cast<void*>(h_route_e_)}) {
    if (p != nullptr) cudaFreeHost(p);
  }
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

absl::Status CudaModelRunner::Validate(const ForwardBatch& b) const {
  return CheckBatch(b, options_, config_.vocab_size);
}

absl::Status CudaModelRunner::Enqueue(int64_t T, int64_t R) {
  const ModelConfig& c = config_;
  const int64_t maxT = options_.max_batch_tokens;
  const int64_t H = c.hidden_size, hd = c.head_dim();
  const int nh = static_cast<int>(c.num_attention_heads),
            nkv = static_cast<int>(c.num_key_value_heads);
  const int64_t nqkv = (nh + 2 * nkv) * hd;
  const int64_t E = c.n_routed_experts;
  const int k = static_cast<int>(std::max<int64_t>(c.num_experts_per_tok, 1));
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  const int32_t* ids = d_inputs_;
  const int32_t* slots = d_inputs_ + maxT;
  const int32_t* positions = d_inputs_ + 2 * maxT;
  const int32_t* rows = d_inputs_ + 3 * maxT;
  cudaStream_t s = stream_;
  auto mark = [&](const char* phase) {
    if (profiler_ != nullptr && profiler_->per_phase()) profiler_->Mark(phase, s);
  };

  DSMOE_CUDA_RETURN_IF_ERROR(LaunchEmbed(dw_->embed_tokens, ids, T, H, h_, s), "embed");
  mark("embed");
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    const DeviceLayer& D = dw_->layers[layer];
    const PagedKvLayer kv = kv_->Layer(layer);
    // --- self-attention: h += o_proj(attn(rms_norm(h))) ---
    DSMOE_CUDA_RETURN_IF_ERROR(LaunchRmsNorm(h_, D.input_norm, nullptr, T, H, eps, xn_, nullptr, s),
                               "rms_norm");
    mark("rms_norm");
    DSMOE_RETURN_IF_ERROR(Project(xn_, T, D.qkv, nqkv, H, false, qkv_));  // [T, (nh+2nkv)·hd]
    mark("qkv_proj");
    DSMOE_CUDA_RETURN_IF_ERROR(
        LaunchRopeKvWrite(qkv_, D.qkv_bias, positions, slots, rope_cos_, rope_sin_, T, nh, nkv,
                          static_cast<int>(hd), kv, s),
        "rope");
    mark("rope_kv_write");
    DSMOE_CUDA_RETURN_IF_ERROR(LaunchPagedAttention(qkv_, positions, slots, T, nh, nkv,
                                                    static_cast<int>(hd), scale, kv, attn_, s),
                               "attention");  // [T, nh·hd]
    mark("attention");
    DSMOE_RETURN_IF_ERROR(Project(attn_, T, D.o, H, nh * hd, true, h_));  // h += attn·Woᵀ
    if (D.o_bias != nullptr)
      DSMOE_CUDA_RETURN_IF_ERROR(LaunchAddBias(D.o_bias, T, H, h_, s), "o bias");
    mark("o_proj");

    // --- feed-forward: h += mlp(rms_norm(h)) ---
    DSMOE_CUDA_RETURN_IF_ERROR(LaunchRmsNorm(h_, D.post_attention_norm, nullptr, T, H, eps, xn_,
                                             D.is_moe ? xn_f32_ : nullptr, s),
                               "rms_norm");
    mark("rms_norm");
    if (!D.is_moe) {
      const int64_t W = D.dense.width;
      DSMOE_RETURN_IF_ERROR(
          Project(xn_, T, D.dense.gate_up, 2 * W, H, false, dense_gu_));  // [T, 2W]
      DSMOE_CUDA_RETURN_IF_ERROR(LaunchSiluMul(dense_gu_, T, W, dense_act_, s),
                                 "silu_mul");  // [T, W]
      DSMOE_RETURN_IF_ERROR(Project(dense_act_, T, D.dense.down, H, W, true, h_));
      mark("dense_mlp");
      continue;
    }
    int32_t* route_e = route_experts_ + layer * maxT * k;                           // [T, k]
    float* route_w = route_weights_ + layer * maxT * k;                             // [T, k]
    DSMOE_RETURN_IF_ERROR(ProjectF32(xn_f32_, T, D.router, E, H, router_logits_));  // [T, E]
    mark("router_logits");
    const bool routed_here = experts_ == nullptr;
    if (routed_here && T <= kFusedRouteMaxTokens) {
      // Routing and grouping in one launch (decode steps).
      DSMOE_CUDA_RETURN_IF_ERROR(
          LaunchRouteAndPlan(router_logits_, T, static_cast<int>(E), k, c.norm_topk_prob, route_e,
                             route_w, D.has_shared, plan_, s),
          "gate and grouping");
    } else {
      DSMOE_CUDA_RETURN_IF_ERROR(LaunchGateTopK(router_logits_, T, static_cast<int>(E), k,
                                                c.norm_topk_prob, route_e, route_w, s),
                                 "gate");
      if (!routed_here) DSMOE_RETURN_IF_ERROR(ExternalExperts(layer, T));
      if (!routed_here && !D.has_shared) continue;
      // Routed experts (if here) and the shared expert: one grouped launch per projection.
      DSMOE_CUDA_RETURN_IF_ERROR(LaunchBuildGroupedPlan(route_e, T, k, static_cast<int>(E),
                                                        routed_here, D.has_shared, plan_, s),
                                 "grouping");
    }
    mark("gate_and_grouping");
    DSMOE_CUDA_RETURN_IF_ERROR(LaunchGroupedGateUp(xn_, T, k, plan_, D.groups, group_act_, s),
                               "experts gate/up");
    mark("experts_gate_up");
    DSMOE_CUDA_RETURN_IF_ERROR(LaunchGroupedDown(group_act_, T, k, plan_, D.groups, expert_out_, s),
                               "experts down");
    mark("experts_down");
    DSMOE_CUDA_RETURN_IF_ERROR(
        LaunchCombine(expert_out_, plan_, route_w, T, k, routed_here,
                      D.has_shared ? static_cast<int>(E) : -1, H, true, h_, s),
        "combine");
    mark("experts_combine");
  }
  if (R == 0) return absl::OkStatus();
  // --- logits for the wanted rows: lm_head(rms_norm(h)) ---
  DSMOE_CUDA_RETURN_IF_ERROR(LaunchRmsNorm(h_, dw_->final_norm, rows, R, H, eps, xn_, nullptr, s),
                             "final norm");
  mark("rms_norm");
  DSMOE_RETURN_IF_ERROR(Project(xn_, R, dw_->lm_head, c.vocab_size, H, false, logits_));
  mark("lm_head");  // [R, V]
  return absl::OkStatus();
}

absl::Status CudaModelRunner::Project(const uint16_t* x, int64_t T, const uint16_t* w, int64_t N,
                                      int64_t K, bool accumulate, float* y) {
  if (GemvBeatsCublas(T, N) && K % 8 == 0) {
    return CudaStatus(LaunchGemvBf16(x, T, w, N, K, accumulate, y, stream_), "gemv");
  }
  return gemm_->Bf16(x, T, w, N, K, accumulate ? 1.0f : 0.0f, y, stream_);
}

absl::Status CudaModelRunner::ProjectF32(const float* x, int64_t T, const float* w, int64_t N,
                                         int64_t K, float* y) {
  if (GemvBeatsCublas(T, N) && K % 8 == 0) {
    return CudaStatus(LaunchGemvF32(x, T, w, N, K, y, stream_), "gemv (fp32)");
  }
  return gemm_->F32(x, T, w, N, K, y, stream_);
}

absl::Status CudaModelRunner::ExternalExperts(int64_t layer, int64_t T) {
  const int64_t H = config_.hidden_size, maxT = options_.max_batch_tokens;
  const int64_t k = config_.num_experts_per_tok;
  const int32_t* route_e = route_experts_ + layer * maxT * k;
  const float* route_w = route_weights_ + layer * maxT * k;
  DSMOE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(h_x_, xn_f32_, T * H * sizeof(float), cudaMemcpyDeviceToHost, stream_),
      "D2H");
  DSMOE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h_route_e_, route_e, T * k * sizeof(int32_t),
                                             cudaMemcpyDeviceToHost, stream_),
                             "D2H");
  DSMOE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(h_route_w_, route_w, T * k * sizeof(float), cudaMemcpyDeviceToHost, stream_),
      "D2H");
  DSMOE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_), "routing to host");
  DSMOE_RETURN_IF_ERROR(experts_->Run(layer, h_x_, T, h_route_e_, h_route_w_, k, h_out_));
  DSMOE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(ext_out_, h_out_, T * H * sizeof(float), cudaMemcpyHostToDevice, stream_),
      "H2D");
  DSMOE_CUDA_RETURN_IF_ERROR(LaunchAddInPlace(ext_out_, h_, T * H, stream_), "residual");
  // h_out_ is reused by the next layer: wait for the copy before returning to the host loop.
  return CudaStatus(cudaStreamSynchronize(stream_), "experts to device");
}

absl::Status CudaModelRunner::Forward(const ForwardBatch& b, float* host_logits) {
  DSMOE_RETURN_IF_ERROR(Validate(b));
  DSMOE_CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device), "cudaSetDevice");
  const int64_t T = static_cast<int64_t>(b.token_ids.size());
  const int64_t R = static_cast<int64_t>(b.logit_rows.size());
  const int64_t maxT = options_.max_batch_tokens;
  DSMOE_RETURN_IF_ERROR(kv_->Reserve(b.slots, b.positions));
  if (profiler_ != nullptr) DSMOE_RETURN_IF_ERROR(profiler_->Begin(stream_));
  std::memcpy(h_inputs_, b.token_ids.data(), T * sizeof(int32_t));
  std::memcpy(h_inputs_ + maxT, b.slots.data(), T * sizeof(int32_t));
  std::memcpy(h_inputs_ + 2 * maxT, b.positions.data(), T * sizeof(int32_t));
  if (R > 0) std::memcpy(h_inputs_ + 3 * maxT, b.logit_rows.data(), R * sizeof(int32_t));
  DSMOE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(d_inputs_, h_inputs_, 4 * maxT * sizeof(int32_t),
                                             cudaMemcpyHostToDevice, stream_),
                             "inputs to device");
  DSMOE_RETURN_IF_ERROR(kv_->Sync(stream_));
  if (profiler_ != nullptr) profiler_->Mark("inputs_to_device", stream_);

  const bool graph = options_.use_cuda_graphs && experts_ == nullptr &&
                     (profiler_ == nullptr || !profiler_->per_phase()) && R == T &&
                     T <= options_.max_graph_tokens;
  if (graph) {
    auto it = graphs_.find(T);
    if (it == graphs_.end()) {
      cudaGraph_t g = nullptr;
      DSMOE_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal),
                                 "graph capture");
      const absl::Status enqueued = Enqueue(T, R);
      const cudaError_t ended = cudaStreamEndCapture(stream_, &g);
      if (!enqueued.ok() || ended != cudaSuccess) {
        if (g != nullptr) cudaGraphDestroy(g);
        (void)cudaGetLastError();
        DSMOE_RETURN_IF_ERROR(enqueued);
        return CudaStatus(ended, "graph capture");
      }
      cudaGraphExec_t exec = nullptr;
      const cudaError_t inst = cudaGraphInstantiate(&exec, g, 0);
      cudaGraphDestroy(g);
      DSMOE_CUDA_RETURN_IF_ERROR(inst, "graph instantiate");
      it = graphs_.emplace(T, exec).first;
    }
    DSMOE_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(it->second, stream_), "graph launch");
    if (profiler_ != nullptr) profiler_->Mark("decode_graph", stream_);
  } else {
    DSMOE_RETURN_IF_ERROR(Enqueue(T, R));
    if (profiler_ != nullptr && !profiler_->per_phase()) profiler_->Mark("forward", stream_);
  }
  if (R > 0) {
    DSMOE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(host_logits, logits_, R * config_.vocab_size * sizeof(float),
                        cudaMemcpyDeviceToHost, stream_),
        "logits to host");
    if (profiler_ != nullptr) profiler_->Mark("logits_to_host", stream_);
  }
  const int64_t k = config_.num_experts_per_tok;
  if (observer_ != nullptr && config_.n_routed_experts > 0) {
    observed_experts_.resize(config_.num_hidden_layers * T * k);
    observed_weights_.resize(config_.num_hidden_layers * T * k);
    for (int64_t layer = 0; layer < config_.num_hidden_layers; ++layer) {
      if (!config_.IsMoeLayer(layer)) continue;
      DSMOE_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(observed_experts_.data() + layer * T * k,
                          route_experts_ + layer * maxT * k, T * k * sizeof(int32_t),
                          cudaMemcpyDeviceToHost, stream_),
          "routing to host");
      DSMOE_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(observed_weights_.data() + layer * T * k,
                          route_weights_ + layer * maxT * k, T * k * sizeof(float),
                          cudaMemcpyDeviceToHost, stream_),
          "routing to host");
    }
  }
  DSMOE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_), "forward pass");
  if (profiler_ != nullptr) DSMOE_RETURN_IF_ERROR(profiler_->End());
  if (observer_ != nullptr && config_.n_routed_experts > 0) {
    for (int64_t layer = 0; layer < config_.num_hidden_layers; ++layer) {
      if (!config_.IsMoeLayer(layer)) continue;
      observer_->OnRouting(layer, T, k, observed_experts_.data() + layer * T * k,
                           observed_weights_.data() + layer * T * k);
    }
  }
  return absl::OkStatus();
}

}  // namespace dsmoe::cuda
