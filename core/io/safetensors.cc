#include "core/io/safetensors.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>

namespace dsmoe {

namespace {

// The reference implementation refuses headers above 100 MB; so do we.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// Element sizes of every dtype the safetensors format defines (bits/8; sub-byte types are not
// part of the format version Hugging Face checkpoints use).
std::optional<size_t> FormatDTypeSize(const std::string& name) {
  static const std::map<std::string, size_t> kSizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
      {"U32", 4},  {"F32", 4}, {"F64", 8}, {"I64", 8},     {"U64", 8}};
  auto it = kSizes.find(name);
  if (it == kSizes.end()) return std::nullopt;
  return it->second;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  DSMOE_ASSIGN_OR_RETURN(auto mapped, MappedFile::Open(path));
  DSMOE_ASSIGN_OR_RETURN(SafetensorsHeader header,
                         ParseSafetensorsHeader(mapped->data(), mapped->size(), path));
  auto file = std::unique_ptr<SafetensorsFile>(new SafetensorsFile(std::move(mapped)));
  file->data_begin_ = file->file_->data() + header.data_offset;
  file->header_ = std::move(header);
  return file;
}

absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(const std::byte* file, size_t size,
                                                         const std::string& path) {
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": invalid safetensors file: ", what));
  };
  const size_t file_size = size;
  SafetensorsHeader out;
  if (file_size < 8)
    return bad(absl::StrCat("only ", file_size, " bytes, no 8-byte header length"));
  uint64_t header_len = 0;
  std::memcpy(&header_len, file, 8);  // little-endian on every platform we build for
  if (header_len > kMaxHeaderBytes) {
    return bad(absl::StrCat("header length ", header_len, " exceeds the 100 MB limit"));
  }
  if (header_len > file_size - 8) {
    return bad(absl::StrCat("header length ", header_len, " runs past the end of the ", file_size,
                            "-byte file"));
  }
  const char* header_begin = reinterpret_cast<const char*>(file) + 8;
  nlohmann::json header = nlohmann::json::parse(header_begin, header_begin + header_len, nullptr,
                                                /*allow_exceptions=*/false);
  if (header.is_discarded()) return bad("header is not valid JSON");
  if (!header.is_object()) return bad("header is not a JSON object");

  out.data_offset = 8 + header_len;
  const uint64_t data_size = file_size - 8 - header_len;

  for (auto& item : header.items()) {
    // Not a structured binding: the lambda below captures the name (clang 14, the fuzz build's
    // compiler, cannot capture bindings).
    const std::string& name = item.key();
    const nlohmann::json& value = item.value();
    if (name == "__metadata__") {
      if (!value.is_object()) return bad("__metadata__ is not an object");
      for (auto& [k, v] : value.items()) {
        if (!v.is_string()) return bad(absl::StrCat("__metadata__.", k, " is not a string"));
        out.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    auto bad_tensor = [&](const std::string& what) {
      return bad(absl::StrCat("tensor '", name, "': ", what));
    };
    if (!value.is_object()) return bad_tensor("entry is not an object");
    SafetensorsEntry e;
    auto dtype = value.find("dtype");
    if (dtype == value.end() || !dtype->is_string()) return bad_tensor("missing string 'dtype'");
    e.dtype_name = dtype->get<std::string>();
    const auto elem_size = FormatDTypeSize(e.dtype_name);
    if (!elem_size) return bad_tensor(absl::StrCat("unknown dtype '", e.dtype_name, "'"));
    auto shape = value.find("shape");
    if (shape == value.end() || !shape->is_array()) return bad_tensor("missing array 'shape'");
    uint64_t numel = 1;
    for (auto& d : *shape) {
      if (!d.is_number_unsigned())
        return bad_tensor("shape holds a value that is not a non-negative integer");
      const uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / 8 / dim) {
        return bad_tensor("shape overflows");
      }
      numel *= dim;
      e.shape.push_back(static_cast<int64_t>(dim));
    }
    auto offsets = value.find("data_offsets");
    if (offsets == value.end() || !offsets->is_array() || offsets->size() != 2 ||
        !(*offsets)[0].is_number_unsigned() || !(*offsets)[1].is_number_unsigned()) {
      return bad_tensor("'data_offsets' must be two non-negative integers");
    }
    e.begin = (*offsets)[0].get<uint64_t>();
    e.end = (*offsets)[1].get<uint64_t>();
    if (e.begin > e.end) {
      return bad_tensor(absl::StrCat("data_offsets [", e.begin, ", ", e.end, "] are reversed"));
    }
    if (e.end > data_size) {
      return bad_tensor(absl::StrCat("data_offsets [", e.begin, ", ", e.end,
                                     "] run past the end of the data (", data_size, " bytes)"));
    }
    if (e.end - e.begin != numel * *elem_size) {
      return bad_tensor(absl::StrCat("shape ", ShapeToString(e.shape), " of ", e.dtype_name,
                                     " needs ", numel * *elem_size, " bytes but data_offsets span ",
                                     e.end - e.begin));
    }
    out.entries.emplace(name, std::move(e));
  }

  // Tensors must tile the data region: no overlap (which would alias weights) and no gap.
  std::vector<const std::pair<const std::string, SafetensorsEntry>*> by_offset;
  for (auto& kv : out.entries) by_offset.push_back(&kv);
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) {
    return a->second.begin != b->second.begin ? a->second.begin < b->second.begin
                                              : a->second.end < b->second.end;
  });
  uint64_t expected = 0;
  for (auto* kv : by_offset) {
    if (kv->second.begin != expected) {
      return bad(absl::StrCat("tensor '", kv->first, "' starts at byte ", kv->second.begin,
                              " of the data but the previous tensor ends at ", expected,
                              kv->second.begin < expected ? " (overlap)" : " (gap)"));
    }
    expected = kv->second.end;
  }
  if (expected != data_size) {
    return bad(
        absl::StrCat("tensors cover ", expected, " bytes but the data region holds ", data_size));
  }
  return out;
}

