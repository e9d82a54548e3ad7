#include "bench/cluster_harness.h"

#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio.hpp>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <sstream>
#include <thread>

#include "attention-server/scheduler.h"
#include "core/io/mapped_file.h"
#include "core/rpc/server.h"
#include "dsmoe/v1/gateway.grpc.pb.h"

namespace dsmoe::bench {
namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

// Counts tokens and signals when every sequence has finished.
class CountingSink final : public SequenceSink {
 public:
  CountingSink(std::atomic<int64_t>& tokens, std::atomic<int>& remaining,
               std::condition_variable& cv, std::mutex& mu)
      : tokens_(tokens), remaining_(remaining), cv_(cv), mu_(mu) {}
  void OnToken(int32_t) override { tokens_.fetch_add(1); }
  void OnFinish(FinishReason, const absl::Status&) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (remaining_.fetch_sub(1) == 1) cv_.notify_all();
  }

 private:
  std::atomic<int64_t>& tokens_;
  std::atomic<int>& remaining_;
  std::condition_variable& cv_;
  std::mutex& mu_;
};

// GET http://127.0.0.1:<port><path>: the body ("" on any failure). Loopback only.
std::string HttpGet(int port, const std::string& path) {
  try {
    boost::asio::io_context io;
    boost::asio::ip::tcp::socket socket(io);
    socket.connect({boost::asio::ip::make_address("127.0.0.1"), static_cast<uint16_t>(port)});
    const std::string request = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    boost::asio::write(socket, boost::asio::buffer(request));
    std::string response;
    boost::system::error_code ec;
    boost::asio::read(socket, boost::asio::dynamic_buffer(response), ec);  // to EOF
    const size_t body = response.find("\r\n\r\n");
    return body == std::string::npos ? "" : response.substr(body + 4);
  } catch (const std::exception&) {
    return "";
  }
}

}  // namespace

std::vector<int32_t> StreamPrompt(int stream, int length, int64_t vocab) {
  std::vector<int32_t> p;
  for (int i = 0; i < length; ++i)
    p.push_back(static_cast<int32_t>(2 + (stream * 131 + i * 7919) % (vocab - 2)));
  return p;
}

double SingleProcessTokensPerSecond(const ModelWeights& weights, int streams, int tokens,
                                    int prompt_len) {
  ThreadPool pool(0);
  SchedulerOptions options;
  options.num_slots = 32;
  options.max_context = prompt_len + tokens + 1;
  auto scheduler = Scheduler::Create(weights, pool, options);
  if (!scheduler.ok()) return 0;
  std::atomic<int64_t> count{0};
  std::atomic<int> remaining{streams};
  std::condition_variable cv;
  std::mutex mu;
  const auto start = Clock::now();
  for (int s = 0; s < streams; ++s) {
    SequenceParams p;
    p.prompt = StreamPrompt(s, prompt_len, weights.config().vocab_size);
    p.max_tokens = tokens;
    (void)(*scheduler)
        ->Submit(std::move(p), std::make_shared<CountingSink>(count, remaining, cv, mu));
  }
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return remaining.load() == 0; });
  return static_cast<double>(count.load()) /
         std::chrono::duration<double>(Clock::now() - start).count();
}

