#include "core/model/cuda/cuda_expert_executor.h"

#include <cuda_runtime.h>

#include <algorithm>

#include "core/ops/cuda/cuda_status.h"

namespace dsmoe::cuda {

absl::StatusOr<std::unique_ptr<CudaExpertExecutor>> CudaExpertExecutor::Create(
    const ModelWeights& weights, int device, int64_t max_tokens) {
  DSMOE_RETURN_IF_ERROR(CheckCudaDevice(device));
  const ModelConfig& c = weights.config();
  if (c.n_routed_experts <= 0) return absl::InvalidArgumentError("the model has no routed experts");
  if (c.n_routed_experts > 1023 || c.hidden_size % 8 != 0 || c.moe_intermediate_size % 8 != 0) {
    return absl::UnimplementedError(
        "GPU grouped GEMMs need <= 1023 experts and hidden/expert widths divisible by 8");
  }
  if (max_tokens <= 0 || max_tokens * c.num_experts_per_tok > 65536) {
    return absl::InvalidArgumentError("max_tokens must be in (0, 65536 / top-k]");
  }
  DSMOE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device), "cudaSetDevice");
  auto ex = std::unique_ptr<CudaExpertExecutor>(new CudaExpertExecutor(c));
  ex->device_ = device;
  ex->max_tokens_ = max_tokens;
  ex->max_k_ = c.num_experts_per_tok;
  DSMOE_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&ex->stream_, cudaStreamNonBlocking),
                             "stream");
  DeviceWeightParts parts;
  parts.attention_side = false;
  DSMOE_ASSIGN_OR_RETURN(ex->dw_, DeviceWeights::Create(weights, parts));

  const int64_t T = max_tokens, k = ex->max_k_, H = c.hidden_size, E = c.n_routed_experts;
  const int64_t W = (c.moe_intermediate_size + 7) / 8 * 8;
  const int64_t tiles = MaxGroupedTiles(T, k, E);
  size_t bytes = 0;
  auto take = [&](size_t n) {
    const size_t off = (bytes + 255) / 256 * 256;
    bytes = off + std::max<size_t>(n, 1);
    return off;
  };
  const size_t o_x = take(T * H * 4), o_xb = take(T * H * 2), o_e = take(T * k * 4),
               o_w = take(T * k * 4), o_act = take(T * k * W * 2), o_eo = take(T * k * H * 4),
               o_out = take(T * H * 4), o_go = take((E + 1) * 4), o_cur = take(E * 4),
               o_rt = take(T * (k + 1) * 4), o_ar = take(T * k * 4), o_tg = take(tiles * 4),
               o_tr = take(tiles * 4), o_nt = take(4), o_t = take(T * k * 4),
               o_off = take((T + 1) * 4);
  DSMOE_CUDA_RETURN_IF_ERROR(cudaMalloc(&ex->arena_, bytes), "expert executor buffers");
  uint8_t* base = static_cast<uint8_t*>(ex->arena_);
  ex->x_ = reinterpret_cast<float*>(base + o_x);
  ex->x_bf16_ = reinterpret_cast<uint16_t*>(base + o_xb);
  ex->route_e_ = reinterpret_cast<int32_t*>(base + o_e);
  ex->route_w_ = reinterpret_cast<float*>(base + o_w);
  ex->act_ = reinterpret_cast<uint16_t*>(base + o_act);
  ex->expert_out_ = reinterpret_cast<float*>(base + o_eo);
  ex->out_ = reinterpret_cast<float*>(base + o_out);
  ex->plan_.group_offset = reinterpret_cast<int32_t*>(base + o_go);
  ex->plan_.cursor = reinterpret_cast<int32_t*>(base + o_cur);
  ex->plan_.row_token = reinterpret_cast<int32_t*>(base + o_rt);
  ex->plan_.assign_row = reinterpret_cast<int32_t*>(base + o_ar);
  ex->plan_.tile_group = reinterpret_cast<int32_t*>(base + o_tg);
  ex->plan_.tile_row = reinterpret_cast<int32_t*>(base + o_tr);
  ex->plan_.num_tiles = reinterpret_cast<int32_t*>(base + o_nt);
  ex->route_t_ = reinterpret_cast<int32_t*>(base + o_t);
  ex->token_offsets_ = reinterpret_cast<int32_t*>(base + o_off);
  ex->sorted_expert_.resize(T * k);
  ex->sorted_token_.resize(T * k);
  ex->sorted_weight_.resize(T * k);
  ex->offsets_.resize(T + 1);
  return ex;
}

