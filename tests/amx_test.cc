// The AMX GEMM against references written here: exact (double) products of the BF16-rounded
// activations, and the scalar reference kernel, on every token count 1-100 and 512, K on and
// off the 32-wide tile blocks, row ranges that start and end inside 16-row panels.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/model/quantize.h"
#include "core/ops/cpu/amx_gemm.h"
#include "core/ops/kernels.h"
#include "core/tensor/dtype.h"
#include "core/util/thread_pool.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

using testing::RandomFloats;

// Unit roundoff of fp32 (round to nearest): each fp32 addition errs by at most u·|result|.
constexpr double kU = 1.0 / (1 << 24);
// Relative rounding error of BF16 (8 significant bits, round to nearest even): ≤ 2^-8 (the
// measured worst case in these tests is 0.82 of the bound below, a single product at K = 1).
constexpr double kBf16Rel = 1.0 / 256;

// Weights [N, K] as the kernel reads them, and the values it multiplies: BF16 as stored, or
// Q8_0 dequantized (q · d, exact in fp32) and rounded to BF16.
struct TestMatrix {
  std::vector<uint8_t> bytes;
  std::vector<uint16_t> scales;
  std::vector<float> used;  // what the tiles multiply, as fp32
  std::vector<float> real;  // the matrix's own values (W.At)
  double weight_rounding;   // relative error of `used` against `real`
  MatrixView view;
};

TestMatrix MakeBf16(int64_t N, int64_t K, uint64_t seed) {
  TestMatrix m;
  const std::vector<float> v = RandomFloats(N * K, seed);
  m.bytes.resize(2 * N * K);
  m.used.resize(N * K);
  for (int64_t i = 0; i < N * K; ++i) {
    const uint16_t h = F32ToBf16(v[i]);
    std::memcpy(m.bytes.data() + 2 * i, &h, 2);
    m.used[i] = Bf16ToF32(h);
  }
  m.real = m.used;
  m.weight_rounding = 0;
  m.view = MatrixView{DType::kBF16, N, K, m.bytes.data()};
  return m;
}

TestMatrix MakeQ8(int64_t N, int64_t K, uint64_t seed) {  // K a multiple of 32
  TestMatrix m;
  const std::vector<float> v = RandomFloats(N * K, seed);
  m.bytes.resize(N * K);
  m.scales.resize(N * K / kQ8Block);
  for (int64_t r = 0; r < N; ++r) {
    QuantizeRowQ8(v.data() + r * K, K, reinterpret_cast<int8_t*>(m.bytes.data()) + r * K,
                  m.scales.data() + r * (K / kQ8Block));
  }
  m.used.resize(N * K);
  m.real.resize(N * K);
  for (int64_t r = 0; r < N; ++r) {
    for (int64_t k = 0; k < K; ++k) {
      const float q = static_cast<float>(static_cast<int8_t>(m.bytes[r * K + k]));
      m.real[r * K + k] = q * F16ToF32(m.scales[r * (K / kQ8Block) + k / kQ8Block]);
      m.used[r * K + k] = Bf16ToF32(F32ToBf16(m.real[r * K + k]));
    }
  }
  m.weight_rounding = kBf16Rel;
  m.view = MatrixView{DType::kQ8_0, N, K, m.bytes.data(), m.scales.data()};
  return m;
}