absl::StatusOr<TensorView> SafetensorsFile::Tensor(const std::string& name) const {
  auto it = header_.entries.find(name);
  if (it == header_.entries.end()) {
    return absl::NotFoundError(absl::StrCat(path(), ": tensor '", name, "' is missing"));
  }
  const SafetensorsEntry& e = it->second;
  const auto dtype = ParseDTypeName(e.dtype_name);
  if (!dtype) {
    return absl::InvalidArgumentError(absl::StrCat(path(), ": tensor '", name, "' has dtype ",
                                                   e.dtype_name,
                                                   "; dsmoe computes with F32, BF16 or F16"));
  }
  return TensorView{*dtype, e.shape, data_begin_ + e.begin};
}

absl::StatusOr<std::unique_ptr<SafetensorsWriter>> SafetensorsWriter::Create(
    const std::string& path, std::vector<Spec> specs,
    const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header;
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const Spec& s : specs) {
    uint64_t bytes = DTypeSize(s.dtype);
    for (int64_t d : s.shape) bytes *= static_cast<uint64_t>(d);
    header[s.name] = {{"dtype", std::string(DTypeName(s.dtype))},
                      {"shape", s.shape},
                      {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keep tensor data 8-byte aligned
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) {
    return absl::PermissionDeniedError(
        absl::StrCat(path, ": cannot create: ", std::strerror(errno)));
  }
  const uint64_t len = text.size();
  if (std::fwrite(&len, 8, 1, f) != 1 ||
      std::fwrite(text.data(), 1, text.size(), f) != text.size()) {
    std::fclose(f);
    return absl::DataLossError(absl::StrCat(path, ": write failed"));
  }
  return std::unique_ptr<SafetensorsWriter>(new SafetensorsWriter(path, f, std::move(specs)));
}

SafetensorsWriter::~SafetensorsWriter() {
  if (file_ != nullptr) std::fclose(file_);
}

absl::Status SafetensorsWriter::Append(const void* bytes, size_t size) {
  if (next_ >= specs_.size()) {
    return absl::FailedPreconditionError(
        absl::StrCat(path_, ": more tensors appended than specified"));
  }
  const Spec& s = specs_[next_];
  size_t expected = DTypeSize(s.dtype);
  for (int64_t d : s.shape) expected *= static_cast<size_t>(d);
  if (size != expected) {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": tensor '", s.name, "' needs ", expected, " bytes, got ", size));
  }
  if (size > 0 && std::fwrite(bytes, 1, size, file_) != size) {
    return absl::DataLossError(absl::StrCat(path_, ": write failed: ", std::strerror(errno)));
  }
  ++next_;
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::Finish() {
  if (next_ != specs_.size()) {
    return absl::FailedPreconditionError(
        absl::StrCat(path_, ": only ", next_, " of ", specs_.size(), " tensors written"));
  }
  const int rc = std::fclose(file_);
  file_ = nullptr;
  if (rc != 0) return absl::DataLossError(absl::StrCat(path_, ": close failed"));
  return absl::OkStatus();
}

}  // namespace dsmoe
