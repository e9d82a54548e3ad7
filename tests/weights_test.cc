// Loading weights: shapes checked against the config with errors naming the tensor, and a
// selection loads only what a role needs.
#include "core/model/weights.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <tuple>

#include "core/io/bulk_read.h"
#include "core/io/safetensors.h"
#include "core/model/make_model.h"
#include "core/model/quantize.h"
#include "core/util/log.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

using ::testing::HasSubstr;
using testing::TempDir;

TEST(ModelWeights, LoadsEveryTensorOfTheTinyPreset) {
  TempDir dir;
  const ModelConfig c = testing::WriteTinyModel(dir.path(), DType::kBF16);
  auto w = ModelWeights::Load(dir.path());
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->embed_tokens.dtype, DType::kBF16);
  EXPECT_EQ((*w)->lm_head.rows, c.vocab_size);
  ASSERT_EQ((*w)->layers.size(), 4u);
  EXPECT_FALSE((*w)->layers[0].is_moe);
  EXPECT_TRUE((*w)->layers[0].dense.loaded());
  EXPECT_TRUE((*w)->layers[1].is_moe);
  EXPECT_EQ((*w)->layers[1].routed.size(), 16u);
  EXPECT_EQ((*w)->layers[1].shared.width(), 64);
  EXPECT_EQ((*w)->layers[1].router.rows, 16);
  EXPECT_EQ((*w)->generation_config().eos_token_ids, std::vector<int64_t>{1});
}

TEST(ModelWeights, SelectionLoadsOnlyTheChosenExperts) {
  TempDir dir;
  testing::WriteTinyModel(dir.path());
  WeightSelection expert_server;
  expert_server.attention_side = false;
  expert_server.all_routed_experts = false;
  expert_server.routed_experts = {{1, 3}, {2, 15}};
  auto w = ModelWeights::Load(dir.path(), expert_server);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_TRUE((*w)->embed_tokens.empty());
  EXPECT_TRUE((*w)->layers[1].router.empty());
  EXPECT_TRUE((*w)->layers[1].routed[3].loaded());
  EXPECT_FALSE((*w)->layers[1].routed[4].loaded());
  EXPECT_TRUE((*w)->layers[2].routed[15].loaded());
  EXPECT_FALSE((*w)->layers[3].routed[3].loaded());
}

TEST(ModelWeights, WrongShapeNamesTensorAndExpectation) {
  TempDir dir;
  ModelConfig c = testing::WriteTinyModel(dir.path());
  c.moe_intermediate_size = 48;  // the checkpoint's experts are 32 wide
  testing::WriteFile(dir.File("config.json"), c.ToJson());
  const absl::Status s = ModelWeights::Load(dir.path()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(
      std::string(s.message()),
      HasSubstr("tensor 'model.layers.1.mlp.shared_experts.gate_proj.weight' has shape [64, 64], "
                "expected [96, 64] (shared experts: n_shared_experts·moe_intermediate_size)"));
}

TEST(ModelWeights, MissingTensorIsNamed) {
  TempDir dir;
  ModelConfig c = testing::WriteTinyModel(dir.path());
  c.attention_bias = true;  // the checkpoint has no biases
  testing::WriteFile(dir.File("config.json"), c.ToJson());
  const absl::Status s = ModelWeights::Load(dir.path()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("tensor 'model.layers.0.self_attn.q_proj.bias' is missing"));
}

TEST(ModelWeights, BadConfigKeyNamesTheFile) {
  TempDir dir;
  testing::WriteTinyModel(dir.path());
  testing::WriteFile(dir.File("config.json"), R"({"model_type": "deepseek", "hidden_size": "64"})");
  const absl::Status s = ModelWeights::Load(dir.path()).status();
  EXPECT_THAT(std::string(s.message()), HasSubstr(dir.File("config.json")));
  EXPECT_THAT(std::string(s.message()), HasSubstr("key 'hidden_size' must be an integer"));
}

TEST(ModelWeights, MissingConfigIsNotFound) {
  TempDir dir;
  testing::WriteTinyModel(dir.path());
  std::filesystem::remove(dir.File("config.json"));
  const absl::Status s = ModelWeights::Load(dir.path()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr("config.json"));
}

TEST(ModelWeights, TruncatedShardIsRefused) {
  TempDir dir;
  testing::WriteTinyModel(dir.path());
  const std::string bytes = testing::ReadFile(dir.File("model.safetensors"));
  testing::WriteFile(dir.File("model.safetensors"), bytes.substr(0, bytes.size() - 100));
  const absl::Status s = ModelWeights::Load(dir.path()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("run past the end of the data"));
}

}  // namespace
}  // namespace dsmoe

