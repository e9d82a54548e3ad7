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
  DSMOE_ASSIGN_OR_RETURN(const RunnerOptions o, options.Resolve(c));
  DSMOE_ASSIGN_OR_RETURN(const int64_t num_pages, NumKvPages(c, o, sizeof(float)));
  auto runner = std::unique_ptr<ModelRunner>(new ModelRunner(weights, pool, o, num_pages));
  if (c.n_routed_experts > 0) {
    if (experts != nullptr) {
      runner->experts_ = experts;
    } else {
      runner->local_experts_ = std::make_unique<LocalExpertExecutor>(
          weights, pool, o.max_batch_tokens * c.num_experts_per_tok);
      runner->experts_ = runner->local_experts_.get();
    }
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

int64_t ModelRunner::AttentionScratch() const {
  return 8 * options_.max_context + 80 * config_.head_dim();  // ops::KernelTable::attend_causal
}

void ModelRunner::Attention(int64_t layer, const ForwardBatch& b) {
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
  pool_.ParallelFor(runs * nh, [&](int64_t task, int thread) {
    const int64_t run = task / nh, h = task % nh;
    const int64_t t0 = attention_runs_[run], n = attention_runs_[run + 1] - t0;
    const ops::KvPages kv = kv_cache_.View(layer, b.slots[t0], h / group);
    float* scratch = scores_.data() + thread * AttentionScratch();
    const float* q = q_.data() + t0 * qkv_stride + h * hd;
    float* out = attn_.data() + t0 * qkv_stride + h * hd;
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
  const int64_t nh = c.num_attention_heads, nkv = c.num_key_value_heads;
  float* h = hidden_.data();
  float* xn = normed_.data();

  for (int64_t t = 0; t < T; ++t) {  // h = embed(tokens)  [T, H]
    kern.row_to_f32(w.embed_tokens.Row(b.token_ids[t]), w.embed_tokens.dtype, H, h + t * H);
  }

  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    const LayerWeights& L = w.layers[layer];
    auto bias = [](const LinearWeights& lw) { return lw.bias.empty() ? nullptr : lw.bias.data(); };

    // --- self-attention: h += o_proj(attn(rms_norm(h))) ---
    ops::RmsNorm(h, L.input_norm.data(), T, H, c.rms_norm_eps, xn);
    ops::Linear(pool_, xn, T, L.attention.q.weight, bias(L.attention.q), q_.data());  // [T, nh·hd]
    ops::Linear(pool_, xn, T, L.attention.k.weight, bias(L.attention.k), k_.data());  // [T, nkv·hd]
    ops::Linear(pool_, xn, T, L.attention.v.weight, bias(L.attention.v), v_.data());  // [T, nkv·hd]
    rope_.Apply(q_.data(), T, nh, b.positions);
    rope_.Apply(k_.data(), T, nkv, b.positions);
    kv_cache_.Write(layer, b, k_.data(), v_.data());  // post-RoPE keys
    Attention(layer, b);                              // attn_ [T, nh·hd]
    ops::Linear(pool_, attn_.data(), T, L.attention.o.weight, bias(L.attention.o), proj_.data());
    ops::AddInPlace(proj_.data(), h, T * H);

    // --- feed-forward: h += mlp(rms_norm(h)) ---
    ops::RmsNorm(h, L.post_attention_norm.data(), T, H, c.rms_norm_eps, xn);
    if (!L.is_moe) {
      const MlpJob job{&L.dense, xn, T, mlp_act_.data(), mlp_up_.data(), proj_.data()};
      RunMlps(pool_, &job, 1, H);
      ops::AddInPlace(proj_.data(), h, T * H);
      continue;
    }
    const int64_t k = c.num_experts_per_tok;
    ops::Linear(pool_, xn, T, L.router, nullptr, router_logits_.data());  // [T, E]
    RouteTokens(gate_, router_logits_.data(), T, gate_scratch_.data(), route_experts_.data(),
                route_weights_.data());
    if (observer_ != nullptr)
      observer_->OnRouting(layer, T, k, route_experts_.data(), route_weights_.data());
    // Routed experts start (possibly on expert servers); the shared experts — every token,
    // no gate — are computed here meanwhile; then the routed results are combined.
    DSMOE_RETURN_IF_ERROR(
        experts_->Start(layer, xn, T, route_experts_.data(), route_weights_.data(), k));
    if (L.shared.loaded()) {
      const MlpJob job{&L.shared, xn, T, mlp_act_.data(), mlp_up_.data(), shared_out_.data()};
      RunMlps(pool_, &job, 1, H);
    }
    DSMOE_RETURN_IF_ERROR(experts_->Finish(proj_.data()));
    ops::AddInPlace(proj_.data(), h, T * H);
    if (L.shared.loaded()) ops::AddInPlace(shared_out_.data(), h, T * H);
  }

  // --- logits for the wanted rows: lm_head(rms_norm(h)) ---
  const int64_t R = static_cast<int64_t>(b.logit_rows.size());
  if (R == 0) return absl::OkStatus();
  for (int64_t r = 0; r < R; ++r) {
    ops::RmsNorm(h + b.logit_rows[r] * H, w.final_norm.data(), 1, H, c.rms_norm_eps, xn + r * H);
  }
  ops::Linear(pool_, xn, R, w.lm_head, nullptr, logits);
  return absl::OkStatus();
}

}  // namespace dsmoe
