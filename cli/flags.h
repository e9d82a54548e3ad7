// Command-line flags of the `dsmoe` tool (CLI11). Each Add*Commands declares one group of
// subcommands on `app` and the flags that fill their options structs; the structs live as long
// as `app` (its callbacks own them), and the chosen subcommand's exit code is stored in *rc.
// The work itself is in the Run* functions of the *_command.h / commands.h headers.
#pragma once

#include <CLI/CLI.hpp>
#include <optional>
#include <string>

#include "cli/commands.h"
#include "cli/sampling_options.h"

namespace dsmoe::cli {

// make-model, quantize, logits, generate, route, info, tokenize, detokenize: offline tools on a
// checkpoint or tokenizer (cli/flags_model.cc).
void AddModelCommands(CLI::App& app, int* rc);
// cluster up|down, placement show|plan|apply: a local cluster and its expert placement
// (cli/flags_cluster.cc).
void AddClusterCommands(CLI::App& app, int* rc);
// client generate: a gateway's public API (cli/flags_client.cc).
void AddClientCommands(CLI::App& app, int* rc);

// The longest --timeout a client command takes: a deadline a million seconds (11.6 days) away
// is "no deadline" for any call, and a larger one overflows gRPC's clock (1e13 s failed at once
// with DEADLINE_EXCEEDED).
inline constexpr double kMaxTimeoutSeconds = 1e6;

// Flag groups more than one subcommand shares (cli/flags_common.cc).
// --model, --ids or --prompt (with the checkpoint's tokenizer), --threads, --mmap-weights,
// --kv-dtype.
void AddModelInputFlags(CLI::App* cmd, ModelInputOptions& in);
// Accepts what ParseKvDType does (auto, f32, bf16); its message otherwise.
CLI::Validator KvDTypeValidator();
// --max-tokens, --temperature, --top-k, --top-p, --seed, --stop-ids, --ignore-eos.
void AddSamplingFlags(CLI::App* cmd, SamplingOptions& sampling);

// An optional option: unset unless the flag is given (e.g. a shape override of a preset).
template <class T>
void AddOptional(CLI::App* cmd, const std::string& name, std::optional<T>& target,
                 const std::string& help) {
  cmd->add_option_function<T>(
      name, [&target](const T& v) { target = v; }, help);
}

}  // namespace dsmoe::cli
