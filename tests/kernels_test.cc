// Every vectorised kernel against the scalar reference on random shapes, and the reference
// itself against double-precision arithmetic written out here.
#include "core/ops/kernels.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/model/quantize.h"
#include "core/tensor/dtype.h"
#include "core/util/cpu_features.h"
#include "core/util/log.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

using testing::RandomFloats;

// Weights of shape [N, K] stored as `dtype`, plus their exact fp32 values.
struct TestMatrix {
  std::vector<uint8_t> bytes;
  std::vector<uint16_t> scales;
  std::vector<float> exact;
  MatrixView view;
};

TestMatrix MakeMatrix(DType dtype, int64_t N, int64_t K, uint64_t seed) {
  TestMatrix m;
  std::vector<float> v = RandomFloats(N * K, seed);
  if (dtype == DType::kQ8_0) {  // K must be a multiple of 32
    m.bytes.resize(N * K);
    m.scales.resize(N * K / kQ8Block);
    m.exact.resize(N * K);
    for (int64_t r = 0; r < N; ++r) {
      QuantizeRowQ8(v.data() + r * K, K, reinterpret_cast<int8_t*>(m.bytes.data()) + r * K,
                    m.scales.data() + r * (K / kQ8Block));
    }
    m.view = MatrixView{dtype, N, K, m.bytes.data(), m.scales.data()};
    for (int64_t r = 0; r < N; ++r)
      for (int64_t k = 0; k < K; ++k) m.exact[r * K + k] = m.view.At(r, k);
    return m;
  }
  m.bytes.resize(N * K * DTypeSize(dtype));
  m.exact.resize(N * K);
  for (int64_t i = 0; i < N * K; ++i) {
    if (dtype == DType::kF32) {
      std::memcpy(m.bytes.data() + 4 * i, &v[i], 4);
      m.exact[i] = v[i];
    } else {
      const uint16_t h = dtype == DType::kBF16 ? F32ToBf16(v[i]) : F32ToF16(v[i]);
      std::memcpy(m.bytes.data() + 2 * i, &h, 2);
      m.exact[i] = dtype == DType::kBF16 ? Bf16ToF32(h) : F16ToF32(h);
    }
  }
  m.view = MatrixView{dtype, N, K, m.bytes.data()};
  return m;
}

// How far a fast table's matmul may stray from exact arithmetic beyond fp32 summation, by
// formula, for output (t, n) of T tokens:
//   - Q8_0 decode (≤ 4 tokens), and batches from table.q8_activation_min_tokens on, round each
//     activation to 16 bits of its block's largest magnitude (error ≤ amax / 32767 / 2):
//     Σ_k |W[n, k]| · amax(block of k) / 65534; batches also round each block's int32 sum to
//     fp32 (relative error ≤ 2^-24 of Σ |W||x16·sx| ≤ Σ_k |W[n, k]| · (|x[k]| + amax / 65534)):
//     bounded by 2^-23 · Σ_k |W[n, k]| · (|x[k]| + amax);
//   - BF16 from table.bf16_activation_min_tokens on rounds each activation to BF16 (round to
//     nearest even: error ≤ 2^-8 |x|) and `vdpbf16ps` treats BF16 subnormals as zero (error
//     ≤ 2^-126 per activation) and flushes subnormal partial sums (≤ 2^-126 per step):
//     Σ_k |W[n, k]| · (2^-8 |x[k]| + 2^-126) + K · 2^-126.
// Zero otherwise: the other paths multiply fp32 activations by exactly widened weights.
float ActivationRoundingBound(const ops::KernelTable& table, DType dtype, const TestMatrix& W,
                              const float* x_row, int64_t n, int64_t T) {
  const int64_t K = W.view.cols;
  double bound = 0;
  const bool q8_batch = table.q8_activation_min_tokens > 0 && T >= table.q8_activation_min_tokens;
  if (dtype == DType::kQ8_0 && (T <= 4 || q8_batch)) {
    for (int64_t b = 0; b < K / kQ8Block; ++b) {
      float amax = 0;
      for (int64_t k = b * kQ8Block; k < (b + 1) * kQ8Block; ++k)
        amax = std::max(amax, std::fabs(x_row[k]));
      for (int64_t k = b * kQ8Block; k < (b + 1) * kQ8Block; ++k) {
        const double w = std::fabs(W.exact[n * K + k]);
        bound += w * amax / 65534.0;
        if (q8_batch) bound += std::ldexp(w * (std::fabs(x_row[k]) + amax), -23);
      }
    }
  }
  if (dtype == DType::kBF16 && table.bf16_activation_min_tokens > 0 &&
      T >= table.bf16_activation_min_tokens) {
    const double tiny = std::ldexp(1.0, -126);
    for (int64_t k = 0; k < K; ++k)
      bound += std::fabs(W.exact[n * K + k]) * (std::ldexp(std::fabs(x_row[k]), -8) + tiny) + tiny;
  }
  return static_cast<float>(bound);
}

