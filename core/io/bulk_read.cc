#include "core/io/bulk_read.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "core/io/mapped_file.h"

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // Linux 5.14; older C libraries lack the name
#endif

namespace dsmoe {

namespace {

// One piece of work: `size` bytes of span `span` from `offset` within it.
struct Chunk {
  size_t span;
  uint64_t offset;
  uint64_t size;
};

template <class Span>
std::vector<Chunk> CutIntoChunks(std::span<const Span> spans, size_t chunk_bytes) {
  std::vector<Chunk> chunks;
  const uint64_t step = std::max<size_t>(chunk_bytes, 4096);
  for (size_t s = 0; s < spans.size(); ++s) {
    for (uint64_t o = 0; o < spans[s].size; o += step) {
      chunks.push_back({s, o, std::min<uint64_t>(step, spans[s].size - o)});
    }
  }
  return chunks;
}

// The first error any thread met; later chunks are skipped once one failed.
class FirstError {
 public:
  void Set(absl::Status s) {
    absl::MutexLock lock(&mu_);
    if (status_.ok()) status_ = std::move(s);
    failed_.store(true, std::memory_order_relaxed);
  }
  bool failed() const { return failed_.load(std::memory_order_relaxed); }
  absl::Status Take() {
    absl::MutexLock lock(&mu_);
    return status_;
  }

 private:
  std::atomic<bool> failed_{false};
  absl::Mutex mu_;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

absl::StatusOr<std::unique_ptr<ReadOnlyFile>> ReadOnlyFile::Open(const std::string& path) {
  DSMOE_ASSIGN_OR_RETURN(const OpenedFile file, OpenRegularFile(path));
  return std::unique_ptr<ReadOnlyFile>(
      new ReadOnlyFile(path, file.fd, static_cast<uint64_t>(file.size)));
}

ReadOnlyFile::~ReadOnlyFile() { ::close(fd_); }

void ReadOnlyFile::DropFromPageCache(uint64_t offset, uint64_t size, bool write_back_first) const {
  if (write_back_first) {
    (void)::sync_file_range(
        fd_, static_cast<off_t>(offset), static_cast<off_t>(size),
        SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
  }
  (void)::posix_fadvise(fd_, static_cast<off_t>(offset), static_cast<off_t>(size),
                        POSIX_FADV_DONTNEED);
}

absl::Status ReadSpans(std::span<const ReadSpan> spans, ThreadPool& pool,
                       const BulkReadOptions& options, std::atomic<uint64_t>* bytes_done) {
  const std::vector<Chunk> chunks = CutIntoChunks(spans, options.chunk_bytes);
  FirstError error;
  pool.ParallelFor(static_cast<int64_t>(chunks.size()), [&](int64_t c, int) {
    if (error.failed()) return;
    const Chunk& chunk = chunks[c];
    const ReadSpan& span = spans[chunk.span];
    const uint64_t begin = span.offset + chunk.offset;
    uint64_t done = 0;
    while (done < chunk.size) {
      const ssize_t n = ::pread(span.file->fd(), span.dst + chunk.offset + done, chunk.size - done,
                                static_cast<off_t>(begin + done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        error.Set(absl::DataLossError(
            absl::StrCat(span.file->path(), ": read of ", chunk.size - done, " bytes at offset ",
                         begin + done, " failed: ", std::strerror(errno))));
        return;
      }
      if (n == 0) {
        error.Set(absl::DataLossError(absl::StrCat(
            span.file->path(), ": the file ends at byte ", begin + done, " but its tensors run to ",
            span.offset + span.size, " (truncated or rewritten while loading?)")));
        return;
      }
      done += static_cast<uint64_t>(n);
    }
    if (options.drop_from_page_cache) span.file->DropFromPageCache(begin, chunk.size);
    if (bytes_done != nullptr) bytes_done->fetch_add(chunk.size, std::memory_order_relaxed);
  });
  return error.Take();
}

absl::Status PopulateSpans(std::span<const MappedSpan> spans, ThreadPool& pool, size_t chunk_bytes,
                           std::atomic<uint64_t>* bytes_done) {
  const std::vector<Chunk> chunks = CutIntoChunks(spans, chunk_bytes);
  FirstError error;
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  pool.ParallelFor(static_cast<int64_t>(chunks.size()), [&](int64_t c, int) {
    if (error.failed()) return;
    const Chunk& chunk = chunks[c];
    const MappedSpan& span = spans[chunk.span];
    // madvise wants a page-aligned start: widen the chunk to whole pages (still inside the
    // mapping, which covers whole pages of the file).
    const uintptr_t begin = reinterpret_cast<uintptr_t>(span.begin) + chunk.offset;
    const uintptr_t first = begin / page * page;
    const uintptr_t end = begin + chunk.size;
    for (;;) {
      if (::madvise(reinterpret_cast<void*>(first), end - first, MADV_POPULATE_READ) == 0) break;
      const int err = errno;
      if (err == EINTR || err == EAGAIN) continue;
      if (err == EINVAL) {  // a kernel before 5.14: touch one byte per page instead
        for (uintptr_t p = first; p < end; p += page) {
          (void)*reinterpret_cast<const volatile uint8_t*>(p);
        }
        break;
      }
      error.Set(err == EFAULT
                    ? absl::DataLossError(absl::StrCat(
                          *span.path, ": bytes ", begin - reinterpret_cast<uintptr_t>(span.begin),
                          "..", end - reinterpret_cast<uintptr_t>(span.begin),
                          " of a tensor range cannot be read (the file is shorter than its "
                          "header says: truncated while loading?)"))
                    : absl::ResourceExhaustedError(absl::StrCat(
                          *span.path, ": cannot fault the weights in: ", std::strerror(err))));
      return;
    }
    if (bytes_done != nullptr) bytes_done->fetch_add(chunk.size, std::memory_order_relaxed);
  });
  return error.Take();
}

}  // namespace dsmoe
