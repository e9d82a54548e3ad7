// Bringing large parts of files into memory fast, for loading weights: the work is cut into
// chunks of several MiB that a pool's threads claim in order, so a cold start keeps several
// reads in flight on the disk and a warm one copies from the page cache on every core.
//
// Both operations report the bytes done so far through an atomic counter, for progress lines.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "core/util/status.h"
#include "core/util/thread_pool.h"

namespace dsmoe {

// An open file descriptor, read-only; closed on destruction. Thread-safe (pread only).
class ReadOnlyFile {
 public:
  static absl::StatusOr<std::unique_ptr<ReadOnlyFile>> Open(const std::string& path);
  ~ReadOnlyFile();
  ReadOnlyFile(const ReadOnlyFile&) = delete;
  ReadOnlyFile& operator=(const ReadOnlyFile&) = delete;

  int fd() const { return fd_; }
  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }
  // Asks the kernel to drop the file's page-cache pages in [offset, offset + size) (whole pages
  // only; pages a process maps stay, and dirty ones unless `write_back_first` waits for their
  // write-back). Advisory: errors are ignored.
  void DropFromPageCache(uint64_t offset, uint64_t size, bool write_back_first = false) const;

 private:
  ReadOnlyFile(std::string path, int fd, uint64_t size)
      : path_(std::move(path)), fd_(fd), size_(size) {}
  std::string path_;
  int fd_;
  uint64_t size_;
};

// Bytes [offset, offset + size) of `file`, to be read into `dst`.
struct ReadSpan {
  const ReadOnlyFile* file = nullptr;
  uint64_t offset = 0;
  uint64_t size = 0;
  std::byte* dst = nullptr;
};

struct BulkReadOptions {
  // Big enough that a syscall's cost vanishes and the disk sees long requests; small enough
  // that two threads share a 100 MiB tensor.
  size_t chunk_bytes = size_t{8} << 20;
  // Drop each chunk from the page cache once it is read: the copy is then the only one, for
  // when memory cannot hold the file's cache beside it.
  bool drop_from_page_cache = false;
};

// Reads every span with pread on `pool`'s threads. DATA_LOSS naming the file and offset when a
// file ends before a span does (truncated since its header was read); the error of the first
// failing chunk otherwise. `bytes_done` (may be null) grows as chunks complete.
absl::Status ReadSpans(std::span<const ReadSpan> spans, ThreadPool& pool,
                       const BulkReadOptions& options, std::atomic<uint64_t>* bytes_done);

// [begin, begin + size) of a read-only file mapping of `path` (named in errors).
struct MappedSpan {
  const std::byte* begin = nullptr;
  size_t size = 0;
  const std::string* path = nullptr;
};

// Faults every page of the spans in, so that later reads never wait for the disk: chunks of
// madvise(MADV_POPULATE_READ) on the pool's threads (touching each page where the kernel is
// older than 5.14). DATA_LOSS naming the file when a span runs past its end.
absl::Status PopulateSpans(std::span<const MappedSpan> spans, ThreadPool& pool, size_t chunk_bytes,
                           std::atomic<uint64_t>* bytes_done);

}  // namespace dsmoe
