// The paged KV cache: the BlockManager's bookkeeping against hand-counted pages, and a runner
// whose sequences' pages are scattered through a small pool against a runner that recomputes
// each sequence alone from scratch.
#include "core/model/kv_cache.h"

#include <gtest/gtest.h>

#include <fstream>
#include <numeric>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/strip.h"
#include "core/model/block_manager.h"
#include "core/model/memory_plan.h"
#include "core/model/model_facts.h"
#include "core/model/model_runner.h"
#include "core/util/memory_limit.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

TEST(BlockManager, SlotsTakeOnlyThePagesTheyReachAndGiveThemBack) {
  BlockManager b(/*num_pages=*/10, /*page_tokens=*/4, /*num_slots=*/3, /*max_context=*/32);
  EXPECT_EQ(b.pages_per_slot(), 8);
  EXPECT_EQ(b.PagesFor(0), 0);
  EXPECT_EQ(b.PagesFor(1), 1);
  EXPECT_EQ(b.PagesFor(4), 1);
  EXPECT_EQ(b.PagesFor(5), 2);
  ASSERT_TRUE(b.Grow(0, 5).ok());  // 2 pages
  EXPECT_EQ(b.Capacity(0), 8);
  EXPECT_EQ(b.num_free_pages(), 8);
  ASSERT_TRUE(b.Grow(0, 8).ok());  // still 2
  EXPECT_EQ(b.num_free_pages(), 8);
  EXPECT_EQ(b.PagesNeeded(1, 30), 8);
  ASSERT_TRUE(b.Grow(1, 30).ok());  // 8 pages: the pool is empty
  EXPECT_EQ(b.num_free_pages(), 0);
  // No page is held twice.
  std::vector<int32_t> seen;
  for (int32_t s : {0, 1}) {
    for (int64_t i = 0; i < b.pages_per_slot() && b.Table(s)[i] >= 0; ++i)
      seen.push_back(b.Table(s)[i]);
  }
  std::sort(seen.begin(), seen.end());
  EXPECT_EQ(seen, std::vector<int32_t>({0, 1, 2, 3, 4, 5, 6, 7, 8, 9}));
  EXPECT_EQ(b.Table(0)[2], -1);
  // Exhausted: refused, nothing taken.
  const absl::Status s = b.Grow(2, 1);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_EQ(b.Capacity(2), 0);
  b.Release(1);
  EXPECT_EQ(b.num_free_pages(), 8);
  EXPECT_EQ(b.Table(1)[0], -1);
  ASSERT_TRUE(b.Grow(2, 1).ok());
  EXPECT_EQ(b.Grow(2, 33).code(), absl::StatusCode::kOutOfRange);
}