// Runs the AMX GEMM on rows [r0, r1) of W with y rows ldy apart, three ways (below), and checks
// every element of each:
//   - inside the range, against Σ_k bf16(x_k)·used[n,k] in double. TDPBF16PS multiplies exactly
//     and adds each product into an fp32 accumulator, so its error is the error of a running
//     fp32 sum: each addition errs by at most u·|s_i| (s_i the partial sum after i terms).
//     Those errors are independent and of mean zero, of variance ≤ (u·s_i)²/3, so the total
//     has a standard deviation ≤ u·sqrt(Σ s_i² / 3): the tolerance is 8 such deviations (the
//     partial sums taken in the order of k, as the tiles add them), which no element of
//     these tests should exceed by chance — and a wrong tail, a wrong pair order or a
//     missing block is off by whole products, orders of magnitude more;
//   - inside the range, against ReferenceKernels().matmul_rows (fp32 x): they differ by the
//     BF16 rounding of x, at most Σ_k |x_k·W[n,k]|·2^-8, the same again for Q8_0's weights
//     (rounded to BF16), plus both fp32 sums' rounding (each ≤ K·u·Σ_k |x_k·W[n,k]|);
//   - outside it (other rows, and the ldy padding), untouched.
void CheckAmx(const TestMatrix& W, int64_t T, int64_t r0, int64_t r1, int64_t ldy, uint64_t seed) {
  const int64_t K = W.view.cols;
  const std::vector<float> x = RandomFloats(T * K, seed, 2.0f);
  constexpr float kSentinel = -12345.0f;
  std::vector<float> ref(T * ldy, kSentinel);
  ops::ReferenceKernels().matmul_rows(x.data(), T, W.view, r0, r1, ref.data(), ldy);
  // Three ways in: x converted by the call; x packed beforehand, in two slices split at a
  // 16-token boundary as threads may pack it; and the range split into 8-row chunks over two
  // threads, as ops::Linear splits a matrix (each thread its own tile state and scratch).
  struct Result {
    const char* how;
    std::vector<float> y;
  };
  std::vector<Result> results;
  results.push_back({"x converted by the call", std::vector<float>(T * ldy, kSentinel)});
  ops::AmxMatMulRows(x.data(), T, W.view, r0, r1, results.back().y.data(), ldy);

  results.push_back({"x packed beforehand", std::vector<float>(T * ldy, kSentinel)});
  std::vector<uint16_t> packed(ops::AmxPackedActivationsSize(T, K), 0xffff);
  const int64_t split = T / 32 * 16;
  ops::AmxPackActivations(x.data(), split, K, packed.data());
  ops::AmxPackActivations(x.data() + split * K, T - split, K,
                          packed.data() + ops::AmxPackedActivationsSize(split, K));
  ops::AmxMatMulRowsPacked(packed.data(), T, W.view, r0, r1, results.back().y.data(), ldy);

  results.push_back({"8-row chunks on 2 threads", std::vector<float>(T * ldy, kSentinel)});
  static ThreadPool pool(2);
  float* chunked = results.back().y.data();
  pool.ParallelFor((r1 - r0 + 7) / 8, [&](int64_t task, int) {
    const int64_t c0 = r0 + 8 * task, c1 = std::min(r1, c0 + 8);
    ops::AmxMatMulRows(x.data(), T, W.view, c0, c1, chunked, ldy);
  });

  std::vector<double> xb(K);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) xb[k] = Bf16ToF32(F32ToBf16(x[t * K + k]));
    for (int64_t n = 0; n < ldy; ++n) {
      if (n < r0 || n >= r1) {
        for (const Result& r : results)
          ASSERT_EQ(r.y[t * ldy + n], kSentinel)
              << "wrote outside its rows, " << r.how << ": t=" << t << " n=" << n;
        continue;
      }
      double sum = 0, partial_sq = 0, abs_sum = 0;
      for (int64_t k = 0; k < K; ++k) {
        sum += xb[k] * W.used[n * K + k];
        partial_sq += sum * sum;
        abs_sum += std::fabs(static_cast<double>(x[t * K + k]) * W.real[n * K + k]);
      }
      const double tol = 8 * kU * std::sqrt(partial_sq / 3) + 1e-30;
      const double ref_tol = abs_sum * (kBf16Rel + W.weight_rounding + 2 * K * kU);
      for (const Result& r : results) {
        const float value = r.y[t * ldy + n];
        ASSERT_NEAR(value, sum, tol)
            << "vs exact BF16 products, " << r.how << ": T=" << T << " K=" << K << " rows [" << r0
            << "," << r1 << ") t=" << t << " n=" << n;
        ASSERT_NEAR(value, ref[t * ldy + n], ref_tol)
            << "vs the fp32 reference kernel, " << r.how << ": T=" << T << " K=" << K << " t=" << t
            << " n=" << n;
      }
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
    const TestMatrix W = MakeBf16(50, K, 1 + K);
    for (int64_t T = 1; T <= 100; ++T) {
      CheckAmx(W, T, 3, 45, 50, 1000 * K + T);
      if (HasFatalFailure()) return;
    }
  }
}

TEST_F(AmxTest, Bf16ShortAndOddK) {
  // K below one block, one value past a block, and two blocks less one.
  for (int64_t K : {1, 7, 31, 33, 63}) {
    const TestMatrix W = MakeBf16(37, K, K);
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
  const TestMatrix W = MakeBf16(150, 2048, 5);
  CheckAmx(W, 512, 5, 147, 150, 6);
}

// Random shapes and ranges, the way threads split a matrix.
TEST_F(AmxTest, Bf16RandomShapes) {
  std::mt19937 rng(42);
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t T = 1 + rng() % 70, N = 1 + rng() % 90, K = 1 + rng() % 300;
    const int64_t r0 = rng() % N, r1 = r0 + 1 + rng() % (N - r0);
    const TestMatrix W = MakeBf16(N, K, 300 + trial);
    CheckAmx(W, T, r0, r1, N, 400 + trial);
    if (HasFatalFailure()) return;
  }
}