// The fast kernel's y for rows [r0, r1) of W against the reference's, every other element
// left untouched by both; `tolerance` beyond the activation rounding above.
void ExpectMatMulMatchesReference(const ops::KernelTable& fast, DType dtype, const TestMatrix& W,
                                  int64_t T, int64_t r0, int64_t r1, uint64_t seed,
                                  float tolerance) {
  const int64_t N = W.view.rows, K = W.view.cols;
  std::vector<float> x = RandomFloats(T * K, seed);
  std::vector<float> want(T * N, -7.0f), got(T * N, -7.0f);
  ops::ReferenceKernels().matmul_rows(x.data(), T, W.view, r0, r1, want.data(), N);
  fast.matmul_rows(x.data(), T, W.view, r0, r1, got.data(), N);
  for (int64_t i = 0; i < T * N; ++i) {
    const float rounding = ActivationRoundingBound(fast, dtype, W, x.data() + i / N * K, i % N, T);
    ASSERT_NEAR(got[i], want[i], tolerance + rounding)
        << fast.name << " T=" << T << " N=" << N << " K=" << K << " rows [" << r0 << "," << r1
        << ") i=" << i;
  }
}

// The vectorised tables this binary has, by name, and what the CPU lacks for each.
const std::vector<std::string>& FastTableNames() {
  static const std::vector<std::string> names = {"avx2", "avx512", "avx512bf16"};
  return names;
}
std::string MissingFeatures(const std::string& table) {
  const CpuFeatures& f = GetCpuFeatures();
  std::vector<std::pair<bool, const char*>> needs = {
      {f.avx2, "AVX2"}, {f.fma, "FMA"}, {f.f16c, "F16C"}};
  if (table != "avx2") {
    needs.insert(needs.end(), {{f.avx512f, "AVX512F"},
                               {f.avx512bw, "AVX512BW"},
                               {f.avx512vl, "AVX512VL"},
                               {f.avx512vnni, "AVX512_VNNI"},
                               {f.avx512bf16, "AVX512_BF16"}});
  }
  std::string missing;
  for (const auto& [present, name] : needs) {
    if (!present) missing += std::string(missing.empty() ? "" : ", ") + name;
  }
  return missing;
}
// The fast tables this CPU can run (none on a CPU without AVX2).
std::vector<const ops::KernelTable*> FastTables() {
  std::vector<const ops::KernelTable*> tables;
  for (const std::string& name : FastTableNames()) {
    if (const ops::KernelTable* t = ops::KernelsNamed(name)) tables.push_back(t);
  }
  return tables;
}
// The reference and every fast table this CPU can run.
std::vector<const ops::KernelTable*> AllTables() {
  std::vector<const ops::KernelTable*> tables = FastTables();
  tables.insert(tables.begin(), &ops::ReferenceKernels());
  return tables;
}

TEST(Kernels, TablesAreNamedAndChosenByCpu) {
  EXPECT_EQ(ops::KernelsNamed("reference"), &ops::ReferenceKernels());
  EXPECT_EQ(ops::KernelsNamed("sse9"), nullptr);
  for (const std::string& name : FastTableNames()) {
    const ops::KernelTable* t = ops::KernelsNamed(name);
    EXPECT_EQ(t != nullptr, MissingFeatures(name).empty()) << name;
    if (t != nullptr) {
      EXPECT_EQ(t->name, name);
    }
  }
  EXPECT_EQ(ops::KernelsNamed("avx512") != nullptr, GetCpuFeatures().HasAvx512Kernels());
  // Without DSMOE_KERNELS the widest table the CPU runs is chosen.
  if (std::getenv("DSMOE_KERNELS") == nullptr) {
    const ops::KernelTable* widest =
        ops::KernelsNamed(GetCpuFeatures().amd ? "avx512bf16" : "avx512");
    if (widest == nullptr) widest = ops::KernelsNamed("avx2");
    if (widest == nullptr) widest = &ops::ReferenceKernels();
    EXPECT_EQ(&ops::Kernels(), widest) << ops::Kernels().name;
  }
}

