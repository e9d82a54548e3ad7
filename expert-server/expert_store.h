// Where an expert server keeps its routed experts and computes them: host memory and the CPU
// kernels, or one GPU (`--device cuda:N`). The service above it owns the placement state
// machine; a store only knows how to compute the experts it holds and how to change that set.
//
// A placement change is prepared first (loading from the checkpoint, uploading to the GPU),
// while the current set keeps serving, and then committed between two computations.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <utility>

#include "core/model/routed_experts.h"
#include "core/model/weights.h"
#include "core/util/device.h"
#include "core/util/status.h"

namespace dsmoe {

using ExpertSet = std::set<std::pair<int64_t, int64_t>>;  // (layer, expert)

// A change of the held set: `target` is the set afterwards, `to_load` what it adds and
// `to_drop` what it removes.
struct PlacementChange {
  ExpertSet target, to_load, to_drop;
};

struct ExpertStoreOptions {
  Device device;              // cpu, or cuda:N
  std::string model_dir;      // the checkpoint every load reads
  int threads = 0;            // CPU compute threads; 0: all cores
  int64_t max_tokens = 4096;  // tokens per computation (and top-k assignments each)
};

class ExpertStore {
 public:
  explicit ExpertStore(const ExpertStoreOptions& options) : options_(options) {}
  virtual ~ExpertStore() = default;

  const ExpertStoreOptions& options() const { return options_; }
  virtual const ModelConfig& config() const = 0;
  // (token, expert) assignments per computation at most: max_tokens × top-k.
  int64_t max_assignments() const { return MaxAssignments(options_, config()); }
  static int64_t MaxAssignments(const ExpertStoreOptions& options, const ModelConfig& config) {
    return options.max_tokens * std::max<int64_t>(config.num_experts_per_tok, 1);
  }
  // The (layer, expert) pairs held when the store was opened.
  virtual ExpertSet InitiallyHeld() const = 0;

  // out[t] = Σ over the assignments of token t of weight · expert(x[t]); zeros for tokens with
  // none. FAILED_PRECONDITION if an expert is not held. Not concurrently with itself or with a
  // commit (the service serialises them).
  virtual absl::Status RunAssignments(int64_t layer, const float* x, int64_t T,
                                      const ExpertAssignments& assignments, float* out) = 0;

  // Whether preparing `change` does real work (loads or uploads weights), so that it belongs
  // on a background thread.
  virtual bool PrepareIsSlow(const PlacementChange& change) const = 0;

  // What puts a prepared change in use: quick, run between two computations.
  using Commit = std::function<void()>;
  // Loads what `change` needs while the current set keeps serving. At most one change is
  // prepared at a time; the returned commit must run before the next Prepare.
  virtual absl::StatusOr<Commit> Prepare(const PlacementChange& change) = 0;

  // The NCCL transport (OpenNcclChannel): stores on a GPU in builds with CUDA; the others say
  // why not (FAILED_PRECONDITION), and the attention server keeps to gRPC.
  using Deadline = std::chrono::steady_clock::time_point;
  // Joins the two-rank communicator `unique_id` as the expert side (rank 1), waiting for the
  // caller until `deadline`; returns the channel's id. Any thread.
  virtual absl::StatusOr<uint64_t> OpenChannel(const std::string& unique_id, Deadline deadline);
  // RunAssignments with the hidden states received through channel `channel` and the output
  // sent back through it. Serialised like RunAssignments.
  virtual absl::Status RunAssignmentsOverChannel(uint64_t channel, int64_t layer, int64_t T,
                                                 const ExpertAssignments& assignments,
                                                 Deadline deadline);
  // Closes channel `channel` if open: the service does after any failed call on it, since the
  // caller closes its side then.
  virtual void CloseChannel(uint64_t /*channel*/) {}

 protected:
  // NOT_FOUND naming `channel`.
  static absl::Status NoSuchChannel(uint64_t channel);

  const ExpertStoreOptions options_;
};

// Loads the experts `selection` names onto `options.device`. FAILED_PRECONDITION with the reason
// when the device cannot be used (a build without CUDA, no GPU).
absl::StatusOr<std::unique_ptr<ExpertStore>> OpenExpertStore(const ExpertStoreOptions& options,
                                                             const WeightSelection& selection);

// The routed experts `weights` has loaded.
ExpertSet LoadedExperts(const ModelWeights& weights);

}  // namespace dsmoe
