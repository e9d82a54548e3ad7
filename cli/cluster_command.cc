#include "cli/cluster_command.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "cli/cluster_certs.h"
#include "cli/process.h"
#include "core/io/mapped_file.h"
#include "core/model/weights.h"
#include "core/rpc/server.h"
#include "core/util/cpu_quota.h"
#include "router/placement.h"

namespace dsmoe::cli {

namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

constexpr char kStateFile[] = "cluster.json";
constexpr auto kStartTimeout = std::chrono::seconds(120);

std::string DefaultStateDir(const std::string& dir) { return dir.empty() ? ".dsmoe-cluster" : dir; }

// The directory holding this executable: the servers are built beside it.
fs::path BinaryDir() {
  std::error_code ec;
  return fs::read_symlink("/proc/self/exe", ec).parent_path();
}

struct Process {
  std::string role;
  int index = 0;
  pid_t pid = -1;
  std::string address;
  std::string log;
  std::string ready_file;
  int metrics_port = 0;   // 0: none reported
  int health_port = 0;    // its plain-text health port (--health-listen); 0: none reported
  int http_port = 0;      // the gateway's HTTP API; 0: none
  std::vector<int> cpus;  // where it may run: its --cpus set, or every CPU this command may use
  int threads = 0;        // its --threads (0: the gateway, which has no compute pool)
};

// Waits until every process has written its ready file (rpc::ReadyPorts: its gRPC, metrics and
// health ports); fails fast if one exits.
absl::Status WaitReady(std::vector<Process>& procs) {
  const auto deadline = std::chrono::steady_clock::now() + kStartTimeout;
  for (Process& p : procs) {
    for (;;) {
      if (fs::exists(p.ready_file)) {
        auto text = ReadTextFile(p.ready_file, 64);
        if (text.ok() && !text->empty()) {
          // Written atomically: a file that is there is whole.
          absl::StatusOr<rpc::ReadyPorts> ports = rpc::ParseReadyFile(*text);
          if (!ports.ok()) {
            return absl::InternalError(absl::StrCat(p.role, " ", p.index, ": ", p.ready_file, ": ",
                                                    ports.status().message()));
          }
          p.address = absl::StrCat("127.0.0.1:", ports->port);
          p.metrics_port = ports->metrics_port;
          p.health_port = ports->health_port;
          p.http_port = ports->http_port;
          break;
        }
      }
      int status = 0;
      if (waitpid(p.pid, &status, WNOHANG) == p.pid) {
        return absl::InternalError(absl::StrCat(p.role, " ", p.index,
                                                " exited while starting; its log ", p.log,
                                                " ends with:\n", Tail(p.log)));
      }
      if (std::chrono::steady_clock::now() > deadline) {
        return absl::DeadlineExceededError(absl::StrCat(p.role, " ", p.index,
                                                        " did not start within ",
                                                        kStartTimeout.count(), " s; see ", p.log));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  return absl::OkStatus();
}

// Whether `pid` still runs (a zombie, dead but not yet reaped by its new parent, does not).
bool Alive(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return false;
  const size_t close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && line[close + 2] != 'Z';
}

void StopAll(const std::vector<Process>& procs) {
  for (auto it = procs.rbegin(); it != procs.rend(); ++it) {
    if (it->pid > 0) kill(it->pid, SIGTERM);
  }
  for (const Process& p : procs) {
    if (p.pid > 0) waitpid(p.pid, nullptr, 0);
  }
}

std::string Join(const std::vector<Process>& procs, const std::string& role) {
  std::string out;
  for (const Process& p : procs) {
    if (p.role == role) out += (out.empty() ? "" : ",") + p.address;
  }
  return out;
}

// The --cpus roles and the process roles they pin.
constexpr std::pair<const char*, const char*> kCpuRoles[] = {
    {"gateway", "gateway"}, {"attention", "attention-server"}, {"experts", "expert-server"}};

// --cpus: process role ("expert-server", ...) -> the CPUs it is pinned to. Items are separated
// by ';' or ','; an item with '=' starts a role ("experts=2-3"), one without continues the
// previous role's CPU list ("attention=0,1" is CPUs 0 and 1), so both "attention=0,experts=1"
// and "attention=0-1,4;experts=2" read as meant. Every CPU must be one this command may run on
// (`allowed`), so that a pin the kernel would refuse is refused here, before anything starts.
absl::StatusOr<std::map<std::string, std::vector<int>>> ParseCpuPinning(
    const std::string& spec, const std::vector<int>& allowed) {
  std::map<std::string, std::vector<int>> pinned;
  if (spec.empty()) return pinned;
  auto role_of = [](absl::string_view name) -> const char* {
    for (const auto& [flag_role, process_role] : kCpuRoles) {
      if (name == flag_role) return process_role;
    }
    return nullptr;
  };
  std::vector<std::pair<std::string, std::string>> lists;  // (flag role, its CPU list)
  for (absl::string_view item : absl::StrSplit(spec, absl::ByAnyChar(",;"))) {
    item = absl::StripAsciiWhitespace(item);
    const size_t eq = item.find('=');
    if (eq == absl::string_view::npos) {
      if (lists.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--cpus '", spec, "': '", item,
            "' comes before any role; write role=CPUs (roles: gateway, attention, experts)"));
      }
      absl::StrAppend(&lists.back().second, lists.back().second.empty() ? "" : ",", item);
      continue;
    }
    const std::string role(absl::StripAsciiWhitespace(item.substr(0, eq)));
    if (role_of(role) == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("--cpus '", spec, "': unknown role '", role,
                                                     "' (roles: gateway, attention, experts)"));
    }
    for (const auto& [seen, unused] : lists) {
      if (seen == role) {
        return absl::InvalidArgumentError(
            absl::StrCat("--cpus '", spec, "': role '", role, "' is given twice"));
      }
    }
    lists.emplace_back(role, std::string(absl::StripAsciiWhitespace(item.substr(eq + 1))));
  }
  for (const auto& [role, list] : lists) {
    if (list.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--cpus '", spec, "': ", role, "= names no CPUs"));
    }
    auto cpus = ParseCpuList(list);
    if (!cpus.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--cpus '", spec, "', ", role, ": ", cpus.status().message()));
    }
    for (int c : *cpus) {
      if (!std::binary_search(allowed.begin(), allowed.end(), c)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--cpus '", spec, "', ", role, ": CPU ", c,
                         " is not on this machine or not one this command may use (CPUs ",
                         FormatCpuList(allowed), ")"));
      }
    }
    pinned[role_of(role)] = *std::move(cpus);
  }
  return pinned;
}

