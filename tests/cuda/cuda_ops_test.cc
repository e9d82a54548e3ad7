// Every CUDA kernel against the CPU reference (core/ops/kernels.h, ops.h, gate.h, and the
// formulas of core/model/model_runner.cc) on random shapes. Bounds: fp32 results to ~1e-5
// relative L2; results rounded to bf16 (or computed from bf16 inputs) to ~1e-2.
#include "core/ops/cuda/cuda_ops.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <random>

#include "core/model/gate.h"
#include "core/ops/cuda/cublas_gemm.h"
#include "core/ops/kernels.h"
#include "core/ops/ops.h"
#include "core/tensor/dtype.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

using testing::DeviceVector;
using testing::RandomFloats;
using testing::RelErr;

std::vector<uint16_t> ToBf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = F32ToBf16(v[i]);
  return out;
}
std::vector<float> FromBf16(const std::vector<uint16_t>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = Bf16ToF32(v[i]);
  return out;
}
std::vector<float> RoundBf16(const std::vector<float>& v) { return FromBf16(ToBf16(v)); }

TEST(CudaKernels, RmsNormMatchesCpu) {
  DSMOE_SKIP_WITHOUT_GPU();
  uint64_t seed = 1;
  for (int64_t T : {1, 5, 33}) {
    for (int64_t H : {64, 520, 1024, 2048}) {
      const std::vector<float> x = RandomFloats(T * H, ++seed, 3.0f);
      std::vector<float> w = RandomFloats(H, ++seed);
      for (float& v : w) v += 1.0f;
      // Every other row, through the row index list (how the final norm picks logit rows).
      std::vector<int32_t> rows;
      for (int32_t t = 0; t < T; t += 2) rows.push_back(t);
      const int64_t R = static_cast<int64_t>(rows.size());
      std::vector<float> want(T * H), want_rows(R * H);
      ops::RmsNorm(x.data(), w.data(), T, H, 1e-6, want.data());
      for (int64_t r = 0; r < R; ++r)
        std::copy_n(want.data() + rows[r] * H, H, want_rows.data() + r * H);

      DeviceVector<float> dx(x), dw(w), out32(T * H);
      DeviceVector<uint16_t> out16(T * H), rows16(R * H);
      DeviceVector<int32_t> drows(rows);
      out32.Poison();
      out16.Poison();
      ASSERT_CUDA_OK(cuda::LaunchRmsNorm(dx.get(), dw.get(), nullptr, T, H, 1e-6f, out16.get(),
                                         out32.get(), nullptr));
      ASSERT_CUDA_OK(cuda::LaunchRmsNorm(dx.get(), dw.get(), drows.get(), R, H, 1e-6f, rows16.get(),
                                         nullptr, nullptr));
      EXPECT_LT(RelErr(out32.Download(), want), 1e-5) << T << "x" << H;
      EXPECT_LT(RelErr(FromBf16(out16.Download()), want), 5e-3) << T << "x" << H;
      EXPECT_LT(RelErr(FromBf16(rows16.Download()), want_rows), 5e-3) << T << "x" << H;
    }
  }
}

TEST(CudaKernels, EmbedGathersRowsExactly) {
  DSMOE_SKIP_WITHOUT_GPU();
  const int64_t V = 300, H = 72, T = 17;
  const std::vector<uint16_t> table = ToBf16(RandomFloats(V * H, 7));
  std::vector<int32_t> ids(T);
  for (int64_t t = 0; t < T; ++t) ids[t] = static_cast<int32_t>((t * 37 + 5) % V);
  DeviceVector<uint16_t> dt(table);
  DeviceVector<int32_t> di(ids);
  DeviceVector<float> h(T * H);
  h.Poison();
  ASSERT_CUDA_OK(cuda::LaunchEmbed(dt.get(), di.get(), T, H, h.get(), nullptr));
  const std::vector<float> got = h.Download();
  for (int64_t t = 0; t < T; ++t) {
    std::vector<float> want(H);
    ops::ReferenceKernels().row_to_f32(table.data() + ids[t] * H, DType::kBF16, H, want.data());
    for (int64_t i = 0; i < H; ++i) ASSERT_EQ(got[t * H + i], want[i]);
  }
}

