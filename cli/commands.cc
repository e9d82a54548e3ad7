#include "cli/commands.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "cli/chat_template_command.h"
#include "cli/id_list.h"
#include "core/io/npy.h"
#include "core/model/generator.h"
#include "core/model/make_model.h"
#include "core/model/model_facts.h"
#include "core/model/model_runner.h"
#include "core/model/quantize.h"
#include "core/model/weights.h"
#include "core/tokenizer/chat_template.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/cpu_features.h"
#include "core/util/log.h"
#include "core/util/thread_pool.h"

namespace dsmoe::cli {

namespace {

int Fail(const absl::Status& status) {
  std::cerr << "dsmoe: error: " << status.message() << "\n";
  return 1;
}

// Library lines (the weight load's summary and progress) on stderr, beside the errors.
Logger* StderrLogger() {
  class Stderr final : public Logger {
   public:
    void Log(LogLevel level, std::string_view message) override {
      // One fprintf per line keeps the line whole when threads log at once.
      std::fprintf(stderr, "%s%s%.*s\n", level == LogLevel::kInfo ? "" : LogLevelName(level),
                   level == LogLevel::kInfo ? "" : ": ", static_cast<int>(message.size()),
                   message.data());
    }
  };
  static Stderr* logger = new Stderr();
  return logger;
}

// A loaded model with what a computing subcommand needs.
struct LoadedModel {
  std::unique_ptr<ModelWeights> weights;
  std::unique_ptr<ThreadPool> pool;
  std::unique_ptr<Tokenizer> tokenizer;  // when the checkpoint has tokenizer.json
  std::vector<int32_t> ids;
};

absl::StatusOr<LoadedModel> Load(const ModelInputOptions& in) {
  if (in.ids.empty() && in.prompt.empty()) {
    return absl::InvalidArgumentError("one of --ids or --prompt is required");
  }
  LoadedModel m;
  const std::string tokenizer_path = in.model + "/tokenizer.json";
  if (std::filesystem::exists(tokenizer_path)) {
    DSMOE_ASSIGN_OR_RETURN(m.tokenizer, Tokenizer::FromFile(tokenizer_path));
  }
  if (!in.prompt.empty()) {
    if (m.tokenizer == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--prompt needs a tokenizer and ", in.model,
          " has no tokenizer.json (make-model --tokenizer FILE adds one); pass --ids instead"));
    }
    DSMOE_ASSIGN_OR_RETURN(m.ids, m.tokenizer->Encode(in.prompt, /*add_special_tokens=*/true));
    if (m.ids.empty()) return absl::InvalidArgumentError("--prompt encodes to no tokens");
  } else {
    DSMOE_ASSIGN_OR_RETURN(m.ids, ParseIdList(in.ids, "--ids"));
  }
  WeightLoadOptions load;
  load.placement = in.mmap_weights   ? WeightLoadOptions::Placement::kMap
                   : in.copy_weights ? WeightLoadOptions::Placement::kCopy
                                     : WeightLoadOptions::Placement::kAuto;
  load.logger = StderrLogger();  // stdout carries the command's output
  DSMOE_ASSIGN_OR_RETURN(m.weights,
                         ModelWeights::Load(in.model, WeightSelection::Everything(), load));
  const int64_t V = m.weights->config().vocab_size;
  for (int32_t id : m.ids) {
    if (id >= V) {
      return absl::InvalidArgumentError(
          absl::StrCat("--ids: token id ", id, " is outside the model's vocabulary [0, ", V, ")"));
    }
  }
  m.pool = std::make_unique<ThreadPool>(in.threads);
  return m;
}