CudaExpertExecutor::~CudaExpertExecutor() {
  dw_.reset();
  if (arena_ != nullptr) cudaFree(arena_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

absl::Status CudaExpertExecutor::Run(int64_t layer, const float* x, int64_t T,
                                     const int32_t* experts, const float* weights, int64_t k,
                                     float* out) {
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, E = c.n_routed_experts;
  if (T <= 0) return absl::OkStatus();
  if (T > max_tokens_ || k > max_k_ || k < 1) {
    return absl::InvalidArgumentError(absl::StrCat("routed experts: ", T, " tokens × top-", k,
                                                   " exceed this executor's capacity of ",
                                                   max_tokens_, " tokens × top-", max_k_));
  }
  DSMOE_RETURN_IF_ERROR(CheckExperts(layer, experts, T * k));
  const DeviceLayer& D = dw_->layers[layer];
  DSMOE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_), "cudaSetDevice");
  cudaStream_t s = stream_;
  DSMOE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(x_, x, T * H * sizeof(float), cudaMemcpyHostToDevice, s), "H2D");
  DSMOE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(route_e_, experts, T * k * sizeof(int32_t), cudaMemcpyHostToDevice, s),
      "H2D");
  DSMOE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(route_w_, weights, T * k * sizeof(float), cudaMemcpyHostToDevice, s), "H2D");
  DSMOE_CUDA_RETURN_IF_ERROR(LaunchF32ToBf16(x_, T * H, x_bf16_, s), "to bf16");
  const int ki = static_cast<int>(k);
  DSMOE_CUDA_RETURN_IF_ERROR(
      LaunchBuildGroupedPlan(route_e_, T, ki, static_cast<int>(E), true, false, plan_, s),
      "grouping");
  DSMOE_CUDA_RETURN_IF_ERROR(LaunchGroupedGateUp(x_bf16_, T, ki, plan_, D.groups, act_, s),
                             "experts gate/up");
  DSMOE_CUDA_RETURN_IF_ERROR(LaunchGroupedDown(act_, T, ki, plan_, D.groups, expert_out_, s),
                             "experts down");
  DSMOE_CUDA_RETURN_IF_ERROR(
      LaunchCombine(expert_out_, plan_, route_w_, T, ki, true, -1, H, false, out_, s), "combine");
  DSMOE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(out, out_, T * H * sizeof(float), cudaMemcpyDeviceToHost, s), "D2H");
  return CudaStatus(cudaStreamSynchronize(s), "routed experts");
}

absl::Status CudaExpertExecutor::CheckExperts(int64_t layer, const int32_t* experts,
                                              int64_t n) const {
  const ModelConfig& c = config_;
  const int64_t E = c.n_routed_experts;
  if (layer < 0 || layer >= c.num_hidden_layers || !dw_->layers[layer].is_moe) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is not a MoE layer"));
  }
  const DeviceLayer& D = dw_->layers[layer];
  for (int64_t a = 0; a < n; ++a) {
    const int32_t e = experts[a];
    if (e < 0 || e >= E) {
      return absl::InvalidArgumentError(absl::StrCat("expert index ", e, " outside [0, ", E, ")"));
    }
    if (!D.routed_loaded[e]) {
      return absl::FailedPreconditionError(absl::StrCat("routed expert (layer ", layer, ", expert ",
                                                        e, ") is not held by this process"));
    }
  }
  return absl::OkStatus();
}

