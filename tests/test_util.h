// Small helpers shared by the unit tests: temporary directories and random data.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/config.h"
#include "core/model/make_model.h"
#include "core/model/weights.h"
#include "core/util/thread_pool.h"

namespace dsmoe::testing {

// A fresh directory under the system temp dir, removed when the object dies.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

void WriteFile(const std::string& path, const std::string& bytes);
std::string ReadFile(const std::string& path);
std::vector<float> RandomFloats(size_t n, uint64_t seed, float scale = 1.0f);

// The tiny preset, written to `dir` (random weights, seed 3).
ModelConfig WriteTinyModel(const std::string& dir, DType dtype = DType::kF32);

// One routed expert (any MLP) on one token, straight from the definition
// down(silu(gate x) ⊙ up x), in double precision.
std::vector<double> NaiveExpert(const MlpWeights& m, const float* x);

// The reference of the prompt-logprob tests: log_softmax, in double, of the logits a fresh
// one-slot ModelRunner gives for every position of `ids` in one forward pass; row p ([vocab]) is
// the distribution token p + 1 is scored by.
absl::StatusOr<std::vector<std::vector<double>>> WholeSequenceLogSoftmax(
    const ModelWeights& weights, ThreadPool& pool, const std::vector<int32_t>& ids);

}  // namespace dsmoe::testing