// Runs the whole prompt through `runner` in chunks, logits for every position if `logits`.
absl::Status Prefill(ModelRunner& runner, const std::vector<int32_t>& ids,
                     std::vector<float>* logits) {
  const int64_t T = static_cast<int64_t>(ids.size());
  const int64_t chunk = runner.options().max_batch_tokens;
  const int64_t V = runner.config().vocab_size;
  if (logits != nullptr) logits->assign(T * V, 0.0f);
  std::vector<int32_t> slots(chunk, 0), positions(chunk), rows(chunk);
  for (int64_t begin = 0; begin < T; begin += chunk) {
    const int64_t n = std::min(chunk, T - begin);
    for (int64_t i = 0; i < n; ++i) {
      positions[i] = static_cast<int32_t>(begin + i);
      rows[i] = static_cast<int32_t>(i);
    }
    ForwardBatch batch{
        std::span(ids).subspan(begin, n), std::span(slots).first(n), std::span(positions).first(n),
        logits != nullptr ? std::span<const int32_t>(rows).first(n) : std::span<const int32_t>()};
    DSMOE_RETURN_IF_ERROR(
        runner.Forward(batch, logits != nullptr ? logits->data() + begin * V : nullptr));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<ModelRunner>> MakeRunner(const LoadedModel& m,
                                                        const ModelInputOptions& in,
                                                        int64_t context) {
  RunnerOptions options;
  options.max_context = context;
  DSMOE_ASSIGN_OR_RETURN(options.kv_dtype, ParseKvDType(in.kv_dtype));
  return ModelRunner::Create(*m.weights, *m.pool, options);
}

absl::StatusOr<DType> ParseDType(const std::string& s) {
  if (s == "f32") return DType::kF32;
  if (s == "bf16") return DType::kBF16;
  if (s == "f16") return DType::kF16;
  return absl::InvalidArgumentError(
      absl::StrCat("--dtype: '", s, "' is not one of f32, bf16, f16"));
}

// The text of make-model's --chat-template: a built-in's name or a Jinja file, checked to parse
// (a template the gateway would refuse at start-up is refused here).
absl::StatusOr<std::string> ChatTemplateSource(const std::string& arg) {
  std::string source;
  if (auto builtin = BuiltinChatTemplate(arg)) {
    source = *std::move(builtin);
  } else if (std::filesystem::is_regular_file(arg)) {
    std::ifstream in(arg, std::ios::binary);
    std::ostringstream ss;
    ss << in.rdbuf();
    if (!in) return absl::NotFoundError(absl::StrCat("--chat-template: cannot read ", arg));
    source = std::move(ss).str();
  } else {
    return absl::NotFoundError(absl::StrCat("--chat-template ", arg,
                                            " is neither a file nor a built-in template (",
                                            BuiltinChatTemplateNames(), ")"));
  }
  if (auto t = ChatTemplate::Parse(source); !t.ok())
    return absl::InvalidArgumentError(
        absl::StrCat("--chat-template ", arg, ": ", t.status().message()));
  return source;
}

// Sets `config_path`'s chat_template to `source`, making the file if there is none (then with the
// tokenizer's bos_token and eos_token, which templates print).
absl::Status WriteChatTemplate(const std::string& source, const std::filesystem::path& config_path,
                               const Tokenizer& tokenizer) {
  nlohmann::json config = nlohmann::json::object();
  if (std::filesystem::exists(config_path)) {
    std::ifstream in(config_path);
    config = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (config.is_discarded() || !config.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(config_path.string(), " is not a JSON object"));
    }
  }
  if (!config.contains("bos_token") && tokenizer.bos_id())
    config["bos_token"] = tokenizer.IdToToken(*tokenizer.bos_id()).value_or("");
  if (!config.contains("eos_token") && tokenizer.eos_id())
    config["eos_token"] = tokenizer.IdToToken(*tokenizer.eos_id()).value_or("");
  config["chat_template"] = source;
  std::ofstream out(config_path, std::ios::binary | std::ios::trunc);
  out << config.dump(2) << "\n";
  if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot write ", config_path.string()));
  return absl::OkStatus();
}

}  // namespace

