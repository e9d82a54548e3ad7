// The safetensors reader on valid and malformed files: every refusal names the file, the
// tensor and what was expected, and nothing crashes.
#include "core/io/safetensors.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>

#include "core/io/checkpoint.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using testing::TempDir;
using testing::WriteFile;

// A file with the given header JSON and `data_bytes` bytes of data.
std::string RawFile(const std::string& header, size_t data_bytes) {
  std::string out(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  return out + header + std::string(data_bytes, '\x01');
}

absl::Status OpenStatus(const std::string& path) { return SafetensorsFile::Open(path).status(); }

TEST(Safetensors, WriterOutputReadsBack) {
  TempDir dir;
  const std::string path = dir.File("a.safetensors");
  auto writer =
      SafetensorsWriter::Create(path, {{"x", DType::kF32, {2, 3}}, {"y", DType::kBF16, {4}}});
  ASSERT_TRUE(writer.ok()) << writer.status();
  const float x[6] = {1, 2, 3, 4, 5, 6};
  const uint16_t y[4] = {0x3f80, 0x4000, 0x4040, 0x4080};
  ASSERT_TRUE((*writer)->Append(x, sizeof(x)).ok());
  ASSERT_TRUE((*writer)->Append(y, sizeof(y)).ok());
  ASSERT_TRUE((*writer)->Finish().ok());

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  auto tx = (*file)->Tensor("x");
  ASSERT_TRUE(tx.ok());
  EXPECT_EQ(tx->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(static_cast<const float*>(tx->data)[5], 6.0f);
  auto ty = (*file)->Tensor("y");
  ASSERT_TRUE(ty.ok());
  EXPECT_EQ(ty->dtype, DType::kBF16);
  EXPECT_EQ(LoadAsF32(ty->data, DType::kBF16, 3), 4.0f);
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  EXPECT_EQ((*file)->Tensor("z").status().code(), absl::StatusCode::kNotFound);
}

TEST(Safetensors, WriterRefusesWrongSizes) {
  TempDir dir;
  auto writer = SafetensorsWriter::Create(dir.File("b.safetensors"), {{"x", DType::kF32, {2}}});
  ASSERT_TRUE(writer.ok());
  const float x[3] = {};
  EXPECT_THAT(std::string((*writer)->Append(x, 12).message()), HasSubstr("needs 8 bytes"));
  EXPECT_THAT(std::string((*writer)->Finish().message()), HasSubstr("only 0 of 1"));
}

struct Malformed {
  const char* name;
  std::string bytes;
  const char* expected;
};

class MalformedFile : public ::testing::TestWithParam<Malformed> {};

TEST_P(MalformedFile, IsRefusedWithAClearMessage) {
  TempDir dir;
  const std::string path = dir.File("bad.safetensors");
  WriteFile(path, GetParam().bytes);
  const absl::Status s = OpenStatus(path);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(std::string(s.message()), AllOf(HasSubstr(path), HasSubstr(GetParam().expected)));
}

std::string HeaderLength(uint64_t n) {
  std::string s(8, '\0');
  std::memcpy(s.data(), &n, 8);
  return s;
}

INSTANTIATE_TEST_SUITE_P(
    Cases, MalformedFile,
    ::testing::Values(
        Malformed{"TooShort", "abc", "no 8-byte header length"},
        Malformed{"HeaderPastEnd", HeaderLength(1000) + "{}", "runs past the end"},
        Malformed{"HeaderHuge", HeaderLength(uint64_t{1} << 40) + "{}", "exceeds the 100 MB limit"},
        Malformed{"NotJson", RawFile("{not json", 0), "not valid JSON"},
        Malformed{"NotObject", RawFile("[1,2]", 0), "not a JSON object"},
        Malformed{"UnknownDType",
                  RawFile(R"({"w":{"dtype":"F99","shape":[1],"data_offsets":[0,4]}})", 4),
                  "tensor 'w': unknown dtype 'F99'"},
        Malformed{"MissingShape", RawFile(R"({"w":{"dtype":"F32","data_offsets":[0,4]}})", 4),
                  "tensor 'w': missing array 'shape'"},
        Malformed{"NegativeDim",
                  RawFile(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4),
                  "not a non-negative integer"},
        Malformed{"OffsetsPastEnd",
                  RawFile(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8),
                  "tensor 'w': data_offsets [0, 16] run past the end of the data (8 bytes)"},
        Malformed{"OffsetsReversed",
                  RawFile(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}})", 4),
                  "reversed"},
        Malformed{"SizeMismatch",
                  RawFile(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
                  "shape [3] of F32 needs 12 bytes but data_offsets span 8"},
        Malformed{
            "Overlap",
            RawFile(
                R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                12),
            "(overlap)"},
        Malformed{"Gap", RawFile(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8),
                  "(gap)"},
        Malformed{"TrailingBytes",
                  RawFile(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 12),
                  "tensors cover 4 bytes but the data region holds 12"}),
    [](const auto& param_info) { return std::string(param_info.param.name); });

TEST(Safetensors, KnownButUncomputableDTypeIsRefusedOnUse) {
  TempDir dir;
  const std::string path = dir.File("i64.safetensors");
  WriteFile(path, RawFile(R"({"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", 8));
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const absl::Status s = (*file)->Tensor("ids").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("tensor 'ids' has dtype I64"));
}

TEST(Checkpoint, RefusesMissingDirectoryAndWeights) {
  EXPECT_EQ(Checkpoint::Open("/nonexistent/dsmoe").status().code(), absl::StatusCode::kNotFound);
  TempDir dir;
  const absl::Status s = Checkpoint::Open(dir.path()).status();
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("neither model.safetensors nor model.safetensors.index.json"));
}

TEST(Checkpoint, IndexMustMatchItsShards) {
  TempDir dir;
  WriteFile(dir.File("model-00001-of-00001.safetensors"),
            RawFile(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4));
  WriteFile(
      dir.File("model.safetensors.index.json"),
      R"({"weight_map":{"a":"model-00001-of-00001.safetensors","b":"model-00001-of-00001.safetensors"}})");
  absl::Status s = Checkpoint::Open(dir.path()).status();
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("tensor 'b' is mapped to model-00001-of-00001.safetensors but that file "
                        "does not contain it"));

  WriteFile(dir.File("model.safetensors.index.json"),
            R"({"weight_map":{"a":"missing.safetensors"}})");
  s = Checkpoint::Open(dir.path()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr("missing.safetensors"));

  WriteFile(dir.File("model.safetensors.index.json"), R"({"weight_map":{"a":"../etc/passwd"}})");
  s = Checkpoint::Open(dir.path()).status();
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("must name a file inside the checkpoint directory"));

  WriteFile(dir.File("model.safetensors.index.json"), R"({"metadata":{}})");
  s = Checkpoint::Open(dir.path()).status();
  EXPECT_THAT(std::string(s.message()), HasSubstr("missing object 'weight_map'"));
}

}  // namespace
}  // namespace dsmoe