TEST(Kernels, ForcedTableIsUsedOrRefusedWithAWarning) {
  const ops::KernelTable& best = ops::ChooseKernels(nullptr, *DefaultLogger());
  CapturingLogger log;
  EXPECT_EQ(&ops::ChooseKernels("", log), &best);
  EXPECT_EQ(&ops::ChooseKernels("reference", log), &ops::ReferenceKernels());
  EXPECT_TRUE(log.lines().empty());
  EXPECT_EQ(&ops::ChooseKernels("sse9", log), &best);
  EXPECT_TRUE(log.Contains("DSMOE_KERNELS=sse9: not one of"))
      << ::testing::PrintToString(log.lines());
  for (const std::string& name : FastTableNames()) {
    CapturingLogger forced;
    const ops::KernelTable& got = ops::ChooseKernels(name.c_str(), forced);
    if (ops::KernelsNamed(name) != nullptr) {
      EXPECT_EQ(got.name, name);
      EXPECT_TRUE(forced.lines().empty());
    } else {  // this CPU cannot run it: the best table, and a warning saying why
      EXPECT_EQ(&got, &best);
      EXPECT_TRUE(forced.Contains("this CPU cannot run that table")) << name;
    }
  }
}

class MatMulTest : public ::testing::TestWithParam<DType> {};

TEST_P(MatMulTest, ReferenceMatchesDoublePrecision) {
  const DType dtype = GetParam();
  const int64_t T = 3, N = 5, K = dtype == DType::kQ8_0 ? 64 : 37;
  TestMatrix W = MakeMatrix(dtype, N, K, 1);
  std::vector<float> x = RandomFloats(T * K, 2), y(T * N);
  ops::ReferenceKernels().matmul_rows(x.data(), T, W.view, 0, N, y.data(), N);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t n = 0; n < N; ++n) {
      double want = 0;
      for (int64_t k = 0; k < K; ++k)
        want += static_cast<double>(x[t * K + k]) * W.exact[n * K + k];
      EXPECT_NEAR(y[t * N + n], want, 1e-5) << "t=" << t << " n=" << n;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllDTypes, MatMulTest,
                         ::testing::Values(DType::kF32, DType::kBF16, DType::kF16, DType::kQ8_0),
                         [](const auto& param_info) {
                           return std::string(DTypeName(param_info.param));
                         });

// Each fast table (by name) × each weight dtype, against the reference; skipped, naming what
// the CPU lacks, where the table cannot run.
class FastMatMulTest : public ::testing::TestWithParam<std::tuple<std::string, DType>> {
 protected:
  void SetUp() override {
    table_ = ops::KernelsNamed(std::get<0>(GetParam()));
    if (table_ == nullptr) {
      GTEST_SKIP() << "CPU lacks " << MissingFeatures(std::get<0>(GetParam())) << " for the "
                   << std::get<0>(GetParam()) << " kernels";
    }
  }
  const ops::KernelTable* table_ = nullptr;
};

TEST_P(FastMatMulTest, MatchesReferenceOnRandomShapes) {
  const DType dtype = std::get<1>(GetParam());
  std::mt19937 rng(42);
  for (int trial = 0; trial < 60; ++trial) {
    const int64_t T = 1 + rng() % (trial % 3 == 0 ? 150 : 9),
                  N = 1 + rng() % 70;  // T >= 48: the panel GEMM
    const int64_t K = dtype == DType::kQ8_0 ? kQ8Block * (1 + rng() % 12) : 1 + rng() % 300;
    const int64_t r0 = rng() % N, r1 = r0 + 1 + rng() % (N - r0);
    TestMatrix W = MakeMatrix(dtype, N, K, trial);
    ExpectMatMulMatchesReference(*table_, dtype, W, T, r0, r1, 100 + trial,
                                 1e-5f * (1.0f + std::sqrt(static_cast<float>(K))));
    if (HasFatalFailure()) return;
  }
}

// Every token count from 1 to 100 crosses each path of the fast kernels: the row streams (≤ 4
// tokens), the broadcast tiles over token panels with every number of vectors (AVX2: panels of
// 24, AVX-512: of 48), AVX2's weight-panel GEMM and avx512bf16's BF16 pairs (≥ 48 tokens) and
// their leftover rows; row ranges end inside a group of 4 rows and K is odd (except for Q8_0,
// whose blocks are 32 wide).
TEST_P(FastMatMulTest, MatchesReferenceForEveryTokenCount) {
  const DType dtype = std::get<1>(GetParam());
  const int64_t N = 37, K = dtype == DType::kQ8_0 ? 96 : 53, r0 = 2, r1 = 35;
  TestMatrix W = MakeMatrix(dtype, N, K, 9);
  for (int64_t T = 1; T <= 100; ++T) {
    ExpectMatMulMatchesReference(*table_, dtype, W, T, r0, r1, 500 + T, 1e-4f);
    if (HasFatalFailure()) return;
  }
}

