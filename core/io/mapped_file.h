// A read-only memory map of a whole file. Pages are read lazily by the kernel, so mapping a
// checkpoint shard costs nothing until its tensors are touched.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "core/util/status.h"

namespace dsmoe {

// Thread-safe after construction (immutable). Owns the mapping; unmaps on destruction.
class MappedFile {
 public:
  static absl::StatusOr<std::unique_ptr<MappedFile>> Open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::byte* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile(std::string path, const std::byte* data, size_t size)
      : path_(std::move(path)), data_(data), size_(size) {}
  std::string path_;
  const std::byte* data_;
  size_t size_;
};

absl::StatusOr<std::string> ReadTextFile(const std::string& path, size_t max_bytes);

// Writes `contents` to a temporary file beside `path`, then renames it over `path`: a reader
// (or a restart after a crash) sees the old file or the new one, never half of one.
absl::Status WriteFileAtomically(const std::string& path, const std::string& contents);

}  // namespace dsmoe
