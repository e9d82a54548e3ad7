#include "core/model/forward_batch.h"

namespace dsmoe {

absl::StatusOr<KvDType> ParseKvDType(std::string_view name) {
  if (name == "auto") return KvDType::kAuto;
  if (name == "f32") return KvDType::kF32;
  if (name == "bf16") return KvDType::kBF16;
  return absl::InvalidArgumentError(
      absl::StrCat("KV dtype \"", std::string(name), "\" is not one of auto, f32, bf16"));
}

const char* KvDTypeName(KvDType t) {
  switch (t) {
    case KvDType::kAuto:
      return "auto";
    case KvDType::kF32:
      return "f32";
    case KvDType::kBF16:
      return "bf16";
  }
  return "?";
}

KvDType ResolveKvDType(KvDType requested, DType weight_dtype) {
  if (requested != KvDType::kAuto) return requested;
  return weight_dtype == DType::kF32 ? KvDType::kF32 : KvDType::kBF16;
}

absl::StatusOr<BatchLimits> BatchLimits::Resolve(const ModelConfig& config) const {
  BatchLimits resolved = *this;
  const int64_t model_max = config.MaxContext();
  if (resolved.max_context <= 0) resolved.max_context = model_max;
  if (resolved.max_context > model_max) {
    return absl::InvalidArgumentError(absl::StrCat("max context ", resolved.max_context,
                                                   " exceeds the model's maximum of ", model_max,
                                                   " positions"));
  }
  if (resolved.max_batch_tokens <= 0 || resolved.num_slots <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_batch_tokens (", resolved.max_batch_tokens,
                                                   ") and num_slots (", resolved.num_slots,
                                                   ") must be > 0"));
  }
  const int64_t page = resolved.kv_page_tokens;
  if (page <= 0 || page > 4096 || (page & (page - 1)) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV page size ", page, " must be a power of two in [1, 4096] positions"));
  }
  if (resolved.kv_cache_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV cache budget ", resolved.kv_cache_bytes, " bytes is negative"));
  }
  return resolved;
}

absl::Status CheckBatch(const ForwardBatch& b, const BatchLimits& limits, int64_t vocab_size) {
  const int64_t T = static_cast<int64_t>(b.token_ids.size());
  if (T == 0) return absl::InvalidArgumentError("empty batch");
  if (T > limits.max_batch_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch of ", T, " tokens exceeds max_batch_tokens ", limits.max_batch_tokens));
  }
  if (b.slots.size() != b.token_ids.size() || b.positions.size() != b.token_ids.size()) {
    return absl::InvalidArgumentError("token_ids, slots and positions differ in length");
  }
  for (int64_t t = 0; t < T; ++t) {
    if (b.token_ids[t] < 0 || b.token_ids[t] >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token id ", b.token_ids[t], " is outside the vocabulary [0, ", vocab_size, ")"));
    }
    if (b.slots[t] < 0 || b.slots[t] >= limits.num_slots) {
      return absl::InvalidArgumentError(
          absl::StrCat("slot ", b.slots[t], " outside [0, ", limits.num_slots, ")"));
    }
    if (b.positions[t] < 0 || b.positions[t] >= limits.max_context) {
      return absl::OutOfRangeError(absl::StrCat("position ", b.positions[t],
                                                " is beyond the context of ", limits.max_context,
                                                " tokens"));
    }
  }
  for (size_t i = 0; i < b.logit_rows.size(); ++i) {
    if (b.logit_rows[i] < 0 || b.logit_rows[i] >= T ||
        (i > 0 && b.logit_rows[i] <= b.logit_rows[i - 1])) {
      return absl::InvalidArgumentError("logit_rows must be ascending indices into the batch");
    }
  }
  return absl::OkStatus();
}

}  // namespace dsmoe