TEST(CudaKernels, SiluMulMatchesCpu) {
  DSMOE_SKIP_WITHOUT_GPU();
  for (int64_t T : {1, 7}) {
    for (int64_t W : {32, 704, 1000}) {
      const std::vector<float> gu = RandomFloats(T * 2 * W, T * W, 4.0f);
      std::vector<float> want(T * W);
      for (int64_t t = 0; t < T; ++t) {
        ops::ReferenceKernels().silu_mul(gu.data() + t * 2 * W, gu.data() + t * 2 * W + W,
                                         want.data() + t * W, W);
      }
      DeviceVector<float> d(gu);
      DeviceVector<uint16_t> out(T * W);
      out.Poison();
      ASSERT_CUDA_OK(cuda::LaunchSiluMul(d.get(), T, W, out.get(), nullptr));
      EXPECT_LT(RelErr(FromBf16(out.Download()), want), 5e-3);
    }
  }
}

TEST(CudaKernels, ResidualBiasAndConversion) {
  DSMOE_SKIP_WITHOUT_GPU();
  const int64_t T = 9, N = 130;
  const std::vector<float> x = RandomFloats(T * N, 3), y = RandomFloats(T * N, 4),
                           b = RandomFloats(N, 5);
  DeviceVector<float> dx(x), dy(y), db(b);
  DeviceVector<uint16_t> d16(T * N);
  ASSERT_CUDA_OK(cuda::LaunchAddInPlace(dx.get(), dy.get(), T * N, nullptr));
  ASSERT_CUDA_OK(cuda::LaunchAddBias(db.get(), T, N, dy.get(), nullptr));
  ASSERT_CUDA_OK(cuda::LaunchF32ToBf16(dx.get(), T * N, d16.get(), nullptr));
  const std::vector<float> got = dy.Download();
  const std::vector<uint16_t> got16 = d16.Download();
  for (int64_t i = 0; i < T * N; ++i) {
    ASSERT_EQ(got[i], (y[i] + x[i]) + b[i % N]);
    ASSERT_EQ(got16[i], F32ToBf16(x[i]));
  }
}

TEST(CudaKernels, GateTopKMatchesRouteTokens) {
  DSMOE_SKIP_WITHOUT_GPU();
  uint64_t seed = 10;
  for (int E : {8, 64, 160, 256}) {
    for (int k : {1, 2, 6}) {
      for (bool norm : {false, true}) {
        const int64_t T = 37;
        const std::vector<float> logits = RandomFloats(T * E, ++seed, 4.0f);
        std::vector<int32_t> want_e(T * k);
        std::vector<float> want_w(T * k), scratch(E);
        RouteTokens(GateParams{E, k, norm}, logits.data(), T, scratch.data(), want_e.data(),
                    want_w.data());
        DeviceVector<float> dl(logits), dw(T * k);
        DeviceVector<int32_t> de(T * k);
        ASSERT_CUDA_OK(cuda::LaunchGateTopK(dl.get(), T, E, k, norm, de.get(), dw.get(), nullptr));
        EXPECT_EQ(de.Download(), want_e) << "E=" << E << " k=" << k << " norm=" << norm;
        EXPECT_LT(RelErr(dw.Download(), want_w), 1e-5);
      }
    }
  }
}

TEST(CudaKernels, CublasGemmMatchesCpu) {
  DSMOE_SKIP_WITHOUT_GPU();
  auto gemm = cuda::CublasGemm::Create();
  ASSERT_TRUE(gemm.ok()) << gemm.status();
  uint64_t seed = 20;
  for (int64_t T : {1, 3, 64, 200}) {
    for (auto [N, K] : {std::pair<int64_t, int64_t>{64, 64}, {1408, 1024}, {96, 520}}) {
      const std::vector<float> x = RoundBf16(RandomFloats(T * K, ++seed));
      const std::vector<uint16_t> w = ToBf16(RandomFloats(N * K, ++seed, 0.1f));
      const std::vector<float> y0 = RandomFloats(T * N, ++seed);
      const MatrixView W{DType::kBF16, N, K, w.data()};
      std::vector<float> want(T * N);
      ops::ReferenceKernels().matmul_rows(x.data(), T, W, 0, N, want.data(), N);
      DeviceVector<uint16_t> dx(ToBf16(x)), dw(w);
      DeviceVector<float> dy(T * N), dacc(y0);
      dy.Poison();
      ASSERT_TRUE((*gemm)->Bf16(dx.get(), T, dw.get(), N, K, 0.0f, dy.get(), nullptr).ok());
      ASSERT_TRUE((*gemm)->Bf16(dx.get(), T, dw.get(), N, K, 1.0f, dacc.get(), nullptr).ok());
      EXPECT_LT(RelErr(dy.Download(), want), 1e-4) << T << "x" << N << "x" << K;
      std::vector<float> want_acc(T * N);
      for (int64_t i = 0; i < T * N; ++i) want_acc[i] = want[i] + y0[i];
      EXPECT_LT(RelErr(dacc.Download(), want_acc), 1e-4);
      // The fp32 router GEMM.
      const std::vector<float> wf = RandomFloats(N * K, ++seed);
      std::vector<float> want_f(T * N);
      ops::ReferenceKernels().matmul_rows(x.data(), T, MatrixView{DType::kF32, N, K, wf.data()}, 0,
                                          N, want_f.data(), N);
      DeviceVector<float> dxf(x), dwf(wf), dyf(T * N);
      ASSERT_TRUE((*gemm)->F32(dxf.get(), T, dwf.get(), N, K, dyf.get(), nullptr).ok());
      EXPECT_LT(RelErr(dyf.Download(), want_f), 1e-5);
    }
  }
}