TEST(BlockManager, ReserveIsAllOrNothingAndRefusesSkippedPositions) {
  BlockManager b(4, 4, 2, 64);
  // Slot 0 positions 0..9 (3 pages) and slot 1 positions 0..5 (2 pages): 5 > 4 pages.
  std::vector<int32_t> slots, pos;
  for (int p = 0; p < 10; ++p) slots.push_back(0), pos.push_back(p);
  for (int p = 0; p < 6; ++p) slots.push_back(1), pos.push_back(p);
  EXPECT_EQ(b.Reserve(slots, pos).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(b.num_free_pages(), 4);
  EXPECT_EQ(b.Capacity(0), 0);
  ASSERT_TRUE(b.Reserve(std::span(slots).first(10), std::span(pos).first(10)).ok());
  EXPECT_EQ(b.Capacity(0), 12);
  // A token past the slot's pages with nothing written before it.
  const std::vector<int32_t> one = {1}, far = {9};
  EXPECT_EQ(b.Reserve(one, far).code(), absl::StatusCode::kInvalidArgument);
  const std::vector<int32_t> zero = {0}, next = {12};
  ASSERT_TRUE(b.Reserve(zero, next).ok());  // decode into a new page
  EXPECT_EQ(b.num_free_pages(), 0);
}

TEST(BlockManager, DirtyRangeCoversEveryChangedEntry) {
  BlockManager b(8, 2, 3, 8);  // tables of 4 entries per slot
  b.TakeDirty();
  auto [begin, end] = b.TakeDirty();
  EXPECT_GE(begin, end);
  ASSERT_TRUE(b.Grow(1, 3).ok());  // entries 4, 5
  std::tie(begin, end) = b.TakeDirty();
  EXPECT_LE(begin, 4);
  EXPECT_GE(end, 6);
  b.Release(2);  // holds nothing: no change
  std::tie(begin, end) = b.TakeDirty();
  EXPECT_GE(begin, end);
  b.Release(1);
  std::tie(begin, end) = b.TakeDirty();
  EXPECT_LE(begin, 4);
  EXPECT_GE(end, 6);
}

TEST(KvCache, BudgetBuysPagesOfTheModelsBytesPerToken) {
  ModelConfig c;
  c.num_hidden_layers = 28;
  c.num_key_value_heads = 16;
  c.num_attention_heads = 16;
  c.hidden_size = 2048;
  // deepseek-moe-16b: 2 · 28 · 16 · 128 · 4 bytes = 448 KiB per token in fp32, half in bf16.
  EXPECT_EQ(KvBytesPerToken(c, 4), 458752);
  EXPECT_EQ(KvBytesPerToken(c, 2), 229376);
  BatchLimits l;
  l.num_slots = 32;
  l.max_context = 4096;
  l.kv_page_tokens = 16;
  EXPECT_EQ(*NumKvPages(c, l, 4), 32 * 256);  // no budget: every slot reaches max_context
  l.kv_cache_bytes = int64_t{8} << 30;
  EXPECT_EQ(*NumKvPages(c, l, 4), (int64_t{8} << 30) / (458752 * 16));
  l.kv_cache_bytes = 1000;
  EXPECT_EQ(NumKvPages(c, l, 4).status().code(), absl::StatusCode::kInvalidArgument);
}

// Two sequences decoded in turn through a pool too small for both to reach max_context, one
// slot released and reused midway so pages lie out of order: every logit equals a fresh
// runner's recomputation of the same tokens.
TEST(KvCache, ScatteredPagesGiveTheLogitsOfARecomputation) {
  testing::TempDir dir;
  testing::WriteTinyModel(dir.path(), DType::kF32);
  auto weights = *ModelWeights::Load(dir.path());
  const ModelConfig& c = weights->config();
  const int64_t V = c.vocab_size;
  ThreadPool pool(2);
  RunnerOptions o;
  o.num_slots = 2;
  o.max_context = 64;
  o.max_batch_tokens = 64;
  o.kv_page_tokens = 4;
  o.kv_cache_bytes = KvBytesPerToken(c, sizeof(float)) * 4 * 12;  // 12 pages of 4 positions
  auto paged = ModelRunner::Create(*weights, pool, o);
  ASSERT_TRUE(paged.ok()) << paged.status();
  EXPECT_EQ((*paged)->blocks().num_pages(), 12);
  RunnerOptions plain;
  plain.num_slots = 1;
  plain.max_context = 64;
  plain.max_batch_tokens = 64;
  auto fresh = ModelRunner::Create(*weights, pool, plain);
  ASSERT_TRUE(fresh.ok());

  std::vector<std::vector<int32_t>> seqs = {{3, 9, 27, 81, 243}, {7, 49}};
  auto recompute = [&](const std::vector<int32_t>& ids) {
    const int64_t T = static_cast<int64_t>(ids.size());
    std::vector<int32_t> slots(T, 0), pos(T);
    std::iota(pos.begin(), pos.end(), 0);
    const std::vector<int32_t> last = {static_cast<int32_t>(T - 1)};
    std::vector<float> logits(V);
    EXPECT_TRUE((*fresh)->Forward({ids, slots, pos, last}, logits.data()).ok());
    return logits;
  };
  auto step = [&](int32_t slot, std::vector<int32_t>& seq, int64_t first) {
    const int64_t n = static_cast<int64_t>(seq.size()) - first;
    std::vector<int32_t> slots(n, slot), pos(n);
    std::iota(pos.begin(), pos.end(), static_cast<int32_t>(first));
    const std::vector<int32_t> last = {static_cast<int32_t>(n - 1)};
    std::vector<float> logits(V);
    const absl::Status s =
        (*paged)->Forward({std::span(seq).subspan(first), slots, pos, last}, logits.data());
    EXPECT_TRUE(s.ok()) << s;
    const std::vector<float> want = recompute(seq);
    for (int64_t v = 0; v < V; ++v) ASSERT_NEAR(logits[v], want[v], 1e-5) << "vocab " << v;
    seq.push_back(
        static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin()));
  };
  step(0, seqs[0], 0);
  step(1, seqs[1], 0);
  for (int i = 0; i < 10; ++i) {
    step(0, seqs[0], static_cast<int64_t>(seqs[0].size()) - 1);
    step(1, seqs[1], static_cast<int64_t>(seqs[1].size()) - 1);
  }
  // Slot 1 starts over with a new sequence on the pages slot 0 did not take.
  (*paged)->ReleaseSlot(1);
  seqs[1] = {11, 12, 13};
  step(1, seqs[1], 0);
  for (int i = 0; i < 10; ++i) {
    step(0, seqs[0], static_cast<int64_t>(seqs[0].size()) - 1);
    step(1, seqs[1], static_cast<int64_t>(seqs[1].size()) - 1);
  }
  // 25 + 13 positions held: 7 + 4 of the 12 pages (two slots of 64 positions would need 32).
  EXPECT_EQ((*paged)->blocks().num_free_pages(), 1);
}

