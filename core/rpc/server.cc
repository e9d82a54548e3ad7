#include "core/rpc/server.h"

#include <errno.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/health_check_service_interface.h>
#include <signal.h>

#include <algorithm>
#include <cstdio>  // std::rename
#include <fstream>

#include "absl/base/thread_annotations.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "core/io/mapped_file.h"

namespace dsmoe::rpc {

namespace {
constexpr char kHealthCheck[] = "/grpc.health.v1.Health/Check";

// "host" of "host:port" ("[::1]" of "[::1]:0"), as a listening address is written.
std::string HostOf(const std::string& address) {
  const size_t colon = address.rfind(':');
  return colon == std::string::npos ? address : address.substr(0, colon);
}
}  // namespace

// Serves Health/Check on the plain-text health port by asking the main server's own health
// service over its in-process channel (no TLS there: it never leaves the process), so the
// answer is whatever the main server reports and nothing else is reachable in plain text.
// Every other method is UNIMPLEMENTED. Thread-safe (one reactor per call).
class HealthForwarder final : public grpc::CallbackGenericService {
 public:
  explicit HealthForwarder(std::shared_ptr<grpc::Channel> main) : stub_(std::move(main)) {}

  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
    return new Reactor(ctx, &stub_);
  }

 private:
  class Reactor final : public grpc::ServerGenericBidiReactor {
   public:
    Reactor(grpc::GenericCallbackServerContext* ctx, grpc::GenericStub* stub) : stub_(stub) {
      if (ctx->method() != kHealthCheck) {
        Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                            "the health port serves only grpc.health.v1.Health/Check"));
        return;
      }
      upstream_.set_deadline(
          std::min(ctx->deadline(), std::chrono::system_clock::now() + std::chrono::seconds(5)));
      StartRead(&request_);
    }
    void OnReadDone(bool ok) override {
      if (!ok) {
        Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no request message"));
        return;
      }
      stub_->UnaryCall(&upstream_, kHealthCheck, grpc::StubOptions(), &request_, &response_,
                       [this](grpc::Status s) {
                         if (s.ok()) {
                           StartWriteAndFinish(&response_, grpc::WriteOptions(), s);
                         } else {
                           Finish(s);
                         }
                       });
    }
    void OnDone() override { delete this; }

   private:
    grpc::GenericStub* stub_;
    grpc::ClientContext upstream_;
    grpc::ByteBuffer request_, response_;
  };
  grpc::GenericStub stub_;
};

RunningServer::RunningServer() = default;
RunningServer::RunningServer(RunningServer&&) noexcept = default;
RunningServer& RunningServer::operator=(RunningServer&&) noexcept = default;
RunningServer::~RunningServer() {
  if (health_server != nullptr) health_server->Shutdown();
}

absl::StatusOr<RunningServer> StartServer(const ServerOptions& options,
                                          const std::vector<grpc::Service*>& services) {
  DSMOE_ASSIGN_OR_RETURN(auto credentials, options.security.ServerCredentials());
  if (options.security.insecure()) {
    options.logger->Log(
        LogLevel::kWarning,
        absl::StrCat(program_invocation_short_name, ": WARNING: serving PLAINTEXT gRPC on ",
                     options.address,
                     " (--insecure): no encryption, no client authentication; anyone who reaches "
                     "the port can call every method"));
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(options.address, credentials, &port);
  // No SO_REUSEPORT: with it, gRPC binds one listener per poller, and for port 0 each of them
  // to a port of its own (only the first is reported: a process listened on an undeclared extra
  // port); and a second process could bind the same fixed port without an error.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  for (grpc::Service* s : services) builder.RegisterService(s);
  RunningServer running;
  running.server = builder.BuildAndStart();
  if (running.server == nullptr || port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.address));
  }
  running.port = port;
  if (!options.health_address.empty()) {
    running.health_forwarder = std::make_unique<HealthForwarder>(
        running.server->InProcessChannel(grpc::ChannelArguments()));
    grpc::ServerBuilder health;
    health.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    health.AddListeningPort(options.health_address, grpc::InsecureServerCredentials(),
                            &running.health_port);
    health.RegisterCallbackGenericService(running.health_forwarder.get());
    running.health_server = health.BuildAndStart();
    if (running.health_server == nullptr || running.health_port == 0) {
      return absl::UnavailableError(
          absl::StrCat("cannot listen on ", options.health_address, " (health port)"));
    }
  }
  if (running.health_port > 0) {
    // Asked for as port 0, it can be found only here (and in the ready file).
    options.logger->Log(LogLevel::kInfo,
                        absl::StrCat(program_invocation_short_name,
                                     ": plain-text health checks (grpc.health.v1 Check only) on ",
                                     HostOf(options.health_address), ":", running.health_port,
                                     " (--health-listen ", options.health_address, ")"));
  }
  if (!options.ready_file.empty()) {
    DSMOE_RETURN_IF_ERROR(
        WriteReadyFile(options.ready_file, {port, options.metrics_port, running.health_port}));
  }
  return running;
}

