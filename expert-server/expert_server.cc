#include "expert-server/expert_server.h"

#include <chrono>

#include "router/placement.h"

namespace dsmoe {

namespace {

absl::Status Validate(const ExpertServerOptions& o) {
  if (o.model_dir.empty()) return absl::InvalidArgumentError("model_dir is required");
  if (o.num_servers < 1) {
    return absl::InvalidArgumentError(absl::StrCat("num_servers is ", o.num_servers, ", not >= 1"));
  }
  if (o.num_replicas < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_replicas is ", o.num_replicas, ", not >= 1"));
  }
  if (o.server_index < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("server_index is ", o.server_index, ", not >= 0"));
  }
  if (o.store.threads < 0 || o.store.max_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("store.threads (", o.store.threads,
                                                   ") must be >= 0 and store.max_tokens (",
                                                   o.store.max_tokens, ") >= 1"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<ExpertServer>> ExpertServer::Create(ExpertServerOptions options) {
  DSMOE_RETURN_IF_ERROR(Validate(options));
  std::unique_ptr<ExpertServer> server(new ExpertServer(std::move(options)));
  DSMOE_RETURN_IF_ERROR(server->Start());
  return server;
}

absl::Status ExpertServer::Start() {
  DSMOE_ASSIGN_OR_RETURN(security_, rpc::TransportSecurity::Load(options_.tls));
  // The placement needs the config; the config comes from the checkpoint.
  DSMOE_ASSIGN_OR_RETURN(auto config_only,
                         ModelWeights::Load(options_.model_dir, WeightSelection::RoutedExperts()));
  DSMOE_ASSIGN_OR_RETURN(
      const router::Placement placement,
      router::Placement::LoadOrCompute(options_.placement_file, config_only->config(),
                                       options_.num_servers, options_.num_replicas));
  if (options_.server_index >= placement.num_servers()) {
    return absl::InvalidArgumentError(absl::StrCat("server index ", options_.server_index,
                                                   " but the placement has ",
                                                   placement.num_servers(), " servers"));
  }
  ExpertStoreOptions store_options = options_.store;
  store_options.model_dir = options_.model_dir;  // SetPlacement loads more experts from here
  DSMOE_ASSIGN_OR_RETURN(
      std::unique_ptr<ExpertStore> store,
      OpenExpertStore(store_options, placement.SelectionFor(options_.server_index)));
  metrics_ = std::make_unique<rpc::MetricsRegistry>(
      options_.serving.ModelName(options_.model_dir),
      prometheus::Labels{{"expert_server", std::to_string(options_.server_index)}});
  ExpertServiceOptions service_options;
  service_options.metrics = metrics_.get();
  service_options.logger = options_.logger;
  service_ = std::make_unique<ExpertService>(std::move(store), service_options);
  if (!options_.data_listen.empty()) {
    DataPlaneServerOptions data_options;
    data_options.listen = options_.data_listen;
    data_options.logger = options_.logger;
    DSMOE_ASSIGN_OR_RETURN(data_plane_, DataPlaneServer::Start(*service_, security_, data_options));
    service_->set_data_port(data_plane_->port());  // before GetExperts can be asked
  }

  rpc::ServerOptions server_options;
  server_options.security = security_;
  server_options.health_address = options_.health_listen;
  server_options.logger = options_.logger;
  server_options.ready_file = options_.serving.ready_file;  // ready as soon as it serves
  DSMOE_RETURN_IF_ERROR(options_.serving.Apply(*metrics_, &server_options));
  metrics_port_ = server_options.metrics_port;
  DSMOE_ASSIGN_OR_RETURN(running_, rpc::StartServer(server_options, {service_.get()}));
  // The service's own name answers liveness probes; "" (ready) is SERVING from the start.
  running_.server->GetHealthCheckService()->SetServingStatus(
      internal::v1::ExpertService::service_full_name(), true);
  return absl::OkStatus();
}

ExpertServer::~ExpertServer() { Shutdown(); }

std::string ExpertServer::Describe() const {
  return absl::StrCat("serving ", num_experts_held(), " routed experts on ", address(), " (",
                      options_.store.device.ToString(), ", ", security_.Describe(),
                      "), data plane on port ", data_port(), ", metrics on port ", metrics_port_);
}

void ExpertServer::Wait() { shutdown_.Wait(); }

void ExpertServer::Shutdown() {
  shutdown_.Shutdown([this] {
    // The data plane first: its clients fail over (to replicas, or to gRPC) at once.
    if (data_plane_ != nullptr) data_plane_->Shutdown();
    if (running_.server != nullptr) {
      running_.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    }
    if (metrics_ != nullptr) metrics_->StopServing();
  });
}

}  // namespace dsmoe
