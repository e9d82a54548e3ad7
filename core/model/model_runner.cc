#include "core/model/model_runner.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/ops/ops.h"

namespace dsmoe {

absl::StatusOr<std::unique_ptr<ModelRunner>> ModelRunner::Create(const ModelWeights& weights,
                                                                 ThreadPool& pool,
                                                                 const RunnerOptions& options,
                                                                 RoutedExpertExecutor* experts) {
  const ModelConfig& c = weights.config();
  if (weights.embed_tokens.empty()) {
    return absl::FailedPreconditionError("model runner needs the attention-side weights loaded");
  }
  DSMOE_ASSIGN_OR_RETURN(RunnerOptions o, options.Resolve(c));
  o.kv_dtype = ResolveKvDType(o.kv_dtype, weights);
  DSMOE_ASSIGN_OR_RETURN(const int64_t num_pages, NumKvPages(c, o, KvElementBytes(o.kv_dtype)));
  auto runner = std::unique_ptr<ModelRunner>(new ModelRunner(weights, pool, o, num_pages));
  if (c.n_routed_experts > 0) {
    if (experts != nullptr) {
      runner->experts_ = experts;
    } else {
      runner->local_experts_ = std::make_unique<LocalExpertExecutor>(
          weights, pool, o.max_batch_tokens * c.num_experts_per_tok);
      runner->experts_ = runner->local_experts_.get();
    }
    runner->micro_batches_.reserve(static_cast<size_t>(runner->experts_->lanes()));
  }
  return runner;
}

ModelRunner::ModelRunner(const ModelWeights& weights, ThreadPool& pool,
                         const RunnerOptions& options, int64_t num_kv_pages)
    : weights_(weights),
      config_(weights.config()),
      pool_(pool),
      options_(options),
      gate_(GateParamsFromConfig(config_)),
      kv_cache_(config_, options, num_kv_pages),
      rope_(config_, options.max_context) {
  const ModelConfig& c = config_;
  const int64_t T = options.max_batch_tokens, H = c.hidden_size, hd = c.head_dim();

  hidden_.Resize(T * H);
  normed_.Resize(T * H);
  proj_.Resize(T * H);
  shared_out_.Resize(T * H);
  q_.Resize(T * c.num_attention_heads * hd);
  attn_.Resize(T * c.num_attention_heads * hd);
  k_.Resize(T * c.num_key_value_heads * hd);
  v_.Resize(T * c.num_key_value_heads * hd);
  int64_t mlp_width = 0;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    mlp_width =
        std::max(mlp_width, c.IsMoeLayer(i) ? c.shared_intermediate_size() : c.intermediate_size);
  }
  mlp_act_.Resize(T * mlp_width);
  mlp_up_.Resize(T * mlp_width);
  if (c.n_routed_experts > 0) {
    router_logits_.Resize(T * c.n_routed_experts);
    gate_scratch_.Resize(c.n_routed_experts);
    route_weights_.Resize(T * c.num_experts_per_tok);
    route_experts_.resize(T * c.num_experts_per_tok);
  }
  scores_.Resize(static_cast<size_t>(pool.num_threads() * AttentionScratch()));
  attention_runs_.resize(T + 1);
}

absl::Status ModelRunner::set_device_limited_routing(
    std::shared_ptr<const DeviceLimitedRouting> routing) {
  if (routing != nullptr) DSMOE_RETURN_IF_ERROR(routing->CheckCovers(config_));
  device_limit_ = std::move(routing);
  // Routing decides the MoE layers' outputs and so every later layer's keys and values: a
  // prefix cached under the old routing is not what the new one computes.
  kv_cache_.blocks().ClearPrefixCache();
  return absl::OkStatus();
}

int64_t ModelRunner::AttentionScratch() const {
  return 8 * options_.max_context + 80 * config_.head_dim();  // ops::KernelTable::attend_causal
}

