// dsmoe: one binary, one subcommand per job. The flags are declared in cli/flags_*.cc, the work
// is done by the Run* functions of the command library.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "cli/flags.h"

int main(int argc, char** argv) {
  CLI::App app{
      "dsmoe: serve DeepSeekMoE models (fine-grained + shared experts) on CPU and clusters"};
  // No require_subcommand(): CLI11 would then report a missing subcommand before naming an
  // unknown word like `dsmoe frobnicate`; we check for a subcommand after parsing instead.
  app.set_version_flag("--version", "dsmoe 0.1.0");
  int rc = 0;
  dsmoe::cli::AddModelCommands(app, &rc);
  dsmoe::cli::AddClusterCommands(app, &rc);
  dsmoe::cli::AddClientCommands(app, &rc);

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
