// What fine-grained experts cost on the wire (docs/fanout.md): DeepSeekMoE's 64 routed experts
// top-6 + 2 shared against GShard's 16 experts of 4x the width top-2 (the same active compute,
// about the same total parameters), over 1, 2, 4 and 8 expert servers with `cluster up`'s
// round-robin placement, one copy each.
//
//   dsmoe_bench_fanout [--hidden 512] [--prompts 32] [--prompt-len 32] [--servers 1,2,4,8]
//                      [--limits 1,2,3] [--step-streams 1,4,32] [--timed 1] [--timed-limits 1]
//                      [--timed-streams 4]
//                      [--timed-tokens 32]
//                      [--dir /tmp/dsmoe-bench-fanout]
//
// Counted (deterministic): a fixed stream of prompts runs through ModelRunner with a
// RoutingObserver; per (token, MoE layer) the distinct expert servers its routed experts sit on
// (one message each way per (layer, server), all of a step's tokens for that server in it),
// the messages per step when the prompts decode side by side (token i of every prompt in one
// step), and the bytes: each distinct server gets the token's hidden row and returns one
// combined row (fp32), plus k assignment triples (token, expert, weight: 12 bytes). Then
// device-limited routing to M servers: the fan-out it saves, and how far it moves the output
// (top-1 agreement and rel-L2 of the final logits against unrestricted routing).
//
// Timed (--timed 1, noisy on a shared machine): a real cluster per N (`dsmoe cluster up
// --expert-servers N`), a few streams decoding through the gateway: tokens/s, and the dispatch
// round trip p50/p99 from the attention server's dsmoe_dispatch_round_trip_seconds histogram
// (quantiles interpolated inside its buckets, the measured run's counts only); with
// --timed-limits 1 also the largest N with `--device-limited-routing M` for each M of --limits.
//
// Random weights route near-uniformly and independently (no expert specialises): for fan-out
// that is the worst case, in that no placement can lower it; a trained model's routing is
// skewed and correlated, which lets a placement co-locate experts that fire together.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "bench/bench_args.h"
#include "bench/cluster_harness.h"
#include "core/model/make_model.h"
#include "core/model/model_runner.h"
#include "router/device_limit.h"
#include "router/dispatch.h"
#include "router/placement.h"

namespace {

using namespace dsmoe;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

constexpr int64_t kTripleBytes = 12;          // uint32 token, uint32 expert, float weight
constexpr int64_t kDeepSeek16bHidden = 2048;  // deepseek-moe-16b-base's hidden_size

struct Args {
  int64_t hidden = 512;
  int prompts = 32, prompt_len = 32;
  std::vector<int> servers = {1, 2, 4, 8};
  std::vector<int> limits = {1, 2, 3};         // DeepSeek-V2 trains with M = 3 of 8 devices
  std::vector<int> step_streams = {1, 4, 32};  // decode steps of this many streams side by side
  bool timed = true;
  bool timed_limits = true;  // also time device-limited routing (--limits) on the largest N
  int timed_streams = 4, timed_tokens = 32;
  std::string dir = "/tmp/dsmoe-bench-fanout";
};

// The two models: the small preset's shape (64 routed of width w, top-6, + 2 shared) and its
// GShard counterpart (16 routed of width 4w, top-2, no shared): 8w activated expert width each.
ModelConfig DeepSeekConfig(int64_t hidden) {
  ModelConfig c = *PresetConfig("small");
  c.hidden_size = hidden;
  return c;
}
ModelConfig GShardConfig(int64_t hidden) {
  ModelConfig c = DeepSeekConfig(hidden);
  c.n_routed_experts = 16;
  c.moe_intermediate_size *= 4;
  c.num_experts_per_tok = 2;
  c.n_shared_experts = 0;
  return c;  // intermediate_size (the dense first layer) stays 8w, as in the DeepSeekMoE one
}

std::vector<int32_t> Prompt(int p, int length, int64_t vocab) {
  std::vector<int32_t> ids;
  for (int i = 0; i < length; ++i)
    ids.push_back(static_cast<int32_t>(2 + (p * 131 + i * 7919 + i * i * 17) % (vocab - 2)));
  return ids;
}

// Routing of every (prompt, MoE layer): [prompt][layer] → [T·k] experts and weights.
struct Routing {
  int64_t k = 0;
  std::vector<std::vector<std::vector<int32_t>>> experts;
  std::vector<std::vector<std::vector<float>>> weights;
};

class Recorder final : public RoutingObserver {
 public:
  Recorder(Routing& r, int64_t layers) : r_(r), layers_(layers) {}
  void StartPrompt() {
    r_.experts.emplace_back(layers_);
    r_.weights.emplace_back(layers_);
  }
  void OnRouting(int64_t layer, int64_t T, int64_t k, const int32_t* experts,
                 const float* weights) override {
    r_.k = k;
    r_.experts.back()[layer].assign(experts, experts + T * k);
    r_.weights.back()[layer].assign(weights, weights + T * k);
  }

