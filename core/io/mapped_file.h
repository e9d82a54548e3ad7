// A read-only memory map of a whole file. Pages are read lazily by the kernel, so mapping a
// checkpoint shard costs nothing until its tensors are touched.
//
// The mapping starts on a 2 MiB boundary and is advised MADV_HUGEPAGE: where the kernel keeps
// the file's page cache in 2 MiB folios (Linux 6.x on ext4 and XFS, filled by a fault on such a
// mapping or by large sequential reads), it then maps them with 2 MiB page-table entries, and
// reading the weights through the mapping costs no more TLB misses than a huge-page copy
// (docs/startup.md).
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "core/util/status.h"

namespace dsmoe {

// A regular file opened read-only (O_CLOEXEC): its descriptor, which the caller then owns, and
// its size. NOT_FOUND or PERMISSION_DENIED when it cannot be opened, INVALID_ARGUMENT when it
// is not a regular file; every message names the path.
struct OpenedFile {
  int fd;
  size_t size;
};
absl::StatusOr<OpenedFile> OpenRegularFile(const std::string& path);

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
  MappedFile(std::string path, const std::byte* data, size_t size, std::byte* mapping,
             size_t mapping_size)
      : path_(std::move(path)),
        data_(data),
        size_(size),
        mapping_(mapping),
        mapping_size_(mapping_size) {}
  std::string path_;
  const std::byte* data_;
  size_t size_;
  std::byte* mapping_;  // the whole reservation data_ lies in (over-mapped to align)
  size_t mapping_size_;
};

absl::StatusOr<std::string> ReadTextFile(const std::string& path, size_t max_bytes);

// Writes `contents` to a temporary file beside `path`, then renames it over `path`: a reader
// (or a restart after a crash) sees the old file or the new one, never half of one.
absl::Status WriteFileAtomically(const std::string& path, const std::string& contents);

}  // namespace dsmoe