// Makes the state directory, refusing one that already holds a running cluster's state.
absl::StatusOr<fs::path> PrepareStateDir(const ClusterUpOptions& o) {
  const fs::path dir = fs::absolute(DefaultStateDir(o.state_dir));
  if (fs::exists(dir / kStateFile)) {
    // Name the state dir the way it was given, so the command to run is the one to copy.
    const std::string down = o.state_dir.empty()
                                 ? "dsmoe cluster down"
                                 : absl::StrCat("dsmoe cluster down --state-dir ", o.state_dir);
    return absl::AlreadyExistsError(absl::StrCat("a cluster is already up with state dir ",
                                                 dir.string(), " (", kStateFile, " there); run `",
                                                 down, "` first, or pick another --state-dir"));
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat(dir.string(), ": ", ec.message()));
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().extension() == ".port") fs::remove(entry.path(), ec);
  }
  return dir;
}

// The placement file every server reads: the given one, or one computed here once so that they
// all agree.
absl::StatusOr<std::string> PlacementFile(const ClusterUpOptions& o, const fs::path& dir) {
  if (!o.placement.empty()) return o.placement;
  DSMOE_ASSIGN_OR_RETURN(auto weights,
                         ModelWeights::Load(o.model, WeightSelection::RoutedExperts()));
  DSMOE_ASSIGN_OR_RETURN(auto placement,
                         router::Placement::Compute(weights->config(), o.expert_servers, o.replicas,
                                                    router::Placement::Strategy::kRoundRobin));
  const std::string path = (dir / "placement.json").string();
  std::ofstream(path) << placement.ToJson();
  return path;
}

