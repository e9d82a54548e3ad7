#include "core/rpc/metrics.h"

#include <prometheus/exposer.h>
#include <prometheus/text_serializer.h>

#include <exception>
#include <filesystem>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace dsmoe::rpc {

const std::string& GrpcCodeName(int code) {
  // absl's names are gRPC's (the codes are the same canonical set).
  static const auto* names = [] {
    auto* n = new std::array<std::string, kNumGrpcCodes>;
    for (int c = 0; c < kNumGrpcCodes; ++c)
      (*n)[c] = absl::StatusCodeToString(static_cast<absl::StatusCode>(c));
    return n;
  }();
  return (*names)[code >= 0 && code < kNumGrpcCodes ? code : 2];
}

CodeCounters AddCodeCounters(prometheus::Family<prometheus::Counter>& family,
                             prometheus::Labels labels) {
  CodeCounters out;
  for (int c = 0; c < kNumGrpcCodes; ++c) {
    labels["code"] = GrpcCodeName(c);
    out[c] = &family.Add(labels);
  }
  return out;
}

std::string ModelNameFromPath(const std::string& model_dir) {
  std::string dir = model_dir;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  return std::filesystem::path(dir).filename().string();
}

const std::vector<double>& RequestLatencyBuckets() {
  static const std::vector<double> b = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                        2.5,   5,    10,    30,   60,  120,  300, 600};
  return b;
}

const std::vector<double>& TokenLatencyBuckets() {
  static const std::vector<double> b = {0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16,
                                        0.32,  0.64,   1.28,  2.5,  5,    10,   60};
  return b;
}

const std::vector<double>& RpcLatencyBuckets() {
  static const std::vector<double> b = {0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                                        0.005,   0.01,   0.025,   0.05,   0.1,   0.25,
                                        0.5,     1,      2.5,     10};
  return b;
}

// What the endpoint scrapes: the collect hooks, then the registry.
class MetricsRegistry::HookedCollectable final : public prometheus::Collectable {
 public:
  explicit HookedCollectable(std::shared_ptr<prometheus::Registry> registry)
      : registry_(std::move(registry)) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    // Scrapes may overlap (the endpoint has two threads); hooks need not be reentrant.
    absl::MutexLock lock(&mu_);
    for (const auto& hook : hooks_) hook();
    return registry_->Collect();
  }
  std::vector<std::function<void()>> hooks_;

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  mutable absl::Mutex mu_;
};

MetricsRegistry::MetricsRegistry(const std::string& model, prometheus::Labels constant_labels)
    : labels_(std::move(constant_labels)), registry_(std::make_shared<prometheus::Registry>()) {
  labels_["model"] = model;
  collectable_ = std::make_shared<HookedCollectable>(registry_);
}

MetricsRegistry::~MetricsRegistry() = default;

prometheus::Family<prometheus::Counter>& MetricsRegistry::Counter(const std::string& name,
                                                                  const std::string& help) {
  return prometheus::BuildCounter().Name(name).Help(help).Labels(labels_).Register(*registry_);
}

prometheus::Family<prometheus::Gauge>& MetricsRegistry::Gauge(const std::string& name,
                                                              const std::string& help) {
  return prometheus::BuildGauge().Name(name).Help(help).Labels(labels_).Register(*registry_);
}

prometheus::Family<prometheus::Histogram>& MetricsRegistry::Histogram(const std::string& name,
                                                                      const std::string& help) {
  return prometheus::BuildHistogram().Name(name).Help(help).Labels(labels_).Register(*registry_);
}

void MetricsRegistry::AddCollectHook(std::function<void()> hook) {
  collectable_->hooks_.push_back(std::move(hook));
}

absl::StatusOr<int> MetricsRegistry::Serve(const std::string& listen) {
  if (exposer_ != nullptr)
    return absl::FailedPreconditionError("the metrics endpoint is already serving");
  // civetweb reports a port it cannot bind by throwing; no exception leaves this function.
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(listen, /*num_threads=*/2);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", listen, ": ", e.what()));
  }
  exposer_->RegisterCollectable(collectable_);
  const std::vector<int> ports = exposer_->GetListeningPorts();
  if (ports.empty() || ports[0] <= 0)
    return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", listen));
  return ports[0];
}

void MetricsRegistry::StopServing() { exposer_.reset(); }

std::string MetricsRegistry::Text() const {
  return prometheus::TextSerializer().Serialize(collectable_->Collect());
}

}  // namespace dsmoe::rpc
