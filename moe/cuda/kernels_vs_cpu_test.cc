// The CUDA kernels against the CPU code they stand in for, on the same inputs: the plans of
// moe/dispatch's MakePlan (dropless, and capacity blocks with drops and empty slots) through
// PermuteRows / SumRows / WeightedSumBackward against Permute, Unpermute and their autograd;
// GroupedGemm against experts::GroupedMatmul; TopKRoute against gate::TopKRoute.
// kernels_vs_cpu_test runs it on a GPU (tagged "gpu", built with --config=cuda against the
// GPU machine's LibTorch: tools/gpu_check.sh); kernels_vs_cpu_emu_test on the CPU emulator
// (third_party/cuda_emu), where it checks that both sides mean the same thing by the plan
// arrays, weights and ties, but not the GPU's arithmetic.
#include <cmath>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <cuda_bf16.h>

#include "gtest/gtest.h"
#include "moe/cuda/device_environment.h"
#include "moe/cuda/kernels.h"
#include "moe/dispatch/permute.h"
#include "moe/experts/experts.h"
#include "moe/gate/router.h"

namespace switchyard::cuda {
namespace {

// A device copy of a contiguous CPU tensor (freed with the object).
struct Dev {
  void* p = nullptr;
  size_t bytes = 0;
  explicit Dev(const at::Tensor& t) : bytes(t.numel() * t.element_size()) {
    const at::Tensor c = t.contiguous();
    EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(bytes, 1)), cudaSuccess);
    if (bytes) {
      EXPECT_EQ(cudaMemcpy(p, c.data_ptr(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
    }
  }
  Dev(const Dev&) = delete;
  ~Dev() { cudaFree(p); }
  // Room for n bytes, every byte 0xff (NaN as floats), so that an element a kernel skips
  // shows. (The emulator's fresh memory is 0xff already; a GPU's is whatever was there.)
  explicit Dev(size_t n) : bytes(n) {
    EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(bytes, 1)), cudaSuccess);
    EXPECT_EQ(cudaMemset(p, 0xff, bytes), cudaSuccess);
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p);
  }
  // Back into a CPU tensor shaped like `like`.
  at::Tensor Host(const at::Tensor& like) const {
    at::Tensor h = at::empty_like(like, at::MemoryFormat::Contiguous);
    EXPECT_EQ(cudaMemcpy(h.data_ptr(), p, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }
};

DType Of(at::ScalarType t) { return t == at::kFloat ? DType::kFloat32 : DType::kBFloat16; }

// got against want, computed in another order or with and without fused multiply-adds: fp32
// within `fp32_tol` · (1 + |want|); bf16 within one bf16 step of want (both round once to
// bf16 from fp32 values that can straddle a rounding boundary).
void ExpectClose(const at::Tensor& got, const at::Tensor& want, double fp32_tol, const char* what) {
  const at::Tensor a = got.to(at::kDouble), b = want.detach().to(at::kDouble);
  const at::Tensor bound = got.scalar_type() == at::kBFloat16
                               ? at::clamp_min(b.abs(), 1e-30) * std::ldexp(1.0, -7)
                               : (b.abs() + 1) * fp32_tol;
  const at::Tensor excess = (a - b).abs() - bound;
  EXPECT_LE(excess.max().item<double>(), 0.0)
      << what << ": max |got − want| " << (a - b).abs().max().item<double>() << " at "
      << (excess).argmax().item<int64_t>();
}

// Router output for T tokens over E experts, dropless or with capacity factor 1 (drops, and
// with padding empty slots).
gate::Routing Route(int64_t T, int E, int k, bool capacity, uint64_t seed) {
  at::manual_seed(seed);
  gate::TopKOptions o{.top_k = k, .capacity_factor = capacity ? 1.0 : 0.0, .pad_to_capacity = false};
  absl::StatusOr<gate::Routing> r = gate::TopKRoute(at::randn({T, E}), o);
  EXPECT_TRUE(r.ok()) << r.status();
  return *r;
}

TEST(CudaKernelsVsCpuTest, PermutationMatchesMoeDispatch) {
  const int64_t T = 203;
  const int E = 8, k = 2;
  for (bool capacity : {false, true}) {
    const gate::Routing r = Route(T, E, k, capacity, 3);
    absl::StatusOr<dispatch::PermutePlan> plan = dispatch::MakePlan(r.routing_map, capacity ? r.capacity : -1);
    ASSERT_TRUE(plan.ok()) << plan.status();
    const int64_t N = plan->num_rows();
    if (capacity) {
      ASSERT_LT(plan->token_rows.numel(), T * k) << "the capacity case should drop copies";
      ASSERT_LT(plan->token_rows.numel(), N) << "and leave empty slots";
    }
    for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
      for (int64_t H : {40, 13}) {  // 16-byte words, and the byte / element loops
        SCOPED_TRACE(::testing::Message() << (capacity ? "capacity" : "dropless") << " "
                                          << (dt == at::kFloat ? "fp32" : "bf16") << " H = " << H);
        at::manual_seed(7);
        const at::Tensor x = at::randn({T, H}).to(dt).requires_grad_(), g = at::randn({T, H}).to(dt);
        const at::Tensor probs = r.probs.detach().clone().requires_grad_();
        // CPU: rows, the weighted and plain unpermutes, and the weighted one's gradients.
        const at::Tensor rows = dispatch::Permute(x, *plan);
        const at::Tensor w = dispatch::RowWeights(probs, *plan).detach();
        const at::Tensor rows_leaf = rows.detach().clone().requires_grad_();
        const at::Tensor weighted = dispatch::Unpermute(rows_leaf, probs, *plan);
        const at::Tensor plain = dispatch::Unpermute(rows.detach(), *plan);
        (weighted.to(at::kFloat) * g.to(at::kFloat)).sum().backward();
        // And Permute's backward: each token's row gradients summed.
        const at::Tensor grad_rows_in = at::randn({N, H}).to(dt);
        (rows.to(at::kFloat) * grad_rows_in.to(at::kFloat)).sum().backward();

        Dev dx(x.detach()), dg(g), dw(w), dtok(plan->row_token), doff(plan->token_offsets), dtr(plan->token_rows),
            dgin(grad_rows_in);
        // Outputs start as NaN: a kernel that skips an element leaves NaN there.
        auto bytes = [](const at::Tensor& t) { return static_cast<size_t>(t.numel() * t.element_size()); };
        Dev drows(bytes(rows)), dsum(bytes(weighted)), dplain(bytes(plain)), dgrad_rows(bytes(rows)), dgrad_w(bytes(w)),
            dgx(bytes(x));
        ASSERT_EQ(cudaGetLastError(), cudaSuccess);
        ASSERT_EQ(PermuteRows(dx.p, drows.p, dtok.as<int64_t>(), N, H, Of(dt), nullptr), cudaSuccess);
        ASSERT_EQ(SumRows(drows.p, dw.as<float>(), doff.as<int64_t>(), dtr.as<int64_t>(), dsum.p, T, H, Of(dt), nullptr),
                  cudaSuccess);
        ASSERT_EQ(SumRows(drows.p, nullptr, doff.as<int64_t>(), dtr.as<int64_t>(), dplain.p, T, H, Of(dt), nullptr),
                  cudaSuccess);
        ASSERT_EQ(WeightedSumBackward(dg.p, drows.p, dw.as<float>(), dtok.as<int64_t>(), dgrad_rows.p,
                                      dgrad_w.as<float>(), N, H, Of(dt), nullptr),
                  cudaSuccess);
        ASSERT_EQ(SumRows(dgin.p, nullptr, doff.as<int64_t>(), dtr.as<int64_t>(), dgx.p, T, H, Of(dt), nullptr),
                  cudaSuccess);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

        EXPECT_TRUE(at::equal(drows.Host(rows), rows.detach())) << "permuted rows, bit for bit";
        // Both sum a token's rows in fp32 in token_rows order and round once.
        ExpectClose(dsum.Host(weighted), weighted, 2e-6, "weighted unpermute");
        ExpectClose(dplain.Host(plain), plain, 2e-6, "plain unpermute");
        ExpectClose(dgrad_rows.Host(rows), rows_leaf.grad(), 2e-6, "row gradients");
        ExpectClose(dgx.Host(x), x.grad(), 2e-6, "Permute's backward");
        // The weight gradient: at a real row, d(probs[t, e]) for the row's (t, e); 0 at an empty slot.
        const at::Tensor gw = dgrad_w.Host(w);
        const at::Tensor want = at::where(plan->row_token >= 0,
                                          probs.grad().flatten().index_select(0, plan->row_prob_index),
                                          at::zeros_like(w));
        EXPECT_TRUE(at::allclose(gw, want, 1e-5, 1e-5)) << "weight gradients: max diff "
                                                        << (gw - want).abs().max().item<float>();
      }
    }
  }
}

TEST(CudaKernelsVsCpuTest, GroupedGemmMatchesGroupedMatmul) {
  const int E = 6;
  const int64_t in = 48, out = 40;
  const std::vector<int64_t> counts = {13, 0, 29, 1, 0, 21};
  int64_t N = 0;
  for (int64_t c : counts) N += c;
  cublasHandle_t h;
  ASSERT_EQ(cublasCreate(&h), CUBLAS_STATUS_SUCCESS);
  // No reduced-precision split-K reductions: the bf16 bound assumes one rounding (as in kernels_test).
  ASSERT_EQ(cublasSetMathMode(h, static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH |
                                                            CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)),
            CUBLAS_STATUS_SUCCESS);
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
    at::manual_seed(11);
    const at::Tensor x = at::randn({N, in}).to(dt), w = at::randn({E, in, out}).to(dt);
    const at::Tensor want = experts::GroupedMatmul(x, w, counts);
    for (bool grouped : {false, true}) {
      SCOPED_TRACE(::testing::Message() << (dt == at::kFloat ? "fp32 " : "bf16 ") << (grouped ? "grouped" : "loop"));
      Dev dx(x), dw(w), dy(want.numel() * want.element_size());
      ASSERT_EQ(GroupedGemm(h, dx.p, dw.p, dy.p, counts.data(), E, in, out, Of(dt), grouped, nullptr), cudaSuccess);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      // Both sum 48 products in fp32, in orders of their own (|products| ~ 1, sums ~ 7).
      ExpectClose(dy.Host(want), want, 1e-5, "grouped GEMM");
    }
  }
  cublasDestroy(h);
}

