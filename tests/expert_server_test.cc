// ExpertServer as a class: two in one process on ephemeral 127.0.0.1 ports, each holding the
// experts its placement entry names (checked through the client pool against the placement the
// test computes itself), options validated in Create, Shutdown idempotent and Wait released by
// it.
#include "expert-server/expert_server.h"

#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "expert-server/client/expert_dispatcher.h"
#include "expert-server/client/expert_server_pool.h"
#include "router/placement.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

class ExpertServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(
        WriteRandomCheckpoint(*PresetConfig("small"), {DType::kBF16, 5, 1}, dir_.path()).ok());
  }

  ExpertServerOptions Options(int index) const {
    ExpertServerOptions o;
    o.model_dir = dir_.path();
    o.num_servers = 2;
    o.server_index = index;
    o.store.threads = 1;
    o.tls.insecure = true;
    o.serving.metrics_listen = "";  // none: nothing to scrape here
    return o;
  }

  testing::TempDir dir_;
};

TEST_F(ExpertServerTest, TwoInOneProcessServeTheirPlacementEntries) {
  std::vector<std::unique_ptr<ExpertServer>> servers;
  std::vector<std::string> addresses;
  for (int s = 0; s < 2; ++s) {
    auto server = ExpertServer::Create(Options(s));
    ASSERT_TRUE(server.ok()) << server.status();
    EXPECT_GT((*server)->port(), 0);
    EXPECT_EQ((*server)->metrics_port(), 0);
    addresses.push_back((*server)->address());
    servers.push_back(std::move(*server));
  }
  EXPECT_NE(servers[0]->port(), servers[1]->port());

  auto weights = ModelWeights::Load(dir_.path(), WeightSelection::RoutedExperts());
  ASSERT_TRUE(weights.ok()) << weights.status();
  const ModelConfig& config = (*weights)->config();
  auto placement =
      router::Placement::Compute(config, 2, 1, router::Placement::Strategy::kRoundRobin);
  ASSERT_TRUE(placement.ok()) << placement.status();
  ExpertServerPoolOptions po;
  po.security = rpc::TransportSecurity::Insecure();
  ExpertServerPool pool(addresses, po);
  ExpertDispatcher dispatcher(config, *placement, pool, ExpertDispatcherOptions{});
  for (int s = 0; s < 2; ++s) {
    EXPECT_EQ(servers[s]->num_experts_held(), static_cast<int64_t>(placement->ExpertsOf(s).size()));
    EXPECT_TRUE(dispatcher.VerifyServer(s).ok()) << dispatcher.VerifyServer(s);
  }
  // Swapped: each holds the other's experts, not its own. The check keeps the server out and
  // tells it what the placement in use assigns it (re-sync); once it has loaded that, a later
  // check admits it, and it holds exactly the placement's entries for its new index.
  ExpertServerPool reversed({addresses[1], addresses[0]}, po);
  ExpertDispatcher wrong(config, *placement, reversed, ExpertDispatcherOptions{});
  const absl::Status refused = wrong.VerifyServer(0);
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnavailable) << refused;
  EXPECT_NE(refused.message().find("expert server 0 at " + addresses[1]), std::string::npos)
      << refused;
  EXPECT_NE(refused.message().find("re-sync"), std::string::npos) << refused;
  absl::Status admitted = refused;
  for (int i = 0; i < 400 && !admitted.ok(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    admitted = wrong.VerifyServer(0);
  }
  EXPECT_TRUE(admitted.ok()) << admitted;
  EXPECT_EQ(servers[1]->num_experts_held(), static_cast<int64_t>(placement->ExpertsOf(0).size()));

  // Wait on one thread, Shutdown on another, then again: all return.
  std::thread waiter([&] { servers[0]->Wait(); });
  servers[0]->Shutdown();
  waiter.join();
  servers[0]->Shutdown();
  servers[0]->Wait();
  const auto after = pool.GetExperts(0, std::chrono::milliseconds(2000));
  EXPECT_EQ(after.status().code(), absl::StatusCode::kUnavailable) << after.status();
  EXPECT_TRUE(pool.GetExperts(1, std::chrono::milliseconds(2000)).ok()) << "the other serves on";
}

TEST_F(ExpertServerTest, CreateValidatesItsOptions) {
  ExpertServerOptions o = Options(0);
  o.model_dir = "";
  EXPECT_EQ(ExpertServer::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = Options(0);
  o.num_replicas = 0;
  EXPECT_EQ(ExpertServer::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = Options(2);  // the placement has servers 0 and 1
  const auto out_of_range = ExpertServer::Create(o);
  EXPECT_EQ(out_of_range.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(out_of_range.status().message().find("server index 2"), std::string::npos)
      << out_of_range.status();
  o = Options(0);
  o.tls.insecure = false;  // TLS, but no certificate
  EXPECT_FALSE(ExpertServer::Create(o).ok());
}

}  // namespace
}  // namespace dsmoe
