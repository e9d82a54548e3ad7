#include "cli/flags.h"
#include "core/model/forward_batch.h"

namespace dsmoe::cli {

CLI::Validator KvDTypeValidator() {
  return CLI::Validator(
      [](std::string& name) {
        absl::StatusOr<KvDType> t = ParseKvDType(name);
        return t.ok() ? std::string() : std::string(t.status().message());
      },
      "auto|f32|bf16");
}

void AddModelInputFlags(CLI::App* cmd, ModelInputOptions& in) {
  cmd->add_option("--model", in.model, "Checkpoint directory (Hugging Face format)")
      ->required()
      ->check(CLI::ExistingDirectory);
  auto* ids = cmd->add_option("--ids", in.ids, "Prompt token ids, comma-separated (e.g. 1,2,3)");
  auto* prompt = cmd->add_option("--prompt", in.prompt,
                                 "Prompt text, encoded with the checkpoint's tokenizer.json");
  ids->excludes(prompt);
  cmd->add_option("--threads", in.threads, "Compute threads (default: all cores)")
      ->check(CLI::Range(1, 1024));
  auto* mmap = cmd->add_flag("--mmap-weights", in.mmap_weights,
                             "Serve weights from the checkpoint's file mapping (the page cache: "
                             "held once, 2 MiB pages where the kernel allows) instead of choosing "
                             "per start");
  auto* copy =
      cmd->add_flag("--copy-weights", in.copy_weights,
                    "Copy weights into anonymous huge pages instead of choosing per start");
  mmap->excludes(copy);
  cmd->add_option("--kv-dtype", in.kv_dtype,
                  "KV cache element type: bf16 (half the bytes, fp32 arithmetic), f32, or auto "
                  "(f32 for an F32 checkpoint, bf16 otherwise)")
      ->check(KvDTypeValidator())
      ->capture_default_str();
}

void AddSamplingFlags(CLI::App* cmd, SamplingOptions& sampling) {
  cmd->add_option("--max-tokens", sampling.max_tokens, "Tokens to generate at most")
      ->check(CLI::Range(int64_t{1}, SamplingOptions::kMaxTokensLimit))
      ->capture_default_str();
  cmd->add_option("--temperature", sampling.temperature, "Sampling temperature (0: greedy)")
      ->check(CLI::Range(0.0, 1e6))
      ->capture_default_str();
  cmd->add_option("--top-k", sampling.top_k, "Keep the k most likely tokens (0: all)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->add_option("--top-p", sampling.top_p, "Nucleus sampling mass in (0, 1]")
      ->check(CLI::Range(1e-9, 1.0))
      ->capture_default_str();
  cmd->add_option("--seed", sampling.seed, "Sampling seed")->capture_default_str();
  cmd->add_option("--stop-ids", sampling.stop_ids, "Extra stop token ids, comma-separated");
  cmd->add_flag("--ignore-eos", sampling.ignore_eos, "Do not stop at the model's eos token");
  cmd->add_option("--logprobs", sampling.logprobs,
                  "With --json: each token's log-probability (of the raw logits, before "
                  "temperature and top-k/top-p) and this many most likely alternatives")
      ->check(CLI::Range(0, 20));
}

}  // namespace dsmoe::cli