TEST(CudaKernelsVsCpuTest, TopKRouteMatchesGateRouter) {
  const int64_t T = 150;
  int checked = 0;
  for (int E : {16, 64, 100}) {
    for (int k : {1, 2, 8}) {
      for (int mode = 0; mode < 3; ++mode) {  // softmax over the k chosen, over all E, sigmoid
        SCOPED_TRACE(::testing::Message() << "E = " << E << " k = " << k << " mode " << mode);
        gate::TopKOptions o{.top_k = k,
                            .score = mode == 2 ? gate::ScoreFunction::kSigmoid : gate::ScoreFunction::kSoftmax,
                            .pre_softmax = mode == 1,
                            .scaling_factor = mode == 1 ? 2.5f : 1.f};
        at::manual_seed(100 * E + 10 * k + mode);
        const at::Tensor logits = at::randn({T, E});
        absl::StatusOr<gate::Routing> r = gate::TopKRoute(logits, o);
        ASSERT_TRUE(r.ok()) << r.status();
        Dev dl(logits), di(T * k * sizeof(int64_t)), dwt(T * k * sizeof(float)), dc(at::zeros({E}, at::kLong));
        ASSERT_EQ(TopKRoute(dl.as<float>(), T, E, k, mode == 2, mode == 1, /*normalize=*/mode == 2 && k > 1,
                            o.scaling_factor, di.as<int64_t>(), dwt.as<float>(), dc.as<int64_t>(), nullptr),
                  cudaSuccess);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        EXPECT_TRUE(at::equal(di.Host(r->topk_indices), r->topk_indices));
        const at::Tensor wt = dwt.Host(r->topk_weights);
        // 5e-6 relative: the GPU's __expf is within 2 + floor(1.173·|x|) ulp (CUDA's
        // programming guide), as in kernels_test.
        EXPECT_TRUE(at::allclose(wt, r->topk_weights.detach(), 5e-6, 1e-12))
            << "max diff " << (wt - r->topk_weights).abs().max().item<float>();
        EXPECT_TRUE(at::equal(dc.Host(r->tokens_per_expert), r->tokens_per_expert));
        ++checked;
      }
    }
  }
  EXPECT_EQ(checked, 27);
}

}  // namespace
}  // namespace switchyard::cuda
