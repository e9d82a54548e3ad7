// The `dsmoe` model subcommands, each a plain options struct and a Run function returning the
// exit code. cli/flags_*.cc declare the flags (CLI11) that fill the structs; these own the work.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cli/sampling_options.h"

namespace dsmoe::cli {

struct MakeModelOptions {
  std::string preset = "tiny";
  std::string dtype = "f32";  // f32 | bf16 | f16
  uint64_t seed = 0;
  std::string out;
  int shards = 1;
  std::string tokenizer;  // a tokenizer.json to copy in; sizes the vocabulary to it
  // A chat template (a Jinja file, or a name of cli/chat_template_command.h's built-ins) written
  // into the copied tokenizer_config.json's chat_template. Needs `tokenizer`.
  std::string chat_template;
  // Shape overrides of the preset (unset: the preset's value).
  std::optional<int64_t> layers, hidden, heads, kv_heads, routed_experts, shared_experts, top_k,
      moe_intermediate, intermediate, vocab, first_dense, moe_layer_freq, max_position;
  std::optional<bool> norm_topk_prob, tie_embeddings, attention_bias;
  std::optional<double> rope_linear_factor;
  std::string router_bias_experts;  // "0,4,8": routed experts whose gate rows are scaled
  double router_bias = 1.0;
};

struct ModelInputOptions {
  std::string model;
  std::string ids;                // "1,2,3"
  std::string prompt;             // needs a tokenizer
  int threads = 0;                // 0: all cores
  bool mmap_weights = false;      // serve weights from the file mapping (page cache)
  bool copy_weights = false;      // copy them into anonymous huge pages; neither: chosen per start
  std::string kv_dtype = "auto";  // the KV cache's element type: auto, f32 or bf16
};

struct LogitsOptions {
  ModelInputOptions input;
  std::string out;
};

struct GenerateOptions {
  ModelInputOptions input;
  SamplingOptions sampling;
  bool json = false;
};

struct RouteOptions {
  ModelInputOptions input;
  bool json = false;
};

struct InfoOptions {
  std::string model;
  bool json = false;
};

struct QuantizeOptions {
  std::string model;
  std::string out;
};

int RunMakeModel(const MakeModelOptions& o);
int RunQuantize(const QuantizeOptions& o);
int RunLogits(const LogitsOptions& o);
int RunGenerate(const GenerateOptions& o);
int RunRoute(const RouteOptions& o);
int RunInfo(const InfoOptions& o);

}  // namespace dsmoe::cli