 private:
  Routing& r_;
  int64_t layers_;
};

// Runs every prompt (one Forward each, logits of every position) and records the routing.
struct RunResult {
  Routing routing;
  std::vector<float> logits;  // [prompts·len, vocab]
};

absl::StatusOr<RunResult> RunPrompts(const ModelWeights& weights, ThreadPool& pool, const Args& a,
                                     std::shared_ptr<const DeviceLimitedRouting> dl) {
  const ModelConfig& c = weights.config();
  RunnerOptions options;
  options.max_batch_tokens = a.prompt_len;
  options.num_slots = 1;
  options.max_context = a.prompt_len;
  DSMOE_ASSIGN_OR_RETURN(auto runner, ModelRunner::Create(weights, pool, options));
  DSMOE_RETURN_IF_ERROR(runner->set_device_limited_routing(std::move(dl)));
  RunResult out;
  Recorder recorder(out.routing, c.num_hidden_layers);
  runner->set_routing_observer(&recorder);
  const int64_t L = a.prompt_len, V = c.vocab_size;
  std::vector<int32_t> slots(L, 0), positions(L), rows(L);
  for (int64_t i = 0; i < L; ++i) positions[i] = rows[i] = static_cast<int32_t>(i);
  out.logits.resize(static_cast<size_t>(a.prompts * L * V));
  for (int p = 0; p < a.prompts; ++p) {
    const std::vector<int32_t> ids = Prompt(p, a.prompt_len, V);
    recorder.StartPrompt();
    DSMOE_RETURN_IF_ERROR(
        runner->Forward({ids, slots, positions, rows}, out.logits.data() + p * L * V));
  }
  return out;
}

// Counted fan-out of one routing over one placement.
struct FanOut {
  double servers_mean = 0, servers_p99 = 0;  // distinct servers per (token, MoE layer)
  std::vector<double> step_messages;         // per MoE layer and decode step, per --step-streams
  int64_t triples_per_token = 0;
};

FanOut Count(const ModelConfig& c, const Routing& r, const router::Placement& placement,
             const Args& a) {
  FanOut f;
  const int64_t k = r.k, L = a.prompt_len;
  std::vector<int> per_token;  // distinct servers of each (prompt, layer, token)
  std::vector<bool> seen(placement.num_servers());
  for (int p = 0; p < a.prompts; ++p) {
    for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
      if (!c.IsMoeLayer(layer)) continue;
      const std::vector<int32_t>& e = r.experts[p][layer];
      for (int64_t t = 0; t < L; ++t) {
        std::fill(seen.begin(), seen.end(), false);
        int n = 0;
        for (int64_t j = 0; j < k; ++j) {
          for (int s : placement.Holders(layer, e[t * k + j])) {
            n += seen[s] ? 0 : 1;
            seen[s] = true;
          }
        }
        per_token.push_back(n);
      }
    }
  }
  double sum = 0;
  for (int n : per_token) sum += n;
  f.servers_mean = sum / static_cast<double>(per_token.size());
  std::sort(per_token.begin(), per_token.end());
  f.servers_p99 = per_token[std::min(
      per_token.size() - 1, static_cast<size_t>(0.99 * static_cast<double>(per_token.size())))];
  f.triples_per_token = k;