// Rows long enough that the packed tokens of one panel fill the kernels' L2 budget, so a
// prompt is swept in several token blocks, each of which buffers the weight rows again.
TEST_P(FastMatMulTest, MatchesReferenceOnLongRows) {
  const DType dtype = std::get<1>(GetParam());
  const int64_t N = 21, K = dtype == DType::kQ8_0 ? 96 * kQ8Block : 3001;
  TestMatrix W = MakeMatrix(dtype, N, K, 11);
  for (int64_t T : {1, 3, 7, 50, 100, 150}) {
    ExpectMatMulMatchesReference(*table_, dtype, W, T, 1, N, 900 + T,
                                 1e-5f * (1.0f + std::sqrt(static_cast<float>(K))));
    if (HasFatalFailure()) return;
  }
}

INSTANTIATE_TEST_SUITE_P(AllTablesAndDTypes, FastMatMulTest,
                         ::testing::Combine(::testing::ValuesIn(FastTableNames()),
                                            ::testing::Values(DType::kF32, DType::kBF16,
                                                              DType::kF16, DType::kQ8_0)),
                         [](const auto& param_info) {
                           return std::get<0>(param_info.param) + "_" +
                                  std::string(DTypeName(std::get<1>(param_info.param)));
                         });

TEST(Kernels, VectorOpsMatchReference) {
  if (FastTables().empty()) GTEST_SKIP() << "CPU lacks " << MissingFeatures("avx2");
  for (const ops::KernelTable* fast : FastTables()) {
    for (int64_t n : {1, 7, 8, 15, 16, 17, 31, 32, 33, 100, 1031}) {
      SCOPED_TRACE(fast->name);
      std::vector<float> a = RandomFloats(n, n), b = RandomFloats(n, n + 1, 12.0f);
      EXPECT_NEAR(fast->dot(a.data(), b.data(), n),
                  ops::ReferenceKernels().dot(a.data(), b.data(), n), 1e-4 * n);
      std::vector<float> y1 = a, y2 = a;
      fast->axpy(0.37f, b.data(), y1.data(), n);
      ops::ReferenceKernels().axpy(0.37f, b.data(), y2.data(), n);
      for (int64_t i = 0; i < n; ++i) ASSERT_NEAR(y1[i], y2[i], 1e-5);
      // SiLU over a wide range of gate values, against the formula in double.
      std::vector<float> out(n);
      fast->silu_mul(b.data(), a.data(), out.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        const double g = b[i];
        const double want = g / (1.0 + std::exp(-g)) * a[i];
        ASSERT_NEAR(out[i], want, 2e-6 * (std::fabs(want) + 1e-3)) << "gate " << g;
      }
    }
  }
}

// The attention of one query over cached rows, in double precision, written out here.
std::vector<double> AttendInDouble(const std::vector<float>& q, const std::vector<float>& keys,
                                   const std::vector<float>& values, int64_t stride, int64_t len,
                                   int64_t hd, double scale) {
  std::vector<double> s(len), out(hd, 0.0);
  double max = -INFINITY, sum = 0.0;
  for (int64_t p = 0; p < len; ++p) {
    for (int64_t d = 0; d < hd; ++d) s[p] += static_cast<double>(q[d]) * keys[p * stride + d];
    s[p] *= scale;
    max = std::max(max, s[p]);
  }
  for (int64_t p = 0; p < len; ++p) sum += s[p] = std::exp(s[p] - max);
  for (int64_t p = 0; p < len; ++p)
    for (int64_t d = 0; d < hd; ++d) out[d] += s[p] / sum * values[p * stride + d];
  return out;
}

TEST(Kernels, AttendMatchesDoublePrecision) {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 40; ++trial) {
    // Head sizes with and without a multiple of 8, one to several hundred positions, rows wider
    // than a head (other kv heads interleaved, as in the cache).
    const int64_t hd = std::vector<int64_t>{8, 16, 24, 64, 72, 128, 7, 13}[trial % 8];
    const int64_t len = 1 + rng() % (trial % 2 ? 600 : 9), stride = hd * (1 + trial % 3);
    std::vector<float> q = RandomFloats(hd, trial, 3.0f),
                       keys = RandomFloats(len * stride, 100 + trial),
                       values = RandomFloats(len * stride, 200 + trial);
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const std::vector<double> want = AttendInDouble(q, keys, values, stride, len, hd, scale);
    for (const ops::KernelTable* k : AllTables()) {
      std::vector<float> scores(len), out(hd, -7.0f);
      k->attend(q.data(), ops::KvPages{keys.data(), values.data(), stride}, len, hd, scale,
                scores.data(), out.data());
      for (int64_t d = 0; d < hd; ++d) {
        ASSERT_NEAR(out[d], want[d], 2e-5)
            << k->name << " hd=" << hd << " len=" << len << " stride=" << stride << " d=" << d;
      }
    }
  }
}