int RunMakeModel(const MakeModelOptions& o) {
  auto config = PresetConfig(o.preset);
  if (!config.ok()) return Fail(config.status());
  ModelConfig& c = *config;
  auto set = [](const std::optional<int64_t>& v, int64_t& field) {
    if (v) field = *v;
  };
  const bool moe_shape_changed = o.shared_experts || o.top_k || o.moe_intermediate;
  set(o.layers, c.num_hidden_layers);
  set(o.hidden, c.hidden_size);
  set(o.heads, c.num_attention_heads);
  c.num_key_value_heads = c.num_attention_heads;
  set(o.kv_heads, c.num_key_value_heads);
  set(o.routed_experts, c.n_routed_experts);
  set(o.shared_experts, c.n_shared_experts);
  set(o.top_k, c.num_experts_per_tok);
  set(o.moe_intermediate, c.moe_intermediate_size);
  if (moe_shape_changed && !o.intermediate && o.preset != "gshard") {
    c.intermediate_size = (c.n_shared_experts + c.num_experts_per_tok) * c.moe_intermediate_size;
  }
  set(o.intermediate, c.intermediate_size);
  set(o.vocab, c.vocab_size);
  set(o.first_dense, c.first_k_dense_replace);
  set(o.moe_layer_freq, c.moe_layer_freq);
  set(o.max_position, c.max_position_embeddings);
  if (o.norm_topk_prob) c.norm_topk_prob = *o.norm_topk_prob;
  if (o.tie_embeddings) c.tie_word_embeddings = *o.tie_embeddings;
  if (o.attention_bias) c.attention_bias = *o.attention_bias;
  if (o.rope_linear_factor) c.rope_scaling = {RopeScaling::Type::kLinear, *o.rope_linear_factor};
  std::unique_ptr<Tokenizer> tokenizer;
  std::string chat_template;
  if (!o.chat_template.empty()) {
    if (o.tokenizer.empty()) {
      return Fail(absl::InvalidArgumentError(
          "--chat-template needs --tokenizer (a chat template is of no use without one)"));
    }
    auto source = ChatTemplateSource(o.chat_template);
    if (!source.ok()) return Fail(source.status());
    chat_template = *std::move(source);
  }
  if (!o.tokenizer.empty()) {
    auto loaded = Tokenizer::FromFile(o.tokenizer);
    if (!loaded.ok()) return Fail(loaded.status());
    tokenizer = std::move(*loaded);
    if (!o.vocab) c.vocab_size = tokenizer->vocab_size();
    if (tokenizer->vocab_size() > c.vocab_size) {
      return Fail(absl::InvalidArgumentError(absl::StrCat("--vocab ", c.vocab_size,
                                                          " is smaller than the tokenizer's ",
                                                          tokenizer->vocab_size(), " ids")));
    }
    if (tokenizer->bos_id()) c.bos_token_id = *tokenizer->bos_id();
    if (tokenizer->eos_id()) c.eos_token_ids = {*tokenizer->eos_id()};
  }
  if (c.vocab_size <= 1) return Fail(absl::InvalidArgumentError("--vocab must be at least 2"));
  auto dtype = ParseDType(o.dtype);
  if (!dtype.ok()) return Fail(dtype.status());
  if (auto s = c.Validate("make-model"); !s.ok()) return Fail(s);
  const auto t0 = std::chrono::steady_clock::now();
  CheckpointWriteOptions write{*dtype, o.seed, o.shards, {}, static_cast<float>(o.router_bias)};
  if (!o.router_bias_experts.empty()) {
    auto ids = ParseIdList(o.router_bias_experts, "--router-bias-experts");
    if (!ids.ok()) return Fail(ids.status());
    write.router_bias_experts.assign(ids->begin(), ids->end());
  }
  if (auto s = WriteRandomCheckpoint(c, write, o.out); !s.ok()) return Fail(s);
  if (tokenizer != nullptr) {
    namespace fs = std::filesystem;
    std::error_code ec;
    const fs::path src = fs::path(o.tokenizer);
    fs::copy_file(src, fs::path(o.out) / "tokenizer.json", fs::copy_options::overwrite_existing,
                  ec);
    if (!ec && fs::exists(src.parent_path() / "tokenizer_config.json")) {
      fs::copy_file(src.parent_path() / "tokenizer_config.json",
                    fs::path(o.out) / "tokenizer_config.json", fs::copy_options::overwrite_existing,
                    ec);
    }
    if (ec)
      return Fail(
          absl::PermissionDeniedError(absl::StrCat("copying the tokenizer: ", ec.message())));
    if (!o.chat_template.empty()) {
      if (auto s = WriteChatTemplate(chat_template, fs::path(o.out) / "tokenizer_config.json",
                                     *tokenizer);
          !s.ok())
        return Fail(s);
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const ParameterCount params = CountParameters(c);
  std::fprintf(stderr,
               "wrote %s: preset %s, %s, %.1fM parameters (%.1fM active per token), %.1f s\n",
               o.out.c_str(), o.preset.c_str(), o.dtype.c_str(), params.total / 1e6,
               params.active / 1e6, secs);
  return 0;
}

int RunQuantize(const QuantizeOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  auto report = QuantizeCheckpoint(o.model, o.out);
  if (!report.ok()) return Fail(report.status());
  std::fprintf(
      stderr, "wrote %s: %lld tensors quantized to Q8_0, %lld copied; %.1f MB -> %.1f MB, %.1f s\n",
      o.out.c_str(), static_cast<long long>(report->quantized_tensors),
      static_cast<long long>(report->copied_tensors), report->bytes_in / 1e6,
      report->bytes_out / 1e6,
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return 0;
}

int RunLogits(const LogitsOptions& o) {
  auto m = Load(o.input);
  if (!m.ok()) return Fail(m.status());
  auto runner = MakeRunner(*m, o.input, static_cast<int64_t>(m->ids.size()));
  if (!runner.ok()) return Fail(runner.status());
  std::vector<float> logits;
  if (auto s = Prefill(**runner, m->ids, &logits); !s.ok()) return Fail(s);
  const int64_t T = static_cast<int64_t>(m->ids.size()), V = m->weights->config().vocab_size;
  if (auto s = WriteNpyFloat32(o.out, {T, V}, logits.data()); !s.ok()) return Fail(s);
  return 0;
}

int RunGenerate(const GenerateOptions& o) {
  GenerateRequest request;
  request.max_tokens = o.sampling.max_tokens;
  request.sampling = {o.sampling.temperature, o.sampling.top_k, o.sampling.top_p, o.sampling.seed};
  request.ignore_eos = o.sampling.ignore_eos;
  request.logprobs = o.sampling.logprobs >= 0;
  request.top_logprobs = std::max(o.sampling.logprobs, 0);
  if (auto s = request.sampling.Validate(); !s.ok()) return Fail(s);
  if (!o.sampling.stop_ids.empty()) {
    auto stops = ParseIdList(o.sampling.stop_ids, "--stop-ids");
    if (!stops.ok()) return Fail(stops.status());
    request.stop_token_ids = *stops;
  }
  auto m = Load(o.input);
  if (!m.ok()) return Fail(m.status());
  request.prompt = m->ids;
  const ModelConfig& c = m->weights->config();
  const int64_t context = std::min<int64_t>(
      c.MaxContext(), static_cast<int64_t>(m->ids.size()) + o.sampling.max_tokens);
  auto runner = MakeRunner(*m, o.input, context);
  if (!runner.ok()) return Fail(runner.status());
  const bool stream = !o.json;
  std::optional<StreamingDecoder> pieces;
  if (m->tokenizer != nullptr) pieces.emplace(*m->tokenizer, /*skip_special_tokens=*/true);
  auto result = Generate(**runner, m->weights->generation_config(), request, 0, [&](int32_t id) {
    if (!stream) return;
    if (pieces) {
      auto piece = pieces->Push(id);
      if (piece.ok()) std::cout << *piece << std::flush;
    } else {
      std::cout << id << " " << std::flush;
    }
  });
  if (!result.ok()) return Fail(result.status());
  if (stream && pieces) {
    if (auto rest = pieces->Finish(); rest.ok()) std::cout << *rest;
  }
  if (o.json) {
    nlohmann::ordered_json j;
    j["ids"] = result->output_ids;
    if (m->tokenizer != nullptr) {
      auto text = m->tokenizer->Decode(result->output_ids, /*skip_special_tokens=*/true);
      if (!text.ok()) return Fail(text.status());
      j["text"] = *text;
    } else {
      j["text"] = nullptr;  // the checkpoint has no tokenizer.json
    }
    j["finish_reason"] = FinishReasonName(result->finish_reason);
    j["usage"] = {{"prompt_tokens", m->ids.size()},
                  {"completion_tokens", result->output_ids.size()}};
    if (request.logprobs) {
      nlohmann::ordered_json list = nlohmann::ordered_json::array();
      for (const TokenLogprobs& lp : result->logprobs) {
        nlohmann::ordered_json top = nlohmann::ordered_json::array();
        for (const TopLogprob& t : lp.top)
          top.push_back({{"id", t.token_id}, {"logprob", t.logprob}});
        list.push_back({{"id", lp.token_id}, {"logprob", lp.logprob}, {"top_logprobs", top}});
      }
      j["logprobs"] = std::move(list);
    }
    std::cout << j.dump() << "\n";
  } else {
    std::cout << "\n";
    const double decode_tokens = static_cast<double>(result->output_ids.size()) - 1.0;
    std::fprintf(stderr,
                 "finish_reason=%s  prompt %zu tokens in %.3f s (%.1f tok/s)  decode %.0f tokens "
                 "in %.3f s (%.1f tok/s)  threads=%d  kernels=%s\n",
                 FinishReasonName(result->finish_reason), m->ids.size(), result->prefill_seconds,
                 static_cast<double>(m->ids.size()) / std::max(result->prefill_seconds, 1e-9),
                 decode_tokens, result->decode_seconds,
                 decode_tokens / std::max(result->decode_seconds, 1e-9), m->pool->num_threads(),
                 GetCpuFeatures().ToString().c_str());
  }
  return 0;
}

namespace {
// Collects `dsmoe route` output: per MoE layer, per position, the chosen experts and weights,
// and the gate's logits over every routed expert (how clear each choice was).
class RouteRecorder final : public RoutingObserver {
 public:
  void OnGateLogits(int64_t /*layer*/, int64_t T, int64_t num_experts,
                    const float* logits) override {
    gate_logits_.assign(logits, logits + T * num_experts);
    num_experts_ = num_experts;
  }
  void OnRouting(int64_t layer, int64_t T, int64_t k, const int32_t* experts,
                 const float* weights) override {
    nlohmann::ordered_json& positions = layers_[layer];
    const bool have_logits = gate_logits_.size() == static_cast<size_t>(T * num_experts_);
    for (int64_t t = 0; t < T; ++t) {
      nlohmann::ordered_json p;
      p["experts"] = std::vector<int32_t>(experts + t * k, experts + (t + 1) * k);
      p["weights"] = std::vector<float>(weights + t * k, weights + (t + 1) * k);
      if (have_logits) {
        const float* row = gate_logits_.data() + t * num_experts_;
        p["gate_logits"] = std::vector<float>(row, row + num_experts_);
      }
      positions.push_back(std::move(p));
    }
    gate_logits_.clear();
  }
  nlohmann::ordered_json ToJson() const {
    nlohmann::ordered_json layers = nlohmann::ordered_json::array();
    for (auto& [layer, positions] : layers_)
      layers.push_back({{"layer", layer}, {"positions", positions}});
    return {{"layers", layers}};
  }

 private:
  std::map<int64_t, nlohmann::ordered_json> layers_;
  std::vector<float> gate_logits_;  // [T, num_experts_] of the layer being routed
  int64_t num_experts_ = 0;
};
}  // namespace

int RunRoute(const RouteOptions& o) {
  auto m = Load(o.input);
  if (!m.ok()) return Fail(m.status());
  auto runner = MakeRunner(*m, o.input, static_cast<int64_t>(m->ids.size()));
  if (!runner.ok()) return Fail(runner.status());
  RouteRecorder recorder;
  (*runner)->set_routing_observer(&recorder);
  if (auto s = Prefill(**runner, m->ids, nullptr); !s.ok()) return Fail(s);
  const nlohmann::ordered_json j = recorder.ToJson();
  if (o.json) {
    std::cout << j.dump() << "\n";
    return 0;
  }
  for (const auto& layer : j["layers"]) {
    std::cout << "layer " << layer["layer"].get<int64_t>() << "\n";
    int64_t pos = 0;
    for (const auto& p : layer["positions"]) {
      std::cout << "  pos " << pos++ << ":";
      for (size_t i = 0; i < p["experts"].size(); ++i) {
        std::printf(" %d(%.4f)", p["experts"][i].get<int>(), p["weights"][i].get<double>());
        std::fflush(stdout);
      }
      std::cout << "\n";
    }
  }
  return 0;
}

int RunInfo(const InfoOptions& o) {
  // Shapes and dtypes only: the weights stay mapped and unread, and stdout is the JSON.
  WeightLoadOptions unread;
  unread.placement = WeightLoadOptions::Placement::kMap;
  unread.populate = false;
  unread.logger = nullptr;
  auto w = ModelWeights::Load(o.model, WeightSelection::Everything(), unread);
  if (!w.ok()) return Fail(w.status());
  const ModelConfig& c = (*w)->config();
  const ParameterCount params = CountParameters(c);
  nlohmann::ordered_json j;
  j["model"] = o.model;
  j["layers"] = c.num_hidden_layers;
  j["moe_layers"] = c.NumMoeLayers();
  j["hidden_size"] = c.hidden_size;
  j["heads"] = c.num_attention_heads;
  j["kv_heads"] = c.num_key_value_heads;
  j["routed_experts"] = c.n_routed_experts;
  j["shared_experts"] = c.n_shared_experts;
  j["experts_per_token"] = c.num_experts_per_tok;
  j["expert_width"] = c.moe_intermediate_size;
  j["vocab_size"] = c.vocab_size;
  j["parameters"] = params.total;
  j["active_parameters"] = params.active;
  j["shards"] = (*w)->checkpoint().ShardNames();
  if (o.json) {
    std::cout << j.dump() << "\n";
  } else {
    std::cout << j.dump(2) << "\n";
  }
  return 0;
}

}  // namespace dsmoe::cli
