#include "core/util/huge_pages.h"

#include <sys/mman.h>

#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
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

ResidentPages ResidentPagesIn(const void* begin, size_t size) {
  ResidentPages out;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(begin), hi = lo + size;
  std::ifstream in("/proc/self/smaps");
  std::string line;
  bool inside = false;
  while (std::getline(in, line)) {
    // A VMA's header line: "7f12a0000000-7f12a4000000 r--p 00000000 fd:00 1234  /path".
    const size_t dash = line.find('-');
    if (dash != std::string::npos && dash > 0 &&
        std::isxdigit(static_cast<unsigned char>(line[0])) && line.find(':') > dash) {
      const uintptr_t vma_begin = std::strtoull(line.c_str(), nullptr, 16);
      const uintptr_t vma_end = std::strtoull(line.c_str() + dash + 1, nullptr, 16);
      inside = vma_begin >= lo && vma_begin < hi && vma_end > vma_begin;
      continue;
    }
    if (!inside) continue;
    auto field = [&](const char* key) -> std::optional<size_t> {
      const size_t n = std::strlen(key);
      if (line.compare(0, n, key) != 0) return std::nullopt;
      return std::strtoull(line.c_str() + n, nullptr, 10) * 1024;  // "Rss:   1234 kB"
    };
    if (auto v = field("Rss:")) out.rss += *v;
    if (auto v = field("FilePmdMapped:")) out.huge += *v;
    if (auto v = field("AnonHugePages:")) out.huge += *v;
  }
  return out;
}

bool TransparentHugePagesAvailable() {
  std::ifstream in("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string text;
  std::getline(in, text);
  return text.find("[never]") == std::string::npos;
}

}  // namespace dsmoe
