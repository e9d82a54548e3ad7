// The safetensors format (Hugging Face): 8-byte little-endian header length N, N bytes of JSON
// mapping tensor names to {dtype, shape, data_offsets}, then the raw little-endian data.
//
// Opening validates the whole header — every dtype, shape and offset, and that the tensors
// tile the data region exactly as the reference library demands — without reading any tensor
// data, so a multi-GB shard opens in microseconds and a malformed one is refused up front.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/io/mapped_file.h"
#include "core/tensor/tensor.h"
#include "core/util/status.h"

namespace dsmoe {

struct SafetensorsEntry {
  std::string dtype_name;  // as written, e.g. "BF16"; may be one dsmoe does not compute with
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets into the data region
  uint64_t end = 0;
};

// A parsed and validated safetensors header: what Open checks, as a pure function of the
// file's bytes (the fuzz target tests/fuzz/safetensors_fuzzer.cc calls it directly).
struct SafetensorsHeader {
  std::map<std::string, SafetensorsEntry> entries;
  std::map<std::string, std::string> metadata;
  uint64_t data_offset = 0;  // where the data region begins: 8 + header length
};
// `file` is the whole file; `source` names it in errors (InvalidArgument).
absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(const std::byte* file, size_t size,
                                                         const std::string& source);

// Immutable after Open; thread-safe.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  const std::string& path() const { return file_->path(); }
  // The whole file's mapping, which every view from Tensor() points into.
  const MappedFile& mapping() const { return *file_; }
  bool Contains(const std::string& name) const { return header_.entries.count(name) != 0; }
  const std::map<std::string, SafetensorsEntry>& entries() const { return header_.entries; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }

  // A view of tensor `name`; NotFound if absent, InvalidArgument if its dtype is not one
  // dsmoe computes with (F32, BF16, F16).
  absl::StatusOr<TensorView> Tensor(const std::string& name) const;

 private:
  explicit SafetensorsFile(std::unique_ptr<MappedFile> file) : file_(std::move(file)) {}

  std::unique_ptr<MappedFile> file_;
  const std::byte* data_begin_ = nullptr;
  SafetensorsHeader header_;
};

// Writes a safetensors file whose tensor list is fixed up front, streaming each tensor's bytes
// in order (so a multi-GB checkpoint is never held in memory).
class SafetensorsWriter {
 public:
  struct Spec {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
  };
  static absl::StatusOr<std::unique_ptr<SafetensorsWriter>> Create(
      const std::string& path, std::vector<Spec> specs,
      const std::map<std::string, std::string>& metadata = {{"format", "pt"}});
  ~SafetensorsWriter();

  // Appends the next tensor's data; `bytes` must be exactly its size.
  absl::Status Append(const void* bytes, size_t size);
  // Flushes and closes; an error if fewer tensors were appended than specified.
  absl::Status Finish();

 private:
  SafetensorsWriter(std::string path, std::FILE* f, std::vector<Spec> specs)
      : path_(std::move(path)), file_(f), specs_(std::move(specs)) {}
  std::string path_;
  std::FILE* file_;
  std::vector<Spec> specs_;
  size_t next_ = 0;
};

}  // namespace dsmoe