absl::Status CudaExpertExecutor::RunAssignments(int64_t layer, const float* x, int64_t T,
                                                const ExpertAssignments& a, float* out) {
  const size_t bytes = static_cast<size_t>(T * config_.hidden_size) * sizeof(float);
  DeviceIo io;
  io.receive = [x, bytes](float* dx, cudaStream_t s) {
    return CudaStatus(cudaMemcpyAsync(dx, x, bytes, cudaMemcpyHostToDevice, s), "H2D");
  };
  io.send = [out, bytes](const float* dout, cudaStream_t s) {
    DSMOE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out, dout, bytes, cudaMemcpyDeviceToHost, s), "D2H");
    return CudaStatus(cudaStreamSynchronize(s), "routed experts");
  };
  return RunAssignments(layer, T, a, io);
}

absl::Status CudaExpertExecutor::RunAssignments(int64_t layer, int64_t T,
                                                const ExpertAssignments& a, const DeviceIo& io) {
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, E = c.n_routed_experts, A = a.size;
  if (T <= 0) return absl::OkStatus();
  if (T > max_tokens_ || A > max_tokens_ * max_k_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        T, " tokens and ", A, " expert assignments exceed this executor's capacity of ",
        max_tokens_, " tokens and ", max_tokens_ * max_k_, " assignments per call"));
  }
  for (int64_t i = 0; i < A; ++i) {
    if (a.token[i] < 0 || a.token[i] >= T) {
      return absl::InvalidArgumentError(
          absl::StrCat("assignment ", i, " names token ", a.token[i], " of a batch of ", T));
    }
  }
  DSMOE_RETURN_IF_ERROR(CheckExperts(layer, a.expert, A));
  // Stable counting sort by token: each token's assignments become contiguous, in their order,
  // so the device combine sums them in the same order as the CPU executor.
  std::fill(offsets_.begin(), offsets_.begin() + T + 1, 0);
  for (int64_t i = 0; i < A; ++i) ++offsets_[a.token[i] + 1];
  for (int64_t t = 0; t < T; ++t) offsets_[t + 1] += offsets_[t];
  for (int64_t i = 0; i < A; ++i) {
    const int32_t slot = offsets_[a.token[i]]++;
    sorted_expert_[slot] = a.expert[i];
    sorted_weight_[slot] = a.weight[i];
    sorted_token_[slot] = a.token[i];
  }
  // The pass advanced every offset to the next token's start: shift back.
  for (int64_t t = T; t > 0; --t) offsets_[t] = offsets_[t - 1];
  offsets_[0] = 0;

  DSMOE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_), "cudaSetDevice");
  cudaStream_t s = stream_;
  const DeviceLayer& D = dw_->layers[layer];
  auto upload = [&](void* dst, const void* src, size_t bytes) {
    return CudaStatus(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, s), "H2D");
  };
  DSMOE_RETURN_IF_ERROR(io.receive(x_, s));
  DSMOE_RETURN_IF_ERROR(upload(route_e_, sorted_expert_.data(), A * sizeof(int32_t)));
  DSMOE_RETURN_IF_ERROR(upload(route_t_, sorted_token_.data(), A * sizeof(int32_t)));
  DSMOE_RETURN_IF_ERROR(upload(route_w_, sorted_weight_.data(), A * sizeof(float)));
  DSMOE_RETURN_IF_ERROR(upload(token_offsets_, offsets_.data(), (T + 1) * sizeof(int32_t)));
  DSMOE_CUDA_RETURN_IF_ERROR(LaunchF32ToBf16(x_, T * H, x_bf16_, s), "to bf16");
  if (A > 0) {
    DSMOE_CUDA_RETURN_IF_ERROR(
        LaunchBuildAssignmentPlan(route_e_, route_t_, A, static_cast<int>(E), plan_, s),
        "grouping");
    // The grouped launches size their grid from (rows, k): A rows of one assignment each.
    DSMOE_CUDA_RETURN_IF_ERROR(LaunchGroupedGateUp(x_bf16_, A, 0, plan_, D.groups, act_, s),
                               "experts gate/up");
    DSMOE_CUDA_RETURN_IF_ERROR(LaunchGroupedDown(act_, A, 0, plan_, D.groups, expert_out_, s),
                               "experts down");
  }
  DSMOE_CUDA_RETURN_IF_ERROR(
      LaunchCombineAssignments(expert_out_, plan_, route_w_, token_offsets_, T, H, out_, s),
      "combine");
  return io.send(out_, s);
}

}  // namespace dsmoe::cuda