  // Decode steps of B streams: position i of prompts [b·B, b·B + B) in one batch, planned as the
  // dispatcher plans it.
  router::DispatchPlanner planner(placement);
  std::vector<router::ServerWork> work;
  for (int B : a.step_streams) {
    std::vector<int32_t> experts(static_cast<size_t>(B * k));
    std::vector<float> weights(static_cast<size_t>(B * k));
    int64_t messages = 0, steps = 0;
    for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
      if (!c.IsMoeLayer(layer)) continue;
      for (int first = 0; first + B <= a.prompts; first += B) {
        for (int64_t i = 0; i < L; ++i) {
          for (int p = 0; p < B; ++p) {
            std::copy_n(r.experts[first + p][layer].begin() + i * k, k, experts.begin() + p * k);
            std::copy_n(r.weights[first + p][layer].begin() + i * k, k, weights.begin() + p * k);
          }
          if (!planner.Plan(layer, B, k, experts.data(), weights.data(), &work).ok()) continue;
          for (const router::ServerWork& w : work) messages += w.empty() ? 0 : 1;
          ++steps;
        }
      }
    }
    f.step_messages.push_back(steps > 0 ? static_cast<double>(messages) / steps : NAN);
  }
  return f;
}

// Bytes one token costs per MoE layer: its row out and a combined row back per distinct server.
double BytesPerToken(double servers, int64_t hidden, int64_t triples) {
  return servers * 2.0 * static_cast<double>(hidden) * 4.0 +
         static_cast<double>(triples * kTripleBytes);
}

struct Divergence {
  double top1_agreement = 0, rel_l2 = 0;
};

Divergence Compare(const std::vector<float>& got, const std::vector<float>& want, int64_t vocab) {
  const size_t rows = want.size() / static_cast<size_t>(vocab);
  size_t agree = 0;
  double diff = 0, norm = 0;
  for (size_t r = 0; r < rows; ++r) {
    const float* g = got.data() + r * vocab;
    const float* w = want.data() + r * vocab;
    agree += std::max_element(g, g + vocab) - g == std::max_element(w, w + vocab) - w;
    for (int64_t v = 0; v < vocab; ++v) {
      diff += (static_cast<double>(g[v]) - w[v]) * (static_cast<double>(g[v]) - w[v]);
      norm += static_cast<double>(w[v]) * w[v];
    }
  }
  return {static_cast<double>(agree) / static_cast<double>(rows), std::sqrt(diff / norm)};
}

// --- The timed part: a real cluster ---

// Cumulative counts of dsmoe_dispatch_round_trip_seconds by upper bound, summed over servers.
std::map<double, double> RoundTripBuckets(const std::string& metrics) {
  std::map<double, double> buckets;
  std::istringstream in(metrics);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("dsmoe_dispatch_round_trip_seconds_bucket{", 0) != 0) continue;
    const auto le = line.find("le=\"");
    if (le == std::string::npos) continue;
    const auto end = line.find('"', le + 4);
    const std::string bound = line.substr(le + 4, end - le - 4);
    const double upper = bound == "+Inf" ? INFINITY : std::stod(bound);
    buckets[upper] += std::stod(line.substr(line.rfind(' ') + 1));
  }
  return buckets;
}

// The q-quantile of a cumulative histogram, linear inside the bucket it falls in (Prometheus'
// histogram_quantile); the last finite bound if it falls in +Inf.
double Quantile(const std::map<double, double>& cumulative, double q) {
  if (cumulative.empty()) return NAN;
  const double total = cumulative.rbegin()->second;
  if (total <= 0) return NAN;
  const double rank = q * total;
  double lower = 0, below = 0;
  for (const auto& [upper, count] : cumulative) {
    if (count >= rank) {
      if (std::isinf(upper)) return lower;
      return lower + (upper - lower) * (rank - below) / std::max(count - below, 1e-12);
    }
    lower = upper;
    below = count;
  }
  return lower;
}

struct Timed {
  bool ok = false;
  double tokens_per_s = 0, p50_ms = 0, p99_ms = 0;
  double calls = 0;
};