// Starts the cluster's processes with the flags they all share, and remembers them so that a
// failure part-way stops the ones already started.
class Launcher {
 public:
  Launcher(fs::path dir, std::vector<std::string> shared_flags,
           std::map<std::string, std::vector<int>> pinned, int threads)
      : dir_(std::move(dir)),
        shared_flags_(std::move(shared_flags)),
        pinned_(std::move(pinned)),
        threads_(threads) {}

  // The compute threads of a server of `role`: --threads if given, else one per CPU it may use
  // (its pinned set, or every CPU this command may use), bounded by the cgroup quota as the
  // server itself would bound them (core/util/cpu_quota.h).
  int Threads(const std::string& role) const {
    if (threads_ > 0) return threads_;
    auto it = pinned_.find(role);
    return it == pinned_.end() ? UsableCpus()
                               : CpusWithinQuota(static_cast<int>(it->second.size()));
  }

  absl::Status Start(const std::string& role, int index, std::vector<std::string> argv) {
    Process p;
    p.role = role;
    p.index = index;
    auto pin = pinned_.find(role);
    p.cpus = pin != pinned_.end() ? pin->second : AllowedCpus();
    p.threads = role == "gateway" ? 0 : Threads(role);  // what its argv says (no pool there)
    p.log = (dir_ / absl::StrCat(role, "-", index, ".log")).string();
    p.ready_file = (dir_ / absl::StrCat(role, "-", index, ".port")).string();
    argv.insert(argv.end(), {"--ready-file", p.ready_file});
    // Every server exports Prometheus metrics on a port of its own, loopback only.
    argv.insert(argv.end(), {"--metrics-listen", "127.0.0.1:0"});
    // ... and plain-text health checks on another (what a Kubernetes probe reaches; here for
    // scripts and load balancers that have no client certificate), recorded in cluster.json.
    argv.insert(argv.end(), {"--health-listen", "127.0.0.1:0"});
    argv.insert(argv.end(), shared_flags_.begin(), shared_flags_.end());
    DSMOE_ASSIGN_OR_RETURN(
        p.pid, Spawn(argv, p.log, pin != pinned_.end() ? pin->second : std::vector<int>{}));
    procs_.push_back(p);
    return absl::OkStatus();
  }
  absl::Status WaitReady() { return cli::WaitReady(procs_); }
  // Passes `s` on after stopping every process started so far.
  absl::Status Fail(absl::Status s) {
    StopAll(procs_);
    return s;
  }
  const std::vector<Process>& processes() const { return procs_; }

 private:
  const fs::path dir_;
  const std::vector<std::string> shared_flags_;           // TLS
  const std::map<std::string, std::vector<int>> pinned_;  // process role -> CPUs (--cpus)
  const int threads_;                                     // --threads; 0: per CPUs
  std::vector<Process> procs_;
};

std::vector<std::string> HealthFlags(const ClusterUpOptions& o) {
  return {"--health-check-period-ms", std::to_string(o.health_check_period_ms),
          "--health-check-timeout-ms", std::to_string(o.health_check_timeout_ms)};
}