// The fused routing + grouping launch equals the gate followed by the grouping: same experts and
// weights, same group offsets and tiles, and each group's rows name the same tokens (their order
// within a group is free).
TEST(CudaKernels, RouteAndPlanEqualsGateThenPlan) {
  DSMOE_SKIP_WITHOUT_GPU();
  for (int64_t T : {1, 7, 64, 256}) {
    const int E = 64, k = 6, G = E + 1;
    const std::vector<float> logits = RandomFloats(T * E, 600 + T, 3.0f);
    struct Out {
      std::vector<int32_t> experts, offsets, tile_group, tile_row, num_tiles, row_token;
      std::vector<float> weights;
    };
    auto run = [&](bool fused) {
      const int64_t tiles = cuda::MaxGroupedTiles(T, k, G);
      DeviceVector<float> dl(logits), dw(T * k);
      DeviceVector<int32_t> de(T * k), off(G + 1), cursor(G), row_token(T * (k + 1)),
          assign_row(T * k), tile_group(tiles), tile_row(tiles), num_tiles(1);
      const cuda::GroupedPlan plan{off.get(),        cursor.get(),     row_token.get(),
                                   assign_row.get(), tile_group.get(), tile_row.get(),
                                   num_tiles.get()};
      if (fused) {
        EXPECT_EQ(cuda::LaunchRouteAndPlan(dl.get(), T, E, k, true, de.get(), dw.get(), true, plan,
                                           nullptr),
                  cudaSuccess);
      } else {
        EXPECT_EQ(cuda::LaunchGateTopK(dl.get(), T, E, k, true, de.get(), dw.get(), nullptr),
                  cudaSuccess);
        EXPECT_EQ(cuda::LaunchBuildGroupedPlan(de.get(), T, k, E, true, true, plan, nullptr),
                  cudaSuccess);
      }
      Out o{de.Download(),        off.Download(),       tile_group.Download(), tile_row.Download(),
            num_tiles.Download(), row_token.Download(), dw.Download()};
      o.tile_group.resize(o.num_tiles[0]);
      o.tile_row.resize(o.num_tiles[0]);
      for (int g = 0; g < G; ++g) {  // canonical order within each group
        std::sort(o.row_token.begin() + o.offsets[g], o.row_token.begin() + o.offsets[g + 1]);
      }
      return o;
    };
    const Out a = run(true), b = run(false);
    EXPECT_EQ(a.experts, b.experts) << "T=" << T;
    EXPECT_EQ(a.weights, b.weights) << "T=" << T;
    EXPECT_EQ(a.offsets, b.offsets) << "T=" << T;
    EXPECT_EQ(a.tile_group, b.tile_group) << "T=" << T;
    EXPECT_EQ(a.tile_row, b.tile_row) << "T=" << T;
    EXPECT_EQ(a.row_token, b.row_token) << "T=" << T;
  }
}

