// A Hugging Face checkpoint directory: config.json, generation_config.json, and the weights as
// one model.safetensors or shards model-0000N-of-0000M.safetensors listed by
// model.safetensors.index.json. Knows files and tensor names; what the tensors mean is the
// model layer's business.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "core/io/safetensors.h"
#include "core/util/status.h"

namespace dsmoe {

// Thread-safe: shards are opened lazily under a lock, and only those that hold a requested
// tensor, so a server that needs a few experts maps a few files.
class Checkpoint {
 public:
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  // Text of a JSON file in the directory, or NotFound.
  absl::StatusOr<std::string> ReadJsonFile(const std::string& name) const;
  bool HasTensor(const std::string& name) const { return tensor_to_shard_.count(name) != 0; }
  // A view of tensor `name`, valid as long as this Checkpoint lives.
  absl::StatusOr<TensorView> Tensor(const std::string& name) const;
  std::vector<std::string> ShardNames() const;
  // Every tensor name, shard by shard in file order, each shard's tensors by data offset.
  std::vector<std::string> TensorNamesInFileOrder() const;
  // Every shard mapped so far (the ones whose tensors were asked for, or all after Open of a
  // sharded checkpoint), with where its mapping lies: views from Tensor() point into these.
  struct MappedShard {
    std::string path;
    const std::byte* data = nullptr;
    size_t size = 0;
  };
  std::vector<MappedShard> MappedShards() const;
  // Unmaps every opened shard: views from Tensor() become invalid. Shards are mapped again
  // on the next Tensor() call.
  void ReleaseMappings();

 private:
  explicit Checkpoint(std::string dir) : dir_(std::move(dir)) {}
  absl::StatusOr<const SafetensorsFile*> Shard(const std::string& file_name) const;

  std::string dir_;
  std::map<std::string, std::string> tensor_to_shard_;  // tensor name → shard file name
  mutable absl::Mutex mu_;
  mutable std::map<std::string, std::unique_ptr<SafetensorsFile>> shards_ ABSL_GUARDED_BY(mu_);
};

}  // namespace dsmoe