// Q8_0: the weights are dequantized to BF16 as the panels are packed. Every token count 1-100
// over a range inside 16-row panels, K of one and of several Q8_0 blocks (odd and even counts
// of them), and a prompt chunk at the model's size.
TEST_F(AmxTest, Q8EveryTokenCountMatchesExactProducts) {
  for (int64_t K : {32, 160}) {
    const TestMatrix W = MakeQ8(50, K, 2 + K);
    for (int64_t T = 1; T <= 100; ++T) {
      CheckAmx(W, T, 3, 45, 50, 2000 * K + T);
      if (HasFatalFailure()) return;
    }
  }
}

TEST_F(AmxTest, Q8PromptChunk) {
  const TestMatrix W = MakeQ8(150, 1408, 7);
  CheckAmx(W, 512, 9, 141, 150, 8);
}

// Q8_0 rows are whole blocks of 32; a matrix that is not is refused (y left as it was), not read
// past its scales.
TEST_F(AmxTest, Q8RefusesPartialBlocks) {
  std::vector<int8_t> q(4 * 40, 1);
  std::vector<uint16_t> scales(4 * 2, F32ToF16(1.0f));
  const MatrixView W{DType::kQ8_0, 4, 40, q.data(), scales.data()};
  std::vector<float> x(16 * 40, 1.0f), y(16 * 4, -3.0f);
  ops::AmxMatMulRows(x.data(), 16, W, 0, 4, y.data(), 4);
  for (float v : y) EXPECT_EQ(v, -3.0f);
}

// The check above must be able to fail: a single wrong weight is caught.
TEST_F(AmxTest, CheckDetectsAWrongWeight) {
  TestMatrix W = MakeBf16(20, 64, 9);
  const std::vector<float> x = RandomFloats(16 * 64, 10, 2.0f);
  std::vector<float> y(16 * 20), y2(16 * 20);
  ops::AmxMatMulRows(x.data(), 16, W.view, 0, 20, y.data(), 20);
  W.bytes[2 * (5 * 64 + 40) + 1] ^= 0x40;  // flip an exponent bit of W[5, 40]
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

// What Linux says about the CPU, independently of CPUID: /proc/cpuinfo lists amx_tile,
// amx_bf16 and amx_int8 only where the CPU has them and the kernel supports the tile state.
TEST(AmxUsableTest, AgreesWithProcCpuinfo) {
  std::ifstream cpuinfo("/proc/cpuinfo");
  if (!cpuinfo) GTEST_SKIP() << "no /proc/cpuinfo (not Linux)";
  std::string line;
  bool tile = false, bf16 = false, int8 = false;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    std::istringstream flags(line.substr(line.find(':') + 1));
    for (std::string flag; flags >> flag;) {
      tile |= flag == "amx_tile";
      bf16 |= flag == "amx_bf16";
      int8 |= flag == "amx_int8";
    }
    break;
  }
  EXPECT_EQ(ops::AmxUsable(), tile && bf16 && int8)
      << "cpuinfo: amx_tile=" << tile << " amx_bf16=" << bf16 << " amx_int8=" << int8;
}

// Probed once: threads asking at the same time all get the one answer.
TEST(AmxUsableTest, SameAnswerOnEveryThread) {
  const bool want = ops::AmxUsable();
  std::vector<std::thread> threads;
  std::atomic<int> disagree{0};
  for (int i = 0; i < 4; ++i)
    threads.emplace_back([&] { disagree += ops::AmxUsable() != want ? 1 : 0; });
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(disagree.load(), 0);
}

TEST(AmxSupportTest, Bf16AndQ8Only) {
  EXPECT_TRUE(ops::AmxSupports(DType::kBF16) || !ops::AmxUsable());
  EXPECT_TRUE(ops::AmxSupports(DType::kQ8_0) || !ops::AmxUsable());
  EXPECT_FALSE(ops::AmxSupports(DType::kF16));
  EXPECT_FALSE(ops::AmxSupports(DType::kF32));
  EXPECT_FALSE(ops::AmxSupports(DType::kI8));
}

}  // namespace
}  // namespace dsmoe
