// Prometheus metrics for the dsmoe services (prometheus-cpp, Debian's prometheus-cpp-dev):
// a registry whose families all carry the `model` label, and the HTTP `/metrics` endpoint
// that serves it on the service's own port.
//
// The pattern every service follows (docs/metrics.md): families are registered and every
// labelled child is looked up once, at start-up, and kept as a pointer; the hot path is then
// one atomic add on a child (prometheus::Counter/Gauge), never a label lookup.
#pragma once

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <array>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/util/status.h"

namespace prometheus {
class Exposer;
}

namespace dsmoe::rpc {

// The gRPC status codes 0..16, in order, as label values ("OK", "CANCELLED", ...).
inline constexpr int kNumGrpcCodes = 17;
const std::string& GrpcCodeName(int code);

// One Counter child per gRPC code of a family (label `code`), created up front so that every
// code's series exists (rate() is defined from start-up on) and counting is an index.
using CodeCounters = std::array<prometheus::Counter*, kNumGrpcCodes>;
CodeCounters AddCodeCounters(prometheus::Family<prometheus::Counter>& family,
                             prometheus::Labels labels);
// Adds 1 to the child of `code` (out-of-range codes count as UNKNOWN).
inline void CountCode(const CodeCounters& counters, int code) {
  counters[code >= 0 && code < kNumGrpcCodes ? code : 2]->Increment();
}

// The default `model` label: the checkpoint directory's name (trailing slashes ignored).
std::string ModelNameFromPath(const std::string& model_dir);

// Bucket bounds (seconds) shared by the services, so dashboards can compare them.
const std::vector<double>& RequestLatencyBuckets();  // TTFT, end-to-end: 5 ms .. 10 min
const std::vector<double>& TokenLatencyBuckets();    // inter-token, queue: 1 ms .. 60 s
const std::vector<double>& RpcLatencyBuckets();  // dispatch round trips, compute: 50 µs .. 10 s

// A registry of families that all carry `model` (and any further constant labels, e.g. the
// expert server's index), plus the endpoint serving it.
//
// Thread-safe: families and children may be added from any thread (prometheus-cpp locks), and
// children updated from any thread (atomics). Collect hooks must be added before Serve.
class MetricsRegistry {
 public:
  explicit MetricsRegistry(const std::string& model, prometheus::Labels constant_labels = {});
  ~MetricsRegistry();
  MetricsRegistry(const MetricsRegistry&) = delete;
  MetricsRegistry& operator=(const MetricsRegistry&) = delete;

  prometheus::Family<prometheus::Counter>& Counter(const std::string& name,
                                                   const std::string& help);
  prometheus::Family<prometheus::Gauge>& Gauge(const std::string& name, const std::string& help);
  prometheus::Family<prometheus::Histogram>& Histogram(const std::string& name,
                                                       const std::string& help);

  // Runs before every scrape, on the scraping thread: for values that are computed rather than
  // counted (a gauge over a recent window). REQUIRES: called before Serve.
  void AddCollectHook(std::function<void()> hook);

  // Starts serving GET /metrics on `listen` (host:port; port 0 picks a free one) and returns
  // the bound port. The endpoint lives as long as this registry.
  absl::StatusOr<int> Serve(const std::string& listen);
  // Stops the endpoint (no scrape runs after this returns): call before the instruments that
  // collect hooks read are destroyed.
  void StopServing();

  // The exposition text of everything registered (what /metrics answers, minus the
  // endpoint's own exposer_* metrics), for tests and tools.
  std::string Text() const;

  prometheus::Registry& registry() { return *registry_; }
  const prometheus::Labels& labels() const { return labels_; }

 private:
  class HookedCollectable;
  prometheus::Labels labels_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<HookedCollectable> collectable_;
  std::unique_ptr<prometheus::Exposer> exposer_;
};

}  // namespace dsmoe::rpc
