// The GPU's KV cache, paged: keys and values (post-RoPE, bf16) of every layer live in a pool of
// fixed-size pages, and each sequence slot maps its positions to pages through a page table.
// A slot takes pages as its sequence grows and gives them back on Release, so many slots can
// share a pool sized for the tokens actually held rather than num_slots × max_context.
//
// Pages are assigned on the host (Reserve, before a forward pass) and the page table is mirrored
// to the device (Sync), so the kernels only read it and a captured CUDA graph stays valid.
//
// Thread-compatible: owned by one CudaModelRunner.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "core/model/config.h"
#include "core/ops/cuda/cuda_ops.h"
#include "core/util/status.h"

namespace dsmoe::cuda {

class PagedKvCache {
 public:
  // num_pages == 0: enough for every slot to reach max_context.
  static absl::StatusOr<std::unique_ptr<PagedKvCache>> Create(const ModelConfig& config,
                                                              int64_t num_slots,
                                                              int64_t max_context,
                                                              int64_t page_size, int64_t num_pages);
  ~PagedKvCache();
  PagedKvCache(const PagedKvCache&) = delete;
  PagedKvCache& operator=(const PagedKvCache&) = delete;

  // Gives every (slot, position) of a batch its page. Position p of a slot requires pages for
  // [0, p) to exist already or to be reserved by the same call (positions are written in order).
  // RESOURCE_EXHAUSTED when the pool is empty; INVALID_ARGUMENT when a token skips positions.
  absl::Status Reserve(std::span<const int32_t> slots, std::span<const int32_t> positions);
  // Copies the page-table entries changed since the last Sync to the device.
  absl::Status Sync(cudaStream_t stream);
  // Returns the slot's pages to the pool (its sequence is finished).
  void Release(int32_t slot);

  PagedKvLayer Layer(int64_t layer) const;
  int64_t num_free_pages() const { return static_cast<int64_t>(free_pages_.size()); }
  int64_t num_pages() const { return num_pages_; }
  size_t num_bytes() const { return bytes_; }

 private:
  PagedKvCache() = default;

  int64_t num_layers_ = 0, num_slots_ = 0, pages_per_slot_ = 0, page_size_ = 0, num_pages_ = 0;
  int64_t row_ = 0;  // nkv · hd
  size_t bytes_ = 0;
  uint16_t* storage_ = nullptr;  // keys then values: [2][layers][num_pages][page_size][row]
  int32_t* device_table_ = nullptr;
  int32_t* host_table_ = nullptr;  // pinned mirror, [num_slots][pages_per_slot], -1: none
  std::vector<int32_t> free_pages_;
  int64_t dirty_begin_ = 0, dirty_end_ = 0;  // entries [begin, end) to Sync
};

}  // namespace dsmoe::cuda
