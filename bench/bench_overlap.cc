// What micro-batches buy when attention and experts have hardware of their own: decode through
// the cluster (1 attention server + 2 expert servers, `dsmoe cluster up`) with m = 1 and m = 2
// micro-batches per step, against the single-process engine on all cores, at 1, 8 and 32
// streams, for each model; then a step-time model fitted from the m = 1 runs' measured phase
// times predicts every run's step time, side by side with the measurement.
//
//   dsmoe_bench_overlap [--models small,medium] [--streams 1,8,32] [--tokens 32] [--prompt 16]
//                       [--micro-batches 1,2] [--cpus "attention=0;experts=1"]
//                       [--cluster-flags "..."]
//
// --cpus pins the roles as `cluster up --cpus` does (attention on core 0, expert servers on
// core 1: as if on separate machines); "" leaves them to share every core. Models are preset
// names (written BF16 under /tmp/dsmoe-bench) or checkpoint directories.
//
// The phase times come from the servers' own metrics: the attention server's
// dsmoe_forward_phase_seconds_total (attention-side work, and routed_wait: time blocked on the
// expert servers), dsmoe_forward_pass_seconds and dsmoe_batch_tokens (steps, tokens per step),
// dsmoe_dispatch_round_trip_seconds (per call), the expert servers'
// dsmoe_expert_server_compute_seconds.
//
// The model, per MoE layer of a step of T tokens (L MoE layers). a(T) = attention-side work per
// layer incl. shared experts, s(T) = the shared experts, both c0 + c1·T; r(T) = a dispatch's
// round trip = c0 + c1·D(T), where D(T) = E/S · (1 − (1 − k/E)^T) is the routed experts one of
// the S expert servers expects to run for T tokens: the expert side is bound by reading their
// weights, so its time follows the experts touched, not the tokens. Fitted by least squares
// over the m = 1 runs:
//   m = 1:  t = L · (a(T) + max(0, r(T) − s(T)))        the round trip hides behind the shared
//   m ≥ 2:  t = L · max(m·a(T/m), m·r(T/m))             a pipeline: each side works on one
//                                                       micro-batch while the other has another
// The pipeline formula assumes the two sides do not share cores (--cpus). It says when
// micro-batches pay: when m·r(T/m) stays below the attention side, i.e. when the expert side
// is compute-bound or has slack — not when every micro-batch re-reads the same expert weights.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "bench/bench_args.h"
#include "bench/cluster_harness.h"
#include "core/model/make_model.h"

