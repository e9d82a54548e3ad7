// dsmoe-attention-server: attention, KV cache, dense layers, shared experts and the LM head of a
// DeepSeekMoE model, with continuous batching; routed experts on expert servers (or local).
// Flags -> Options -> AttentionServer::Create -> wait for SIGTERM/SIGINT -> Shutdown.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "attention-server/attention_server.h"
#include "core/rpc/health_flags.h"
#include "core/rpc/security_flags.h"
#include "core/rpc/server.h"
#include "core/rpc/serving_flags.h"
#include "core/util/memory_limit.h"

namespace {

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "dsmoe-attention-server: error: %s\n", std::string(s.message()).c_str());
  return 1;
}

// The flags of how routed experts are reached: --expert-servers, --placement, --replicas,
// --dispatch-deadline-ms, --expert-transport.
void AddExpertFlags(CLI::App& app, dsmoe::AttentionServerOptions* o, std::string* expert_servers,
                    int* deadline_ms, std::string* transport) {
  app.add_option("--expert-servers", *expert_servers,
                 "Comma-separated expert server addresses, in placement order (none: routed "
                 "experts run here)");
  app.add_option("--placement", o->placement_file,
                 "Placement JSON (default: round-robin over the expert servers)")
      ->check(CLI::ExistingFile);
  app.add_option("--replicas", o->num_replicas, "Copies of each expert in the computed placement")
      ->check(CLI::Range(1, 4096));
  app.add_option("--placement-state", o->placement_state_file,
                 "Keep the placement in use here: written after each change, read at start when "
                 "it exists (instead of --placement), so a restart does not fall back");
  app.add_option("--dispatch-deadline-ms", *deadline_ms,
                 "Deadline of each expert-server call (a slower server is taken out)")
      ->check(CLI::Range(1, 3600000))
      ->capture_default_str();
  app.add_option("--device-limited-routing", o->device_limited_routing,
                 "Each token's routed experts only from the M expert servers whose best expert "
                 "scores highest (DeepSeek-V2's device-limited routing; 1 to the number of expert "
                 "servers; off by default: a model not trained with it routes differently)");
  app.add_option("--expert-transport", *transport,
                 "How hidden states reach the expert servers: grpc, or nccl (GPU to GPU, with "
                 "--device cuda and expert servers on GPUs; gRPC where a channel cannot open)")
      ->check(CLI::IsMember({"grpc", "nccl"}))
      ->capture_default_str();
  app.add_option("--micro-batches", o->micro_batches,
                 "Split each forward pass in this many micro-batches that overlap one's expert "
                 "dispatch with the next's attention (1: no overlap; one with --expert-transport "
                 "nccl)")
      ->check(CLI::Range(1, 16))
      ->capture_default_str();
}

// The scheduler's flags: --num-slots, --max-batch-tokens, --max-context, --max-waiting,
// --kv-page-tokens, --enable-prefix-caching.
void AddSchedulerFlags(CLI::App& app, dsmoe::SchedulerOptions* s) {
  app.add_option("--num-slots", s->num_slots, "Sequences running at once")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app.add_option("--max-batch-tokens", s->max_batch_tokens, "Tokens per forward pass")
      ->check(CLI::Range(1, 65536))
      ->capture_default_str();
  app.add_option("--max-context", s->max_context, "Context per sequence (default: the model's)")
      ->check(CLI::Range(1, 1 << 24));
  app.add_option("--max-waiting", s->max_waiting, "Queued sequences at most")
      ->check(CLI::Range(0, 1 << 20))
      ->capture_default_str();
  app.add_option("--kv-page-tokens", s->kv_page_tokens,
                 "Positions per KV-cache page (a power of two)")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app.add_flag("--enable-prefix-caching,!--no-enable-prefix-caching", s->enable_prefix_caching,
               "Reuse the KV-cache pages of cached prompt prefixes (default on)");
}

// A byte size flag ("16Gi", "512M", "1073741824") into *bytes.
void AddByteSizeOption(CLI::App& app, const std::string& name, int64_t* bytes,
                       const std::string& help) {
  app.add_option_function<std::string>(
      name,
      [bytes, name](const std::string& text) {
        absl::StatusOr<int64_t> v = dsmoe::ParseByteSize(text);
        if (!v.ok()) throw CLI::ValidationError(name, std::string(v.status().message()));
        *bytes = *v;
      },
      help);
}

