// Fuzz target: the safetensors header parser (core/io/safetensors.h) on arbitrary file bytes.
// Beyond not crashing, an accepted header must describe tensors that lie inside the data
// region, tile it exactly, and have non-negative shapes whose size matches their byte span.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/io/safetensors.h"
#include "tests/fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto header =
      dsmoe::ParseSafetensorsHeader(reinterpret_cast<const std::byte*>(data), size, "fuzz");
  if (!header.ok()) {
    DSMOE_FUZZ_CHECK(header.status().code() == absl::StatusCode::kInvalidArgument);
    return 0;
  }
  DSMOE_FUZZ_CHECK(header->data_offset >= 8 && header->data_offset <= size);
  const uint64_t data_size = size - header->data_offset;
  uint64_t covered = 0;
  for (const auto& [name, e] : header->entries) {
    DSMOE_FUZZ_CHECK(e.begin <= e.end && e.end <= data_size);
    covered += e.end - e.begin;
    uint64_t numel = 1;
    for (int64_t d : e.shape) {
      DSMOE_FUZZ_CHECK(d >= 0);
      numel *= static_cast<uint64_t>(d);
    }
    // For the dtypes dsmoe computes with, the byte span is exactly numel × element size.
    if (auto dtype = dsmoe::ParseDTypeName(e.dtype_name)) {
      DSMOE_FUZZ_CHECK(numel * dsmoe::DTypeSize(*dtype) == e.end - e.begin);
    }
  }
  DSMOE_FUZZ_CHECK(covered == data_size);
  return 0;
}
