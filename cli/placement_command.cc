#include "cli/placement_command.h"

#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "absl/strings/str_split.h"
#include "cli/cluster_state.h"
#include "core/io/mapped_file.h"
#include "core/rpc/server.h"
#include "dsmoe/internal/v1/placement.grpc.pb.h"

namespace dsmoe::cli {

namespace {

namespace v1 = dsmoe::internal::v1;

// The attention servers to call: --attention, or those of the cluster state.
absl::StatusOr<std::vector<std::string>> Addresses(const PlacementOptions& o,
                                                   const nlohmann::json& state) {
  if (!o.attention.empty()) {
    return std::vector<std::string>(absl::StrSplit(o.attention, ',', absl::SkipEmpty()));
  }
  std::vector<std::string> out;
  if (state.is_object() && state.contains("processes")) {
    for (const auto& p : state["processes"]) {
      if (p.value("role", "") == "attention-server") out.push_back(p.value("address", ""));
    }
  }
  if (out.empty()) {
    return absl::NotFoundError(
        "no --attention given and the cluster state names no attention "
        "server");
  }
  return out;
}

absl::Status FromGrpc(const grpc::Status& s, const std::string& address) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat("attention server ", address, ": ", s.error_message()));
}

std::string ToJson(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, options);
  return out;
}

class Client {
 public:
  Client(const std::string& address, const rpc::TransportSecurity& security, double timeout)
      : address_(address),
        timeout_(timeout),
        stub_(v1::PlacementService::NewStub(rpc::MakeChannel(address, security))) {}

  template <class Req, class Resp, class Method>
  absl::Status Call(Method method, const Req& req, Resp* resp) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::milliseconds(static_cast<int64_t>(timeout_ * 1000)));
    const grpc::Status s = ((*stub_).*method)(&ctx, req, resp);
    return s.ok() ? absl::OkStatus() : FromGrpc(s, address_);
  }
  const std::string& address() const { return address_; }

 private:
  std::string address_;
  double timeout_;
  std::unique_ptr<v1::PlacementService::Stub> stub_;
};

std::string Fixed(double x, int digits = 3) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.*f", digits, x);
  return buf;
}

void PrintImbalances(const google::protobuf::RepeatedField<uint32_t>& layers,
                     const google::protobuf::RepeatedField<double>& before,
                     const google::protobuf::RepeatedField<double>& after) {
  for (int i = 0; i < layers.size() && i < before.size() && i < after.size(); ++i) {
    std::cout << "  layer " << layers[i] << ": per-server imbalance " << Fixed(before[i]) << " -> "
              << Fixed(after[i]) << "\n";
  }
}

absl::Status Show(std::vector<Client>& clients, bool json) {
  nlohmann::json all = nlohmann::json::array();
  for (Client& c : clients) {
    v1::PlacementReport r;
    DSMOE_RETURN_IF_ERROR(
        c.Call(&v1::PlacementService::Stub::GetPlacement, v1::GetPlacementRequest(), &r));
    if (json) {
      nlohmann::json j = nlohmann::json::parse(ToJson(r));
      j["address"] = c.address();
      all.push_back(j);
      continue;
    }
    std::cout << "attention server " << c.address() << ": placement version " << r.version()
              << (r.automatic() ? " (automatic rebalancing)" : "") << ", load of the last "
              << r.window_seconds() << " s\n";
    for (const auto& l : r.layers()) {
      std::cout << "  layer " << l.layer() << ": per-server imbalance " << Fixed(l.imbalance())
                << ", server loads";
      for (double x : l.server_load()) std::cout << " " << static_cast<int64_t>(x);
      std::cout << "\n";
    }
    const auto& s = r.status();
    std::cout << "  rebalances: " << s.succeeded() << " succeeded, " << s.failed() << " failed";
    if (s.succeeded() > 0)
      std::cout << "; the last took " << Fixed(s.last_duration_seconds()) << " s";
    if (!s.last_error().empty()) std::cout << "; last error: " << s.last_error();
    std::cout << "\n";
  }
  if (json) std::cout << all.dump() << "\n";
  return absl::OkStatus();
}