TEST(Kernels, AttendCausalMatchesDoublePrecision) {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 40; ++trial) {
    // 1 to 20 queries (blocks of 8 and a remainder), starting anywhere in the cache.
    const int64_t hd = std::vector<int64_t>{8, 16, 64, 128, 24, 12}[trial % 6];
    const int64_t Q = 1 + rng() % 20, first = rng() % (trial % 2 ? 300 : 5);
    const int64_t stride = hd * (1 + trial % 3), len = first + Q;
    const int64_t q_stride = hd * 3, out_stride = hd * 2;  // queries of other heads between
    std::vector<float> q = RandomFloats(Q * q_stride, trial, 3.0f),
                       keys = RandomFloats(len * stride, 300 + trial),
                       values = RandomFloats(len * stride, 400 + trial);
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    for (const ops::KernelTable* k : AllTables()) {
      std::vector<float> scratch(8 * len + 80 * hd), out(Q * out_stride, -7.0f);
      k->attend_causal(q.data(), q_stride, Q, first,
                       ops::KvPages{keys.data(), values.data(), stride}, hd, scale, scratch.data(),
                       out.data(), out_stride);
      for (int64_t i = 0; i < Q; ++i) {
        const std::vector<float> qi(q.begin() + i * q_stride, q.begin() + i * q_stride + hd);
        const std::vector<double> want =
            AttendInDouble(qi, keys, values, stride, first + i + 1, hd, scale);
        for (int64_t d = 0; d < out_stride; ++d) {
          if (d >= hd) {  // between the outputs: untouched
            ASSERT_EQ(out[i * out_stride + d], -7.0f) << k->name;
            continue;
          }
          ASSERT_NEAR(out[i * out_stride + d], want[d], 2e-5)
              << k->name << " hd=" << hd << " Q=" << Q << " first=" << first << " i=" << i
              << " d=" << d;
        }
      }
    }
  }
}

// A contiguous cache [len][stride] scattered into pages of 2^shift rows, in shuffled page
// order with unused pages between: what a block table points into.
struct ScatteredPages {
  std::vector<float> keys, values;
  std::vector<int32_t> table;
  ops::KvPages view;
};
ScatteredPages Scatter(const std::vector<float>& keys, const std::vector<float>& values,
                       int64_t stride, int64_t len, int shift, uint32_t seed) {
  const int64_t page = int64_t{1} << shift, num_used = (len + page - 1) / page;
  const int64_t num_pages = 2 * num_used + 1, page_stride = page * stride;
  std::vector<int32_t> order(num_pages);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937(seed));
  ScatteredPages s;
  s.keys.assign(num_pages * page_stride, std::nanf(""));  // unused rows would poison the sum
  s.values.assign(num_pages * page_stride, std::nanf(""));
  s.table.assign(order.begin(), order.begin() + num_used);
  for (int64_t p = 0; p < len; ++p) {
    const int64_t at = s.table[p / page] * page_stride + (p % page) * stride;
    std::copy_n(keys.begin() + p * stride, stride, s.keys.begin() + at);
    std::copy_n(values.begin() + p * stride, stride, s.values.begin() + at);
  }
  s.view = ops::KvPages{s.keys.data(), s.values.data(), stride, s.table.data(), shift, page_stride};
  return s;
}

TEST(Kernels, PagedAttendMatchesDoublePrecision) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t hd = std::vector<int64_t>{8, 16, 64, 128, 24, 13}[trial % 6];
    const int64_t len = 1 + rng() % (trial % 2 ? 300 : 20), stride = hd * (1 + trial % 2);
    const int shift = std::vector<int>{0, 2, 3, 4}[trial % 4];
    std::vector<float> q = RandomFloats(hd, trial, 3.0f),
                       keys = RandomFloats(len * stride, 500 + trial),
                       values = RandomFloats(len * stride, 600 + trial);
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const std::vector<double> want = AttendInDouble(q, keys, values, stride, len, hd, scale);
    const ScatteredPages paged = Scatter(keys, values, stride, len, shift, trial);
    for (const ops::KernelTable* k : AllTables()) {
      std::vector<float> scores(len), out(hd, -7.0f);
      k->attend(q.data(), paged.view, len, hd, scale, scores.data(), out.data());
      for (int64_t d = 0; d < hd; ++d) {
        ASSERT_NEAR(out[d], want[d], 2e-5)
            << k->name << " hd=" << hd << " len=" << len << " page=" << (1 << shift);
      }
    }
  }
}

