// Flags of the offline subcommands: make-model, quantize, logits, generate, route, info,
// tokenize, detokenize, chat-template.
#include <functional>
#include <memory>

#include "cli/chat_template_command.h"
#include "cli/flags.h"
#include "cli/tokenize_command.h"
#include "core/tokenizer/chat_template.h"

namespace dsmoe::cli {
namespace {

void AddMakeModel(CLI::App& app, int* rc) {
  auto mk = std::make_shared<MakeModelOptions>();
  auto* make =
      app.add_subcommand("make-model", "Write a random-weight checkpoint in Hugging Face format");
  make->add_option("--preset", mk->preset, "Shape preset")
      ->check(CLI::IsMember({"tiny", "gshard", "small", "medium"}))
      ->capture_default_str();
  make->add_option("--dtype", mk->dtype, "Weight dtype on disk")
      ->check(CLI::IsMember({"f32", "bf16", "f16"}))
      ->capture_default_str();
  make->add_option("--seed", mk->seed, "Random seed")->capture_default_str();
  make->add_option("--out", mk->out, "Output directory")->required();
  make->add_option("--shards", mk->shards, "Number of safetensors shards")
      ->check(CLI::Range(1, 9999))
      ->capture_default_str();
  AddOptional(make, "--layers", mk->layers, "Override num_hidden_layers");
  AddOptional(make, "--hidden", mk->hidden, "Override hidden_size");
  AddOptional(make, "--heads", mk->heads, "Override num_attention_heads");
  AddOptional(make, "--kv-heads", mk->kv_heads,
              "Override num_key_value_heads (GQA < heads, MQA = 1)");
  AddOptional(make, "--routed-experts", mk->routed_experts, "Override n_routed_experts");
  AddOptional(make, "--shared-experts", mk->shared_experts, "Override n_shared_experts (0: none)");
  AddOptional(make, "--top-k", mk->top_k, "Override num_experts_per_tok");
  AddOptional(make, "--expert-width", mk->moe_intermediate, "Override moe_intermediate_size");
  AddOptional(make, "--intermediate", mk->intermediate,
              "Override intermediate_size (dense layers)");
  AddOptional(make, "--vocab", mk->vocab, "Override vocab_size");
  AddOptional(make, "--first-dense", mk->first_dense, "Override first_k_dense_replace");
  AddOptional(make, "--moe-layer-freq", mk->moe_layer_freq, "Override moe_layer_freq");
  AddOptional(make, "--max-position", mk->max_position, "Override max_position_embeddings");
  AddOptional(make, "--norm-topk-prob", mk->norm_topk_prob, "Set norm_topk_prob (true|false)");
  make->add_option("--router-bias-experts", mk->router_bias_experts,
                   "Routed experts the router favours in every MoE layer, comma-separated "
                   "(their gate rows are scaled by --router-bias): a skewed load");
  make->add_option("--router-bias", mk->router_bias, "Scale of the favoured experts' gate rows")
      ->check(CLI::Range(1e-3, 1e3))
      ->capture_default_str();
  AddOptional(make, "--tie-embeddings", mk->tie_embeddings, "Set tie_word_embeddings (true|false)");
  AddOptional(make, "--attention-bias", mk->attention_bias, "Set attention_bias (true|false)");
  make->add_option("--tokenizer", mk->tokenizer,
                   "Copy this tokenizer.json (+ tokenizer_config.json beside it) and size the "
                   "vocabulary to it")
      ->check(CLI::ExistingFile);
  make->add_option("--chat-template", mk->chat_template,
                   "Write this chat template into the checkpoint's tokenizer_config.json: a "
                   "Jinja file, or a built-in name (" +
                       BuiltinChatTemplateNames() + "). Needs --tokenizer");
  AddOptional(make, "--rope-linear-factor", mk->rope_linear_factor,
              "Use linear RoPE scaling with this factor");
  make->callback([mk, rc] { *rc = RunMakeModel(*mk); });
}

void AddQuantize(CLI::App& app, int* rc) {
  auto qz = std::make_shared<QuantizeOptions>();
  auto* quantize = app.add_subcommand(
      "quantize", "Write an 8-bit (Q8_0) copy of a checkpoint: half the bytes of BF16");
  quantize->add_option("--model", qz->model, "Checkpoint directory to read")
      ->required()
      ->check(CLI::ExistingDirectory);
  quantize->add_option("--out", qz->out, "Output directory")->required();
  quantize->callback([qz, rc] { *rc = RunQuantize(*qz); });
}

void AddForwardCommands(CLI::App& app, int* rc) {
  auto lg = std::make_shared<LogitsOptions>();
  auto* logits =
      app.add_subcommand("logits", "Write float32 logits of every position as .npy [T, vocab]");
  AddModelInputFlags(logits, lg->input);
  logits->add_option("--out", lg->out, "Output .npy file")->required();
  logits->callback([lg, rc] { *rc = RunLogits(*lg); });

  auto gen = std::make_shared<GenerateOptions>();
  auto* generate = app.add_subcommand("generate", "Generate tokens (greedy at temperature 0)");
  AddModelInputFlags(generate, gen->input);
  AddSamplingFlags(generate, gen->sampling);
  generate->add_flag("--json", gen->json,
                     "Print {\"ids\", \"text\", \"finish_reason\", \"usage\"} as JSON");
  generate->callback([gen, rc] { *rc = RunGenerate(*gen); });

  auto rt = std::make_shared<RouteOptions>();
  auto* route = app.add_subcommand(
      "route", "Show the routed experts and weights chosen per MoE layer and position");
  AddModelInputFlags(route, rt->input);
  route->add_flag("--json", rt->json,
                  "Print {\"layers\": [{\"layer\", \"positions\": [{\"experts\", \"weights\"}]}]}");
  route->callback([rt, rc] { *rc = RunRoute(*rt); });

  auto inf = std::make_shared<InfoOptions>();
  auto* info =
      app.add_subcommand("info", "Describe a checkpoint: shape, experts, parameter counts");
  info->add_option("--model", inf->model, "Checkpoint directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  info->add_flag("--json", inf->json, "Print as one JSON object");
  info->callback([inf, rc] { *rc = RunInfo(*inf); });
}

// --tokenizer FILE, or --model DIR for the checkpoint's tokenizer.json. Returns the check the
// command's callback runs first: one of the two is required.
std::function<void()> AddTokenizerSource(CLI::App* cmd, std::string& tokenizer_path) {
  auto* file = cmd->add_option("--tokenizer", tokenizer_path,
                               "tokenizer.json (tokenizer_config.json beside it is read too)")
                   ->check(CLI::ExistingFile);
  auto* model = cmd->add_option_function<std::string>(
                       "--model",
                       [&tokenizer_path](const std::string& dir) {
                         tokenizer_path = dir + "/tokenizer.json";
                       },
                       "Checkpoint directory: its tokenizer.json")
                    ->check(CLI::ExistingDirectory);
  file->excludes(model);
  return [file, model] {
    if (file->count() + model->count() == 0) throw CLI::RequiredError("--tokenizer or --model");
  };
}

void AddChatTemplate(CLI::App& app, int* rc) {
  auto ct = std::make_shared<ChatTemplateOptions>();
  auto* cmd = app.add_subcommand(
      "chat-template",
      "Render a chat template for a conversation (the text a chat request becomes)");
  auto* model = cmd->add_option("--model", ct->model,
                                "Checkpoint directory: its "
                                "tokenizer_config.json (and tokenizer.json)")
                    ->check(CLI::ExistingDirectory);
  auto* config = cmd->add_option("--tokenizer-config", ct->tokenizer_config,
                                 "A tokenizer_config.json holding chat_template")
                     ->check(CLI::ExistingFile);
  model->excludes(config);
  cmd->add_option("--messages", ct->messages,
                  "JSON list of {role, content} messages; - reads stdin")
      ->required();
  cmd->add_option("--chat-template", ct->chat_template,
                  "Jinja file replacing the config's chat_template")
      ->check(CLI::ExistingFile);
  cmd->add_flag("--add-generation-prompt", ct->add_generation_prompt,
                "End with the assistant's turn prompt");
  cmd->add_flag("--jsonl", ct->jsonl,
                "One conversation per input line, one JSON string per output line");
  cmd->add_flag("--ids", ct->ids,
                "Also tokenize: print {\"text\", \"ids\"} as JSON (needs tokenizer.json)");
  cmd->callback([ct, rc] { *rc = RunChatTemplate(*ct); });
}

void AddTokenizerCommands(CLI::App& app, int* rc) {
  auto tk = std::make_shared<TokenizeOptions>();
  auto* tokenize = app.add_subcommand("tokenize", "Encode text with a Hugging Face tokenizer.json");
  const auto tokenizer_given = AddTokenizerSource(tokenize, tk->tokenizer_path);
  auto* text = tokenize->add_option_function<std::string>(
      "--text", [tk](const std::string& v) { tk->text = v; }, "Text to encode");
  auto* file =
      tokenize
          ->add_option_function<std::string>(
              "--file", [tk](const std::string& v) { tk->file = v; }, "UTF-8 file to encode")
          ->check(CLI::ExistingFile);
  text->excludes(file);
  tokenize->add_flag("--jsonl", tk->jsonl, "With --file: one JSON array of ids per input line");
  auto no_special = std::make_shared<bool>(false);
  tokenize->add_flag("--no-special-tokens", *no_special,
                     "Do not add BOS/EOS as the tokenizer would");
  tokenize->callback([tk, no_special, rc, tokenizer_given] {
    tokenizer_given();
    tk->add_special_tokens = !*no_special;
    *rc = RunTokenize(*tk);
  });

  auto dt = std::make_shared<DetokenizeOptions>();
  auto* detokenize =
      app.add_subcommand("detokenize", "Decode token ids with a Hugging Face tokenizer.json");
  const auto detokenizer_given = AddTokenizerSource(detokenize, dt->tokenizer_path);
  detokenize->add_option("--ids", dt->ids, "Token ids, comma-separated")->required();
  detokenize->add_flag("--skip-special-tokens", dt->skip_special_tokens,
                       "Leave special tokens out of the text");
  detokenize->callback([dt, rc, detokenizer_given] {
    detokenizer_given();
    *rc = RunDetokenize(*dt);
  });
}

}  // namespace

void AddModelCommands(CLI::App& app, int* rc) {
  AddMakeModel(app, rc);
  AddQuantize(app, rc);
  AddForwardCommands(app, rc);
  AddTokenizerCommands(app, rc);
  AddChatTemplate(app, rc);
}

}  // namespace dsmoe::cli