// The small-batch GEMV kernels against the CPU reference, over and beyond one 8-row pass.
TEST(CudaKernels, GemvMatchesCpu) {
  DSMOE_SKIP_WITHOUT_GPU();
  uint64_t seed = 40;
  for (int64_t T : {1, 3, 8, 11, 20}) {
    for (auto [N, K] : {std::pair<int64_t, int64_t>{64, 64}, {1408, 1024}, {96, 520}}) {
      const std::vector<float> x = RoundBf16(RandomFloats(T * K, ++seed));
      const std::vector<uint16_t> w = ToBf16(RandomFloats(N * K, ++seed, 0.1f));
      const std::vector<float> y0 = RandomFloats(T * N, ++seed);
      std::vector<float> want(T * N), want_acc(T * N);
      ops::ReferenceKernels().matmul_rows(x.data(), T, MatrixView{DType::kBF16, N, K, w.data()}, 0,
                                          N, want.data(), N);
      for (int64_t i = 0; i < T * N; ++i) want_acc[i] = want[i] + y0[i];
      DeviceVector<uint16_t> dx(ToBf16(x)), dw(w);
      DeviceVector<float> dy(T * N), dacc(y0);
      dy.Poison();
      ASSERT_CUDA_OK(cuda::LaunchGemvBf16(dx.get(), T, dw.get(), N, K, false, dy.get(), nullptr));
      ASSERT_CUDA_OK(cuda::LaunchGemvBf16(dx.get(), T, dw.get(), N, K, true, dacc.get(), nullptr));
      EXPECT_LT(RelErr(dy.Download(), want), 1e-5) << T << "x" << N << "x" << K;
      EXPECT_LT(RelErr(dacc.Download(), want_acc), 1e-5) << T << "x" << N << "x" << K;
      const std::vector<float> wf = RandomFloats(N * K, ++seed);
      std::vector<float> want_f(T * N);
      ops::ReferenceKernels().matmul_rows(x.data(), T, MatrixView{DType::kF32, N, K, wf.data()}, 0,
                                          N, want_f.data(), N);
      DeviceVector<float> dxf(x), dwf(wf), dyf(T * N);
      ASSERT_CUDA_OK(cuda::LaunchGemvF32(dxf.get(), T, dwf.get(), N, K, dyf.get(), nullptr));
      EXPECT_LT(RelErr(dyf.Download(), want_f), 1e-5);
    }
  }
  // K not a multiple of 8 is refused (the runner then uses cuBLAS).
  DeviceVector<uint16_t> dx(12), dw(12);
  DeviceVector<float> dy(1);
  EXPECT_EQ(cuda::LaunchGemvBf16(dx.get(), 1, dw.get(), 1, 12, false, dy.get(), nullptr),
            cudaErrorInvalidValue);
}

