#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace dsmoe::testing {

TempDir::TempDir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "dsmoe-test-XXXXXX").string();
  path_ = mkdtemp(tmpl.data());
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<float> RandomFloats(size_t n, uint64_t seed, float scale) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

ModelConfig WriteTinyModel(const std::string& dir, DType dtype) {
  ModelConfig config = *PresetConfig("tiny");
  const absl::Status s = WriteRandomCheckpoint(config, {dtype, 3, 1}, dir);
  EXPECT_TRUE(s.ok()) << s;
  return config;
}

std::vector<double> NaiveExpert(const MlpWeights& m, const float* x) {
  const int64_t W = m.width(), H = m.gate.cols;
  std::vector<double> act(W), out(H);
  for (int64_t r = 0; r < W; ++r) {
    double g = 0, u = 0;
    for (int64_t k = 0; k < H; ++k) {
      g += x[k] * double(LoadAsF32(m.gate.Row(r), m.gate.dtype, k));
      u += x[k] * double(LoadAsF32(m.up.Row(r), m.up.dtype, k));
    }
    act[r] = g / (1 + std::exp(-g)) * u;
  }
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t r = 0; r < W; ++r) out[h] += act[r] * LoadAsF32(m.down.Row(h), m.down.dtype, r);
  }
  return out;
}

}  // namespace dsmoe::testing
