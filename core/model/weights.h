// The model's weights as named views into a checkpoint, checked against the config.
//
// Tensor names and shapes are exactly Hugging Face's DeepseekForCausalLM, as listed once in
// core/model/tensor_roles.h.
#pragma once

#include <atomic>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/time/time.h"
#include "core/io/checkpoint.h"
#include "core/model/config.h"
#include "core/tensor/tensor.h"
#include "core/util/huge_pages.h"
#include "core/util/log.h"
#include "core/util/status.h"
#include "core/util/thread_pool.h"

namespace dsmoe {

struct LinearWeights {
  MatrixView weight;        // [out, in]
  std::vector<float> bias;  // [out] or empty
};

// A SwiGLU MLP: down(silu(gate(x)) · up(x)). Dense layers, each routed expert and the shared
// experts (one MLP of width n_shared · moe_intermediate_size) all have this form.
struct MlpWeights {
  MatrixView gate;  // [width, H]
  MatrixView up;    // [width, H]
  MatrixView down;  // [H, width]
  int64_t width() const { return gate.rows; }
  bool loaded() const { return !gate.empty(); }
};

struct AttentionWeights {
  LinearWeights q, k, v, o;
};

struct LayerWeights {
  std::vector<float> input_norm;           // [H]
  std::vector<float> post_attention_norm;  // [H]
  AttentionWeights attention;
  bool is_moe = false;
  MlpWeights dense;                // dense layers only
  MatrixView router;               // MoE layers: the gate, [n_routed, H]
  MlpWeights shared;               // MoE layers with shared experts
  std::vector<MlpWeights> routed;  // MoE layers: [n_routed]; not loaded() if not selected
};

// Which tensors a process needs: an attention server takes everything but the routed experts,
// an expert server only its routed experts, the single-process engine all of them.
struct WeightSelection {
  bool attention_side = true;  // embeddings, norms, attention, dense MLPs, routers, shared, head
  bool all_routed_experts = true;
  std::set<std::pair<int64_t, int64_t>> routed_experts;  // (layer, expert), if not all

  static WeightSelection Everything() { return {}; }
  // Only the routed experts `experts` (an expert server's share); none: the config alone.
  static WeightSelection RoutedExperts(std::set<std::pair<int64_t, int64_t>> experts = {}) {
    WeightSelection s;
    s.attention_side = false;
    s.all_routed_experts = false;
    s.routed_experts = std::move(experts);
    return s;
  }
  bool WantsExpert(int64_t layer, int64_t expert) const {
    return all_routed_experts || routed_experts.count({layer, expert}) != 0;
  }
};

struct WeightLoadOptions {
  // Where the weights live once loaded (docs/startup.md has the figures behind the choice).
  enum class Placement {
    // kMap when the kernel maps the checkpoint's page cache with 2 MiB pages, even if only in
    // part (held once, a warm start costs no copy); else (no 2 MiB file pages at all) kCopy
    // when memory holds a copy; else kMap with 4 KiB pages.
    // The choice and why are logged.
    kAuto,
    // Views into the checkpoint's file mapping (MADV_HUGEPAGE), faulted in at load when
    // `populate` (and shards the cache holds in 4 KiB folios read again, as kAuto does): the
    // page cache is the only copy (--mmap-weights).
    kMap,
    // Read with parallel pread, in the order the forward pass reads them, into one anonymous
    // buffer advised for transparent huge pages; the file mappings are dropped, and so is the
    // file's page cache as it is read when memory cannot hold both.
    kCopy,
  };
  Placement placement = Placement::kAuto;
  // kMap: fault every selected page in during Load, so that no forward pass waits for the disk.
  // Off: pages are read at first touch (a store that uploads the weights elsewhere and drops
  // them).
  bool populate = true;
  // Mapped placements: lock the mapped weights in memory (mlock2 MLOCK_ONFAULT), so that they
  // stay resident as an anonymous copy would (no swap): otherwise the kernel evicts mapped
  // page cache under memory pressure, and decode reads it from disk again (measured: a 17.6 GB
  // checkpoint on a 24 GiB box fell to 0.2 tok/s). Not when memory available at the start
  // holds less than the weights + 10% (then paging beats not starting), nor where
  // RLIMIT_MEMLOCK forbids it: the load goes on unlocked and says so.
  bool lock_mapped = true;
  // Threads that read or fault in (0: the usable CPUs, at least 4: a cold start needs several
  // reads in flight to reach the disk's speed).
  int threads = 0;
  // The summary line (kInfo) and progress lines of loads that last longer than `progress_after`
  // (then every `progress_every`). Null: silent.
  Logger* logger = DefaultLogger();
  absl::Duration progress_after = absl::Seconds(3);
  absl::Duration progress_every = absl::Seconds(3);
};

// What Load did: for its log line, tests and benchmarks.
struct WeightLoadReport {
  WeightLoadOptions::Placement placement = WeightLoadOptions::Placement::kMap;
  std::string reason;          // why this placement (kAuto), in words
  int64_t bytes = 0;           // distinct weight matrix bytes selected
  int64_t huge_bytes = 0;      // of what this process holds of them, bytes in 2 MiB pages
  int64_t resident_bytes = 0;  // what this process holds of the weight mappings or buffer
  int64_t num_shards = 0;
  bool locked = false;          // mapped weights locked in memory (WeightLoadOptions::lock_mapped)
  double open_seconds = 0;      // config, headers, names and shapes checked
  double read_seconds = 0;      // placing the weights: the three below
  double populate_seconds = 0;  // faulting the mapping in (kMap, kAuto)
  double reread_seconds = 0;    // kAuto: re-reading shards the cache held in 4 KiB pages
  double copy_seconds = 0;      // kCopy: pread into the buffer
  double total_seconds = 0;
  std::string Describe() const;  // the log line
};
const char* PlacementName(WeightLoadOptions::Placement placement);  // "auto", "map", "copy"

// Const after Load; thread-safe. Owns the memory the views point into: the weight buffer, or
// the checkpoint's mappings.
class ModelWeights {
 public:
  static absl::StatusOr<std::unique_ptr<ModelWeights>> Load(
      const std::string& dir, const WeightSelection& selection = WeightSelection::Everything(),
      const WeightLoadOptions& options = {});