namespace {

using namespace dsmoe;
using bench::SplitList;
namespace fs = std::filesystem;

// One cluster run's figures, per step (seconds) unless named otherwise.
struct Run {
  int streams = 0, micro_batches = 0;
  double tokens_per_second = 0;
  double steps = 0, tokens_per_step = 0, step = 0;
  double attention_side = 0;  // every phase but routed_wait
  double shared = 0, routed_wait = 0;
  double round_trip = 0;      // per dispatch call
  double expert_compute = 0;  // per expert-server call
  double calls_per_layer = 0;
};

// The attention server's and expert servers' counters, summed.
struct Counters {
  double steps = 0, step_seconds = 0, batch_tokens = 0;
  double phases_total = 0, shared = 0, routed_wait = 0;
  double rtt_sum = 0, rtt_count = 0, compute_sum = 0, compute_count = 0;
};

Counters Read(const bench::BenchCluster& cluster) {
  Counters c;
  for (const std::string& m : cluster.Scrape("attention-server")) {
    c.steps += bench::MetricSum(m, "dsmoe_forward_pass_seconds_count");
    c.step_seconds += bench::MetricSum(m, "dsmoe_forward_pass_seconds_sum");
    c.batch_tokens += bench::MetricSum(m, "dsmoe_batch_tokens_sum");
    c.phases_total += bench::MetricSum(m, "dsmoe_forward_phase_seconds_total");
    c.shared += bench::MetricSum(m, "dsmoe_forward_phase_seconds_total", "\"shared_experts\"");
    c.routed_wait += bench::MetricSum(m, "dsmoe_forward_phase_seconds_total", "\"routed_wait\"");
    c.rtt_sum += bench::MetricSum(m, "dsmoe_dispatch_round_trip_seconds_sum");
    c.rtt_count += bench::MetricSum(m, "dsmoe_dispatch_round_trip_seconds_count");
  }
  for (const std::string& m : cluster.Scrape("expert-server")) {
    c.compute_sum += bench::MetricSum(m, "dsmoe_expert_server_compute_seconds_sum");
    c.compute_count += bench::MetricSum(m, "dsmoe_expert_server_compute_seconds_count");
  }
  return c;
}

Run Measure(const bench::BenchCluster& cluster, const ModelConfig& config, int streams,
            int micro_batches, int tokens, int prompt_len) {
  const Counters before = Read(cluster);
  Run r;
  r.streams = streams;
  r.micro_batches = micro_batches;
  r.tokens_per_second = cluster.Generate(config.vocab_size, streams, tokens, prompt_len);
  const Counters after = Read(cluster);
  const double steps = std::max(after.steps - before.steps, 1.0);
  const double calls = std::max(after.rtt_count - before.rtt_count, 1.0);
  r.steps = steps;
  r.tokens_per_step = (after.batch_tokens - before.batch_tokens) / steps;
  r.step = (after.step_seconds - before.step_seconds) / steps;
  r.routed_wait = (after.routed_wait - before.routed_wait) / steps;
  r.shared = (after.shared - before.shared) / steps;
  r.attention_side = (after.phases_total - before.phases_total) / steps - r.routed_wait;
  r.round_trip = (after.rtt_sum - before.rtt_sum) / calls;
  r.expert_compute = (after.compute_sum - before.compute_sum) /
                     std::max(after.compute_count - before.compute_count, 1.0);
  r.calls_per_layer = calls / steps / static_cast<double>(config.NumMoeLayers());
  return r;
}

// y ≈ c0 + c1·x by least squares (c1 = 0 with one distinct x).
struct Line {
  double c0 = 0, c1 = 0;
  double operator()(double x) const { return c0 + c1 * x; }
};
Line Fit(const std::vector<double>& x, const std::vector<double>& y) {
  const double n = static_cast<double>(x.size());
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    sx += x[i];
    sy += y[i];
    sxx += x[i] * x[i];
    sxy += x[i] * y[i];
  }
  const double det = n * sxx - sx * sx;
  if (std::abs(det) < 1e-12) return {sy / n, 0};
  return {(sy * sxx - sx * sxy) / det, (n * sxy - sx * sy) / det};
}

std::string ModelDir(const std::string& name) {
  if (fs::exists(name + "/config.json")) return name;
  const std::string dir = "/tmp/dsmoe-bench/" + name + "-bf16";
  if (!fs::exists(dir + "/config.json")) {
    auto config = PresetConfig(name);
    if (!config.ok()) return "";
    std::printf("writing %s ...\n", dir.c_str());
    if (!WriteRandomCheckpoint(*config, {DType::kBF16, 1, 1}, dir).ok()) return "";
  }
  return dir;
}

}  // namespace