std::vector<std::string> AttentionServerFlags(const ClusterUpOptions& o, const fs::path& bin,
                                              const std::string& model,
                                              const std::string& placement,
                                              const std::string& placement_state,
                                              const std::string& experts, int threads) {
  std::vector<std::string> argv = {(bin / "dsmoe-attention-server").string(),
                                   "--model",
                                   model,
                                   "--expert-servers",
                                   experts,
                                   "--placement",
                                   placement,
                                   "--threads",
                                   std::to_string(threads),
                                   "--num-slots",
                                   std::to_string(o.num_slots),
                                   "--dispatch-deadline-ms",
                                   std::to_string(o.dispatch_deadline_ms),
                                   "--device",
                                   o.device,
                                   "--expert-transport",
                                   o.expert_transport};
  for (const std::string& f : HealthFlags(o)) argv.push_back(f);
  if (o.device_limited_routing.has_value()) {
    argv.insert(argv.end(),
                {"--device-limited-routing", std::to_string(*o.device_limited_routing)});
  }
  if (o.min_copies > 0) argv.insert(argv.end(), {"--min-copies", std::to_string(o.min_copies)});
  if (o.micro_batches > 0) {
    argv.insert(argv.end(), {"--micro-batches", std::to_string(o.micro_batches)});
  }
  if (!o.kv_cache_memory.empty()) argv.insert(argv.end(), {"--kv-cache-memory", o.kv_cache_memory});
  if (!o.memory_limit.empty()) argv.insert(argv.end(), {"--memory-limit", o.memory_limit});
  if (!o.enable_prefix_caching) argv.push_back("--no-enable-prefix-caching");
  if (!o.kv_dtype.empty()) argv.insert(argv.end(), {"--kv-dtype", o.kv_dtype});
  // A restarted attention server resumes the placement in use, not the start-up one.
  argv.insert(argv.end(), {"--placement-state", placement_state});
  for (const auto& [flag, value] : {std::pair{"--rebalance-period", o.rebalance_period},
                                    std::pair{"--rebalance-threshold", o.rebalance_threshold},
                                    std::pair{"--load-window-seconds", o.load_window_seconds}}) {
    if (value > 0) argv.insert(argv.end(), {flag, absl::StrCat(value)});
  }
  return argv;
}

std::vector<std::string> GatewayFlags(const ClusterUpOptions& o, const fs::path& bin,
                                      const std::string& model, const std::string& attention,
                                      const ClusterCredentials& credentials) {
  std::vector<std::string> argv = {(bin / "dsmoe-gateway").string(), "--model", model,
                                   "--attention-servers", attention, "--listen",
                                   absl::StrCat("127.0.0.1:", o.gateway_port),
                                   // The OpenAI-compatible HTTP API, on a free port.
                                   "--http-listen", "127.0.0.1:0"};
  if (o.no_auth) {
    argv.push_back("--no-auth");
  } else {
    argv.insert(argv.end(), {"--api-keys", credentials.api_key_hashes_file});
  }
  if (!o.insecure) {
    argv.insert(argv.end(),
                {"--tls-client-auth", o.gateway_require_client_cert ? "require" : "none"});
  }
  for (const std::string& f : HealthFlags(o)) argv.push_back(f);
  return argv;
}