// The load window and rebalancing flags.
void AddRebalanceFlags(CLI::App& app, dsmoe::AttentionServerOptions* o) {
  app.add_option("--load-window-seconds", o->load_window_seconds,
                 "Routing load is measured over this recent window (imbalance gauge, planner)")
      ->check(CLI::Range(1.0, 86400.0))
      ->capture_default_str();
  app.add_option("--rebalance-period", o->rebalance.period_seconds,
                 "Automatic rebalancing: look at the load this often, in seconds (0: off; "
                 "`dsmoe placement apply` works either way)")
      ->check(CLI::Range(0.0, 86400.0))
      ->capture_default_str();
  app.add_option("--rebalance-threshold", o->rebalance.threshold,
                 "Automatic rebalancing when some MoE layer's per-server load imbalance (max / "
                 "mean over expert servers) exceeds this")
      ->check(CLI::Range(1.0, 1000.0))
      ->capture_default_str();
  app.add_option("--rebalance-replicas", o->rebalance.planner.num_replicas,
                 "Replica budget of the planner: physical experts per MoE layer beyond "
                 "--min-copies per routed expert (default: one per expert server)")
      ->check(CLI::Range(0, 1 << 20));
  app.add_option("--min-copies", o->rebalance.planner.min_copies,
                 "Copies every routed expert keeps through every placement change, each on a "
                 "different expert server (default: as many as the start-up placement gives "
                 "each)")
      ->check(CLI::Range(1, 4096));
  app.add_option("--rebalance-slots", o->rebalance.planner.slots_per_server,
                 "Physical experts an expert server may hold per MoE layer (0: just enough)")
      ->check(CLI::Range(0, 1 << 20))
      ->capture_default_str();
}

}  // namespace

int main(int argc, char** argv) {
  dsmoe::rpc::BlockShutdownSignals();
  CLI::App app{
      "dsmoe-attention-server: the attention side of a DeepSeekMoE model, with continuous "
      "batching"};
  dsmoe::AttentionServerOptions options;
  std::string expert_servers, device_name = "cpu", transport = "grpc";
  int deadline_ms = static_cast<int>(options.dispatch_deadline.count());
  // Mutual TLS by default: only the gateway calls it.
  dsmoe::rpc::AddSecurityFlags(app, &options.tls, &options.health_listen);
  app.add_option("--model", options.model_dir, "Checkpoint directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  AddExpertFlags(app, &options, &expert_servers, &deadline_ms, &transport);
  dsmoe::rpc::HealthCheckFlags health_flags(app, "expert servers");
  AddSchedulerFlags(app, &options.scheduler);
  AddByteSizeOption(app, "--kv-cache-memory", &options.scheduler.kv_cache_bytes,
                    "Bytes the KV cache's pages may take (e.g. 16Gi); sequences hold only the "
                    "pages they reach (default: enough for every slot to reach the context)");
  app.add_option_function<std::string>(
      "--kv-dtype",
      [&options](const std::string& text) {
        absl::StatusOr<dsmoe::KvDType> t = dsmoe::ParseKvDType(text);
        if (!t.ok()) throw CLI::ValidationError("--kv-dtype", std::string(t.status().message()));
        options.scheduler.kv_dtype = *t;
      },
      "KV cache element type: auto (default: f32 for an F32 checkpoint, bf16 for BF16, F16 "
      "and Q8_0 ones), f32, or bf16 (half the bytes per token; fp32 arithmetic)");
  AddByteSizeOption(app, "--memory-limit", &options.memory_limit,
                    "Refuse to start when the memory plan (weights + KV cache + activations) "
                    "exceeds this (e.g. 32Gi; default: the container's cgroup limit)");
  app.add_option("--device", device_name, "Where the forward pass runs: cpu, cuda or cuda:N")
      ->capture_default_str();
  app.add_option("--threads", options.threads, "Compute threads (default: all cores)")
      ->check(CLI::Range(1, 1024));
  dsmoe::rpc::AddServingFlags(app, &options.serving);
  AddRebalanceFlags(app, &options);
  CLI11_PARSE(app, argc, argv);

  const absl::StatusOr<dsmoe::Device> device = dsmoe::ParseDevice(device_name);
  if (!device.ok()) return Fail(device.status());
  options.device = *device;
  options.expert_servers = dsmoe::rpc::SplitAddresses(expert_servers);
  options.dispatch_deadline = std::chrono::milliseconds(deadline_ms);
  options.expert_transport = transport == "nccl"
                                 ? dsmoe::AttentionServerOptions::ExpertTransport::kNccl
                                 : dsmoe::AttentionServerOptions::ExpertTransport::kGrpc;
  options.expert_health = health_flags.Options("dsmoe-attention-server", "expert server");
  absl::StatusOr<std::unique_ptr<dsmoe::AttentionServer>> server =
      dsmoe::AttentionServer::Create(std::move(options));
  if (!server.ok()) return Fail(server.status());
  std::printf("dsmoe-attention-server serving %s\n", (*server)->Describe().c_str());
  std::fflush(stdout);
  const int sig = dsmoe::rpc::WaitForShutdownSignal();
  std::printf("dsmoe-attention-server: signal %d, shutting down\n", sig);
  (*server)->Shutdown();
  return 0;
}
