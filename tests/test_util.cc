#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <sstream>

#include "core/model/model_runner.h"
#include "core/util/status.h"

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

absl::StatusOr<std::vector<std::vector<double>>> WholeSequenceLogSoftmax(
    const ModelWeights& weights, ThreadPool& pool, const std::vector<int32_t>& ids) {
  const int64_t T = static_cast<int64_t>(ids.size()), V = weights.config().vocab_size;
  RunnerOptions o;
  o.num_slots = 1;
  o.max_context = std::max<int64_t>(T, 64);
  o.max_batch_tokens = std::max<int64_t>(T, 64);
  DSMOE_ASSIGN_OR_RETURN(auto runner, ModelRunner::Create(weights, pool, o));
  std::vector<int32_t> slots(T, 0), positions(T), rows(T);
  std::iota(positions.begin(), positions.end(), 0);
  std::iota(rows.begin(), rows.end(), 0);
  std::vector<float> logits(T * V);
  DSMOE_RETURN_IF_ERROR(runner->Forward({ids, slots, positions, rows}, logits.data()));
  std::vector<std::vector<double>> out(T, std::vector<double>(V));
  for (int64_t t = 0; t < T; ++t) {
    const float* row = logits.data() + t * V;
    double sum = 0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(static_cast<double>(row[v]));
    for (int64_t v = 0; v < V; ++v) out[t][v] = static_cast<double>(row[v]) - std::log(sum);
  }
  return out;
}

}  // namespace dsmoe::testing