int main(int argc, char** argv) {
  std::string models = "small,medium", streams_arg = "1,8,32", micro_arg = "1,2", cpus,
              cluster_flags;
  int tokens = 32, prompt_len = 16;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--models") {
      models = value;
    } else if (flag == "--streams") {
      streams_arg = value;
    } else if (flag == "--micro-batches") {
      micro_arg = value;
    } else if (flag == "--tokens") {
      tokens = std::stoi(value);
    } else if (flag == "--prompt") {
      prompt_len = std::stoi(value);
    } else if (flag == "--cpus") {
      cpus = value;
    } else if (flag == "--cluster-flags") {
      cluster_flags = value;
    } else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  std::printf("placement of the roles: %s\n",
              cpus.empty() ? "every process may use every core" : cpus.c_str());
  for (const std::string& name : SplitList(models)) {
    const std::string dir = ModelDir(name);
    auto weights = ModelWeights::Load(dir);
    if (dir.empty() || !weights.ok()) {
      std::fprintf(stderr, "model %s: cannot load\n", name.c_str());
      return 1;
    }
    const ModelConfig& c = (*weights)->config();
    const double L = static_cast<double>(c.NumMoeLayers());
    std::printf("\n## %s: %lld layers (%lld MoE), hidden %lld, %lld routed experts (top-%lld)\n\n",
                name.c_str(), (long long)c.num_hidden_layers, (long long)c.NumMoeLayers(),
                (long long)c.hidden_size, (long long)c.n_routed_experts,
                (long long)c.num_experts_per_tok);
    std::vector<double> single;
    bench::SingleProcessTokensPerSecond(**weights, 4, 4, prompt_len);  // page the weights in
    for (const std::string& n : SplitList(streams_arg)) {
      single.push_back(
          bench::SingleProcessTokensPerSecond(**weights, std::stoi(n), tokens, prompt_len));
    }
    std::vector<Run> runs;
    for (const std::string& m : SplitList(micro_arg)) {
      std::string flags = "--micro-batches " + m + " " + cluster_flags;
      if (!cpus.empty()) flags += " --cpus '" + cpus + "'";
      auto cluster = bench::BenchCluster::Up(dir, 2, flags);
      if (!cluster.ok()) {
        std::fprintf(stderr, "%s\n", std::string(cluster.status().message()).c_str());
        return 1;
      }
      (*cluster)->Generate(c.vocab_size, 4, 4, prompt_len);  // warm-up
      for (const std::string& n : SplitList(streams_arg)) {
        runs.push_back(Measure(**cluster, c, std::stoi(n), std::stoi(m), tokens, prompt_len));
      }
    }
    // The model, fitted on the m = 1 runs.
    const double E = static_cast<double>(c.n_routed_experts), S = 2;
    const double k = static_cast<double>(c.num_experts_per_tok);
    auto touched = [&](double T) { return E / S * (1 - std::pow(1 - k / E, T)); };
    std::vector<double> x, d, a, s, r;
    for (const Run& run : runs) {
      if (run.micro_batches != 1) continue;
      x.push_back(run.tokens_per_step);
      d.push_back(touched(run.tokens_per_step));
      a.push_back(run.attention_side / L);
      s.push_back(run.shared / L);
      r.push_back(run.round_trip);
    }
    const Line fa = Fit(x, a), fs_ = Fit(x, s), fr = Fit(d, r);
    auto predict = [&](double T, int m) {
      if (m <= 1 || T < 2) return L * (fa(T) + std::max(0.0, fr(touched(T)) - fs_(T)));
      const double h = T / m;
      return L * std::max(m * fa(h), m * fr(touched(h)));
    };
    std::printf(
        "| streams | m | single tok/s | cluster tok/s | cluster / single | tokens/step | step ms | "
        "attention side ms | routed wait ms | dispatch RTT µs | expert compute µs | calls/layer "
        "| model step ms | model error |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        "\n");
    const size_t num_streams = single.size();
    for (size_t i = 0; i < runs.size(); ++i) {
      const Run& run = runs[i];
      const double one = single[i % num_streams];
      const double model = predict(run.tokens_per_step, run.micro_batches);
      std::printf(
          "| %d | %d | %.1f | %.1f | %.2f | %.1f | %.2f | %.2f | %.2f | %.0f | %.0f | %.2f | %.2f "
          "| %+.0f%% |\n",
          run.streams, run.micro_batches, one, run.tokens_per_second, run.tokens_per_second / one,
          run.tokens_per_step, run.step * 1e3, run.attention_side * 1e3, run.routed_wait * 1e3,
          run.round_trip * 1e6, run.expert_compute * 1e6, run.calls_per_layer, model * 1e3,
          100.0 * (model - run.step) / run.step);
    }
    // m = 2 against m = 1 at each stream count.
    for (size_t i = 0; i < num_streams && runs.size() >= 2 * num_streams; ++i) {
      std::printf("%d streams: m = %d / m = %d throughput %.2fx\n", runs[i].streams,
                  runs[num_streams + i].micro_batches, runs[i].micro_batches,
                  runs[num_streams + i].tokens_per_second / runs[i].tokens_per_second);
    }
    std::printf(
        "fitted per MoE layer: a(T) = %.0f + %.1f·T µs, s(T) = %.0f + %.1f·T µs, "
        "r(T) = %.0f + %.1f·D(T) µs\n",
        fa.c0 * 1e6, fa.c1 * 1e6, fs_.c0 * 1e6, fs_.c1 * 1e6, fr.c0 * 1e6, fr.c1 * 1e6);
    std::fflush(stdout);
  }
  return 0;
}