Timed TimeCluster(const std::string& model, int64_t vocab, int servers, int limit, const Args& a) {
  // One micro-batch per step, so that a step's calls are the counted messages of a step.
  std::string flags =
      "--micro-batches 1 --num-slots " + std::to_string(std::max(a.timed_streams, 1));
  if (limit > 0) flags += " --device-limited-routing " + std::to_string(limit);
  Timed t;
  auto cluster = bench::BenchCluster::Up(model, servers, flags);
  if (!cluster.ok()) {
    std::fprintf(stderr, "%s\n", std::string(cluster.status().message()).c_str());
    return t;
  }
  auto round_trips = [&] {
    const std::vector<std::string> pages = (*cluster)->Scrape("attention-server");
    return pages.empty() ? std::map<double, double>{} : RoundTripBuckets(pages[0]);
  };
  (*cluster)->Generate(vocab, a.timed_streams, 8, 8);  // warm-up: page the weights in
  const auto before = round_trips();
  t.tokens_per_s = (*cluster)->Generate(vocab, a.timed_streams, a.timed_tokens, 8);
  auto after = round_trips();
  for (auto& [upper, count] : after) {
    const auto it = before.find(upper);
    if (it != before.end()) count -= it->second;
  }
  t.p50_ms = 1e3 * Quantile(after, 0.5);
  t.p99_ms = 1e3 * Quantile(after, 0.99);
  t.calls = after.empty() ? 0 : after.rbegin()->second;
  t.ok = true;
  return t;
}