// The grouped expert GEMMs (both kernels) and the combine against a naive CPU MoE: routed experts
// of different widths plus a shared expert, batches from decode-sized to several tiles per group.
TEST(CudaKernels, GroupedExpertsMatchCpuWithBothKernels) {
  DSMOE_SKIP_WITHOUT_GPU();
  const int E = 12, H = 64, k = 3, G = E + 1;
  std::vector<int32_t> widths(G);
  for (int g = 0; g < E; ++g) widths[g] = 40 + 8 * (g % 3);
  widths[E] = 96;  // the shared expert
  const int max_w = *std::max_element(widths.begin(), widths.end());
  std::vector<std::vector<uint16_t>> gate_up(G), down(G);
  std::vector<std::unique_ptr<DeviceVector<uint16_t>>> d_gu, d_down;
  std::vector<const uint16_t*> gu_ptrs(G), down_ptrs(G);
  for (int g = 0; g < G; ++g) {
    gate_up[g] = ToBf16(RandomFloats(2 * widths[g] * H, 300 + g, 0.2f));
    down[g] = ToBf16(RandomFloats(H * widths[g], 400 + g, 0.2f));
    d_gu.push_back(std::make_unique<DeviceVector<uint16_t>>(gate_up[g]));
    d_down.push_back(std::make_unique<DeviceVector<uint16_t>>(down[g]));
    gu_ptrs[g] = d_gu.back()->get();
    down_ptrs[g] = d_down.back()->get();
  }
  DeviceVector<const uint16_t*> dgu(gu_ptrs), ddown(down_ptrs);
  DeviceVector<int32_t> dwidth(widths);
  const cuda::GroupedWeights gw{dgu.get(), ddown.get(), dwidth.get(), G, max_w, H};

  for (int64_t T : {1, 6, 16, 40, 300}) {
    const std::vector<float> x = RoundBf16(RandomFloats(T * H, 500 + T));
    const auto [experts, weights] = testing::RandomRouting(T, E, k, static_cast<unsigned>(T), 0.1f);
    // CPU: act = bf16(silu(x·gateᵀ) ⊙ x·upᵀ), y = Σ w·act·downᵀ + shared.
    auto expert = [&](int g, const float* xt, float* y) {
      const int W = widths[g];
      const std::vector<float> gu = FromBf16(gate_up[g]), dn = FromBf16(down[g]);
      std::vector<float> act(W);
      for (int i = 0; i < W; ++i) {
        double a = 0, b = 0;
        for (int d = 0; d < H; ++d) {
          a += double(xt[d]) * gu[i * H + d];
          b += double(xt[d]) * gu[(W + i) * H + d];
        }
        act[i] = Bf16ToF32(F32ToBf16(static_cast<float>(a / (1 + std::exp(-a)) * b)));
      }
      for (int o = 0; o < H; ++o) {
        double sum = 0;
        for (int i = 0; i < W; ++i) sum += double(act[i]) * dn[o * W + i];
        y[o] = static_cast<float>(sum);
      }
    };
    std::vector<float> want(T * H, 0.0f), y(H);
    for (int64_t t = 0; t < T; ++t) {
      for (int j = 0; j < k; ++j) {
        expert(experts[t * k + j], x.data() + t * H, y.data());
        for (int o = 0; o < H; ++o) want[t * H + o] += weights[t * k + j] * y[o];
      }
      expert(E, x.data() + t * H, y.data());
      for (int o = 0; o < H; ++o) want[t * H + o] += y[o];
    }

    const int64_t tiles = cuda::MaxGroupedTiles(T, k, G);
    DeviceVector<int32_t> off(G + 1), cursor(G), row_token(T * (k + 1)), assign_row(T * k),
        tile_group(tiles), tile_row(tiles), num_tiles(1), dexperts(experts);
    const cuda::GroupedPlan plan{off.get(),        cursor.get(),     row_token.get(),
                                 assign_row.get(), tile_group.get(), tile_row.get(),
                                 num_tiles.get()};
    DeviceVector<uint16_t> dx(ToBf16(x)), act(T * (k + 1) * max_w);
    DeviceVector<float> dweights(weights), expert_out(T * (k + 1) * H), out(T * H);
    ASSERT_CUDA_OK(
        cuda::LaunchBuildGroupedPlan(dexperts.get(), T, k, E, true, true, plan, nullptr));
    for (cuda::GroupedAlgo algo : {cuda::GroupedAlgo::kTensorCore, cuda::GroupedAlgo::kGemv}) {
      expert_out.Poison();
      out.Poison();
      ASSERT_CUDA_OK(cuda::LaunchGroupedGateUp(dx.get(), T, k, plan, gw, act.get(), nullptr, algo));
      ASSERT_CUDA_OK(
          cuda::LaunchGroupedDown(act.get(), T, k, plan, gw, expert_out.get(), nullptr, algo));
      ASSERT_CUDA_OK(cuda::LaunchCombine(expert_out.get(), plan, dweights.get(), T, k, true, E, H,
                                         false, out.get(), nullptr));
      EXPECT_LT(RelErr(out.Download(), want), 1e-2)
          << "T=" << T << (algo == cuda::GroupedAlgo::kGemv ? " gemv" : " tensor cores");
    }
  }
}

