#include "attention-server/attention_server.h"

#include <algorithm>
#include <filesystem>

#include "attention-server/batch_runner_factory.h"
#include "core/model/memory_plan.h"
#include "core/util/memory_limit.h"
#include "expert-server/client/nccl_transport.h"
#include "router/device_limit.h"

namespace dsmoe {

namespace {

constexpr char kLogName[] = "dsmoe-attention-server";

absl::Status Validate(const AttentionServerOptions& o) {
  if (o.model_dir.empty()) return absl::InvalidArgumentError("model_dir is required");
  if (o.num_replicas < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_replicas is ", o.num_replicas, ", not >= 1"));
  }
  if (o.micro_batches < 1 || o.micro_batches > 16) {
    return absl::InvalidArgumentError(
        absl::StrCat("micro_batches is ", o.micro_batches, ", not in [1, 16]"));
  }
  if (o.dispatch_deadline.count() <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("dispatch_deadline is ", o.dispatch_deadline.count(), " ms, not > 0"));
  }
  const SchedulerOptions& s = o.scheduler;
  if (s.num_slots < 1 || s.max_batch_tokens < 1 || s.max_context < 0 || s.max_waiting < 0) {
    return absl::InvalidArgumentError(absl::StrCat("scheduler: num_slots (", s.num_slots,
                                                   ") and max_batch_tokens (", s.max_batch_tokens,
                                                   ") must be >= 1, max_context (", s.max_context,
                                                   ") and max_waiting (", s.max_waiting, ") >= 0"));
  }
  if (o.device.is_cuda() && s.kv_dtype == KvDType::kF32) {
    return absl::InvalidArgumentError(
        "KV dtype f32 is for the CPU runner: the GPU runner's KV cache is bf16 (--kv-dtype auto "
        "or bf16 with --device cuda)");
  }
  if (o.threads < 0) {
    return absl::InvalidArgumentError(absl::StrCat("threads is ", o.threads, ", not >= 0"));
  }
  if (!(o.load_window_seconds > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("load_window_seconds is ", o.load_window_seconds, ", not > 0"));
  }
  if (o.expert_transport == AttentionServerOptions::ExpertTransport::kNccl &&
      o.expert_servers.empty()) {
    return absl::InvalidArgumentError(
        "expert_transport is nccl, but there are no expert servers to reach");
  }
  if (o.device_limited_routing.has_value()) {
    const int m = *o.device_limited_routing, n = static_cast<int>(o.expert_servers.size());
    if (n == 0) {
      return absl::InvalidArgumentError(
          "device_limited_routing limits the expert servers a token's experts span, but there "
          "are no expert servers");
    }
    if (m < 1 || m > n) {
      return absl::InvalidArgumentError(absl::StrCat("device_limited_routing is ", m,
                                                     ": must be 1 to ", n,
                                                     " (the number of expert servers)"));
    }
    if (o.device.is_cuda()) DSMOE_RETURN_IF_ERROR(CheckGpuGateSupportsDeviceLimit(m));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<AttentionServer>> AttentionServer::Create(
    AttentionServerOptions options) {
  DSMOE_RETURN_IF_ERROR(Validate(options));
  std::unique_ptr<AttentionServer> server(new AttentionServer(std::move(options)));
  DSMOE_RETURN_IF_ERROR(server->Start());
  return server;
}

absl::Status AttentionServer::CheckMemory() {
  // The GPU runner's KV cache and activations live in device memory (its own plan, not this).
  if (options_.device.is_cuda()) return absl::OkStatus();
  BatchLimits limits = scheduler_options_;
  limits.num_slots += 1;  // the scratch slot of ComputeLogits, as CreateBatchRunner adds
  DSMOE_ASSIGN_OR_RETURN(
      const MemoryPlan plan,
      PlanMemory(weights_->config(), limits, static_cast<int64_t>(weights_->MatrixBytes()),
                 options_.expert_servers.empty(), thread_pool_->num_threads()));
  int64_t limit = options_.memory_limit;
  std::string source = "--memory-limit";
  if (limit == 0) {
    limit = CgroupMemoryLimit();
    source = "the cgroup's memory limit";
  }
  options_.logger->Log(LogLevel::kInfo,
                       absl::StrCat(kLogName, ": memory plan: ", plan.Describe(), "; limit ",
                                    limit > 0 ? FormatBytes(limit) + " (" + source + ")" : "none"));
  auto& family = metrics_->Gauge("dsmoe_memory_plan_bytes",
                                 "The start-up memory plan, by part (weights, kv_cache, "
                                 "activations, runtime), and the limit it was checked against");
  family.Add({{"part", "weights"}}).Set(static_cast<double>(plan.weight_bytes));
  family.Add({{"part", "kv_cache"}}).Set(static_cast<double>(plan.kv_bytes()));
  family.Add({{"part", "activations"}}).Set(static_cast<double>(plan.activation_bytes));
  family.Add({{"part", "runtime"}}).Set(static_cast<double>(plan.runtime_bytes));
  family.Add({{"part", "limit"}}).Set(static_cast<double>(limit));
  metrics_->Gauge("dsmoe_kv_cache_tokens", "Tokens the KV cache's pages hold in all")
      .Add({})
      .Set(static_cast<double>(plan.kv_tokens()));
  metrics_
      ->Gauge("dsmoe_kv_cache_bytes_per_token",
              "Bytes one cached position takes (keys and values of every layer), by the "
              "cache's element type")
      .Add({{"dtype", KvDTypeName(plan.kv_dtype)}})
      .Set(static_cast<double>(plan.kv_page_bytes / std::max<int64_t>(plan.kv_page_tokens, 1)));
  return CheckMemoryPlan(plan, limit, source);
}

absl::Status AttentionServer::Start() {
  DSMOE_ASSIGN_OR_RETURN(security_, rpc::TransportSecurity::Load(options_.tls));
  WeightSelection selection;
  selection.all_routed_experts = options_.expert_servers.empty();  // remote experts: none here
  DSMOE_ASSIGN_OR_RETURN(weights_, ModelWeights::Load(options_.model_dir, selection));
  const ModelConfig& config = weights_->config();
  // The KV cache's element type, concrete from here on: planned, built and described alike (as
  // ModelRunner::Create would resolve it; the GPU runner stores bf16).
  scheduler_options_ = options_.scheduler;
  if (scheduler_options_.kv_dtype == KvDType::kAuto) {
    scheduler_options_.kv_dtype =
        options_.device.is_cuda() ? KvDType::kBF16 : ResolveKvDType(KvDType::kAuto, *weights_);
  }
  // Registered before anything runs, so every series exists from the first scrape.
  metrics_ = std::make_unique<rpc::MetricsRegistry>(options_.serving.ModelName(options_.model_dir));
  attention_metrics_ = std::make_unique<AttentionMetrics>(
      *metrics_, config, ExpertLoadOptions{options_.load_window_seconds, 6});
  if (!options_.expert_servers.empty()) DSMOE_RETURN_IF_ERROR(ConnectExpertServers(config));

  thread_pool_ = std::make_unique<ThreadPool>(options_.threads);
  DSMOE_RETURN_IF_ERROR(CheckMemory());
  DSMOE_ASSIGN_OR_RETURN(std::unique_ptr<BatchRunner> runner,
                         CreateBatchRunner(options_.device, *weights_, *thread_pool_,
                                           scheduler_options_, dispatcher_.get()));
  if (options_.device_limited_routing.has_value()) {
    model_runner_ = dynamic_cast<ModelRunner*>(runner.get());  // the CPU runner (Validate)
    if (model_runner_ == nullptr) return CheckGpuGateSupportsDeviceLimit(1);
    DSMOE_RETURN_IF_ERROR(SetDeviceLimit(*dispatcher_->placement()));
  }
  DSMOE_ASSIGN_OR_RETURN(scheduler_, Scheduler::Create(std::move(runner), scheduler_options_,
                                                       attention_metrics_.get()));
  if (dispatcher_ != nullptr) {
    RebalancerOptions rebalance = options_.rebalance;
    rebalance.logger = options_.logger;
    rebalance.state_file = options_.placement_state_file;
    if (model_runner_ != nullptr) {  // the limit follows the servers of the placement in use
      rebalance.on_switch = [this](const router::Placement& p) {
        if (absl::Status s = SetDeviceLimit(p); !s.ok()) {
          (void)model_runner_->set_device_limited_routing(nullptr);
          options_.logger->Log(
              LogLevel::kError,
              absl::StrCat(kLogName, ": device-limited routing is off: ", s.message()));
        }
      };
    }
    if (rebalance.planner.num_replicas < 0) {
      rebalance.planner.num_replicas = expert_pool_->num_servers();
    }
    if (rebalance.planner.min_copies <= 0) {
      rebalance.planner.min_copies = dispatcher_->placement()->CopiesRange().first;
    }
    if (rebalance.planner.min_copies > expert_pool_->num_servers()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--min-copies ", rebalance.planner.min_copies, " exceeds the ",
                       expert_pool_->num_servers(),
                       " expert servers (copies of one expert sit on different "
                       "servers)"));
    }
    rebalancer_ = std::make_unique<Rebalancer>(config, *scheduler_, *dispatcher_,
                                               attention_metrics_->expert_load().window(),
                                               metrics_.get(), rebalance);
  }
  placement_service_ =
      std::make_unique<PlacementService>(rebalancer_.get(), config, options_.load_window_seconds);
  attention_service_ = std::make_unique<AttentionService>(
      *scheduler_, weights_->generation_config(), expert_pool_.get());
  return StartServing();
}

absl::Status AttentionServer::ConnectExpertServers(const ModelConfig& config) {
  const int num_servers = static_cast<int>(options_.expert_servers.size());
  const bool kept = !options_.placement_state_file.empty() &&
                    std::filesystem::exists(options_.placement_state_file);
  DSMOE_ASSIGN_OR_RETURN(router::Placement placement,
                         router::Placement::LoadOrCompute(
                             kept ? options_.placement_state_file : options_.placement_file, config,
                             num_servers, options_.num_replicas));
  if (kept) {
    options_.logger->Log(
        LogLevel::kInfo,
        absl::StrCat(kLogName, ": placement version ", placement.version(), " from ",
                     options_.placement_state_file, " (the one in use before the restart)"));
  }
  if (placement.num_servers() != num_servers) {
    return absl::InvalidArgumentError(absl::StrCat("the placement names ", placement.num_servers(),
                                                   " expert servers but ", num_servers,
                                                   " were given"));
  }
  // An expert server counts only once it answers health checks and holds what the placement
  // says; the checks start with serving (this server may start before its expert servers).
  ExpertServerPoolOptions pool_options;
  pool_options.security = security_;
  pool_options.health_checks = options_.expert_health;
  pool_options.health_checks->log_prefix = kLogName;
  pool_options.health_checks->target_kind = "expert server";
  pool_options.logger = options_.logger;
  expert_pool_ = std::make_unique<ExpertServerPool>(options_.expert_servers, pool_options);
  ExpertDispatcherOptions dispatch;
  dispatch.deadline = options_.dispatch_deadline;
  dispatch.metrics = metrics_.get();
  dispatch.logger = options_.logger;
  dispatch.lanes = options_.micro_batches;
  if (options_.expert_transport == AttentionServerOptions::ExpertTransport::kNccl) {
    absl::StatusOr<std::unique_ptr<DispatchSideChannel>> links =
        OpenNcclTransport(options_.device, *expert_pool_, config.hidden_size,
                          options_.scheduler.max_batch_tokens, options_.logger);
    if (links.ok()) {
      nccl_links_ = std::move(*links);
      dispatch.side_channel = nccl_links_.get();
    } else {  // not an error: every call then carries its tensors itself
      options_.logger->Log(LogLevel::kWarning,
                           absl::StrCat(kLogName, ": --expert-transport nccl: ",
                                        links.status().message(), "; using gRPC"));
    }
  }
  dispatcher_ = std::make_unique<ExpertDispatcher>(config, placement, *expert_pool_, dispatch);
  return absl::OkStatus();
}

absl::Status AttentionServer::SetDeviceLimit(const router::Placement& placement) {
  DSMOE_ASSIGN_OR_RETURN(
      DeviceLimitedRouting routing,
      router::DeviceLimitedRoutingFor(placement, *options_.device_limited_routing));
  return model_runner_->set_device_limited_routing(
      std::make_shared<const DeviceLimitedRouting>(std::move(routing)));
}

absl::Status AttentionServer::StartServing() {
  rpc::ServerOptions server_options;
  server_options.security = security_;
  server_options.health_address = options_.health_listen;
  server_options.logger = options_.logger;
  // No ready file yet: it is written once ready (Readiness).
  DSMOE_RETURN_IF_ERROR(options_.serving.Apply(*metrics_, &server_options));
  metrics_port_ = server_options.metrics_port;
  DSMOE_ASSIGN_OR_RETURN(running_, rpc::StartServer(server_options, {attention_service_.get(),
                                                                     placement_service_.get()}));
  // Ready means "can serve": every routed expert reachable on some live expert server.
  readiness_ = std::make_unique<rpc::Readiness>(
      running_.server.get(), internal::v1::AttentionService::service_full_name(),
      options_.serving.ready_file,
      rpc::ReadyPorts{running_.port, metrics_port_, running_.health_port}, kLogName,
      options_.logger);
  if (expert_pool_ == nullptr) {
    readiness_->Set(true);
    return absl::OkStatus();
  }
  expert_servers_out_ = std::make_unique<rpc::OutOfServiceGauges>(*metrics_, "expert_server");
  experts_without_live_copy_ =
      &metrics_
           ->Gauge("dsmoe_routed_experts_without_live_copy",
                   "Routed (layer, expert) pairs that no available expert server holds: requests "
                   "that need one fail until a server holding it is back")
           .Add({});
  expert_pool_->StartHealthChecks([this](int s) { return dispatcher_->VerifyServer(s); },
                                  [this](int, rpc::TargetHealth) { OnExpertServerHealth(); });
  OnExpertServerHealth();  // servers down from the start never change: count them now
  return absl::OkStatus();
}

void AttentionServer::OnExpertServerHealth() {
  const auto [num_missing, missing] = MissingExperts();
  readiness_->Set(num_missing == 0, missing);
  experts_without_live_copy_->Set(static_cast<double>(num_missing));
  if (expert_pool_->health_checker() != nullptr) {
    expert_servers_out_->Update(*expert_pool_->health_checker());
  }
}

std::pair<int64_t, std::string> AttentionServer::MissingExperts() const {
  const ModelConfig& config = weights_->config();
  const std::shared_ptr<const router::Placement> placement = dispatcher_->placement();
  int64_t num_missing = 0;
  std::string first;
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
    if (!config.IsMoeLayer(layer)) continue;
    for (int64_t e = 0; e < config.n_routed_experts; ++e) {
      bool held = false;
      for (int s : placement->Holders(layer, e)) held = held || expert_pool_->available(s);
      if (held) continue;
      if (num_missing++ < 8) {
        absl::StrAppend(&first, first.empty() ? "" : ", ", "(", layer, ", ", e, ")");
      }
    }
  }
  if (num_missing == 0) return {0, ""};
  return {num_missing, absl::StrCat("no serving expert server holds ", num_missing,
                                    " routed experts ", first, num_missing > 8 ? ", ..." : "")};
}

AttentionServer::~AttentionServer() { Shutdown(); }

std::string AttentionServer::Describe() const {
  return absl::StrCat(
      "on ", address(), " (", options_.device.ToString(), "; ", security_.Describe(), "; ",
      options_.expert_servers.size(), " expert servers",
      dispatcher_ != nullptr ? absl::StrCat(" (", dispatcher_->lanes(), " micro-batches per step)")
                             : "",
      options_.device_limited_routing.has_value()
          ? absl::StrCat(", device-limited routing to ", *options_.device_limited_routing)
          : "",
      ", ", options_.scheduler.num_slots, " slots, ", KvDTypeName(scheduler_options_.kv_dtype),
      " KV cache), metrics on port ", metrics_port_);
}

void AttentionServer::Wait() { shutdown_.Wait(); }

void AttentionServer::Shutdown() {
  shutdown_.Shutdown([this] {
    // The checks' callbacks publish readiness on the server: they stop before it does.
    if (expert_pool_ != nullptr) expert_pool_->StopHealthChecks();
    if (running_.server != nullptr) {
      running_.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    }
    if (metrics_ != nullptr) metrics_->StopServing();  // before the instruments it reads go away
  });
}

}  // namespace dsmoe