absl::StatusOr<std::unique_ptr<BenchCluster>> BenchCluster::Up(const std::string& model,
                                                               int expert_servers,
                                                               const std::string& extra_flags) {
  auto c = std::unique_ptr<BenchCluster>(new BenchCluster());
  static std::atomic<int> counter{0};
  const fs::path bin = fs::read_symlink("/proc/self/exe").parent_path();
  c->state_dir_ = (fs::temp_directory_path() / ("dsmoe-bench-cluster-" + std::to_string(getpid()) +
                                                "-" + std::to_string(counter++)))
                      .string();
  const std::string json_file = c->state_dir_ + ".json";
  const std::string up = (bin / "dsmoe").string() + " cluster up --model " + model +
                         " --attention-servers 1 --expert-servers " +
                         std::to_string(expert_servers) + " --json " + extra_flags +
                         " --state-dir " + c->state_dir_ + " > " + json_file;
  if (std::system(up.c_str()) != 0) {
    return absl::InternalError("cluster up failed: " + up);
  }
  DSMOE_ASSIGN_OR_RETURN(const std::string text, ReadTextFile(json_file, 1 << 20));
  fs::remove(json_file);
  c->info_ = nlohmann::json::parse(text);
  const auto& s = c->info_["security"];
  if (s["tls"].get<bool>()) {
    rpc::TransportSecurityOptions tls;
    tls.ca_file = s["ca"];
    tls.cert_file = s["client_cert"];
    tls.key_file = s["client_key"];
    DSMOE_ASSIGN_OR_RETURN(c->security_, rpc::TransportSecurity::Load(tls));
    if (s["api_key_file"].is_string()) {
      DSMOE_ASSIGN_OR_RETURN(c->api_key_, ReadTextFile(s["api_key_file"].get<std::string>(), 4096));
      while (!c->api_key_.empty() && c->api_key_.back() == '\n') c->api_key_.pop_back();
    }
  }
  return c;
}

BenchCluster::~BenchCluster() {
  const fs::path bin = fs::read_symlink("/proc/self/exe").parent_path();
  std::system(
      ((bin / "dsmoe").string() + " cluster down --state-dir " + state_dir_ + " > /dev/null")
          .c_str());
}

std::string BenchCluster::Address(const std::string& role, int index) const {
  for (const auto& p : info_["processes"]) {
    if (p["role"] == role && p["index"] == index) return p["address"];
  }
  return "";
}

double BenchCluster::Generate(int64_t vocab, int streams, int tokens, int prompt_len) const {
  auto stub =
      dsmoe::v1::Gateway::NewStub(rpc::MakeChannel(info_["gateway"].get<std::string>(), security_));
  std::atomic<int64_t> count{0};
  std::atomic<int> failures{0};
  const auto start = Clock::now();
  std::vector<std::thread> threads;
  for (int s = 0; s < streams; ++s) {
    threads.emplace_back([&, s] {
      dsmoe::v1::GenerateRequest req;
      for (int32_t id : StreamPrompt(s, prompt_len, vocab))
        req.mutable_token_ids()->add_ids(static_cast<uint32_t>(id));
      req.set_max_tokens(static_cast<uint32_t>(tokens));
      req.set_temperature(0.0f);
      req.set_ignore_eos(true);
      grpc::ClientContext ctx;
      if (!api_key_.empty()) ctx.AddMetadata("authorization", "Bearer " + api_key_);
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(600));
      auto reader = stub->Generate(&ctx, req);
      dsmoe::v1::GenerateResponse m;
      while (reader->Read(&m)) count.fetch_add(m.token_ids_size());
      if (!reader->Finish().ok()) failures.fetch_add(1);
    });
  }
  for (auto& t : threads) t.join();
  if (failures.load() > 0) std::fprintf(stderr, "%d streams failed\n", failures.load());
  return static_cast<double>(count.load()) /
         std::chrono::duration<double>(Clock::now() - start).count();
}

std::vector<std::string> BenchCluster::Scrape(const std::string& role) const {
  std::vector<std::string> out;
  for (const auto& p : info_["processes"]) {
    if (p["role"] != role || !p["metrics_url"].is_string()) continue;
    const std::string url = p["metrics_url"];  // http://127.0.0.1:<port>/metrics
    const size_t colon = url.rfind(':'), slash = url.find('/', colon);
    out.push_back(HttpGet(std::stoi(url.substr(colon + 1, slash - colon - 1)), url.substr(slash)));
  }
  return out;
}

double MetricSum(const std::string& text, const std::string& name,
                 const std::string& label_filter) {
  double sum = 0;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind(name, 0) != 0 || line.size() <= name.size()) continue;
    const char next = line[name.size()];
    if (next != '{' && next != ' ') continue;  // another metric with this prefix
    const size_t space = line.rfind(' ');
    const std::string labels = line.substr(name.size(), space - name.size());
    if (labels.find(label_filter) == std::string::npos) continue;
    sum += std::strtod(line.c_str() + space + 1, nullptr);
  }
  return sum;
}

}  // namespace dsmoe::bench
