#include "router/load_window.h"

#include <algorithm>

namespace dsmoe::router {

LoadWindow::LoadWindow(const std::vector<bool>& tracked, int64_t num_experts,
                       LoadWindowOptions options)
    : options_(std::move(options)), num_experts_(std::max<int64_t>(num_experts, 0)) {
  options_.num_buckets = std::max(options_.num_buckets, 1);
  bucket_ns_ = std::max<int64_t>(
      1, static_cast<int64_t>(options_.window_seconds * 1e9 / options_.num_buckets));
  layers_.resize(tracked.size());
  for (size_t l = 0; l < tracked.size(); ++l) {
    if (!tracked[l] || num_experts_ == 0) continue;
    Layer& L = layers_[l];
    L.window.reset(new std::atomic<int64_t>[options_.num_buckets * num_experts_]);
    L.bucket_epoch.reset(new std::atomic<int64_t>[options_.num_buckets]);
    for (int64_t i = 0; i < options_.num_buckets * num_experts_; ++i) L.window[i].store(0);
    for (int b = 0; b < options_.num_buckets; ++b) L.bucket_epoch[b].store(-1);
  }
}

int64_t LoadWindow::Epoch() const { return options_.now_ns() / bucket_ns_; }

void LoadWindow::Add(int64_t layer, const int64_t* counts) {
  if (!tracked(layer)) return;
  Layer& L = layers_[layer];
  const int64_t epoch = Epoch();
  const int b = static_cast<int>(epoch % options_.num_buckets);
  std::atomic<int64_t>* bucket = L.window.get() + b * num_experts_;
  if (L.bucket_epoch[b].load(std::memory_order_relaxed) != epoch) {
    // A sub-window that has expired: reuse it.
    for (int64_t e = 0; e < num_experts_; ++e) bucket[e].store(0, std::memory_order_relaxed);
    L.bucket_epoch[b].store(epoch, std::memory_order_release);
  }
  for (int64_t e = 0; e < num_experts_; ++e) {
    if (counts[e] != 0) bucket[e].fetch_add(counts[e], std::memory_order_relaxed);
  }
}

std::vector<int64_t> LoadWindow::Counts(int64_t layer) const {
  std::vector<int64_t> out(static_cast<size_t>(num_experts_), 0);
  if (!tracked(layer)) return out;
  const Layer& L = layers_[layer];
  const int64_t now = Epoch();
  for (int b = 0; b < options_.num_buckets; ++b) {
    const int64_t epoch = L.bucket_epoch[b].load(std::memory_order_acquire);
    if (epoch < 0 || epoch <= now - options_.num_buckets || epoch > now)
      continue;  // outside the window
    const std::atomic<int64_t>* bucket = L.window.get() + b * num_experts_;
    for (int64_t e = 0; e < num_experts_; ++e) out[e] += bucket[e].load(std::memory_order_relaxed);
  }
  return out;
}

}  // namespace dsmoe::router