TEST(Kernels, PagedAttendCausalMatchesDoublePrecision) {
  std::mt19937 rng(9);
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t hd = std::vector<int64_t>{8, 16, 64, 128, 24, 12}[trial % 6];
    const int64_t Q = 1 + rng() % 20, first = rng() % (trial % 2 ? 200 : 5);
    const int64_t stride = hd * (1 + trial % 2), len = first + Q, q_stride = hd * 2;
    const int shift = std::vector<int>{0, 2, 3, 4, 5}[trial % 5];
    std::vector<float> q = RandomFloats(Q * q_stride, trial, 3.0f),
                       keys = RandomFloats(len * stride, 700 + trial),
                       values = RandomFloats(len * stride, 800 + trial);
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const ScatteredPages paged = Scatter(keys, values, stride, len, shift, trial);
    for (const ops::KernelTable* k : AllTables()) {
      std::vector<float> scratch(8 * len + 80 * hd), out(Q * hd, -7.0f);
      k->attend_causal(q.data(), q_stride, Q, first, paged.view, hd, scale, scratch.data(),
                       out.data(), hd);
      for (int64_t i = 0; i < Q; ++i) {
        const std::vector<float> qi(q.begin() + i * q_stride, q.begin() + i * q_stride + hd);
        const std::vector<double> want =
            AttendInDouble(qi, keys, values, stride, first + i + 1, hd, scale);
        for (int64_t d = 0; d < hd; ++d) {
          ASSERT_NEAR(out[i * hd + d], want[d], 2e-5)
              << k->name << " hd=" << hd << " Q=" << Q << " first=" << first
              << " page=" << (1 << shift) << " i=" << i;
        }
      }
    }
  }
}

// BF16 pages: the kernels read the 16-bit elements as they are and compute in fp32, so their
// output must match double-precision attention over the BF16-rounded keys and values as
// closely as F32 pages match over exact ones. Rounding is done here (round to nearest even,
// what KvCache::Write does), and the reference is given the rounded values widened exactly.
struct Bf16Cache {
  std::vector<uint16_t> keys, values;       // as stored
  std::vector<float> keys_f32, values_f32;  // the same values, exactly, for AttendInDouble
  std::vector<int32_t> table;               // empty: contiguous
  ops::KvPages view;
};

// [len][stride] random rows, rounded to bf16; with shift >= 0 scattered into shuffled pages of
// 2^shift rows with unused (NaN) pages between, as ScatteredPages does for fp32.
Bf16Cache MakeBf16Cache(int64_t len, int64_t stride, int shift, uint64_t seed) {
  Bf16Cache c;
  const std::vector<float> k = RandomFloats(len * stride, seed),
                           v = RandomFloats(len * stride, seed + 1);
  c.keys_f32.resize(len * stride);
  c.values_f32.resize(len * stride);
  std::vector<uint16_t> k16(len * stride), v16(len * stride);
  for (int64_t i = 0; i < len * stride; ++i) {
    k16[i] = F32ToBf16(k[i]);
    v16[i] = F32ToBf16(v[i]);
    c.keys_f32[i] = Bf16ToF32(k16[i]);
    c.values_f32[i] = Bf16ToF32(v16[i]);
  }
  if (shift < 0) {
    c.keys = std::move(k16);
    c.values = std::move(v16);
    c.view = ops::KvPages{c.keys.data(), c.values.data(), stride};
    c.view.dtype = DType::kBF16;
    return c;
  }
  const int64_t page = int64_t{1} << shift, num_used = (len + page - 1) / page;
  const int64_t num_pages = 2 * num_used + 1, page_stride = page * stride;
  std::vector<int32_t> order(num_pages);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937(static_cast<uint32_t>(seed)));
  c.keys.assign(num_pages * page_stride, 0x7fc0);  // bf16 NaN: unused rows would poison the sum
  c.values.assign(num_pages * page_stride, 0x7fc0);
  c.table.assign(order.begin(), order.begin() + num_used);
  for (int64_t p = 0; p < len; ++p) {
    const int64_t at = c.table[p / page] * page_stride + (p % page) * stride;
    std::copy_n(k16.begin() + p * stride, stride, c.keys.begin() + at);
    std::copy_n(v16.begin() + p * stride, stride, c.values.begin() + at);
  }
  c.view = ops::KvPages{c.keys.data(), c.values.data(), stride,      c.table.data(),
                        shift,         page_stride,     DType::kBF16};
  return c;
}