namespace dsmoe {
namespace {

using Placement = WeightLoadOptions::Placement;

WeightLoadOptions Quiet(Placement placement) {
  WeightLoadOptions o;
  o.placement = placement;
  o.logger = nullptr;
  return o;
}

// The bytes [offset, offset + size) of a file, read with plain stdio: the reference the loaders
// are held to.
std::string FileBytes(const std::string& path, uint64_t offset, size_t size) {
  std::ifstream in(path, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(offset));
  std::string bytes(size, '\0');
  in.read(bytes.data(), static_cast<std::streamsize>(size));
  EXPECT_TRUE(in.good()) << path << " @" << offset;
  return bytes;
}

// Where a mapped view points: the shard file and the offset in it.
std::pair<std::string, uint64_t> FileOffsetOf(const ModelWeights& w, const void* p) {
  for (const auto& shard : w.checkpoint().MappedShards()) {
    const auto* b = static_cast<const std::byte*>(p);
    if (b >= shard.data && b < shard.data + shard.size) {
      return {shard.path, static_cast<uint64_t>(b - shard.data)};
    }
  }
  ADD_FAILURE() << "a mapped view points outside every shard";
  return {"", 0};
}

// Loads `dir` mapped and copied with `selection`, and requires of every matrix (values and Q8_0
// scales) that both hold exactly the file's bytes at a tensor's data offset (read with stdio,
// located through the safetensors header), that tied matrices stay one copy and that the copy
// holds each distinct matrix once.
void ExpectCopyEqualsFile(const std::string& dir, const WeightSelection& selection,
                          size_t* num_matrices = nullptr) {
  auto mapped = ModelWeights::Load(dir, selection, Quiet(Placement::kMap));
  auto copied = ModelWeights::Load(dir, selection, Quiet(Placement::kCopy));
  ASSERT_TRUE(mapped.ok()) << mapped.status();
  ASSERT_TRUE(copied.ok()) << copied.status();
  EXPECT_FALSE((*mapped)->in_huge_pages());
  EXPECT_TRUE((*copied)->in_huge_pages());
  EXPECT_EQ((*copied)->load_report().placement, Placement::kCopy);
  EXPECT_TRUE((*copied)->checkpoint().MappedShards().empty()) << "the copy keeps no mapping";
  EXPECT_EQ((*copied)->MatrixBytes(), (*mapped)->MatrixBytes());
  EXPECT_EQ((*copied)->load_report().bytes, static_cast<int64_t>((*mapped)->MatrixBytes()));
  EXPECT_EQ((*copied)->lm_head.data == (*copied)->embed_tokens.data,
            (*mapped)->lm_head.data == (*mapped)->embed_tokens.data);

  // Every data offset a tensor starts at, per shard file, from the header alone.
  std::map<std::string, std::map<uint64_t, uint64_t>> tensor_starts;  // path → offset → bytes
  for (const auto& shard : (*mapped)->checkpoint().MappedShards()) {
    const std::string file = testing::ReadFile(shard.path);
    auto header = ParseSafetensorsHeader(reinterpret_cast<const std::byte*>(file.data()),
                                         file.size(), shard.path);
    ASSERT_TRUE(header.ok()) << header.status();
    for (const auto& [name, e] : header->entries) {
      tensor_starts[shard.path][header->data_offset + e.begin] = e.end - e.begin;
    }
  }
  std::vector<MatrixView> a, b;
  (*mapped)->ForEachMatrix([&](MatrixView& m) { a.push_back(m); });
  (*copied)->ForEachMatrix([&](MatrixView& m) { b.push_back(m); });
  ASSERT_EQ(a.size(), b.size());
  if (num_matrices != nullptr) *num_matrices = a.size();
  auto check = [&](const void* in_map, const void* in_copy, size_t bytes, size_t i) {
    const auto [path, offset] = FileOffsetOf(**mapped, in_map);
    auto start = tensor_starts[path].find(offset);
    ASSERT_NE(start, tensor_starts[path].end()) << "matrix " << i << " is not a tensor's start";
    ASSERT_EQ(start->second, bytes) << "matrix " << i;
    const std::string want = FileBytes(path, offset, bytes);
    ASSERT_EQ(std::memcmp(in_map, want.data(), bytes), 0) << "mapped matrix " << i;
    ASSERT_EQ(std::memcmp(in_copy, want.data(), bytes), 0) << "copied matrix " << i;
  };
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].dtype, b[i].dtype);
    ASSERT_EQ(a[i].NumBytes(), b[i].NumBytes());
    ASSERT_NE(a[i].data, b[i].data);
    check(a[i].data, b[i].data, a[i].NumBytes(), i);
    ASSERT_EQ(a[i].scales == nullptr, b[i].scales == nullptr);
    if (a[i].scales != nullptr) check(a[i].scales, b[i].scales, a[i].ScaleBytes(), i);
  }
}