// RoPE + KV write + paged attention against the CPU runner's formulas: two sequences in one
// batch (a prefill), pages scattered in the pool, GQA.
TEST(CudaKernels, RopeAndPagedAttentionMatchCpu) {
  DSMOE_SKIP_WITHOUT_GPU();
  struct Shape {
    int nh, nkv, hd, page;
  };
  for (const Shape& sh :
       {Shape{4, 4, 16, 4}, Shape{8, 2, 64, 16}, Shape{16, 16, 64, 16}, Shape{4, 1, 128, 8},
        Shape{2, 1, 6, 4}}) {  // hd 6: rows not 16-byte aligned (the scalar key path)
    const int nh = sh.nh, nkv = sh.nkv, hd = sh.hd, ps = sh.page, half = hd / 2;
    // 200 positions: several 32-position chunks per warp; 5: one partial chunk.
    const std::vector<int> lens = {200, 37, 5};
    const int num_seqs = static_cast<int>(lens.size());
    const int max_ctx = 256, pages_per_slot = (max_ctx + ps - 1) / ps,
              num_pages = num_seqs * pages_per_slot;
    std::vector<int32_t> slots, positions;
    for (int s = 0; s < num_seqs; ++s) {
      for (int p = 0; p < lens[s]; ++p) {
        slots.push_back(s);
        positions.push_back(p);
      }
    }
    const int64_t T = static_cast<int64_t>(slots.size());
    const int width = (nh + 2 * nkv) * hd;
    std::vector<float> qkv = RandomFloats(T * width, hd + nh, 2.0f);
    const std::vector<float> bias = RandomFloats(width, 99, 0.5f);
    // Pages in a shuffled order, so a wrong page lookup cannot pass.
    std::vector<int32_t> table(num_pages);
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), std::mt19937(hd));
    std::vector<float> cos(max_ctx * half), sin(max_ctx * half);
    for (int p = 0; p < max_ctx; ++p) {
      for (int i = 0; i < half; ++i) {
        const double angle = p * std::pow(10000.0, -2.0 * i / hd);
        cos[p * half + i] = static_cast<float>(std::cos(angle));
        sin[p * half + i] = static_cast<float>(std::sin(angle));
      }
    }
    DeviceVector<float> dqkv(qkv), dbias(bias), dcos(cos), dsin(sin);
    DeviceVector<int32_t> dslots(slots), dpos(positions), dtable(table);
    const size_t cache = static_cast<size_t>(num_pages) * ps * nkv * hd;
    DeviceVector<uint16_t> keys(cache), values(cache), out(T * nh * hd);
    out.Poison();
    cuda::PagedKvLayer kv{keys.get(), values.get(), dtable.get(), pages_per_slot, ps};
    ASSERT_CUDA_OK(cuda::LaunchRopeKvWrite(dqkv.get(), dbias.get(), dpos.get(), dslots.get(),
                                           dcos.get(), dsin.get(), T, nh, nkv, hd, kv, nullptr));
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    ASSERT_CUDA_OK(cuda::LaunchPagedAttention(dqkv.get(), dpos.get(), dslots.get(), T, nh, nkv, hd,
                                              scale, kv, out.get(), nullptr));
    // CPU: bias, rotate_half RoPE (ModelRunner::ApplyRope), keys/values through bf16 (the
    // cache's type), softmax attention (ModelRunner::Attention).
    for (int64_t t = 0; t < T; ++t) {
      float* row = qkv.data() + t * width;
      for (int i = 0; i < width; ++i) row[i] += bias[i];
      for (int h = 0; h < nh + nkv; ++h) {
        float* v = row + h * hd;
        const float* c = cos.data() + positions[t] * half;
        const float* s = sin.data() + positions[t] * half;
        for (int i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          v[i] = a * c[i] - b * s[i];
          v[i + half] = b * c[i] + a * s[i];
        }
      }
    }
    const std::vector<float> got_qkv = dqkv.Download();
    EXPECT_LT(RelErr(got_qkv, qkv), 1e-6) << "rope, hd " << hd;
    std::vector<float> want(T * nh * hd, 0.0f);
    const ops::KernelTable& k = ops::ReferenceKernels();
    for (int64_t t = 0; t < T; ++t) {
      for (int h = 0; h < nh; ++h) {
        const int kvh = h / (nh / nkv);
        std::vector<float> scores(positions[t] + 1);
        // Rows of the same sequence with position <= p, as stored (bf16).
        std::vector<const float*> krows, vrows;
        for (int64_t u = 0; u < T; ++u) {
          if (slots[u] != slots[t] || positions[u] > positions[t]) continue;
          krows.push_back(qkv.data() + u * width + (nh + kvh) * hd);
          vrows.push_back(qkv.data() + u * width + (nh + nkv + kvh) * hd);
        }
        float max = -INFINITY;
        std::vector<float> kb(hd);
        for (size_t p = 0; p < krows.size(); ++p) {
          for (int d = 0; d < hd; ++d) kb[d] = Bf16ToF32(F32ToBf16(krows[p][d]));
          scores[p] = k.dot(qkv.data() + t * width + h * hd, kb.data(), hd) * scale;
          max = std::max(max, scores[p]);
        }
        float sum = 0;
        for (float& s : scores) sum += s = std::exp(s - max);
        for (size_t p = 0; p < vrows.size(); ++p) {
          for (int d = 0; d < hd; ++d) {
            want[(t * nh + h) * hd + d] += scores[p] / sum * Bf16ToF32(F32ToBf16(vrows[p][d]));
          }
        }
      }
    }
    EXPECT_LT(RelErr(FromBf16(out.Download()), want), 1e-2)
        << "attention nh " << nh << " nkv " << nkv << " hd " << hd;
  }
}

}  // namespace
}  // namespace dsmoe