absl::Status Plan(Client& c, const PlacementOptions& o, v1::PlacementPlan* plan) {
  DSMOE_RETURN_IF_ERROR(
      c.Call(&v1::PlacementService::Stub::PlanPlacement, v1::PlanPlacementRequest(), plan));
  if (!o.out.empty()) {
    std::ofstream f(o.out);
    f << plan->placement_json();
    if (!f) return absl::PermissionDeniedError(absl::StrCat(o.out, ": cannot write"));
  }
  return absl::OkStatus();
}

absl::Status Apply(std::vector<Client>& clients, const PlacementOptions& o) {
  std::string placement;
  if (!o.placement.empty()) {
    DSMOE_ASSIGN_OR_RETURN(placement, ReadTextFile(o.placement, 64 << 20));
  } else if (clients.size() > 1) {
    // One plan for all: every attention server must switch to the same placement.
    v1::PlacementPlan plan;
    DSMOE_RETURN_IF_ERROR(Plan(clients[0], o, &plan));
    placement = plan.placement_json();
  }
  // Several attention servers: each switches keeping the old experts loaded, and only when all
  // have switched does the last call drop them.
  nlohmann::json all = nlohmann::json::array();
  const bool several = clients.size() > 1;
  for (size_t i = 0; i <= clients.size(); ++i) {
    if (i == clients.size() && !several) break;
    Client& c = clients[i == clients.size() ? 0 : i];
    v1::ApplyPlacementRequest req;
    req.set_placement_json(placement);
    req.set_keep_old_experts(several && i < clients.size());
    req.set_force(o.force);
    v1::ApplyPlacementResponse r;
    DSMOE_RETURN_IF_ERROR(c.Call(&v1::PlacementService::Stub::ApplyPlacement, req, &r));
    if (o.json) {
      nlohmann::json j = nlohmann::json::parse(ToJson(r));
      j["address"] = c.address();
      all.push_back(j);
      continue;
    }
    std::cout << "attention server " << c.address() << ": placement version " << r.version()
              << (r.switched() ? " in use" : " was already in use") << " after "
              << Fixed(r.duration_seconds()) << " s (loading " << Fixed(r.load_seconds())
              << " s, switch " << Fixed(r.switch_seconds(), 4) << " s; " << r.experts_loaded()
              << " experts loaded, " << r.experts_dropped() << " dropped)\n";
    if (r.switched()) PrintImbalances(r.layers(), r.imbalance_before(), r.imbalance_after());
  }
  if (o.json) std::cout << all.dump() << "\n";
  return absl::OkStatus();
}

}  // namespace

int RunPlacement(const PlacementOptions& o) {
  auto fail = [](const absl::Status& s) {
    std::cerr << "dsmoe: error: " << s.message() << "\n";
    return 1;
  };
  // The cluster state gives the addresses (unless --attention) and the client certificate.
  nlohmann::json state;
  if (o.attention.empty() || !o.state_dir.empty()) {
    auto read = ReadClusterState(o.state_dir);
    if (!read.ok()) return fail(read.status());
    state = std::move(*read);
  }
  auto addresses = Addresses(o, state);
  if (!addresses.ok()) return fail(addresses.status());
  auto security = ClientSecurity(state, o.tls);
  if (!security.ok()) return fail(security.status());
  std::vector<Client> clients;
  for (const std::string& a : *addresses) clients.emplace_back(a, *security, o.timeout_seconds);
  absl::Status status;
  if (o.action == "show") {
    status = Show(clients, o.json);
  } else if (o.action == "plan") {
    v1::PlacementPlan plan;
    status = Plan(clients[0], o, &plan);
    if (status.ok() && o.json) {
      std::cout << ToJson(plan) << "\n";
    } else if (status.ok()) {
      std::cout << "placement version " << plan.version() << " (" << plan.experts_to_load()
                << " experts to load)" << (o.out.empty() ? "" : ", written to " + o.out) << "\n"
                << "copies per routed expert: " << plan.min_copies() << " to " << plan.max_copies()
                << " (floor " << plan.copies_floor() << ")\n";
      PrintImbalances(plan.layers(), plan.imbalance_before(), plan.imbalance_after());
    }
  } else if (o.action == "apply") {
    status = Apply(clients, o);
  } else {
    status = absl::InvalidArgumentError(absl::StrCat("unknown action '", o.action, "'"));
  }
  return status.ok() ? 0 : fail(status);
}

}  // namespace dsmoe::cli