class LoaderEqualsFile : public ::testing::TestWithParam<std::tuple<std::string, int>> {};

TEST_P(LoaderEqualsFile, MappedAndCopiedHoldTheFilesBytes) {
  const auto& [dtype, shards] = GetParam();
  testing::TempDir dir;
  ModelConfig c = *PresetConfig("tiny");
  c.tie_word_embeddings = true;
  const DType written = dtype == "f32" ? DType::kF32 : dtype == "f16" ? DType::kF16 : DType::kBF16;
  ASSERT_TRUE(WriteRandomCheckpoint(c, {written, 5, shards}, dir.path()).ok());
  std::string model = dir.path();
  testing::TempDir q8;
  if (dtype == "q8_0") {
    ASSERT_TRUE(QuantizeCheckpoint(dir.path(), q8.path()).ok());
    model = q8.path();
  }
  auto w = ModelWeights::Load(model, WeightSelection::Everything(), Quiet(Placement::kCopy));
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->lm_head.data, (*w)->embed_tokens.data);  // tied: one copy
  // dsmoe quantize writes one file and keeps the embeddings as they were.
  EXPECT_EQ((*w)->embed_tokens.dtype, written);
  EXPECT_EQ((*w)->layers[1].routed[0].gate.dtype, dtype == "q8_0" ? DType::kQ8_0 : written);
  EXPECT_EQ((*w)->load_report().num_shards, dtype == "q8_0" ? 1 : shards);
  size_t matrices = 0;
  ExpectCopyEqualsFile(model, WeightSelection::Everything(), &matrices);
  EXPECT_GT(matrices, 100u);
}

INSTANTIATE_TEST_SUITE_P(EveryDTypeAndShards, LoaderEqualsFile,
                         ::testing::Combine(::testing::Values("f32", "bf16", "f16", "q8_0"),
                                            ::testing::Values(1, 3)));

TEST(ModelWeights, PartialSelectionReadsOnlyItsExperts) {
  testing::TempDir dir;
  ASSERT_TRUE(WriteRandomCheckpoint(*PresetConfig("tiny"), {DType::kBF16, 7, 3}, dir.path()).ok());
  const WeightSelection some = WeightSelection::RoutedExperts({{1, 3}, {2, 15}, {3, 0}});
  ExpectCopyEqualsFile(dir.path(), some);
  auto w = ModelWeights::Load(dir.path(), some, Quiet(Placement::kCopy));
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_TRUE((*w)->embed_tokens.empty());
  EXPECT_TRUE((*w)->layers[1].routed[3].loaded());
  EXPECT_FALSE((*w)->layers[1].routed[4].loaded());
  const ModelConfig& c = (*w)->config();
  // Three experts of gate, up [w, H] and down [H, w] in BF16: nothing else was read.
  const int64_t expert_bytes = 3 * c.moe_intermediate_size * c.hidden_size * 2;
  EXPECT_EQ((*w)->load_report().bytes, 3 * expert_bytes);
  EXPECT_LT((*w)->load_report().bytes, 4 << 20);
}