  // Every weight matrix, in forward order (embeddings, layer by layer, head); a matrix seen
  // twice (tied embeddings) is visited twice.
  template <class Fn>
  void ForEachMatrix(Fn&& fn);
  // Bytes of all distinct loaded weight matrices.
  size_t MatrixBytes();
  // Whether the weights were copied into an anonymous buffer (kCopy) rather than mapped.
  bool in_huge_pages() const { return buffer_ != nullptr; }
  const WeightLoadReport& load_report() const { return report_; }

  const ModelConfig& config() const { return config_; }
  const GenerationConfig& generation_config() const { return generation_config_; }
  const Checkpoint& checkpoint() const { return *checkpoint_; }

  MatrixView embed_tokens;        // [V, H]
  std::vector<float> final_norm;  // [H]
  MatrixView lm_head;             // [V, H]; the embedding matrix when tie_word_embeddings
  std::vector<LayerWeights> layers;

 private:
  ModelWeights() = default;
  absl::Status LoadTensors(const WeightSelection& selection);

  // A distinct piece of weight bytes (values or Q8_0 scales), in forward order.
  struct Piece {
    const std::byte* data;
    size_t size;
  };
  std::vector<Piece> DistinctPieces();
  absl::Status Place(const WeightLoadOptions& options, ThreadPool& pool,
                     std::atomic<uint64_t>& progress);
  // mlock2(MLOCK_ONFAULT) of every shard mapping: what was faulted in stays; sets
  // report_.locked, or says in report_.reason why not.
  void LockMappings();
  // After LockMappings: faults in again what the kernel evicted from the mapping before it was
  // locked; says so in report_.reason.
  absl::Status RefaultEvicted(ThreadPool& pool, std::atomic<uint64_t>& progress);
  absl::Status Populate(const std::vector<Piece>& pieces, ThreadPool& pool,
                        std::atomic<uint64_t>& progress);
  // Moves the weights into huge pages: parallel pread of every piece into the buffer.
  absl::Status CopyIn(const std::vector<Piece>& pieces, ThreadPool& pool, bool drop_cache,
                      std::atomic<uint64_t>& progress);
  // Re-reads shards whose page cache holds small folios, if this kernel maps the file with
  // 2 MiB pages at all (tried on one 2 MiB range). Sets `works` to what the trial showed.
  absl::Status RereadSmallPagedShards(const std::vector<Piece>& pieces, ThreadPool& pool,
                                      std::atomic<uint64_t>& progress, bool& works,
                                      int64_t& reread_bytes);

  ModelConfig config_;
  GenerationConfig generation_config_;
  std::unique_ptr<Checkpoint> checkpoint_;
  std::unique_ptr<HugePageBuffer> buffer_;
  WeightLoadReport report_;
};

template <class Fn>
void ModelWeights::ForEachMatrix(Fn&& fn) {
  auto mlp = [&](MlpWeights& m) {
    if (!m.loaded()) return;
    fn(m.gate);
    fn(m.up);
    fn(m.down);
  };
  if (!embed_tokens.empty()) fn(embed_tokens);
  for (LayerWeights& L : layers) {
    for (LinearWeights* lw : {&L.attention.q, &L.attention.k, &L.attention.v, &L.attention.o}) {
      if (!lw->weight.empty()) fn(lw->weight);
    }
    mlp(L.dense);
    if (!L.router.empty()) fn(L.router);
    mlp(L.shared);
    for (MlpWeights& m : L.routed) mlp(m);
  }
  if (!lm_head.empty()) fn(lm_head);
}

}  // namespace dsmoe
