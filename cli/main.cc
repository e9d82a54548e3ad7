// dsmoe: one binary, one subcommand per job. This file only declares flags (CLI11) and hands
// the parsed options to cli/commands.cc.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "cli/client_command.h"
#include "cli/cluster_command.h"
#include "cli/commands.h"
#include "cli/placement_command.h"
#include "cli/tokenize_command.h"

namespace {

using dsmoe::cli::ModelInputOptions;

void AddModelInput(CLI::App* cmd, ModelInputOptions& in, bool allow_prompt) {
  cmd->add_option("--model", in.model, "Checkpoint directory (Hugging Face format)")
      ->required()
      ->check(CLI::ExistingDirectory);
  auto* ids = cmd->add_option("--ids", in.ids, "Prompt token ids, comma-separated (e.g. 1,2,3)");
  if (allow_prompt) {
    auto* prompt = cmd->add_option("--prompt", in.prompt, "Prompt text (needs a tokenizer)");
    ids->excludes(prompt);
  } else {
    ids->required();
  }
  cmd->add_option("--threads", in.threads, "Compute threads (default: all cores)")
      ->check(CLI::Range(1, 1024));
  cmd->add_flag("--mmap-weights", in.mmap_weights,
                "Read weights through the file mapping (4 KiB pages) instead of copying them into "
                "huge pages");
}

template <class T>
void AddOptional(CLI::App* cmd, const std::string& name, std::optional<T>& target,
                 const std::string& help) {
  cmd->add_option_function<T>(
      name, [&target](const T& v) { target = v; }, help);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "dsmoe: serve DeepSeekMoE models (fine-grained + shared experts) on CPU and clusters"};
  // No require_subcommand(): CLI11 would then report a missing subcommand before naming an
  // unknown word like `dsmoe frobnicate`; we check for a subcommand after parsing instead.
  app.set_version_flag("--version", "dsmoe 0.1.0");
  int rc = 0;

  // make-model
  dsmoe::cli::MakeModelOptions mk;
  auto* make =
      app.add_subcommand("make-model", "Write a random-weight checkpoint in Hugging Face format");
  make->add_option("--preset", mk.preset, "Shape preset")
      ->check(CLI::IsMember({"tiny", "gshard", "small", "medium"}))
      ->capture_default_str();
  make->add_option("--dtype", mk.dtype, "Weight dtype on disk")
      ->check(CLI::IsMember({"f32", "bf16", "f16"}))
      ->capture_default_str();
  make->add_option("--seed", mk.seed, "Random seed")->capture_default_str();
  make->add_option("--out", mk.out, "Output directory")->required();
  make->add_option("--shards", mk.shards, "Number of safetensors shards")
      ->check(CLI::Range(1, 9999))
      ->capture_default_str();
  AddOptional(make, "--layers", mk.layers, "Override num_hidden_layers");
  AddOptional(make, "--hidden", mk.hidden, "Override hidden_size");
  AddOptional(make, "--heads", mk.heads, "Override num_attention_heads");
  AddOptional(make, "--kv-heads", mk.kv_heads,
              "Override num_key_value_heads (GQA < heads, MQA = 1)");
  AddOptional(make, "--routed-experts", mk.routed_experts, "Override n_routed_experts");
  AddOptional(make, "--shared-experts", mk.shared_experts, "Override n_shared_experts (0: none)");
  AddOptional(make, "--top-k", mk.top_k, "Override num_experts_per_tok");
  AddOptional(make, "--expert-width", mk.moe_intermediate, "Override moe_intermediate_size");
  AddOptional(make, "--intermediate", mk.intermediate, "Override intermediate_size (dense layers)");
  AddOptional(make, "--vocab", mk.vocab, "Override vocab_size");
  AddOptional(make, "--first-dense", mk.first_dense, "Override first_k_dense_replace");
  AddOptional(make, "--moe-layer-freq", mk.moe_layer_freq, "Override moe_layer_freq");
  AddOptional(make, "--max-position", mk.max_position, "Override max_position_embeddings");
  AddOptional(make, "--norm-topk-prob", mk.norm_topk_prob, "Set norm_topk_prob (true|false)");
  make->add_option("--router-bias-experts", mk.router_bias_experts,
                   "Routed experts the router favours in every MoE layer, comma-separated "
                   "(their gate rows are scaled by --router-bias): a skewed load");
  make->add_option("--router-bias", mk.router_bias, "Scale of the favoured experts' gate rows")
      ->check(CLI::Range(1e-3, 1e3))
      ->capture_default_str();
  AddOptional(make, "--tie-embeddings", mk.tie_embeddings, "Set tie_word_embeddings (true|false)");
  AddOptional(make, "--attention-bias", mk.attention_bias, "Set attention_bias (true|false)");
  make->add_option("--tokenizer", mk.tokenizer,
                   "Copy this tokenizer.json (+ tokenizer_config.json beside it) and size the "
                   "vocabulary to it")
      ->check(CLI::ExistingFile);
  AddOptional(make, "--rope-linear-factor", mk.rope_linear_factor,
              "Use linear RoPE scaling with this factor");
  make->callback([&] { rc = dsmoe::cli::RunMakeModel(mk); });

