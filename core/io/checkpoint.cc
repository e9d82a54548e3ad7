#include "core/io/checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace dsmoe {

namespace fs = std::filesystem;

namespace {
constexpr char kSingleFile[] = "model.safetensors";
constexpr char kIndexFile[] = "model.safetensors.index.json";
constexpr size_t kMaxJsonBytes = 64 << 20;
}  // namespace

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat(dir, ": not a checkpoint directory"));
  }
  auto ckpt = std::unique_ptr<Checkpoint>(new Checkpoint(dir));
  const fs::path index_path = fs::path(dir) / kIndexFile;
  if (fs::exists(index_path)) {
    DSMOE_ASSIGN_OR_RETURN(std::string text, ReadTextFile(index_path.string(), kMaxJsonBytes));
    auto index = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (index.is_discarded() || !index.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": not a JSON object"));
    }
    auto map = index.find("weight_map");
    if (map == index.end() || !map->is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path.string(), ": missing object 'weight_map'"));
    }
    for (auto& [tensor, shard] : map->items()) {
      if (!shard.is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path.string(), ": weight_map['", tensor, "'] is not a file name"));
      }
      const std::string file = shard.get<std::string>();
      if (file.find('/') != std::string::npos || file == ".." || file.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path.string(), ": weight_map['", tensor, "'] = '", file,
                         "' must name a file inside the checkpoint directory"));
      }
      ckpt->tensor_to_shard_[tensor] = file;
    }
    // Every shard must exist and hold what the index says it holds. Opening validates each
    // header (no tensor data is read).
    std::set<std::string> files;
    for (auto& kv : ckpt->tensor_to_shard_) files.insert(kv.second);
    for (const std::string& file : files) {
      DSMOE_ASSIGN_OR_RETURN(const SafetensorsFile* shard, ckpt->Shard(file));
      (void)shard;
    }
    absl::MutexLock lock(&ckpt->mu_);  // not shared yet, but shards_ is read under it
    for (auto& [tensor, file] : ckpt->tensor_to_shard_) {
      if (!ckpt->shards_.at(file)->Contains(tensor)) {
        return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": tensor '", tensor,
                                                       "' is mapped to ", file,
                                                       " but that file does not contain it"));
      }
    }
    return ckpt;
  }
  const fs::path single = fs::path(dir) / kSingleFile;
  if (!fs::exists(single)) {
    return absl::NotFoundError(
        absl::StrCat(dir, ": neither ", kSingleFile, " nor ", kIndexFile, " is present"));
  }
  DSMOE_ASSIGN_OR_RETURN(const SafetensorsFile* file, ckpt->Shard(kSingleFile));
  for (auto& kv : file->entries()) ckpt->tensor_to_shard_[kv.first] = kSingleFile;
  return ckpt;
}

absl::StatusOr<std::string> Checkpoint::ReadJsonFile(const std::string& name) const {
  return ReadTextFile((fs::path(dir_) / name).string(), kMaxJsonBytes);
}

absl::StatusOr<const SafetensorsFile*> Checkpoint::Shard(const std::string& file_name) const {
  absl::MutexLock lock(&mu_);
  auto it = shards_.find(file_name);
  if (it != shards_.end()) return it->second.get();
  DSMOE_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open((fs::path(dir_) / file_name).string()));
  const SafetensorsFile* raw = file.get();
  shards_.emplace(file_name, std::move(file));
  return raw;
}

absl::StatusOr<TensorView> Checkpoint::Tensor(const std::string& name) const {
  auto it = tensor_to_shard_.find(name);
  if (it == tensor_to_shard_.end()) {
    return absl::NotFoundError(absl::StrCat(dir_, ": tensor '", name, "' is missing"));
  }
  DSMOE_ASSIGN_OR_RETURN(const SafetensorsFile* shard, Shard(it->second));
  return shard->Tensor(name);
}

std::vector<std::string> Checkpoint::TensorNamesInFileOrder() const {
  std::vector<std::string> names;
  for (const std::string& file : ShardNames()) {
    auto shard = Shard(file);
    if (!shard.ok()) continue;
    std::vector<std::pair<uint64_t, std::string>> by_offset;
    for (const auto& [name, entry] : (*shard)->entries()) {
      auto it = tensor_to_shard_.find(name);
      if (it != tensor_to_shard_.end() && it->second == file)
        by_offset.emplace_back(entry.begin, name);
    }
    std::sort(by_offset.begin(), by_offset.end());
    for (auto& [offset, name] : by_offset) names.push_back(std::move(name));
  }
  return names;
}

std::vector<Checkpoint::MappedShard> Checkpoint::MappedShards() const {
  absl::MutexLock lock(&mu_);
  std::vector<MappedShard> out;
  for (const auto& [name, file] : shards_) {
    out.push_back({file->path(), file->mapping().data(), file->mapping().size()});
  }
  return out;
}

void Checkpoint::ReleaseMappings() {
  absl::MutexLock lock(&mu_);
  shards_.clear();
}

std::vector<std::string> Checkpoint::ShardNames() const {
  std::set<std::string> files;
  for (auto& kv : tensor_to_shard_) files.insert(kv.second);
  return {files.begin(), files.end()};
}

}  // namespace dsmoe
