// The CPU's key/value cache, paged: post-RoPE keys and values of every layer live in a pool of
// pages of page_tokens positions, [layer][page][kv_head][page_tokens][head_dim] for keys and
// the same for values, in fp32 or bf16 (BatchLimits::kv_dtype). Within a page each kv head's
// rows are contiguous, so the attention of one head streams whole runs of memory (page_tokens ·
// head_dim elements) instead of one head's slice of every row; the BlockManager
// (core/model/block_manager.h) hands pages to sequence slots and keeps their block tables. The pool
// is sized by a byte budget (BatchLimits::kv_cache_bytes), so memory follows the tokens held, not
// num_slots × max_context.
//
// Thread-compatible: owned by one ModelRunner, written and read inside its Forward; its
// BlockManager is also used by the runner's owner between calls.
#pragma once

#include <cstdint>

#include "core/model/block_manager.h"
#include "core/model/config.h"
#include "core/model/forward_batch.h"
#include "core/model/weights.h"
#include "core/ops/kernels.h"
#include "core/tensor/tensor.h"

namespace dsmoe {

// Bytes one position takes in the cache: keys and values of every layer,
// 2 · layers · kv_heads · head_dim · element_bytes.
int64_t KvBytesPerToken(const ModelConfig& config, int64_t element_bytes);
// Pages a runner of `limits` (resolved) gets: kv_cache_bytes / page bytes, or, with no budget,
// enough for every slot to reach max_context. INVALID_ARGUMENT when the budget holds no page.
absl::StatusOr<int64_t> NumKvPages(const ModelConfig& config, const BatchLimits& limits,
                                   int64_t element_bytes);
// kAuto made concrete for a runner of these weights: F32 when its attention weights are F32 (an
// F32 checkpoint), BF16 otherwise (BF16, F16, Q8_0). REQUIRES: the attention side loaded.
KvDType ResolveKvDType(KvDType requested, const ModelWeights& weights);

class KvCache {
 public:
  // REQUIRES: limits resolved (BatchLimits::Resolve) with kv_dtype kF32 or kBF16; num_pages
  // from NumKvPages with KvElementBytes(limits.kv_dtype).
  KvCache(const ModelConfig& config, const BatchLimits& limits, int64_t num_pages);

  BlockManager& blocks() { return blocks_; }
  const BlockManager& blocks() const { return blocks_; }
  int64_t row_size() const { return row_size_; }  // num_key_value_heads · head_dim
  KvDType dtype() const { return dtype_; }
  size_t NumBytes() const { return 2 * static_cast<size_t>(layers_ * layer_elements_ * elem_); }

  // Stores the keys and values of the batch's tokens ([T, row_size] each, fp32) at their
  // slots' positions, rounded to nearest even when the cache is BF16. REQUIRES: the pages of
  // those positions were reserved (blocks().Reserve).
  void Write(int64_t layer, const ForwardBatch& batch, const float* k, const float* v);
  // What the attention kernels read: kv head `kv_head` of `slot` in `layer`, through the
  // slot's block table.
  ops::KvPages View(int64_t layer, int32_t slot, int64_t kv_head) const;

 private:
  // Element offset of a position's row of kv head 0 in keys_ (and values_); head h's row is
  // h · head_block_ further.
  int64_t RowOffset(int64_t layer, int32_t slot, int64_t position) const;
  KvDType dtype_;
  int64_t elem_;  // bytes per element
  int64_t layers_, row_size_, head_dim_;
  int64_t head_block_;  // page_tokens · head_dim: one kv head's rows of a page
  int64_t page_elements_, layer_elements_;
  BlockManager blocks_;
  // The pages, bytes in units of 4 (a FloatBuffer is the aligned, huge-page-advised
  // allocation we have): fp32 elements, or two bf16 elements per float.
  FloatBuffer keys_, values_;
};

}  // namespace dsmoe