  // quantize
  dsmoe::cli::QuantizeOptions qz;
  auto* quantize = app.add_subcommand(
      "quantize", "Write an 8-bit (Q8_0) copy of a checkpoint: half the bytes of BF16");
  quantize->add_option("--model", qz.model, "Checkpoint directory to read")
      ->required()
      ->check(CLI::ExistingDirectory);
  quantize->add_option("--out", qz.out, "Output directory")->required();
  quantize->callback([&] { rc = dsmoe::cli::RunQuantize(qz); });

  // logits
  dsmoe::cli::LogitsOptions lg;
  auto* logits =
      app.add_subcommand("logits", "Write float32 logits of every position as .npy [T, vocab]");
  AddModelInput(logits, lg.input, /*allow_prompt=*/false);
  logits->add_option("--out", lg.out, "Output .npy file")->required();
  logits->callback([&] { rc = dsmoe::cli::RunLogits(lg); });

  // generate
  dsmoe::cli::GenerateOptions gen;
  auto* generate = app.add_subcommand("generate", "Generate tokens (greedy at temperature 0)");
  AddModelInput(generate, gen.input, /*allow_prompt=*/true);
  generate->add_option("--max-tokens", gen.max_tokens, "Tokens to generate at most")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20))
      ->capture_default_str();
  generate->add_option("--temperature", gen.temperature, "Sampling temperature (0: greedy)")
      ->check(CLI::Range(0.0, 1e6))
      ->capture_default_str();
  generate->add_option("--top-k", gen.top_k, "Keep the k most likely tokens (0: all)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  generate->add_option("--top-p", gen.top_p, "Nucleus sampling mass in (0, 1]")
      ->check(CLI::Range(1e-9, 1.0))
      ->capture_default_str();
  generate->add_option("--seed", gen.seed, "Sampling seed")->capture_default_str();
  generate->add_option("--stop-ids", gen.stop_ids, "Extra stop token ids, comma-separated");
  generate->add_flag("--ignore-eos", gen.ignore_eos, "Do not stop at the model's eos token");
  generate->add_flag("--json", gen.json,
                     "Print {\"ids\", \"text\", \"finish_reason\", \"usage\"} as JSON");
  generate->callback([&] { rc = dsmoe::cli::RunGenerate(gen); });

  // route
  dsmoe::cli::RouteOptions rt;
  auto* route = app.add_subcommand(
      "route", "Show the routed experts and weights chosen per MoE layer and position");
  AddModelInput(route, rt.input, /*allow_prompt=*/false);
  route->add_flag("--json", rt.json,
                  "Print {\"layers\": [{\"layer\", \"positions\": [{\"experts\", \"weights\"}]}]}");
  route->callback([&] { rc = dsmoe::cli::RunRoute(rt); });

  // info
  dsmoe::cli::InfoOptions inf;
  auto* info =
      app.add_subcommand("info", "Describe a checkpoint: shape, experts, parameter counts");
  info->add_option("--model", inf.model, "Checkpoint directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  info->add_flag("--json", inf.json, "Print as one JSON object");
  info->callback([&] { rc = dsmoe::cli::RunInfo(inf); });

  // tokenize / detokenize
  dsmoe::cli::TokenizeOptions tk;
  auto* tokenize = app.add_subcommand("tokenize", "Encode text with a Hugging Face tokenizer.json");
  tokenize
      ->add_option("--tokenizer", tk.tokenizer_path,
                   "tokenizer.json (tokenizer_config.json beside it is read too)")
      ->required()
      ->check(CLI::ExistingFile);
  auto* tk_text = tokenize->add_option_function<std::string>(
      "--text", [&](const std::string& v) { tk.text = v; }, "Text to encode");
  auto* tk_file =
      tokenize
          ->add_option_function<std::string>(
              "--file", [&](const std::string& v) { tk.file = v; }, "UTF-8 file to encode")
          ->check(CLI::ExistingFile);
  tk_text->excludes(tk_file);
  tokenize->add_flag("--jsonl", tk.jsonl, "With --file: one JSON array of ids per input line");
  bool no_special = false;
  tokenize->add_flag("--no-special-tokens", no_special,
                     "Do not add BOS/EOS as the tokenizer would");
  tokenize->callback([&] {
    tk.add_special_tokens = !no_special;
    rc = dsmoe::cli::RunTokenize(tk);
  });
  dsmoe::cli::DetokenizeOptions dt;
  auto* detokenize =
      app.add_subcommand("detokenize", "Decode token ids with a Hugging Face tokenizer.json");
  detokenize->add_option("--tokenizer", dt.tokenizer_path, "tokenizer.json")
      ->required()
      ->check(CLI::ExistingFile);
  detokenize->add_option("--ids", dt.ids, "Token ids, comma-separated")->required();
  detokenize->add_flag("--skip-special-tokens", dt.skip_special_tokens,
                       "Leave special tokens out of the text");
  detokenize->callback([&] { rc = dsmoe::cli::RunDetokenize(dt); });

  // cluster up / down
  auto* cluster = app.add_subcommand(
      "cluster", "Run a local dsmoe cluster (gateway, attention and expert servers)");
  cluster->require_subcommand(1);
  dsmoe::cli::ClusterUpOptions up;
  auto* cluster_up =
      cluster->add_subcommand("up", "Start the processes on 127.0.0.1 and wait until all serve");
  cluster_up->add_option("--model", up.model, "Checkpoint directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  cluster_up->add_option("--attention-servers", up.attention_servers, "Attention servers")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  cluster_up->add_option("--expert-servers", up.expert_servers, "Expert servers")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  cluster_up->add_option("--replicas", up.replicas, "Copies of each routed expert")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  cluster_up->add_option("--placement", up.placement, "Placement JSON (default: round-robin)")
      ->check(CLI::ExistingFile);
  cluster_up->add_option("--gateway-port", up.gateway_port, "Gateway port (default: any free one)")
      ->check(CLI::Range(0, 65535));
  cluster_up
      ->add_option("--threads", up.threads,
                   "Compute threads per server (default: all cores; the servers take turns)")
      ->check(CLI::Range(1, 1024));
  cluster_up->add_option("--num-slots", up.num_slots, "Sequences per attention server")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  cluster_up
      ->add_option("--dispatch-deadline-ms", up.dispatch_deadline_ms,
                   "Deadline of each attention → expert server call")
      ->check(CLI::Range(1, 3600000))
      ->capture_default_str();
  cluster_up
      ->add_option("--rebalance-period", up.rebalance_period,
                   "Attention servers rebalance the expert placement on their own, looking "
                   "this often (seconds; needs one attention server)")
      ->check(CLI::Range(0.001, 86400.0));
  cluster_up
      ->add_option("--rebalance-threshold", up.rebalance_threshold,
                   "... when a layer's per-server load imbalance exceeds this (default 1.15)")
      ->check(CLI::Range(1.0, 1000.0));
  cluster_up
      ->add_option("--load-window-seconds", up.load_window_seconds,
                   "Window of the routing load the planner and imbalance gauges use (default 60)")
      ->check(CLI::Range(1.0, 86400.0));
  cluster_up
      ->add_option("--health-check-period-ms", up.health_check_period_ms,
                   "Interval of the health checks (attention → expert servers, gateway → "
                   "attention servers)")
      ->check(CLI::Range(10, 3600000))
      ->capture_default_str();
  cluster_up
      ->add_option("--health-check-timeout-ms", up.health_check_timeout_ms,
                   "Deadline of one health check")
      ->check(CLI::Range(10, 3600000))
      ->capture_default_str();
  cluster_up
      ->add_option("--device", up.device,
                   "Where every attention and expert server computes: cpu, cuda or cuda:N")
      ->capture_default_str();
  cluster_up
      ->add_option("--expert-transport", up.expert_transport,
                   "Attention → expert server tensors: grpc, or nccl (GPU to GPU; gRPC where a "
                   "channel cannot open)")
      ->check(CLI::IsMember({"grpc", "nccl"}))
      ->capture_default_str();
  cluster_up->add_option("--state-dir", up.state_dir,
                         "Where pids, ports and logs go (default: .dsmoe-cluster)");
  cluster_up->add_flag("--insecure", up.insecure,
                       "Plain text between all processes, no TLS (a warning is logged)");
  cluster_up->add_flag("--no-auth", up.no_auth, "The gateway takes calls without an API key");
  cluster_up->add_flag("--gateway-require-client-cert", up.gateway_require_client_cert,
                       "The gateway also requires a client certificate (tls/client.pem)");
  cluster_up->add_flag("--json", up.json, "Print one JSON object naming every process");
  cluster_up->callback([&] { rc = dsmoe::cli::RunClusterUp(up); });
  dsmoe::cli::ClusterDownOptions down;
  auto* cluster_down = cluster->add_subcommand("down", "Stop the cluster started by `cluster up`");
  cluster_down->add_option("--state-dir", down.state_dir,
                           "As given to cluster up (default: .dsmoe-cluster)");
  cluster_down->callback([&] { rc = dsmoe::cli::RunClusterDown(down); });

  // placement show | plan | apply
  dsmoe::cli::PlacementOptions pl;
  auto* placement = app.add_subcommand(
      "placement", "Show, plan or change the expert placement of a running cluster");
  placement->require_subcommand(1);
  for (const auto& [name, help] :
       {std::pair{"show", "The placement in use, per-layer load and per-server imbalance"},
        std::pair{"plan", "Plan a placement from the measured load (changes nothing)"},
        std::pair{"apply", "Switch to a planned (or given) placement without stopping"}}) {
    auto* sub = placement->add_subcommand(name, help);
    sub->add_option("--attention", pl.attention,
                    "Attention server addresses, comma-separated (default: the cluster in "
                    "--state-dir)");
    sub->add_option("--state-dir", pl.state_dir,
                    "As given to cluster up: attention servers, CA and client certificate "
                    "(default: .dsmoe-cluster)");
    sub->add_option("--ca", pl.tls.ca, "PEM CA that signed the servers' certificates")
        ->check(CLI::ExistingFile);
    sub->add_option("--cert", pl.tls.cert, "PEM client certificate")->check(CLI::ExistingFile);
    sub->add_option("--key", pl.tls.key, "PEM key of --cert")->check(CLI::ExistingFile);
    sub->add_flag("--insecure", pl.tls.insecure, "Plain text, no TLS");
    sub->add_option("--timeout", pl.timeout_seconds, "Deadline of each call in seconds")
        ->check(CLI::PositiveNumber);
    sub->add_flag("--json", pl.json, "Print JSON");
    if (std::string(name) == "plan")
      sub->add_option("--out", pl.out, "Write the planned placement JSON here");
    if (std::string(name) == "apply") {
      sub->add_option("--placement", pl.placement,
                      "Placement JSON to switch to (default: plan from the measured load)")
          ->check(CLI::ExistingFile);
    }
    sub->callback([&pl, &rc, name = std::string(name)] {
      pl.action = name;
      rc = dsmoe::cli::RunPlacement(pl);
    });
  }

  // client generate
  auto* client = app.add_subcommand("client", "Call a dsmoe gateway");
  client->require_subcommand(1);
  dsmoe::cli::ClientGenerateOptions cg;
  auto* client_gen = client->add_subcommand("generate", "Stream a completion from the gateway");
  client_gen->add_option("--gateway", cg.gateway,
                         "Gateway address host:port (default: the cluster state's)");
  client_gen->add_option("--state-dir", cg.state_dir,
                         "State dir of `cluster up`: gateway, CA, client certificate and API key "
                         "(default: .dsmoe-cluster when --gateway is not given)");
  client_gen->add_option("--ca", cg.ca, "PEM CA that signed the gateway's certificate")
      ->check(CLI::ExistingFile);
  client_gen->add_option("--cert", cg.cert, "PEM client certificate (if the gateway asks)")
      ->check(CLI::ExistingFile);
  client_gen->add_option("--key", cg.key, "PEM key of --cert")->check(CLI::ExistingFile);
  client_gen->add_option("--tls-server-name", cg.server_name,
                         "Name expected in the gateway's certificate (default: its host)");
  client_gen->add_option("--api-key", cg.api_key,
                         "API key (visible to other local users in ps: prefer --api-key-file "
                         "or $DSMOE_API_KEY)");
  client_gen->add_option("--api-key-file", cg.api_key_file, "File holding the API key")
      ->check(CLI::ExistingFile);
  client_gen->add_flag("--insecure", cg.insecure, "Plain text, no TLS");
  auto* cg_ids = client_gen->add_option("--ids", cg.ids, "Prompt token ids, comma-separated");
  auto* cg_prompt =
      client_gen->add_option("--prompt", cg.prompt, "Prompt text (the gateway tokenizes)");
  cg_ids->excludes(cg_prompt);
  client_gen->add_option("--max-tokens", cg.max_tokens, "Tokens to generate at most")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 24))
      ->capture_default_str();
  client_gen->add_option("--temperature", cg.temperature, "Sampling temperature (0: greedy)")
      ->check(CLI::Range(0.0, 1e6))
      ->capture_default_str();
  client_gen->add_option("--top-k", cg.top_k, "Keep the k most likely tokens (0: all)")
      ->check(CLI::NonNegativeNumber);
  client_gen->add_option("--top-p", cg.top_p, "Nucleus sampling mass in (0, 1]")
      ->check(CLI::Range(1e-9, 1.0));
  client_gen->add_option("--seed", cg.seed, "Sampling seed");
  client_gen->add_option("--stop-ids", cg.stop_ids, "Extra stop token ids, comma-separated");
  client_gen->add_flag("--ignore-eos", cg.ignore_eos, "Do not stop at the model's eos token");
  client_gen->add_option("--timeout", cg.timeout_seconds, "Deadline in seconds")
      ->check(CLI::PositiveNumber);
  client_gen->add_flag("--json", cg.json,
                       "Print {\"ids\", \"text\", \"finish_reason\", \"usage\"} as JSON");
  client_gen->callback([&] {
    if (cg.ids.empty() && cg.prompt.empty())
      throw CLI::ValidationError("one of --ids or --prompt is required");
    rc = dsmoe::cli::RunClientGenerate(cg);
  });

  CLI11_PARSE(app, argc, argv);
  if (app.get_subcommands().empty()) {
    std::fprintf(
        stderr,
        "dsmoe: error: a subcommand is required (make-model, quantize, info, logits, "
        "generate, route, tokenize, detokenize, cluster, placement, client); see dsmoe --help\n");
    return 2;
  }
  return rc;
}