TEST(MemoryLimit, ParsesByteSizesAndCgroupFiles) {
  EXPECT_EQ(*ParseByteSize("123"), 123);
  EXPECT_EQ(*ParseByteSize("16Gi"), int64_t{16} << 30);
  EXPECT_EQ(*ParseByteSize("512Mi"), int64_t{512} << 20);
  EXPECT_EQ(*ParseByteSize("2G"), 2000000000);
  EXPECT_EQ(*ParseByteSize("1.5k"), 1500);
  EXPECT_EQ(*ParseByteSize(" 64Ki "), 65536);
  for (const char* bad : {"", "Gi", "12X", "-1", "1i", "1e30", "abc"}) {
    EXPECT_EQ(ParseByteSize(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_EQ(MemoryLimitFromCgroupV2("max\n"), 0);
  EXPECT_EQ(MemoryLimitFromCgroupV2("34359738368\n"), int64_t{32} << 30);
  EXPECT_EQ(MemoryLimitFromCgroupV1("9223372036854771712\n"), 0);  // v1 "unlimited"
  EXPECT_EQ(MemoryLimitFromCgroupV1("2147483648"), int64_t{2} << 30);
  EXPECT_EQ(FormatBytes(512), "512 B");
  EXPECT_EQ(FormatBytes(int64_t{3} << 29), "1.5 GiB");
}

// The released deepseek-moe-16b-base config.json.
constexpr char k16B[] = R"({
  "architectures": ["DeepseekForCausalLM"], "attention_bias": false, "bos_token_id": 100000,
  "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
  "intermediate_size": 10944, "max_position_embeddings": 4096, "model_type": "deepseek",
  "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_routed_experts": 64, "n_shared_experts": 2,
  "norm_topk_prob": false, "num_attention_heads": 16, "num_experts_per_tok": 6,
  "num_hidden_layers": 28, "num_key_value_heads": 16, "rms_norm_eps": 1e-06,
  "rope_scaling": null, "rope_theta": 10000, "scoring_func": "softmax",
  "tie_word_embeddings": false, "torch_dtype": "bfloat16", "vocab_size": 102400})";

TEST(MemoryPlan, CountsTheRolesWeightsTheBudgetAndTheArena) {
  auto c = ModelConfig::FromJson(k16B, "config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  // Attention side of 16B in bf16, counted by hand: embeddings and head 2·102400·2048, attention
  // 28·4·2048², layer 0's dense MLP 3·2048·10944, 27 shared MLPs 3·2048·2816, 27 gates 64·2048,
  // norms 57·2048.
  const int64_t attention_side = 2 * 102400 * 2048LL + 28 * 4 * 2048LL * 2048 + 3 * 2048LL * 10944 +
                                 27 * 3 * 2048LL * 2816 + 27 * 64 * 2048LL + 57 * 2048LL;
  EXPECT_EQ(RoleWeightBytes(*c, 2.0, false), 2 * attention_side);
  EXPECT_NEAR(RoleWeightBytes(*c, 2.0, true) / 2.0, CountParameters(*c).total, 1);

  BatchLimits l;
  l.num_slots = 33;
  l.max_batch_tokens = 256;
  l.kv_page_tokens = 16;
  l.kv_dtype = KvDType::kF32;
  // Today's reservation: every slot a full 4096-token context, 448 KiB a token in fp32.
  auto full = PlanMemory(*c, l, 2 * attention_side, false, 64);
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ(full->kv_bytes(), 33LL * 4096 * 458752);
  const absl::Status refused = CheckMemoryPlan(*full, int64_t{32} << 30, "the cgroup's limit");
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(refused.message(), "KV cache 57.8 GiB")) << refused.message();
  EXPECT_TRUE(absl::StrContains(refused.message(), "32.0 GiB (the cgroup's limit)"));
  // A budget: what it buys, in whole pages of 16 tokens.
  l.kv_cache_bytes = int64_t{8} << 30;
  auto budget = PlanMemory(*c, l, 2 * attention_side, false, 64);
  ASSERT_TRUE(budget.ok());
  EXPECT_EQ(budget->kv_pages, (int64_t{8} << 30) / (16 * 458752));
  EXPECT_EQ(budget->kv_tokens(), budget->kv_pages * 16);
  EXPECT_LE(budget->kv_bytes(), int64_t{8} << 30);
  // The arena, counted by hand: [256, 4H + 2·nh·hd + 2·nkv·hd + 2·10944 + E + 2k] floats,
  // 64 threads of 8·4096 + 80·128 scores, 33 logit rows of the vocabulary.
  const int64_t arena = 256 * (4 * 2048 + 2 * 2048 + 2 * 2048 + 2 * 10944 + 64 + 12) +
                        64 * (8 * 4096 + 80 * 128) + 33 * 102400;
  EXPECT_EQ(budget->activation_bytes, 4 * arena);
  EXPECT_TRUE(CheckMemoryPlan(*budget, int64_t{32} << 30, "x").ok());
  EXPECT_TRUE(CheckMemoryPlan(*full, 0, "none").ok());

  // BF16: 2 · 28 · 16 · 128 · 2 = 224 KiB a token, so the same budget holds twice the pages.
  l.kv_dtype = KvDType::kBF16;
  auto bf16 = PlanMemory(*c, l, 2 * attention_side, false, 64);
  ASSERT_TRUE(bf16.ok());
  EXPECT_EQ(bf16->kv_page_bytes, 16 * 229376);
  EXPECT_EQ(bf16->kv_pages, (int64_t{8} << 30) / (16 * 229376));
  EXPECT_EQ(bf16->kv_pages, 2 * budget->kv_pages);
  EXPECT_TRUE(absl::StrContains(bf16->Describe(), "224.0 KiB each, bf16")) << bf16->Describe();
  // The type must be concrete: what auto means depends on the weights, which a plan has not.
  l.kv_dtype = KvDType::kAuto;
  EXPECT_EQ(PlanMemory(*c, l, 2 * attention_side, false, 64).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// The value of `key:` (with its indentation) in the top-level `block:` of a values file, comments
// stripped; "" when absent.
std::string ChartValue(const std::string& yaml, const std::string& block, const std::string& key) {
  std::istringstream in(yaml);
  std::string line;
  bool inside = false;
  while (std::getline(in, line)) {
    if (!line.empty() && line[0] != ' ' && line[0] != '#') inside = line == block + ":";
    if (!inside) continue;
    absl::string_view l = line;
    if (absl::ConsumePrefix(&l, key + ":")) {
      l = l.substr(0, l.find('#'));
      return std::string(absl::StripAsciiWhitespace(l));
    }
  }
  return "";
}

// The chart's defaults for the flagship model: the attention server's plan (the 16B config,
// attention side in bf16, routed experts on expert servers) fits its pod's memory limit.
TEST(MemoryPlan, ChartDefaultsForTheSixteenBModelFitThePodLimit) {
  std::ifstream f(std::string(DSMOE_SOURCE_DIR) + "/deploy/helm/dsmoe/values.yaml");
  ASSERT_TRUE(f.good());
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string yaml = ss.str();
  ASSERT_TRUE(absl::StrContains(ChartValue(yaml, "model", "  path"), "deepseek-moe-16b"));
  BatchLimits l;
  ASSERT_TRUE(absl::SimpleAtoi(ChartValue(yaml, "attention", "  numSlots"), &l.num_slots));
  l.num_slots += 1;  // the scratch slot
  ASSERT_TRUE(
      absl::SimpleAtoi(ChartValue(yaml, "attention", "  maxBatchTokens"), &l.max_batch_tokens));
  ASSERT_TRUE(absl::SimpleAtoi(ChartValue(yaml, "attention", "  maxContext"), &l.max_context));
  ASSERT_TRUE(absl::SimpleAtoi(ChartValue(yaml, "attention", "  kvPageTokens"), &l.kv_page_tokens));
  const std::string kv = ChartValue(yaml, "attention", "  kvCacheMemory");
  if (!kv.empty() && kv != "\"\"") l.kv_cache_bytes = *ParseByteSize(kv);
  // The KV dtype as the server resolves it for the 16B checkpoint's bf16 weights.
  const absl::StatusOr<KvDType> kv_dtype = ParseKvDType(ChartValue(yaml, "attention", "  kvDtype"));
  ASSERT_TRUE(kv_dtype.ok()) << kv_dtype.status();
  l.kv_dtype = ResolveKvDType(*kv_dtype, DType::kBF16);
  // "    limits: {memory: 32Gi}" under attention.resources.
  const std::string limits = ChartValue(yaml, "attention", "    limits");
  const size_t at = limits.find("memory:");
  ASSERT_NE(at, std::string::npos) << limits;
  std::string mem = limits.substr(at + 7);
  mem = mem.substr(0, mem.find_first_of(",}"));
  const absl::StatusOr<int64_t> limit = ParseByteSize(mem);
  ASSERT_TRUE(limit.ok()) << limit.status();

  auto c = ModelConfig::FromJson(k16B, "config.json");
  ASSERT_TRUE(c.ok());
  // threads 0 means all the node's cores: plan for 128.
  auto plan = PlanMemory(*c, l, RoleWeightBytes(*c, 2.0, false), false, 128);
  ASSERT_TRUE(plan.ok()) << plan.status();
  std::printf("[chart 16B plan] %s; limit %s\n", plan->Describe().c_str(),
              FormatBytes(*limit).c_str());
  const absl::Status fits = CheckMemoryPlan(*plan, *limit, "attention.resources.limits.memory");
  EXPECT_TRUE(fits.ok()) << fits;
  // And the budget is a real one: at least 8x the sequences of 512 tokens a slot-sized
  // reservation of the same bytes would hold (32 slots x 4096: 8 per slot).
  EXPECT_GE(plan->kv_tokens() / 512, 64) << "the KV budget holds too few sequences";
}

}  // namespace
}  // namespace dsmoe