void ShutdownOnce::Shutdown(const std::function<void()>& steps) {
  absl::MutexLock lock(&mu_);  // held throughout: a concurrent caller waits for it
  if (done_) return;
  steps();
  done_ = true;
  done_cv_.SignalAll();
}

void ShutdownOnce::Wait() {
  absl::MutexLock lock(&mu_);
  while (!done_) done_cv_.Wait(&mu_);
}

absl::Status WriteReadyFile(const std::string& path, const ReadyPorts& ports) {
  // Lines up to the last port there is: "<port>\n[<metrics>\n[<health>\n[<http>\n]]]".
  const int lines[4] = {ports.port, ports.metrics_port, ports.health_port, ports.http_port};
  int count = 4;
  while (count > 1 && lines[count - 1] == 0) --count;
  std::string text;
  for (int i = 0; i < count; ++i) absl::StrAppend(&text, lines[i], "\n");
  // Whole or not at all: `cluster up` polls for it.
  return WriteFileAtomically(path, text);
}

absl::StatusOr<ReadyPorts> ParseReadyFile(absl::string_view text) {
  const std::vector<absl::string_view> lines = absl::StrSplit(text, '\n', absl::SkipWhitespace());
  int ports[4] = {0, 0, 0, 0};
  if (lines.empty() || lines.size() > 4) {
    return absl::InvalidArgumentError(
        absl::StrCat("a ready file holds 1 to 4 lines of ports, not ", lines.size()));
  }
  for (size_t i = 0; i < lines.size(); ++i) {
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(lines[i]), &ports[i]) || ports[i] < 0 ||
        ports[i] > 65535) {
      return absl::InvalidArgumentError(
          absl::StrCat("line ", i + 1, " of the ready file, '", lines[i], "', is not a port"));
    }
  }
  if (ports[0] == 0) return absl::InvalidArgumentError("the ready file names no gRPC port");
  return ReadyPorts{ports[0], ports[1], ports[2], ports[3]};
}

void BlockShutdownSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

int WaitForShutdownSignal() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  int sig = 0;
  sigwait(&set, &sig);
  return sig;
}

std::vector<std::string> SplitAddresses(const std::string& list) {
  std::vector<std::string> out;
  size_t begin = 0;
  while (begin <= list.size()) {
    size_t end = list.find(',', begin);
    if (end == std::string::npos) end = list.size();
    if (end > begin) out.push_back(list.substr(begin, end - begin));
    begin = end + 1;
  }
  return out;
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address,
                                           const TransportSecurity& security,
                                           int max_message_bytes) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(max_message_bytes);
  args.SetMaxSendMessageSize(max_message_bytes);
  security.ConfigureChannel(&args);
  // A restarted server must be found again within a second, not after gRPC's default backoff
  // (which grows to two minutes): health checks and retries depend on reconnecting.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  return grpc::CreateCustomChannel(address, security.ChannelCredentials(), args);
}

}  // namespace dsmoe::rpc
