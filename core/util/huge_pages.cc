#include "core/util/huge_pages.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>

namespace dsmoe {

namespace {
constexpr size_t kHugePage = size_t{2} << 20;
}

absl::StatusOr<std::unique_ptr<HugePageBuffer>> HugePageBuffer::Allocate(size_t bytes) {
  const size_t size = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  if (size == 0) return std::unique_ptr<HugePageBuffer>(new HugePageBuffer(nullptr, 0, nullptr, 0));
  // Over-map by one huge page so the usable range can start on a 2 MiB boundary.
  const size_t mapping_size = size + kHugePage;
  void* p = mmap(nullptr, mapping_size, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot map ", mapping_size, " bytes: ", std::strerror(errno)));
  }
  auto* mapping = static_cast<std::byte*>(p);
  const uintptr_t aligned =
      (reinterpret_cast<uintptr_t>(mapping) + kHugePage - 1) / kHugePage * kHugePage;
  auto* data = reinterpret_cast<std::byte*>(aligned);
  // Advisory: without THP support the memory is still usable with normal pages.
  (void)madvise(data, size, MADV_HUGEPAGE);
  return std::unique_ptr<HugePageBuffer>(new HugePageBuffer(mapping, mapping_size, data, size));
}

HugePageBuffer::~HugePageBuffer() {
  if (mapping_ != nullptr) munmap(mapping_, mapping_size_);
}

size_t ProcessHugePageBytes() {
  std::ifstream in("/proc/self/smaps_rollup");
  std::string key;
  size_t value = 0;
  std::string unit;
  while (in >> key) {
    if (key == "AnonHugePages:") {
      in >> value >> unit;
      return value * 1024;
    }
    std::getline(in, unit);
  }
  return 0;
}

}  // namespace dsmoe