// Every length class of the decode kernel: four-row score groups and their remainder (1-3),
// runs cut by pages of 1 to 16 rows, value sums of 1 to 8 vectors of 8 dimensions (hd up to
// 64 per pass, 72 and 128 taking two) and a scalar tail (hd not a multiple of 8).
TEST(Kernels, Bf16AttendMatchesDoublePrecisionOverRoundedValues) {
  const std::vector<int64_t> lens = {1,  2,  3,  4,  5,  7,  8,   9,   15,
                                     16, 17, 31, 33, 64, 65, 130, 300, 601};
  const std::vector<int64_t> hds = {8, 12, 16, 24, 40, 64, 72, 128, 7, 13};
  int trial = 0;
  for (int shift : {-1, 0, 2, 4}) {
    for (int64_t len : lens) {
      for (int64_t hd : hds) {
        ++trial;
        const int64_t stride = hd * (1 + trial % 2);
        const Bf16Cache c = MakeBf16Cache(len, stride, shift, 1000 + trial);
        const std::vector<float> q = RandomFloats(hd, trial, 3.0f);
        const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
        const std::vector<double> want =
            AttendInDouble(q, c.keys_f32, c.values_f32, stride, len, hd, scale);
        for (const ops::KernelTable* k : AllTables()) {
          std::vector<float> scores(len), out(hd, -7.0f);
          k->attend(q.data(), c.view, len, hd, scale, scores.data(), out.data());
          for (int64_t d = 0; d < hd; ++d) {
            ASSERT_NEAR(out[d], want[d], 2e-5) << k->name << " hd=" << hd << " len=" << len
                                               << " page shift=" << shift << " d=" << d;
          }
        }
      }
    }
  }
}

// Every length class of the prefill kernel: blocks of 8 queries and a remainder (a single
// query and hd % 8 != 0 take the decode kernel), eight-key score passes and their remainder,
// value chunks of 64 positions and a partial one, pages of 1 to 32 rows or none.
TEST(Kernels, Bf16AttendCausalMatchesDoublePrecisionOverRoundedValues) {
  const std::vector<std::pair<int64_t, int64_t>> shapes = {
      // (first, Q)
      {0, 1},  {0, 2},  {0, 7},   {0, 8},  {0, 9},  {3, 8},    {5, 16},   {0, 20},
      {57, 7}, {56, 8}, {60, 13}, {63, 2}, {64, 8}, {120, 17}, {250, 11}, {300, 20}};
  const std::vector<int64_t> hds = {8, 16, 24, 64, 128, 12};
  int trial = 0;
  for (int shift : {-1, 0, 3, 5}) {
    for (const auto& [first, Q] : shapes) {
      for (int64_t hd : hds) {
        ++trial;
        const int64_t stride = hd * (1 + trial % 2), len = first + Q;
        const int64_t q_stride = hd * 3, out_stride = hd * 2;  // other heads between
        const Bf16Cache c = MakeBf16Cache(len, stride, shift, 5000 + trial);
        const std::vector<float> q = RandomFloats(Q * q_stride, trial, 3.0f);
        const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
        for (const ops::KernelTable* k : AllTables()) {
          std::vector<float> scratch(8 * len + 80 * hd), out(Q * out_stride, -7.0f);
          k->attend_causal(q.data(), q_stride, Q, first, c.view, hd, scale, scratch.data(),
                           out.data(), out_stride);
          for (int64_t i = 0; i < Q; ++i) {
            const std::vector<float> qi(q.begin() + i * q_stride, q.begin() + i * q_stride + hd);
            const std::vector<double> want =
                AttendInDouble(qi, c.keys_f32, c.values_f32, stride, first + i + 1, hd, scale);
            for (int64_t d = 0; d < out_stride; ++d) {
              if (d >= hd) {  // between the outputs: untouched
                ASSERT_EQ(out[i * out_stride + d], -7.0f) << k->name;
                continue;
              }
              ASSERT_NEAR(out[i * out_stride + d], want[d], 2e-5)
                  << k->name << " hd=" << hd << " Q=" << Q << " first=" << first
                  << " page shift=" << shift << " i=" << i << " d=" << d;
            }
          }
        }
      }
    }
  }
}

// The rounding matters: attention over BF16 pages is not attention over the fp32 values they
// came from, by about bf16's relative step (2^-8) — the comparison above is not vacuous.
TEST(Kernels, Bf16AttendDiffersFromUnroundedAttention) {
  const int64_t hd = 64, len = 4;  // few positions: the rounding errors do not average out
  const Bf16Cache c = MakeBf16Cache(len, hd, -1, 77);
  const std::vector<float> k = RandomFloats(len * hd, 77), v = RandomFloats(len * hd, 78);
  const std::vector<float> q = RandomFloats(hd, 1, 3.0f);
  const std::vector<double> exact = AttendInDouble(q, k, v, hd, len, hd, 0.125);
  std::vector<float> scores(len), out(hd);
  ops::Kernels().attend(q.data(), c.view, len, hd, 0.125f, scores.data(), out.data());
  double max_diff = 0, max_abs = 0;
  for (int64_t d = 0; d < hd; ++d) {
    max_diff = std::max(max_diff, std::fabs(out[d] - exact[d]));
    max_abs = std::max(max_abs, std::fabs(exact[d]));
  }
  EXPECT_GT(max_diff, 1e-4);            // well above the 2e-5 the tests above allow
  EXPECT_LT(max_diff, 0.02 * max_abs);  // and of bf16's order, not garbage
}