void ModelRunner::Attention(int64_t layer, const ForwardBatch& b, int64_t first) {
  const ModelConfig& c = config_;
  const int64_t T = static_cast<int64_t>(b.token_ids.size());
  const int64_t nh = c.num_attention_heads, hd = c.head_dim();
  const int64_t group = nh / c.num_key_value_heads;  // HF repeat_kv: head h reads kv head h / group
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  const ops::KernelTable& k = ops::Kernels();

  // Runs of consecutive tokens of one sequence at consecutive positions (a prompt chunk), at
  // most 8 each; a decode batch makes one run per token.
  int64_t runs = 0;
  for (int64_t t = 0; t < T; ++t) {
    const bool continues = t > 0 && b.slots[t] == b.slots[t - 1] &&
                           b.positions[t] == b.positions[t - 1] + 1 &&
                           t - attention_runs_[runs - 1] < 8;
    if (!continues) attention_runs_[runs++] = static_cast<int32_t>(t);
  }
  attention_runs_[runs] = static_cast<int32_t>(T);

  const int64_t qkv_stride = nh * hd;
  const float* q_rows = q_.data() + first * qkv_stride;
  float* attn_rows = attn_.data() + first * qkv_stride;
  pool_.ParallelFor(runs * nh, [&](int64_t task, int thread) {
    const int64_t run = task / nh, h = task % nh;
    const int64_t t0 = attention_runs_[run], n = attention_runs_[run + 1] - t0;
    const ops::KvPages kv = kv_cache_.View(layer, b.slots[t0], h / group);
    float* scratch = scores_.data() + thread * AttentionScratch();
    const float* q = q_rows + t0 * qkv_stride + h * hd;
    float* out = attn_rows + t0 * qkv_stride + h * hd;
    if (n == 1) {
      k.attend(q, kv, b.positions[t0] + 1, hd, scale, scratch, out);
    } else {
      k.attend_causal(q, qkv_stride, n, b.positions[t0], kv, hd, scale, scratch, out, qkv_stride);
    }
  });
}

absl::Status ModelRunner::Forward(const ForwardBatch& b, float* logits) {
  DSMOE_RETURN_IF_ERROR(CheckBatch(b, options_, config_.vocab_size));
  // Pages for every position written (a scheduler has usually grown its slots already).
  DSMOE_RETURN_IF_ERROR(kv_cache_.blocks().Reserve(b.slots, b.positions));
  const ModelConfig& c = config_;
  const ModelWeights& w = weights_;
  const ops::KernelTable& kern = ops::Kernels();
  const int64_t T = static_cast<int64_t>(b.token_ids.size());
  const int64_t H = c.hidden_size;
  float* h = hidden_.data();
  float* xn = normed_.data();
  PhaseClock clock(profile_);

  for (int64_t t = 0; t < T; ++t) {  // h = embed(tokens)  [T, H]
    kern.row_to_f32(w.embed_tokens.Row(b.token_ids[t]), w.embed_tokens.dtype, H, h + t * H);
  }
  clock.Lap(ForwardPhase::kEmbed);

  // Micro-batches: contiguous ranges of the batch, one per lane of the routed-expert executor
  // (at most one per token). They go through the layers interleaved: while one micro-batch's
  // routed experts compute elsewhere, the next runs its attention, gate and shared experts.
  // Within a layer they run in batch order, so a prompt chunk split between two of them still
  // finds its earlier positions' keys and values in the cache.
  const int64_t m = experts_ != nullptr ? std::min<int64_t>(experts_->lanes(), T) : 1;
  micro_batches_.clear();
  for (int64_t i = 0; i < m; ++i) {
    const int64_t first = T * i / m;
    micro_batches_.push_back({first, T * (i + 1) / m - first, static_cast<int>(i), false});
  }
  auto slice = [&](const MicroBatch& mb) {
    return ForwardBatch{b.token_ids.subspan(mb.first, mb.size),
                        b.slots.subspan(mb.first, mb.size),
                        b.positions.subspan(mb.first, mb.size),
                        {}};
  };
  absl::Status status;
  for (int64_t layer = 0; layer < c.num_hidden_layers && status.ok(); ++layer) {
    for (MicroBatch& mb : micro_batches_) {
      if (layer > 0) status.Update(EndLayer(layer - 1, mb, clock));
      if (status.ok()) status.Update(BeginLayer(layer, slice(mb), mb, clock));
      if (!status.ok()) break;
    }
  }
  // The last layer's routed experts; after an error, what is still in flight is collected
  // (and dropped) so that no lane is left busy for the next call.
  for (MicroBatch& mb : micro_batches_) {
    status.Update(EndLayer(c.num_hidden_layers - 1, mb, clock));
  }
  DSMOE_RETURN_IF_ERROR(status);

  // --- logits for the wanted rows: lm_head(rms_norm(h)) ---
  const int64_t R = static_cast<int64_t>(b.logit_rows.size());
  if (R == 0) return absl::OkStatus();
  for (int64_t r = 0; r < R; ++r) {
    ops::RmsNorm(h + b.logit_rows[r] * H, w.final_norm.data(), 1, H, c.rms_norm_eps, xn + r * H);
  }
  ops::Linear(pool_, xn, R, w.lm_head, nullptr, logits);
  clock.Lap(ForwardPhase::kLogits);
  return absl::OkStatus();
}

