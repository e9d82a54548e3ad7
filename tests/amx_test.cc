// The AMX GEMM against references written here: exact (double) products of the BF16-rounded
// activations, and the scalar reference kernel, on every token count 1-100 and 512, K on and
// off the 32-wide tile blocks, row ranges that start and end inside 16-row panels.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/ops/cpu/amx_gemm.h"
#include "core/ops/kernels.h"
#include "core/tensor/dtype.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

using testing::RandomFloats;

// Unit roundoff of fp32 (round to nearest): each fp32 addition errs by at most u·|result|.
constexpr double kU = 1.0 / (1 << 24);
// Relative rounding error of BF16 (8 significant bits, round to nearest even): ≤ 2^-8 (the
// measured worst case in these tests is 0.82 of the bound below, a single product at K = 1).
constexpr double kBf16Rel = 1.0 / 256;

struct Bf16Matrix {
  std::vector<uint16_t> bits;
  std::vector<float> exact;  // the BF16 values as fp32
  MatrixView view;
};

Bf16Matrix MakeBf16(int64_t N, int64_t K, uint64_t seed) {
  Bf16Matrix m;
  const std::vector<float> v = RandomFloats(N * K, seed);
  m.bits.resize(N * K);
  m.exact.resize(N * K);
  for (int64_t i = 0; i < N * K; ++i) {
    m.bits[i] = F32ToBf16(v[i]);
    m.exact[i] = Bf16ToF32(m.bits[i]);
  }
  m.view = MatrixView{DType::kBF16, N, K, m.bits.data()};
  return m;
}

// Runs AmxMatMulRows on rows [r0, r1) of W with y rows ldy apart, and checks every element:
//   - inside the range, against Σ_k bf16(x_k)·W[n,k] in double. TDPBF16PS multiplies exactly
//     and adds each product into an fp32 accumulator, so its error is the error of a running
//     fp32 sum: each addition errs by at most u·|s_i| (s_i the partial sum after i terms).
//     Those errors are independent and of mean zero, of variance ≤ (u·s_i)²/3, so the total
//     has a standard deviation ≤ u·sqrt(Σ s_i² / 3): the tolerance is 8 such deviations (the
//     partial sums taken in the order of k, as the tiles add them), which no element of
//     these tests should exceed by chance — and a wrong tail, a wrong pair order or a
//     missing block is off by whole products, orders of magnitude more;
//   - inside the range, against ReferenceKernels().matmul_rows (fp32 x): they differ by the
//     BF16 rounding of x, at most Σ_k |x_k·W[n,k]|·2^-8, plus both fp32 sums' rounding
//     (each ≤ K·u·Σ_k |x_k·W[n,k]|);
//   - outside it (other rows, and the ldy padding), untouched.
void CheckAmx(const Bf16Matrix& W, int64_t T, int64_t r0, int64_t r1, int64_t ldy, uint64_t seed) {
  const int64_t K = W.view.cols;
  const std::vector<float> x = RandomFloats(T * K, seed, 2.0f);
  constexpr float kSentinel = -12345.0f;
  std::vector<float> got(T * ldy, kSentinel), ref(T * ldy, kSentinel);
  ops::AmxMatMulRows(x.data(), T, W.view, r0, r1, got.data(), ldy);
  ops::ReferenceKernels().matmul_rows(x.data(), T, W.view, r0, r1, ref.data(), ldy);
  std::vector<double> xb(K);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) xb[k] = Bf16ToF32(F32ToBf16(x[t * K + k]));
    for (int64_t n = 0; n < ldy; ++n) {
      const float value = got[t * ldy + n];
      if (n < r0 || n >= r1) {
        ASSERT_EQ(value, kSentinel) << "wrote outside its rows: t=" << t << " n=" << n;
        continue;
      }
      double sum = 0, partial_sq = 0, abs_sum = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double w = W.exact[n * K + k];
        sum += xb[k] * w;
        partial_sq += sum * sum;
        abs_sum += std::fabs(static_cast<double>(x[t * K + k]) * w);
      }
      const double tol = 8 * kU * std::sqrt(partial_sq / 3) + 1e-30;
      ASSERT_NEAR(value, sum, tol) << "vs exact BF16 products: T=" << T << " K=" << K << " rows ["
                                   << r0 << "," << r1 << ") t=" << t << " n=" << n;
      const double ref_tol = abs_sum * (kBf16Rel + 2 * K * kU);
      ASSERT_NEAR(value, ref[t * ldy + n], ref_tol)
          << "vs the fp32 reference kernel: T=" << T << " K=" << K << " t=" << t << " n=" << n;
    }
  }
}

class AmxTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!ops::AmxUsable())
      GTEST_SKIP() << "AMX is not usable here (CPU without AMX-TILE/BF16/INT8, or the OS did "
                      "not grant the tile state): see the log line above";
  }
};

// Every token count 1-100 crosses each tail of the token tiles (1-15 spare rows, one or two
// tiles per kernel call); K = 100 ends inside a 32-wide block, K = 96 on one; rows [3, 45) of
// 50 start and end inside 16-row panels and leave a single panel at the end of a pair.
TEST_F(AmxTest, Bf16EveryTokenCountMatchesExactProducts) {
  for (int64_t K : {96, 100}) {
    const Bf16Matrix W = MakeBf16(50, K, 1 + K);
    for (int64_t T = 1; T <= 100; ++T) {
      CheckAmx(W, T, 3, 45, 50, 1000 * K + T);
      if (HasFatalFailure()) return;
    }
  }
}

TEST_F(AmxTest, Bf16ShortAndOddK) {
  // K below one block, one value past a block, and two blocks less one.
  for (int64_t K : {1, 7, 31, 33, 63}) {
    const Bf16Matrix W = MakeBf16(37, K, K);
    for (int64_t T : {1, 15, 16, 17, 33}) {
      CheckAmx(W, T, 0, 37, 40, 77 * K + T);   // ldy > N: the padding stays untouched
      CheckAmx(W, T, 17, 18, 37, 78 * K + T);  // a single row inside a panel
      if (HasFatalFailure()) return;
    }
  }
}

// A prompt chunk at the model's size: 512 tokens, K = 2048 (the hidden size of DeepSeekMoE
// 16B), more than one block of 8 packed panels (128 rows), a range ending mid-panel.
TEST_F(AmxTest, Bf16PromptChunk) {
  const Bf16Matrix W = MakeBf16(150, 2048, 5);
  CheckAmx(W, 512, 5, 147, 150, 6);
}

// Random shapes and ranges, the way threads split a matrix.
TEST_F(AmxTest, Bf16RandomShapes) {
  std::mt19937 rng(42);
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t T = 1 + rng() % 70, N = 1 + rng() % 90, K = 1 + rng() % 300;
    const int64_t r0 = rng() % N, r1 = r0 + 1 + rng() % (N - r0);
    const Bf16Matrix W = MakeBf16(N, K, 300 + trial);
    CheckAmx(W, T, r0, r1, N, 400 + trial);
    if (HasFatalFailure()) return;
  }
}

// The check above must be able to fail: a single wrong weight is caught.
TEST_F(AmxTest, CheckDetectsAWrongWeight) {
  Bf16Matrix W = MakeBf16(20, 64, 9);
  const std::vector<float> x = RandomFloats(16 * 64, 10, 2.0f);
  std::vector<float> y(16 * 20), y2(16 * 20);
  ops::AmxMatMulRows(x.data(), 16, W.view, 0, 20, y.data(), 20);
  W.bits[5 * 64 + 40] ^= 0x4000;  // flip an exponent bit of W[5, 40]
  ops::AmxMatMulRows(x.data(), 16, W.view, 0, 20, y2.data(), 20);
  for (int64_t t = 0; t < 16; ++t) {
    for (int64_t n = 0; n < 20; ++n) {
      if (n == 5)
        EXPECT_NE(y[t * 20 + n], y2[t * 20 + n]) << t;
      else
        EXPECT_EQ(y[t * 20 + n], y2[t * 20 + n]) << t << " " << n;
    }
  }
}

TEST(AmxSupportTest, Bf16Only) {
  EXPECT_TRUE(ops::AmxSupports(DType::kBF16) || !ops::AmxUsable());
  EXPECT_FALSE(ops::AmxSupports(DType::kF32));
  EXPECT_FALSE(ops::AmxSupports(DType::kI8));
}

}  // namespace
}  // namespace dsmoe