bool ParseArgs(int argc, char** argv, Args& a) {
  auto ints = [](const std::string& s) {
    std::vector<int> v;
    for (const std::string& x : bench::SplitList(s)) v.push_back(std::stoi(x));
    return v;
  };
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--hidden")
      a.hidden = std::stoll(value);
    else if (flag == "--prompts")
      a.prompts = std::stoi(value);
    else if (flag == "--prompt-len")
      a.prompt_len = std::stoi(value);
    else if (flag == "--servers")
      a.servers = ints(value);
    else if (flag == "--limits")
      a.limits = ints(value);
    else if (flag == "--step-streams")
      a.step_streams = ints(value);
    else if (flag == "--timed")
      a.timed = value != "0";
    else if (flag == "--timed-limits")
      a.timed_limits = value != "0";
    else if (flag == "--timed-streams")
      a.timed_streams = std::stoi(value);
    else if (flag == "--timed-tokens")
      a.timed_tokens = std::stoi(value);
    else if (flag == "--dir")
      a.dir = value;
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return false;
    }
  }
  return (argc % 2) == 1 && a.prompts > 0 && a.prompt_len > 0 && a.hidden > 0;
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "dsmoe_bench_fanout: %s\n", std::string(s.message()).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  if (!ParseArgs(argc, argv, a)) return 2;
  struct Model {
    std::string name;
    ModelConfig config;
    std::string dir;
  };
  std::vector<Model> models = {{"DeepSeekMoE 64×w top-6 + 2 shared", DeepSeekConfig(a.hidden), ""},
                               {"GShard 16×4w top-2", GShardConfig(a.hidden), ""}};
  models[0].dir = a.dir + "/deepseek-h" + std::to_string(a.hidden);
  models[1].dir = a.dir + "/gshard-h" + std::to_string(a.hidden);
  for (const Model& m : models) {
    if (fs::exists(m.dir + "/config.json")) continue;
    std::printf("writing %s ...\n", m.dir.c_str());
    std::fflush(stdout);
    if (auto s = WriteRandomCheckpoint(m.config, {DType::kBF16, 1, 1}, m.dir); !s.ok())
      return Fail(s);
  }
  ThreadPool pool(0);
  std::printf(
      "Random weights (seed 1, BF16), hidden %lld, %d prompts × %d tokens; round-robin placement, "
      "1 copy per expert.\nRandom weights route near-uniformly and independently: the worst case "
      "for fan-out (no "
      "placement can lower it; a trained model's correlated routing lets one co-locate experts "
      "that fire together).\n",
      (long long)a.hidden, a.prompts, a.prompt_len);

  for (const Model& m : models) {
    auto weights = ModelWeights::Load(m.dir);
    if (!weights.ok()) return Fail(weights.status());
    const ModelConfig& c = (*weights)->config();
    std::printf("\n## %s (E %lld, k %lld, shared %lld, width %lld)\n\n", m.name.c_str(),
                (long long)c.n_routed_experts, (long long)c.num_experts_per_tok,
                (long long)c.n_shared_experts, (long long)c.moe_intermediate_size);
    const auto start = Clock::now();
    auto base = RunPrompts(**weights, pool, a, nullptr);
    if (!base.ok()) return Fail(base.status());
    std::printf("(%.1f s per pass over the prompts)\n\n",
                std::chrono::duration<double>(Clock::now() - start).count());
    std::printf("| servers | limit M | servers/token/layer mean | p99 |");
    for (int B : a.step_streams) std::printf(" messages/layer/step, %d streams |", B);
    std::printf(
        " bytes/token/layer (H %lld) | at H 2048 | top-1 agree | logits rel-L2 "
        "|\n|---|---|---|---|",
        (long long)c.hidden_size);
    for (size_t i = 0; i < a.step_streams.size(); ++i) std::printf("---|");
    std::printf("---|---|---|---|\n");
    for (int n : a.servers) {
      auto placement =
          router::Placement::Compute(c, n, 1, router::Placement::Strategy::kRoundRobin);
      if (!placement.ok()) return Fail(placement.status());
      const FanOut f = Count(c, base->routing, *placement, a);
      std::printf("| %d | – | %.2f | %.0f |", n, f.servers_mean, f.servers_p99);
      for (double msgs : f.step_messages) std::printf(" %.2f |", msgs);
      std::printf(" %.0f | %.0f | 1 | 0 |\n",
                  BytesPerToken(f.servers_mean, c.hidden_size, f.triples_per_token),
                  BytesPerToken(f.servers_mean, kDeepSeek16bHidden, f.triples_per_token));
      std::fflush(stdout);
      for (int limit : a.limits) {
        if (limit >= n) continue;
        auto routing = router::DeviceLimitedRoutingFor(*placement, limit);
        if (!routing.ok()) return Fail(routing.status());
        auto limited = RunPrompts(
            **weights, pool, a, std::make_shared<const DeviceLimitedRouting>(std::move(*routing)));
        if (!limited.ok()) return Fail(limited.status());
        const FanOut fl = Count(c, limited->routing, *placement, a);
        const Divergence d = Compare(limited->logits, base->logits, c.vocab_size);
        std::printf("| %d | %d | %.2f | %.0f |", n, limit, fl.servers_mean, fl.servers_p99);
        for (double msgs : fl.step_messages) std::printf(" %.2f |", msgs);
        std::printf(" %.0f | %.0f | %.3f | %.3f |\n",
                    BytesPerToken(fl.servers_mean, c.hidden_size, fl.triples_per_token),
                    BytesPerToken(fl.servers_mean, kDeepSeek16bHidden, fl.triples_per_token),
                    d.top1_agreement, d.rel_l2);
        std::fflush(stdout);
      }
    }
  }

  if (!a.timed) {
    std::printf("\n(timed part skipped: --timed 0)\n");
    return 0;
  }
  std::printf(
      "\n## Timed: real clusters (cluster up, TLS, --micro-batches 1; %d streams × %d tokens "
      "through "
      "the gateway; "
      "noisy on a shared machine)\n\n| model | expert servers | limit M | tokens/s | dispatch "
      "calls | dispatch RTT p50 ms | p99 ms |\n|---|---|---|---|---|---|---|\n",
      a.timed_streams, a.timed_tokens);
  for (const Model& m : models) {
    for (int n : a.servers) {
      const Timed t = TimeCluster(fs::absolute(m.dir).string(), m.config.vocab_size, n, 0, a);
      if (!t.ok) {
        std::printf("| %s | %d | failed | | | |\n", m.name.c_str(), n);
        continue;
      }
      std::printf("| %s | %d | – | %.1f | %.0f | %.2f | %.2f |\n", m.name.c_str(), n,
                  t.tokens_per_s, t.calls, t.p50_ms, t.p99_ms);
      std::fflush(stdout);
    }
    // Device-limited routing on the largest cluster (--device-limited-routing M).
    const int n = *std::max_element(a.servers.begin(), a.servers.end());
    for (int limit : a.timed_limits ? a.limits : std::vector<int>{}) {
      if (limit >= n) continue;
      const Timed t = TimeCluster(fs::absolute(m.dir).string(), m.config.vocab_size, n, limit, a);
      if (!t.ok) {
        std::printf("| %s | %d | %d | failed | | | |\n", m.name.c_str(), n, limit);
        continue;
      }
      std::printf("| %s | %d | %d | %.1f | %.0f | %.2f | %.2f |\n", m.name.c_str(), n, limit,
                  t.tokens_per_s, t.calls, t.p50_ms, t.p99_ms);
      std::fflush(stdout);
    }
  }
  return 0;
}
