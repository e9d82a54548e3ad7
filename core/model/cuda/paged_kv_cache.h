// The GPU's KV cache, paged: keys and values (post-RoPE, bf16) of every layer live in a pool of
// fixed-size pages, and each sequence slot maps its positions to pages through a page table.
// A slot takes pages as its sequence grows and gives them back on Release, so many slots can
// share a pool sized for the tokens actually held rather than num_slots × max_context.
//
// Pages are assigned on the host by the BlockManager the CPU runner uses too (core/model/
// block_manager.h: the allocator and the block tables), before a forward pass, and its tables
// are mirrored to the device (Sync), so the kernels only read them and a captured CUDA graph
// stays valid.
//
// Thread-compatible: owned by one CudaModelRunner.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "core/model/block_manager.h"
#include "core/model/config.h"
#include "core/ops/cuda/cuda_ops.h"
#include "core/util/status.h"

namespace dsmoe::cuda {

class PagedKvCache {
 public:
  // num_pages == 0: enough for every slot to reach max_context. page_size: a power of two.
  static absl::StatusOr<std::unique_ptr<PagedKvCache>> Create(const ModelConfig& config,
                                                              int64_t num_slots,
                                                              int64_t max_context,
                                                              int64_t page_size, int64_t num_pages);
  ~PagedKvCache();
  PagedKvCache(const PagedKvCache&) = delete;
  PagedKvCache& operator=(const PagedKvCache&) = delete;

  // Gives every (slot, position) of a batch its page (BlockManager::Reserve: positions are
  // written in order). RESOURCE_EXHAUSTED when the pool is short; INVALID_ARGUMENT when a token
  // skips positions.
  absl::Status Reserve(std::span<const int32_t> slots, std::span<const int32_t> positions) {
    return blocks_->Reserve(slots, positions);
  }
  // Copies the block-table entries changed since the last Sync to the device.
  absl::Status Sync(cudaStream_t stream);
  // Returns the slot's pages to the pool (its sequence is finished or preempted).
  void Release(int32_t slot) { blocks_->Release(slot); }

  PagedKvLayer Layer(int64_t layer) const;
  BlockManager& blocks() { return *blocks_; }
  int64_t num_free_pages() const { return blocks_->num_free_pages(); }
  int64_t num_pages() const { return num_pages_; }
  size_t num_bytes() const { return bytes_; }

 private:
  PagedKvCache() = default;

  int64_t num_layers_ = 0, num_slots_ = 0, pages_per_slot_ = 0, page_size_ = 0, num_pages_ = 0;
  int64_t row_ = 0;  // nkv · hd
  size_t bytes_ = 0;
  uint16_t* storage_ = nullptr;  // keys then values: [2][layers][num_pages][page_size][row]
  int32_t* device_table_ = nullptr;
  int32_t* host_table_ = nullptr;  // pinned staging of the tables' changed entries
  std::unique_ptr<BlockManager> blocks_;
};

}  // namespace dsmoe::cuda
