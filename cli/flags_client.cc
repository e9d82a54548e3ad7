// Flags of `dsmoe client generate`.
#include <memory>

#include "cli/client_command.h"
#include "cli/flags.h"

namespace dsmoe::cli {
namespace {

// Where the gateway is and how to reach it: TLS, client certificate, API key.
void AddGatewayConnectionFlags(CLI::App* cmd, ClientGenerateOptions& cg) {
  cmd->add_option("--gateway", cg.gateway,
                  "Gateway address host:port (default: the cluster state's)");
  cmd->add_option("--state-dir", cg.state_dir,
                  "State dir of `cluster up`: gateway, CA, client certificate and API key "
                  "(default: .dsmoe-cluster when --gateway is not given)");
  cmd->add_option("--ca", cg.ca, "PEM CA that signed the gateway's certificate")
      ->check(CLI::ExistingFile);
  cmd->add_option("--cert", cg.cert, "PEM client certificate (if the gateway asks)")
      ->check(CLI::ExistingFile);
  cmd->add_option("--key", cg.key, "PEM key of --cert")->check(CLI::ExistingFile);
  cmd->add_option("--tls-server-name", cg.server_name,
                  "Name expected in the gateway's certificate (default: its host)");
  cmd->add_option("--api-key", cg.api_key,
                  "API key (visible to other local users in ps: prefer --api-key-file "
                  "or $DSMOE_API_KEY)");
  cmd->add_option("--api-key-file", cg.api_key_file, "File holding the API key")
      ->check(CLI::ExistingFile);
  cmd->add_flag("--insecure", cg.insecure, "Plain text, no TLS");
  cmd->add_option("--timeout", cg.timeout_seconds, "Deadline in seconds")
      ->check(CLI::Range(1e-3, kMaxTimeoutSeconds))
      ->capture_default_str();
}

}  // namespace

void AddClientCommands(CLI::App& app, int* rc) {
  auto* client = app.add_subcommand("client", "Call a dsmoe gateway");
  client->require_subcommand(1);
  auto cg = std::make_shared<ClientGenerateOptions>();
  auto* generate = client->add_subcommand("generate", "Stream a completion from the gateway");
  AddGatewayConnectionFlags(generate, *cg);
  auto* ids = generate->add_option("--ids", cg->ids, "Prompt token ids, comma-separated");
  auto* prompt =
      generate->add_option("--prompt", cg->prompt, "Prompt text (the gateway tokenizes)");
  ids->excludes(prompt);
  AddSamplingFlags(generate, cg->sampling);
  generate->add_option("--stop", cg->stop,
                       "Stop when the text contains this string (not included; repeat for more)");
  generate
      ->add_option("--prompt-logprobs", cg->prompt_logprobs,
                   "With --json: each prompt token's log-probability (from the second on: what "
                   "the model gives it after the tokens before it) and this many alternatives")
      ->check(CLI::Range(0, 20));
  generate->add_flag("--json", cg->json,
                     "Print {\"ids\", \"text\", \"finish_reason\", \"usage\"} as JSON (on a "
                     "failure: {\"ids\", \"text\", \"error\"}, what was delivered before it)");
  generate->callback([cg, rc] {
    if (cg->ids.empty() && cg->prompt.empty())
      throw CLI::ValidationError("one of --ids or --prompt is required");
    *rc = RunClientGenerate(*cg);
  });
}

}  // namespace dsmoe::cli
