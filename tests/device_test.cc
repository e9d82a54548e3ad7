// --device parsing: every accepted spelling, and refusals naming the text.
#include "core/util/device.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace dsmoe {
namespace {

TEST(ParseDevice, AcceptsCpuCudaAndCudaN) {
  EXPECT_FALSE(ParseDevice("cpu")->is_cuda());
  EXPECT_EQ(ParseDevice("cuda")->index, 0);
  EXPECT_TRUE(ParseDevice("cuda")->is_cuda());
  EXPECT_EQ(ParseDevice("cuda:3")->index, 3);
  EXPECT_EQ(ParseDevice("cuda:3")->ToString(), "cuda:3");
  EXPECT_EQ(ParseDevice("cpu")->ToString(), "cpu");
}

TEST(ParseDevice, RefusesAnythingElseNamingIt) {
  for (const char* bad : {"", "gpu", "CPU", "cuda:", "cuda:-1", "cuda:1x", "cuda:x", "cuda0"}) {
    const auto d = ParseDevice(bad);
    ASSERT_FALSE(d.ok()) << bad;
    EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(d.status().message()),
                ::testing::HasSubstr(std::string("\"") + bad + "\""));
  }
}

}  // namespace
}  // namespace dsmoe