TEST(Kernels, SiluHandlesExtremes) {
  for (const ops::KernelTable* table : AllTables()) {
    const ops::KernelTable& k = *table;
    const std::vector<float> gate = {-1000.f, -90.f, -20.f, 0.f, 20.f, 90.f, 1000.f, -0.5f};
    const std::vector<float> up(gate.size(), 2.0f);
    std::vector<float> out(gate.size());
    k.silu_mul(gate.data(), up.data(), out.data(), static_cast<int64_t>(gate.size()));
    for (size_t i = 0; i < gate.size(); ++i) {
      const double want = 2.0 * gate[i] / (1.0 + std::exp(-static_cast<double>(gate[i])));
      EXPECT_TRUE(std::isfinite(out[i])) << gate[i];
      EXPECT_NEAR(out[i], want, 1e-5 * (std::fabs(want) + 1)) << k.name << " " << gate[i];
    }
  }
}

TEST(Kernels, RowToF32ConvertsEveryDType) {
  for (const ops::KernelTable* k : AllTables()) {
    for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
      for (int64_t n : {1, 16, 29, 47}) {
        TestMatrix m = MakeMatrix(dtype, 1, n, 5);
        std::vector<float> out(n + 1, -7.0f);
        k->row_to_f32(m.view.data, dtype, n, out.data());
        for (int64_t i = 0; i < n; ++i)
          EXPECT_EQ(out[i], m.exact[i]) << k->name << " " << DTypeName(dtype) << " " << i;
        EXPECT_EQ(out[n], -7.0f) << k->name << ": wrote past the row";
      }
    }
  }
}

TEST(Q8, QuantizationErrorIsWithinHalfAStep) {
  std::vector<float> x = RandomFloats(256, 3, 5.0f);
  x[7] = 0.0f;
  std::vector<float> zeros(32, 0.0f);
  std::vector<int8_t> q(256);
  std::vector<uint16_t> d(8);
  QuantizeRowQ8(x.data(), 256, q.data(), d.data());
  for (int64_t i = 0; i < 256; ++i) {
    const float step = F16ToF32(d[i / 32]);
    EXPECT_LE(std::fabs(x[i] - q[i] * step), 0.5f * step + 1e-6f) << i;
    EXPECT_LE(std::abs(q[i]), 127);
  }
  QuantizeRowQ8(zeros.data(), 32, q.data(), d.data());  // an all-zero block stays zero
  EXPECT_EQ(F16ToF32(d[0]), 0.0f);
  EXPECT_EQ(q[0], 0);
}

TEST(DType, HalfPrecisionKnownValues) {
  EXPECT_EQ(F16ToF32(0x3c00), 1.0f);
  EXPECT_EQ(F16ToF32(0xc000), -2.0f);
  EXPECT_EQ(F16ToF32(0x7bff), 65504.0f);
  EXPECT_EQ(F16ToF32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(F16ToF32(0x0400), std::ldexp(1.0f, -14));  // smallest normal
  EXPECT_TRUE(std::isinf(F16ToF32(0x7c00)));
  EXPECT_TRUE(std::isnan(F16ToF32(0x7e00)));
  EXPECT_EQ(Bf16ToF32(0x3f80), 1.0f);
  EXPECT_EQ(Bf16ToF32(0xc040), -3.0f);
}

TEST(DType, HalfRoundTripsEveryValue) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = F16ToF32(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(F32ToF16(f), h) << std::hex << h;
  }
}

TEST(DType, RoundingToNearestEven) {
  // 1 + 2^-8 lies exactly between two bf16 values: ties go to the even mantissa (1.0).
  EXPECT_EQ(F32ToBf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  // 1 + 3·2^-8 lies between 1+2^-7 (odd) and 1+2^-6 (even): rounds up to even.
  EXPECT_EQ(F32ToBf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  // f16: 1 + 2^-11 is a tie between 1.0 and 1 + 2^-10 → 1.0.
  EXPECT_EQ(F32ToF16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
  EXPECT_EQ(F32ToF16(70000.0f), 0x7c00);  // overflow → inf
}

}  // namespace
}  // namespace dsmoe
