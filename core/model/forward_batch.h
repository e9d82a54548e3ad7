// What both forward-pass engines (the CPU ModelRunner, cuda::CudaModelRunner) share about a
// batch: its layout, the limits an engine is sized for, and the one check of a batch against
// them.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

#include "core/model/config.h"
#include "core/tensor/dtype.h"
#include "core/util/status.h"

namespace dsmoe {

// How the KV cache stores keys and values; attention arithmetic is fp32 either way. kAuto: F32
// for an F32 checkpoint (the exact reference tests keep their tolerance), BF16 for BF16, F16
// and Q8_0 ones (half the bytes per token; their weights already round at that level).
enum class KvDType : uint8_t { kAuto, kF32, kBF16 };

// "auto", "f32", "bf16" (--kv-dtype); INVALID_ARGUMENT naming the choices otherwise.
absl::StatusOr<KvDType> ParseKvDType(std::string_view name);
const char* KvDTypeName(KvDType t);
// kAuto made concrete for weights stored as `weight_dtype`; kF32 and kBF16 stay.
KvDType ResolveKvDType(KvDType requested, DType weight_dtype);
// Bytes of one cached element: 4 (kF32) or 2 (kBF16). REQUIRES: t resolved (not kAuto).
inline int64_t KvElementBytes(KvDType t) { return t == KvDType::kBF16 ? 2 : 4; }
// The ops-layer element type of a resolved KvDType (what ops::KvPages::dtype holds).
inline DType KvStorageDType(KvDType t) { return t == KvDType::kBF16 ? DType::kBF16 : DType::kF32; }

struct ForwardBatch {
  std::span<const int32_t> token_ids;
  std::span<const int32_t> slots;       // KV-cache slot of each token
  std::span<const int32_t> positions;   // position of each token in its sequence
  std::span<const int32_t> logit_rows;  // indices of the tokens whose logits are wanted, ascending
};

// The limits a forward-pass engine is sized for at creation (its KV cache and activation
// arena). The CPU runner's options, and part of the GPU runner's and the scheduler's.
struct BatchLimits {
  int64_t max_batch_tokens = 256;  // tokens per Forward; longer prompts are fed in chunks
  int64_t num_slots = 1;           // sequences running at once (a cap, not a reservation)
  int64_t max_context = 0;         // positions per slot; 0: the model's maximum
  // The KV cache's pages: positions per page (a power of two), and the bytes the pages may
  // take in all (core/model/kv_cache.h). 0: enough pages for every slot to reach max_context.
  int64_t kv_page_tokens = 16;
  int64_t kv_cache_bytes = 0;
  // The cache's element type; kAuto is resolved from the weights by whoever builds the cache
  // (ResolveKvDType), so the same flag means the same thing for every checkpoint.
  KvDType kv_dtype = KvDType::kAuto;

  // These limits for a model of `config`, max_context 0 made the model's maximum.
  // INVALID_ARGUMENT when a count is not positive, the page size not a power of two, or the
  // context exceeds the model's.
  absl::StatusOr<BatchLimits> Resolve(const ModelConfig& config) const;
};

// Checks a batch against resolved limits: lengths agree, at most max_batch_tokens tokens, token
// ids in the vocabulary, slots in [0, num_slots), positions in [0, max_context) (OUT_OF_RANGE),
// logit rows ascending indices into the batch. Every other failure is INVALID_ARGUMENT.
absl::Status CheckBatch(const ForwardBatch& batch, const BatchLimits& limits, int64_t vocab_size);

}  // namespace dsmoe
