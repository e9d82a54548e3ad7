// The expert server's service on each device it can hold experts on (`--device cpu` and, where
// dsmoe was built with CUDA and a GPU is present, `cuda:0`): it computes what a naive per-token
// loop computes, and a placement change (experts added, kept and dropped) takes effect while it
// serves. The cuda:0 case skips with the reason elsewhere.
#include "expert-server/expert_service.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <thread>

#include "core/model/make_model.h"
#include "core/util/log.h"
#include "expert-server/expert_store.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

class ExpertServiceOnDevice : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    ASSERT_TRUE(
        WriteRandomCheckpoint(*PresetConfig("small"), {DType::kBF16, 7, 1}, dir_.path()).ok());
    auto w = ModelWeights::Load(dir_.path());
    ASSERT_TRUE(w.ok()) << w.status();
    weights_ = std::move(*w);
  }

  // The service as dsmoe-expert-server --device <param> runs it, holding `experts`; null (and
  // the test skipped) where the device cannot be used.
  std::unique_ptr<ExpertService> Open(const ExpertSet& experts, Logger* logger = DefaultLogger()) {
    ExpertStoreOptions so;
    so.device = *ParseDevice(GetParam());
    so.model_dir = dir_.path();
    so.threads = 2;
    so.max_tokens = 8;
    auto store = OpenExpertStore(so, WeightSelection::RoutedExperts(experts));
    if (!store.ok()) {
      // Only a missing GPU or CUDA backend is a reason to skip; anything else fails.
      EXPECT_TRUE(so.device.is_cuda() &&
                  store.status().code() == absl::StatusCode::kFailedPrecondition)
          << store.status();
      unusable_ = std::string(store.status().message());
      return nullptr;
    }
    ExpertServiceOptions options;
    options.logger = logger;
    return std::make_unique<ExpertService>(std::move(*store), options);
  }

  // One ComputeExperts call: token 0 routed to `expert` of `layer` with weight 0.75.
  grpc::Status ComputeOne(ExpertService& service, int64_t layer, int32_t expert,
                          const std::vector<float>& x, std::vector<float>* out) {
    internal::v1::ComputeExpertsRequest req;
    req.set_layer(static_cast<uint32_t>(layer));
    req.set_num_tokens(1);
    req.set_hidden(x.data(), x.size() * sizeof(float));
    req.add_token(0);
    req.add_expert(static_cast<uint32_t>(expert));
    req.add_weight(0.75f);
    internal::v1::ComputeExpertsResponse resp;
    grpc::ServerContext context;
    const grpc::Status s = service.ComputeExperts(&context, &req, &resp);
    if (s.ok()) {
      EXPECT_EQ(resp.output().size(), x.size() * sizeof(float));
      out->resize(x.size());
      std::memcpy(out->data(), resp.output().data(), x.size() * sizeof(float));
    }
    return s;
  }

  // Relative L2 distance of `got` from 0.75 · NaiveExpert(expert)(x).
  double ErrorAgainstNaive(int64_t layer, int32_t expert, const std::vector<float>& x,
                           const std::vector<float>& got) {
    const std::vector<double> want =
        testing::NaiveExpert(weights_->layers[layer].routed[expert], x.data());
    double num = 0, den = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      const double w = 0.75 * want[i];
      num += (got[i] - w) * (got[i] - w);
      den += w * w;
    }
    return std::sqrt(num / den);
  }

  // bf16 weights: the CPU keeps fp32 activations; the GPU rounds them to bf16 too.
  double Tolerance() const { return GetParam() == "cpu" ? 1e-5 : 1e-2; }

  testing::TempDir dir_;
  std::unique_ptr<ModelWeights> weights_;
  std::string unusable_;  // why the device could not be used
};