// What `cluster.json` records: the processes, and what a client needs (`dsmoe client generate
// --state-dir` reads it from here).
Json DescribeCluster(const ClusterUpOptions& o, const fs::path& dir, const std::string& placement,
                     const ClusterCredentials& credentials, const std::vector<Process>& procs) {
  Json state;
  state["gateway"] = Join(procs, "gateway");
  state["http_address"] = nullptr;
  for (const Process& p : procs) {
    if (p.role == "gateway" && p.http_port > 0) {
      state["http_address"] = absl::StrCat("127.0.0.1:", p.http_port);
      state["http_url"] = absl::StrCat(o.insecure ? "http" : "https", "://127.0.0.1:", p.http_port);
    }
  }
  state["state_dir"] = dir.string();
  state["placement"] = placement;
  auto or_null = [](const std::string& s) { return s.empty() ? Json(nullptr) : Json(s); };
  state["security"] = {
      {"tls", !o.insecure},
      {"ca", or_null(o.insecure ? "" : credentials.ca)},
      {"client_cert", or_null(o.insecure ? "" : credentials.client_cert)},
      {"client_key", or_null(o.insecure ? "" : credentials.client_key)},
      {"server_cert", or_null(o.insecure ? "" : credentials.server_cert)},
      {"server_key", or_null(o.insecure ? "" : credentials.server_key)},
      {"gateway_requires_client_cert", !o.insecure && o.gateway_require_client_cert},
      {"api_key_file", or_null(o.no_auth ? "" : credentials.api_key_file)}};
  Json list = Json::array();
  for (const Process& p : procs) {
    list.push_back(
        {{"role", p.role},
         {"index", p.index},
         {"pid", p.pid},
         {"address", p.address},
         {"metrics_url", p.metrics_port > 0
                             ? Json(absl::StrCat("http://127.0.0.1:", p.metrics_port, "/metrics"))
                             : Json(nullptr)},
         {"health_address",
          p.health_port > 0 ? Json(absl::StrCat("127.0.0.1:", p.health_port)) : Json(nullptr)},
         {"cpus", FormatCpuList(p.cpus)},
         {"threads", p.threads > 0 ? Json(p.threads) : Json(nullptr)},
         {"log", p.log}});
  }
  state["processes"] = list;
  return state;
}

// Expert servers, then attention servers, then the gateway, each group ready before the next
// starts (each needs the addresses of the one before).
absl::Status Up(const ClusterUpOptions& o, Json* state) {
  if (o.rebalance_period > 0 && o.attention_servers > 1) {
    // Each attention server would plan and switch on its own and drop experts the others use.
    return absl::InvalidArgumentError(
        "--rebalance-period needs a single attention server; with several, use `dsmoe "
        "placement apply`, which switches them all before dropping old experts");
  }
  if (o.device_limited_routing.has_value() &&
      (*o.device_limited_routing < 1 || *o.device_limited_routing > o.expert_servers)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--device-limited-routing ", *o.device_limited_routing, ": must be 1 to ", o.expert_servers,
        " (--expert-servers; a token's experts come from that many servers)"));
  }
  // Checked before anything is made or started.
  DSMOE_ASSIGN_OR_RETURN(auto pinned, ParseCpuPinning(o.cpus, AllowedCpus()));
  DSMOE_ASSIGN_OR_RETURN(const fs::path dir, PrepareStateDir(o));
  DSMOE_ASSIGN_OR_RETURN(const std::string placement, PlacementFile(o, dir));
  // Credentials made for this cluster alone (cli/cluster_certs.h), and the flags that use them.
  ClusterCredentials credentials;
  if (!o.insecure || !o.no_auth) {
    DSMOE_ASSIGN_OR_RETURN(credentials, MakeClusterCredentials((dir / "tls").string()));
  }
  std::vector<std::string> tls_flags = {"--insecure"};
  if (!o.insecure) {
    tls_flags = {"--tls-cert", credentials.server_cert, "--tls-key", credentials.server_key,
                 "--tls-ca",   credentials.ca};
  }
  // Every server gets every core by default: they compute in turns (attention, then experts),
  // and the thread pool never waits for a worker the OS has not scheduled, so sharing cores
  // costs little while splitting them leaves cores idle (measured: 32 streams through the
  // gateway reach 0.73 of the single process with 2 threads each, 0.63 with 1). With --cpus a
  // pinned role gets a thread per CPU of its set instead (Launcher::Threads).
  const fs::path bin = BinaryDir();
  const std::string model = fs::absolute(o.model).string();
  Launcher launcher(dir, tls_flags, std::move(pinned), o.threads);
  for (int i = 0; i < o.expert_servers; ++i) {
    const std::vector<std::string> argv = {(bin / "dsmoe-expert-server").string(),
                                           "--model",
                                           model,
                                           "--placement",
                                           placement,
                                           "--server-index",
                                           std::to_string(i),
                                           "--threads",
                                           std::to_string(launcher.Threads("expert-server")),
                                           "--device",
                                           o.device};
    if (auto s = launcher.Start("expert-server", i, argv); !s.ok()) return launcher.Fail(s);
  }
  if (auto s = launcher.WaitReady(); !s.ok()) return launcher.Fail(s);
  const std::string experts = Join(launcher.processes(), "expert-server");
  for (int i = 0; i < o.attention_servers; ++i) {
    auto argv =
        AttentionServerFlags(o, bin, model, placement, (dir / "placement-in-use.json").string(),
                             experts, launcher.Threads("attention-server"));
    if (auto s = launcher.Start("attention-server", i, argv); !s.ok()) return launcher.Fail(s);
  }
  if (auto s = launcher.WaitReady(); !s.ok()) return launcher.Fail(s);
  auto gateway =
      GatewayFlags(o, bin, model, Join(launcher.processes(), "attention-server"), credentials);
  if (auto s = launcher.Start("gateway", 0, gateway); !s.ok()) return launcher.Fail(s);
  if (auto s = launcher.WaitReady(); !s.ok()) return launcher.Fail(s);

  *state = DescribeCluster(o, dir, placement, credentials, launcher.processes());
  std::ofstream(dir / kStateFile) << state->dump(2) << "\n";
  return absl::OkStatus();
}

}  // namespace