absl::Status ModelRunner::BeginLayer(int64_t layer, const ForwardBatch& b, MicroBatch& mb,
                                     PhaseClock& clock) {
  const ModelConfig& c = config_;
  const LayerWeights& L = weights_.layers[layer];
  const int64_t T = mb.size, H = c.hidden_size;
  const int64_t nh = c.num_attention_heads, nkv = c.num_key_value_heads, hd = c.head_dim();
  // This micro-batch's rows of the activation arena.
  float* h = hidden_.data() + mb.first * H;
  float* xn = normed_.data() + mb.first * H;
  float* q = q_.data() + mb.first * nh * hd;
  float* k = k_.data() + mb.first * nkv * hd;
  float* v = v_.data() + mb.first * nkv * hd;
  float* attn = attn_.data() + mb.first * nh * hd;
  float* proj = proj_.data() + mb.first * H;
  auto bias = [](const LinearWeights& lw) { return lw.bias.empty() ? nullptr : lw.bias.data(); };

  // --- self-attention: h += o_proj(attn(rms_norm(h))) ---
  ops::RmsNorm(h, L.input_norm.data(), T, H, c.rms_norm_eps, xn);
  ops::Linear(pool_, xn, T, L.attention.q.weight, bias(L.attention.q), q);  // [T, nh·hd]
  ops::Linear(pool_, xn, T, L.attention.k.weight, bias(L.attention.k), k);  // [T, nkv·hd]
  ops::Linear(pool_, xn, T, L.attention.v.weight, bias(L.attention.v), v);  // [T, nkv·hd]
  rope_.Apply(q, T, nh, b.positions);
  rope_.Apply(k, T, nkv, b.positions);
  kv_cache_.Write(layer, b, k, v);  // post-RoPE keys
  Attention(layer, b, mb.first);    // attn [T, nh·hd]
  ops::Linear(pool_, attn, T, L.attention.o.weight, bias(L.attention.o), proj);
  ops::AddInPlace(proj, h, T * H);
  clock.Lap(ForwardPhase::kAttention);

  // --- feed-forward: h += mlp(rms_norm(h)) ---
  ops::RmsNorm(h, L.post_attention_norm.data(), T, H, c.rms_norm_eps, xn);
  if (!L.is_moe) {
    const MlpJob job{&L.dense, xn, T, mlp_act_.data(), mlp_up_.data(), proj};
    RunMlps(pool_, &job, 1, H);
    ops::AddInPlace(proj, h, T * H);
    clock.Lap(ForwardPhase::kDense);
    return absl::OkStatus();
  }
  const int64_t topk = c.num_experts_per_tok;
  float* router_logits = router_logits_.data() + mb.first * c.n_routed_experts;
  int32_t* route_experts = route_experts_.data() + mb.first * topk;
  float* route_weights = route_weights_.data() + mb.first * topk;
  ops::Linear(pool_, xn, T, L.router, nullptr, router_logits);  // [T, E]
  const GateParams gate = device_limit_ ? device_limit_->ForLayer(gate_, layer) : gate_;
  RouteTokens(gate, router_logits, T, gate_scratch_.data(), route_experts, route_weights);
  if (observer_ != nullptr) {
    observer_->OnGateLogits(layer, T, c.n_routed_experts, router_logits);
    observer_->OnRouting(layer, T, topk, route_experts, route_weights);
  }
  clock.Lap(ForwardPhase::kGate);
  // Routed experts start (possibly on expert servers); the shared experts — every token, no
  // gate — are computed here meanwhile; EndLayer combines them.
  DSMOE_RETURN_IF_ERROR(experts_->Start(mb.lane, layer, xn, T, route_experts, route_weights, topk));
  mb.routed_in_flight = true;
  clock.Lap(ForwardPhase::kDispatch);
  if (L.shared.loaded()) {
    const MlpJob job{
        &L.shared, xn, T, mlp_act_.data(), mlp_up_.data(), shared_out_.data() + mb.first * H};
    RunMlps(pool_, &job, 1, H);
    clock.Lap(ForwardPhase::kShared);
  }
  return absl::OkStatus();
}

absl::Status ModelRunner::EndLayer(int64_t layer, MicroBatch& mb, PhaseClock& clock) {
  if (!mb.routed_in_flight) return absl::OkStatus();  // a dense layer, or not started
  mb.routed_in_flight = false;
  const int64_t H = config_.hidden_size, T = mb.size;
  float* h = hidden_.data() + mb.first * H;
  float* proj = proj_.data() + mb.first * H;
  DSMOE_RETURN_IF_ERROR(experts_->Finish(mb.lane, proj));
  clock.Lap(ForwardPhase::kRoutedWait);
  ops::AddInPlace(proj, h, T * H);
  if (weights_.layers[layer].shared.loaded()) {
    ops::AddInPlace(shared_out_.data() + mb.first * H, h, T * H);
  }
  clock.Lap(ForwardPhase::kCombine);
  return absl::OkStatus();
}

}  // namespace dsmoe