TEST_P(ExpertServiceOnDevice, PlacementChangeAddsKeepsAndDropsExpertsWhileServing) {
  const ModelConfig& c = weights_->config();
  const int64_t H = c.hidden_size, E = c.n_routed_experts, layer = c.first_k_dense_replace;
  ASSERT_GE(E, 4);
  ExpertSet first, second;  // [0, E/2), then [E/4, E): a quarter dropped, half added
  for (int64_t e = 0; e < E / 2; ++e) first.insert({layer, e});
  for (int64_t e = E / 4; e < E; ++e) second.insert({layer, e});
  CapturingLogger log;  // outlives the service, which logs the change into it
  std::unique_ptr<ExpertService> service = Open(first, &log);
  if (service == nullptr) GTEST_SKIP() << GetParam() << " cannot be used here: " << unusable_;
  EXPECT_EQ(service->num_experts_held(), E / 2);

  std::vector<float> x = testing::RandomFloats(H, 31);
  for (float& v : x) v = Bf16ToF32(F32ToBf16(v));  // exact on both devices
  std::vector<float> out;
  const int32_t added = static_cast<int32_t>(E - 1), kept = static_cast<int32_t>(E / 4),
                dropped = 0;
  EXPECT_EQ(ComputeOne(*service, layer, added, x, &out).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION)
      << "not held yet";
  ASSERT_TRUE(ComputeOne(*service, layer, dropped, x, &out).ok());
  EXPECT_LT(ErrorAgainstNaive(layer, dropped, x, out), Tolerance());

  internal::v1::SetPlacementRequest req;
  req.set_version(1);
  for (const auto& [l, e] : second) {
    req.add_layers(static_cast<uint32_t>(l));
    req.add_experts(static_cast<uint32_t>(e));
  }
  internal::v1::SetPlacementResponse resp;
  {
    grpc::ServerContext context;
    ASSERT_TRUE(service->SetPlacement(&context, &req, &resp).ok());
  }
  EXPECT_EQ(resp.num_loading(), static_cast<uint32_t>(E - E / 2));
  EXPECT_EQ(resp.num_dropping(), static_cast<uint32_t>(E / 4));
  // The old set serves while the new one loads.
  ASSERT_TRUE(ComputeOne(*service, layer, kept, x, &out).ok());

  internal::v1::GetExpertsResponse held;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  do {
    held.Clear();
    grpc::ServerContext context;
    internal::v1::GetExpertsRequest get;
    ASSERT_TRUE(service->GetExperts(&context, &get, &held).ok());
    if (held.placement_state() != internal::v1::PLACEMENT_STATE_LOADING) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  } while (std::chrono::steady_clock::now() < deadline);
  ASSERT_EQ(held.placement_state(), internal::v1::PLACEMENT_STATE_SERVING)
      << held.placement_error();
  EXPECT_EQ(held.placement_version(), 1u);
  ExpertSet reported;
  for (int i = 0; i < held.layers_size(); ++i) reported.insert({held.layers(i), held.experts(i)});
  EXPECT_EQ(reported, second);
  EXPECT_EQ(service->num_experts_held(), static_cast<int64_t>(second.size()));
  // One line says so (logged before the state reads SERVING): "expert server: placement 1 serves
  // <held> experts (loaded <added> in <seconds> s, dropped <dropped>)".
  const std::vector<std::string> lines = log.lines();
  ASSERT_EQ(lines.size(), 1u);
  const std::string head = absl::StrCat("expert server: placement 1 serves ", second.size(),
                                        " experts (loaded ", E - E / 2, " in "),
                    tail = absl::StrCat(" s, dropped ", E / 4, ")");
  ASSERT_GT(lines[0].size(), head.size() + tail.size()) << lines[0];
  EXPECT_EQ(lines[0].substr(0, head.size()), head) << lines[0];
  EXPECT_EQ(lines[0].substr(lines[0].size() - tail.size()), tail) << lines[0];
  EXPECT_EQ(log.entries()[0].level, LogLevel::kInfo);

  EXPECT_EQ(ComputeOne(*service, layer, dropped, x, &out).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION)
      << "dropped";
  for (int32_t e : {added, kept}) {
    ASSERT_TRUE(ComputeOne(*service, layer, e, x, &out).ok()) << "expert " << e;
    const double err = ErrorAgainstNaive(layer, e, x, out);
    std::printf("[expert-service %s] expert %d after the change: rel-L2 %.3g\n", GetParam().c_str(),
                e, err);
    EXPECT_LT(err, Tolerance()) << "expert " << e;
  }
}

// The store's limits are the service's: 8 tokens and 8 × top-k assignments per request (what
// a GPU store has room for), checked before any computation.
TEST_P(ExpertServiceOnDevice, RequestsAboveTheStoresLimitsAreRefused) {
  const ModelConfig& c = weights_->config();
  const int64_t H = c.hidden_size, layer = c.first_k_dense_replace;
  std::unique_ptr<ExpertService> service = Open({{layer, 0}});
  if (service == nullptr) GTEST_SKIP() << GetParam() << " cannot be used here: " << unusable_;
  const int64_t max_assignments = 8 * c.num_experts_per_tok;
  auto call = [&](int64_t tokens, int64_t assignments) {
    internal::v1::ComputeExpertsRequest req;
    req.set_layer(static_cast<uint32_t>(layer));
    req.set_num_tokens(static_cast<uint32_t>(tokens));
    const std::vector<float> x = testing::RandomFloats(tokens * H, 5);
    req.set_hidden(x.data(), x.size() * sizeof(float));
    for (int64_t i = 0; i < assignments; ++i) {
      req.add_token(static_cast<uint32_t>(i % tokens));
      req.add_expert(0);
      req.add_weight(0.5f);
    }
    internal::v1::ComputeExpertsResponse resp;
    grpc::ServerContext context;
    return service->ComputeExperts(&context, &req, &resp);
  };
  EXPECT_TRUE(call(8, max_assignments).ok()) << "at the limits";
  const grpc::Status tokens = call(9, 9);
  EXPECT_EQ(tokens.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(tokens.error_message().find("9 tokens exceed"), std::string::npos)
      << tokens.error_message();
  const grpc::Status assignments = call(8, max_assignments + 1);
  EXPECT_EQ(assignments.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(assignments.error_message().find(absl::StrCat(max_assignments + 1, " assignments")),
            std::string::npos)
      << assignments.error_message();
}

INSTANTIATE_TEST_SUITE_P(Devices, ExpertServiceOnDevice, ::testing::Values("cpu", "cuda:0"),
                         [](const auto& p) {
                           return p.param == "cpu" ? std::string("Cpu") : std::string("Cuda0");
                         });

}  // namespace
}  // namespace dsmoe
