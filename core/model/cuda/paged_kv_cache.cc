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
  if (num_slots <= 0 || max_context <= 0 || page_size <= 0) {
    return absl::InvalidArgumentError("paged KV cache: slots, context and page size must be > 0");
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
  std::fill(c.host_table_, c.host_table_ + table, -1);
  c.dirty_begin_ = 0;
  c.dirty_end_ = static_cast<int64_t>(table);
  // Pages are handed out lowest first (popped from the back).
  c.free_pages_.resize(c.num_pages_);
  for (int64_t i = 0; i < c.num_pages_; ++i)
    c.free_pages_[i] = static_cast<int32_t>(c.num_pages_ - 1 - i);
  return cache;
}

PagedKvCache::~PagedKvCache() {
  if (storage_ != nullptr) cudaFree(storage_);
  if (device_table_ != nullptr) cudaFree(device_table_);
  if (host_table_ != nullptr) cudaFreeHost(host_table_);
}

absl::Status PagedKvCache::Reserve(std::span<const int32_t> slots,
                                   std::span<const int32_t> positions) {
  std::vector<int64_t> taken;  // entries assigned by this call, undone if the batch is refused
  auto undo = [&] {
    for (int64_t entry : taken) {
      free_pages_.push_back(host_table_[entry]);
      host_table_[entry] = -1;
    }
  };
  for (size_t t = 0; t < slots.size(); ++t) {
    const int64_t entry = slots[t] * pages_per_slot_ + positions[t] / page_size_;
    if (host_table_[entry] >= 0) continue;
    if (free_pages_.empty()) {
      undo();
      return absl::ResourceExhaustedError(absl::StrCat("KV cache: all ", num_pages_,
                                                       " pages are in use (slot ", slots[t],
                                                       " position ", positions[t], ")"));
    }
    host_table_[entry] = free_pages_.back();
    free_pages_.pop_back();
    taken.push_back(entry);
    dirty_begin_ = std::min(dirty_begin_, entry);
    dirty_end_ = std::max(dirty_end_, entry + 1);
  }
  // Every page a token attends to must exist: [0, p] of its slot.
  for (size_t t = 0; t < slots.size(); ++t) {
    const int32_t* row = host_table_ + slots[t] * pages_per_slot_;
    for (int64_t i = 0; i <= positions[t] / page_size_; ++i) {
      if (row[i] < 0) {
        undo();
        return absl::InvalidArgumentError(absl::StrCat("slot ", slots[t], " position ",
                                                       positions[t],
                                                       ": earlier positions were never written"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status PagedKvCache::Sync(cudaStream_t stream) {
  if (dirty_end_ <= dirty_begin_) return absl::OkStatus();
  DSMOE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(device_table_ + dirty_begin_, host_table_ + dirty_begin_,
                      static_cast<size_t>(dirty_end_ - dirty_begin_) * sizeof(int32_t),
                      cudaMemcpyHostToDevice, stream),
      "page table upload");
  dirty_begin_ = num_slots_ * pages_per_slot_;
  dirty_end_ = 0;
  return absl::OkStatus();
}

void PagedKvCache::Release(int32_t slot) {
  if (slot < 0 || slot >= num_slots_) return;
  int32_t* row = host_table_ + slot * pages_per_slot_;
  for (int64_t i = 0; i < pages_per_slot_; ++i) {
    if (row[i] >= 0) free_pages_.push_back(row[i]);
    row[i] = -1;
  }
  dirty_begin_ = std::min(dirty_begin_, slot * pages_per_slot_);
  dirty_end_ = std::max(dirty_end_, (slot + 1) * pages_per_slot_);
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
