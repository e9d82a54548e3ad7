#include "cli/cluster_command.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
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
  int metrics_port = 0;  // 0: none reported
};

// Waits until every process has written its ready file ("<grpc port>\n<metrics port>\n");
// fails fast if one exits.
absl::Status WaitReady(std::vector<Process>& procs) {
  const auto deadline = std::chrono::steady_clock::now() + kStartTimeout;
  for (Process& p : procs) {
    for (;;) {
      if (fs::exists(p.ready_file)) {
        auto text = ReadTextFile(p.ready_file, 64);
        if (text.ok() && !text->empty()) {
          const std::vector<std::string> lines =
              absl::StrSplit(*text, '\n', absl::SkipWhitespace());
          p.address = "127.0.0.1:" + std::string(absl::StripAsciiWhitespace(lines[0]));
          if (lines.size() > 1 && !absl::SimpleAtoi(lines[1], &p.metrics_port)) p.metrics_port = 0;
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
  Launcher(fs::path dir, std::vector<std::string> shared_flags)
      : dir_(std::move(dir)), shared_flags_(std::move(shared_flags)) {}

  absl::Status Start(const std::string& role, int index, std::vector<std::string> argv) {
    Process p;
    p.role = role;
    p.index = index;
    p.log = (dir_ / absl::StrCat(role, "-", index, ".log")).string();
    p.ready_file = (dir_ / absl::StrCat(role, "-", index, ".port")).string();
    argv.insert(argv.end(), {"--ready-file", p.ready_file});
    // Every server exports Prometheus metrics on a port of its own, loopback only.
    argv.insert(argv.end(), {"--metrics-listen", "127.0.0.1:0"});
    argv.insert(argv.end(), shared_flags_.begin(), shared_flags_.end());
    DSMOE_ASSIGN_OR_RETURN(p.pid, Spawn(argv, p.log));
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
  const std::vector<std::string> shared_flags_;  // TLS
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
  if (o.min_copies > 0) argv.insert(argv.end(), {"--min-copies", std::to_string(o.min_copies)});
  if (o.micro_batches > 0) {
    argv.insert(argv.end(), {"--micro-batches", std::to_string(o.micro_batches)});
  }
  if (!o.kv_cache_memory.empty()) argv.insert(argv.end(), {"--kv-cache-memory", o.kv_cache_memory});
  if (!o.memory_limit.empty()) argv.insert(argv.end(), {"--memory-limit", o.memory_limit});
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
  std::vector<std::string> argv = {(bin / "dsmoe-gateway").string(),
                                   "--model",
                                   model,
                                   "--attention-servers",
                                   attention,
                                   "--listen",
                                   absl::StrCat("127.0.0.1:", o.gateway_port)};
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
  // gateway reach 0.73 of the single process with 2 threads each, 0.63 with 1).
  const int threads = o.threads > 0 ? o.threads : UsableCpus();
  const fs::path bin = BinaryDir();
  const std::string model = fs::absolute(o.model).string();
  Launcher launcher(dir, tls_flags);
  for (int i = 0; i < o.expert_servers; ++i) {
    const std::vector<std::string> argv = {(bin / "dsmoe-expert-server").string(),
                                           "--model",
                                           model,
                                           "--placement",
                                           placement,
                                           "--server-index",
                                           std::to_string(i),
                                           "--threads",
                                           std::to_string(threads),
                                           "--device",
                                           o.device};
    if (auto s = launcher.Start("expert-server", i, argv); !s.ok()) return launcher.Fail(s);
  }
  if (auto s = launcher.WaitReady(); !s.ok()) return launcher.Fail(s);
  const std::string experts = Join(launcher.processes(), "expert-server");
  for (int i = 0; i < o.attention_servers; ++i) {
    auto argv = AttentionServerFlags(o, bin, model, placement,
                                     (dir / "placement-in-use.json").string(), experts, threads);
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
                << p["pid"].get<int>() << "  " << p["address"].get<std::string>() << "  log "
                << p["log"].get<std::string>() << "\n";
    }
    std::cout << "gateway: " << state["gateway"].get<std::string>() << "\n";
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