TEST(ModelWeights, AutoPlacementLoadsAndSaysWhy) {
  testing::TempDir dir;
  testing::WriteTinyModel(dir.path(), DType::kBF16);
  CapturingLogger log;
  WeightLoadOptions o;
  o.logger = &log;
  auto w = ModelWeights::Load(dir.path(), WeightSelection::Everything(), o);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_NE((*w)->load_report().placement, Placement::kAuto);
  EXPECT_FALSE((*w)->load_report().reason.empty());
  EXPECT_TRUE(log.Contains("weights: ")) << ::testing::PrintToString(log.lines());
  EXPECT_TRUE(log.Contains((*w)->load_report().reason));
  auto reference =
      ModelWeights::Load(dir.path(), WeightSelection::Everything(), Quiet(Placement::kMap));
  ASSERT_TRUE(reference.ok());
  std::vector<MatrixView> a, b;
  (*w)->ForEachMatrix([&](MatrixView& m) { a.push_back(m); });
  (*reference)->ForEachMatrix([&](MatrixView& m) { b.push_back(m); });
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(std::memcmp(a[i].data, b[i].data, a[i].NumBytes()), 0) << "matrix " << i;
  }
}

TEST(ModelWeights, TruncatedShardOfSeveralIsNamed) {
  testing::TempDir dir;
  ASSERT_TRUE(WriteRandomCheckpoint(*PresetConfig("tiny"), {DType::kBF16, 1, 3}, dir.path()).ok());
  const std::string shard = dir.File("model-00002-of-00003.safetensors");
  const std::string bytes = testing::ReadFile(shard);
  testing::WriteFile(shard, bytes.substr(0, bytes.size() / 2));
  for (Placement p : {Placement::kAuto, Placement::kMap, Placement::kCopy}) {
    const absl::Status s =
        ModelWeights::Load(dir.path(), WeightSelection::Everything(), Quiet(p)).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << PlacementName(p);
    EXPECT_THAT(std::string(s.message()), HasSubstr("model-00002-of-00003.safetensors"));
  }
}

// A file cut short after its header was read (so after Open's checks): the reads say so
// instead of crashing.
TEST(BulkRead, ReadPastTheEndIsDataLoss) {
  testing::TempDir dir;
  testing::WriteFile(dir.File("f"), std::string(10000, 'x'));
  auto file = ReadOnlyFile::Open(dir.File("f"));
  ASSERT_TRUE(file.ok()) << file.status();
  std::vector<std::byte> dst(20000);
  ThreadPool pool(2);
  std::atomic<uint64_t> done{0};
  const ReadSpan whole{file->get(), 0, 10000, dst.data()};
  ASSERT_TRUE(ReadSpans({&whole, 1}, pool, {}, &done).ok());
  EXPECT_EQ(done.load(), 10000u);
  EXPECT_EQ(static_cast<char>(dst[9999]), 'x');
  const ReadSpan past{file->get(), 5000, 8000, dst.data()};
  BulkReadOptions small_chunks;
  small_chunks.chunk_bytes = 4096;
  const absl::Status s = ReadSpans({&past, 1}, pool, small_chunks, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(s.message()), HasSubstr("ends at byte 10000"));
  EXPECT_THAT(std::string(s.message()), HasSubstr(dir.File("f")));
}

TEST(BulkRead, PopulatingATruncatedMappingIsDataLoss) {
  testing::TempDir dir;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  testing::WriteFile(dir.File("f"), std::string(8 * page, 'y'));
  auto mapped = MappedFile::Open(dir.File("f"));
  ASSERT_TRUE(mapped.ok()) << mapped.status();
  ThreadPool pool(2);
  const MappedSpan all{(*mapped)->data(), (*mapped)->size(), &(*mapped)->path()};
  ASSERT_TRUE(PopulateSpans({&all, 1}, pool, page, nullptr).ok());
  ASSERT_EQ(truncate(dir.File("f").c_str(), static_cast<off_t>(2 * page)), 0);
  // The pages already read stay in this mapping; drop them so they must be faulted again.
  ASSERT_EQ(madvise(const_cast<std::byte*>((*mapped)->data()), 8 * page, MADV_DONTNEED), 0);
  const absl::Status s = PopulateSpans({&all, 1}, pool, page, nullptr);
  if (s.ok()) GTEST_SKIP() << "this kernel has no MADV_POPULATE_READ (before 5.14)";
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("shorter than its header says"));
}

}  // namespace
}  // namespace dsmoe
