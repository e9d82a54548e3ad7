#include "core/model/cuda/paged_kv_cache.h"

#include <cuda_runtime.h>

#include <algorithm>

#include "core/ops/cuda/cuda_status.h"

namespace dsmoe::cuda {

absl::StatusOr<std::unique_ptr<PagedKvCache>> PagedKvCache::Create(const ModelConfig& config,
                                                                   int64_t num_slots,
                                                                   int64_t max_context,
                                                                   int64_t page_size,
                                                                   int64_t num_pages) {
  if (num_slots <= 0 || max_context <= 0 || page_size <= 0 || (page_size & (page_size - 1)) != 0) {
    return absl::InvalidArgumentError(
        "paged KV cache: slots and context must be > 0, the page size a power of two");
  }
  auto cache = std::unique_ptr<PagedKvCache>(new PagedKvCache());
  PagedKvCache& c = *cache;
  c.num_layers_ = config.num_hidden_layers;
  c.num_slots_ = num_slots;
  c.page_size_ = page_size;
  c.pages_per_slot_ = (max_context + page_size - 1) / page_size;
  c.num_pages_ = num_pages > 0 ? num_pages : num_slots * c.pages_per_slot_;
  if (c.num_pages_ > INT32_MAX) return absl::InvalidArgumentError("paged KV cache: too many pages");
  c.row_ = config.num_key_value_heads * config.head_dim();
  c.bytes_ = static_cast<size_t>(2 * c.num_layers_ * c.num_pages_ * page_size * c.row_) * 2;
  DSMOE_CUDA_RETURN_IF_ERROR(
      cudaMalloc(&c.storage_, c.bytes_),
      absl::StrCat("allocating the KV cache (", c.bytes_, " bytes)").c_str());
  const size_t table = static_cast<size_t>(num_slots * c.pages_per_slot_);
  DSMOE_CUDA_RETURN_IF_ERROR(cudaMalloc(&c.device_table_, table * sizeof(int32_t)), "page table");
  DSMOE_CUDA_RETURN_IF_ERROR(cudaMallocHost(&c.host_table_, table * sizeof(int32_t)), "page table");
  c.blocks_ = std::make_unique<BlockManager>(c.num_pages_, page_size, num_slots, max_context);
  return cache;
}

PagedKvCache::~PagedKvCache() {
  if (storage_ != nullptr) cudaFree(storage_);
  if (device_table_ != nullptr) cudaFree(device_table_);
  if (host_table_ != nullptr) cudaFreeHost(host_table_);
}

absl::Status PagedKvCache::Sync(cudaStream_t stream) {
  const auto [begin, end] = blocks_->TakeDirty();
  if (end <= begin) return absl::OkStatus();
  // Staged through pinned memory so the upload is a DMA. The staging is rewritten by the next
  // Sync only after the caller's stream has moved on (Forward synchronizes before returning).
  const std::span<const int32_t> tables = blocks_->tables();
  std::copy(tables.begin() + begin, tables.begin() + end, host_table_ + begin);
  DSMOE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device_table_ + begin, host_table_ + begin,
                                             static_cast<size_t>(end - begin) * sizeof(int32_t),
                                             cudaMemcpyHostToDevice, stream),
                             "page table upload");
  return absl::OkStatus();
}

PagedKvLayer PagedKvCache::Layer(int64_t layer) const {
  const size_t per_layer = static_cast<size_t>(num_pages_ * page_size_ * row_);
  PagedKvLayer v;
  v.keys = storage_ + static_cast<size_t>(layer) * per_layer;
  v.values = storage_ + static_cast<size_t>(num_layers_ + layer) * per_layer;
  v.page_table = device_table_;
  v.pages_per_slot = static_cast<int32_t>(pages_per_slot_);
  v.page_size = static_cast<int32_t>(page_size_);
  return v;
}

}  // namespace dsmoe::cuda