int RunClusterUp(const ClusterUpOptions& o) {
  Json state;
  if (auto s = Up(o, &state); !s.ok()) {
    std::cerr << "dsmoe: error: " << s.message() << "\n";
    return 1;
  }
  if (o.json) {
    std::cout << state.dump() << "\n";
  } else {
    for (const auto& p : state["processes"]) {
      std::cout << p["role"].get<std::string>() << " " << p["index"].get<int>() << "  pid "
                << p["pid"].get<int>() << "  " << p["address"].get<std::string>() << "  cpus "
                << p["cpus"].get<std::string>() << "  log " << p["log"].get<std::string>() << "\n";
    }
    std::cout << "gateway: " << state["gateway"].get<std::string>() << "\n";
    if (state["http_address"].is_string()) {
      std::cout << "HTTP API (OpenAI-compatible): " << state["http_url"].get<std::string>()
                << "/v1\n";
    }
  }
  return 0;
}

int RunClusterDown(const ClusterDownOptions& o) {
  const fs::path file = fs::path(DefaultStateDir(o.state_dir)) / kStateFile;
  auto text = ReadTextFile(file.string(), 1 << 20);
  if (!text.ok()) {
    std::cerr << "dsmoe: error: no cluster is up (" << file.string() << " not found)\n";
    return 1;
  }
  Json state = Json::parse(*text, nullptr, false);
  if (state.is_discarded() || !state.contains("processes")) {
    std::cerr << "dsmoe: error: " << file.string() << " is not a cluster state file\n";
    return 1;
  }
  // Front to back: the gateway first (it drains its streams), then attention, then experts.
  std::vector<std::pair<std::string, pid_t>> order;
  for (const char* role : {"gateway", "attention-server", "expert-server"}) {
    for (const auto& p : state["processes"]) {
      if (p["role"] == role) order.emplace_back(role, p["pid"].get<pid_t>());
    }
  }
  int stopped = 0;
  for (const auto& [role, pid] : order) {
    if (kill(pid, SIGTERM) != 0) continue;  // already gone
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(15);
    while (Alive(pid) && std::chrono::steady_clock::now() < deadline) {
      waitpid(pid, nullptr, WNOHANG);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (Alive(pid)) {
      std::cerr << "dsmoe: " << role << " pid " << pid << " ignored SIGTERM; killing it\n";
      kill(pid, SIGKILL);
    }
    ++stopped;
  }
  std::error_code ec;
  fs::remove(file, ec);
  std::cout << "stopped " << stopped << " processes\n";
  return 0;
}

}  // namespace dsmoe::cli
