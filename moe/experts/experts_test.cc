#include "moe/experts/experts.h"

#include <limits>
#include <numeric>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "common/cpu_clones.h"
#include "common/matmul.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace switchyard::experts {
namespace {

using ::testing::HasSubstr;

double MaxRel(const at::Tensor& a, const at::Tensor& b) {
  if (b.numel() == 0) return a.numel() == 0 ? 0.0 : 1e9;
  const at::Tensor x = a.to(at::kDouble), y = b.to(at::kDouble);
  return ((x - y).abs().max() / (y.abs().max() + 1e-12)).item<double>();
}

// Forces the GEMMs bf16 storage uses for one test, whatever this CPU has.
class Bf16GemmsScope {
 public:
  explicit Bf16GemmsScope(Bf16Gemms choice) { SetBf16Gemms(choice); }
  ~Bf16GemmsScope() { SetBf16Gemms(Bf16Gemms::kAuto); }
};

class SwigluKernelsScope {
 public:
  explicit SwigluKernelsScope(SwigluKernels choice) { SetSwigluKernels(choice); }
  ~SwigluKernelsScope() { SetSwigluKernels(SwigluKernels::kAuto); }
};

const char* Name(Bf16Gemms g) { return g == Bf16Gemms::kFp32 ? "fp32 GEMMs" : "bf16 GEMMs"; }

at::Tensor Act(const at::Tensor& h, Activation a) {
  switch (a) {
    case Activation::kGelu: return at::gelu(h);
    case Activation::kRelu: return at::relu(h);
    case Activation::kSwiglu: {
      const int64_t f = h.size(1) / 2;
      return at::silu(h.narrow(1, 0, f)) * h.narrow(1, f, f);
    }
  }
  return h;
}

// One expert as a plain MLP on its rows, with ATen's autograd.
at::Tensor ReferenceMlp(const at::Tensor& x, const at::Tensor& fc1, const at::Tensor& fc2, Activation a) {
  return at::mm(Act(at::mm(x, fc1), a), fc2);
}

TEST(GroupedMatmulTest, MatchesPerExpertLoopWithEmptyExperts) {
  at::manual_seed(1);
  const std::vector<int64_t> counts = {3, 0, 7, 1, 0};
  const int64_t N = 11, in = 6, out = 4, E = 5;
  const at::Tensor x0 = at::randn({N, in}), w0 = at::randn({E, in, out}), R = at::randn({N, out});
  at::Tensor x = x0.clone().requires_grad_(true), w = w0.clone().requires_grad_(true);
  at::Tensor y = GroupedMatmul(x, w, counts);
  (y * R).sum().backward();

  at::Tensor xr = x0.clone().requires_grad_(true), wr = w0.clone().requires_grad_(true);
  std::vector<at::Tensor> parts;
  int64_t off = 0;
  for (int64_t e = 0; e < E; ++e) {
    parts.push_back(at::mm(xr.narrow(0, off, counts[e]), wr[e]));
    off += counts[e];
  }
  const at::Tensor yr = at::cat(parts);
  (yr * R).sum().backward();
  EXPECT_LT(MaxRel(y, yr), 1e-6);
  EXPECT_LT(MaxRel(x.grad(), xr.grad()), 1e-6);
  EXPECT_LT(MaxRel(w.grad(), wr.grad()), 1e-6);
  EXPECT_EQ(w.grad()[1].abs().sum().item<double>(), 0.0);
  EXPECT_THROW(GroupedMatmul(x0, w0, {3, 0, 7, 1}), c10::Error);
  EXPECT_THROW(GroupedMatmul(x0, w0, {3, 0, 7, 1, 1}), c10::Error);
}

// Segments in any order, several per expert (as the EP dispatcher hands rows over).
TEST(GroupedMatmulTest, SegmentsOfTheSameExpertInAnyOrder) {
  at::manual_seed(9);
  const std::vector<int64_t> rows = {4, 3, 0, 5, 2}, expert = {2, 0, 1, 2, 0};
  const at::Tensor x0 = at::randn({14, 6}), w0 = at::randn({3, 6, 4}), R = at::randn({14, 4});
  at::Tensor x = x0.clone().requires_grad_(true), w = w0.clone().requires_grad_(true);
  (GroupedMatmul(x, w, rows, expert) * R).sum().backward();
  at::Tensor xr = x0.clone().requires_grad_(true), wr = w0.clone().requires_grad_(true);
  std::vector<at::Tensor> parts;
  int64_t off = 0;
  for (size_t s = 0; s < rows.size(); ++s) {
    parts.push_back(at::mm(xr.narrow(0, off, rows[s]), wr[expert[s]]));
    off += rows[s];
  }
  (at::cat(parts) * R).sum().backward();
  EXPECT_LT(MaxRel(x.grad(), xr.grad()), 1e-6);
  EXPECT_LT(MaxRel(w.grad(), wr.grad()), 1e-6);
  EXPECT_EQ(w.grad()[1].abs().sum().item<double>(), 0.0);  // only an empty segment
  EXPECT_THROW(GroupedMatmul(x0, w0, rows, {2, 0, 1, 3, 0}), c10::Error);
  EXPECT_THROW(GroupedMatmul(x0, w0, rows, {2, 0}), c10::Error);
}

// The fused MLP against ATen's autograd of the composed ops, with segments in any order and
// several per expert (as the EP dispatcher hands them over), for every activation; once with
// every input needing a gradient and once with only the weights.
TEST(GroupedMlpTest, MatchesComposedOpsWithSegmentsInAnyOrder) {
  const std::vector<int64_t> rows = {4, 3, 0, 5, 2, 6}, expert = {2, 0, 1, 2, 0, 3};
  for (Activation a : {Activation::kGelu, Activation::kRelu, Activation::kSwiglu}) {
    for (bool x_grad : {true, false}) {
      at::manual_seed(9);
      const int64_t f = 5, f1 = a == Activation::kSwiglu ? 2 * f : f;
      const at::Tensor x0 = at::randn({20, 6}) * 2, w10 = at::randn({4, 6, f1}), w20 = at::randn({4, f, 6});
      const at::Tensor R = at::randn({20, 6});
      at::Tensor x = x0.clone().requires_grad_(x_grad), w1 = w10.clone().requires_grad_(true),
                 w2 = w20.clone().requires_grad_(true);
      const at::Tensor y = GroupedMlp(x, w1, w2, a, rows, expert);
      (y * R).sum().backward();
      at::Tensor xr = x0.clone().requires_grad_(x_grad), w1r = w10.clone().requires_grad_(true),
                 w2r = w20.clone().requires_grad_(true);
      std::vector<at::Tensor> parts;
      int64_t off = 0;
      for (size_t s = 0; s < rows.size(); ++s) {
        parts.push_back(ReferenceMlp(xr.narrow(0, off, rows[s]), w1r[expert[s]], w2r[expert[s]], a));
        off += rows[s];
      }
      const at::Tensor yr = at::cat(parts);
      (yr * R).sum().backward();
      EXPECT_LT(MaxRel(y, yr), 1e-6);
      if (x_grad) {
        EXPECT_LT(MaxRel(x.grad(), xr.grad()), 1e-6);
      } else {
        EXPECT_FALSE(x.grad().defined());
      }
      EXPECT_LT(MaxRel(w1.grad(), w1r.grad()), 1e-6);
      EXPECT_LT(MaxRel(w2.grad(), w2r.grad()), 1e-6);
      EXPECT_EQ(w1.grad()[1].abs().sum().item<double>(), 0.0);  // expert 1 has only an empty segment
      EXPECT_EQ(w2.grad()[1].abs().sum().item<double>(), 0.0);
    }
  }
  const at::Tensor x = at::randn({20, 6}), w1 = at::randn({4, 6, 10}), w2 = at::randn({4, 5, 6});
  EXPECT_THROW(GroupedMlp(x, w1, w2, Activation::kGelu, rows, expert), c10::Error);  // w1 not [E, H, F]
  EXPECT_THROW(GroupedMlp(x, w1, w2.narrow(0, 0, 3), Activation::kSwiglu, {20, 0, 0}), c10::Error);
  EXPECT_THROW(GroupedMlp(x, w1, w2, Activation::kSwiglu, rows, {2, 0, 1, 4, 0, 3}), c10::Error);
  EXPECT_THROW(GroupedMlp(x, w1, w2, Activation::kSwiglu, {4, 3, 0, 5, 2, 5}, expert), c10::Error);
  EXPECT_THROW(GroupedMlp(x.to(at::kDouble), w1, w2, Activation::kSwiglu, rows, expert), c10::Error);
}

// Row weights (the routing weights MoELayer passes) scale each row's fc2 input: y[r] =
// w[r] · mlp(x[r]), with gradients to x, w1, w2 and w, against composed ops in fp64, on every
// path: the fused SwiGLU in fp32 and in bf16 with either GEMMs, ATen's activations (GELU,
// and SwiGLU in fp64), segments in any order, an empty segment, weights 0 among them.
TEST(GroupedMlpTest, RowWeightsScaleEachRowOnEveryPath) {
  const std::vector<int64_t> rows = {40, 3, 0, 51, 2, 64}, expert = {2, 0, 1, 2, 0, 3};
  const int64_t N = 160, H = 24, f = 40;
  struct Path {
    Activation act;
    at::ScalarType dtype;
    Bf16Gemms gemms;
    double tol;
    SwigluKernels kernels = SwigluKernels::kAuto;
  };
  for (const Path& p : {Path{Activation::kSwiglu, at::kFloat, Bf16Gemms::kAuto, 1e-6},
                        Path{Activation::kSwiglu, at::kFloat, Bf16Gemms::kAuto, 1e-6, SwigluKernels::kPortable},
                        Path{Activation::kSwiglu, at::kDouble, Bf16Gemms::kAuto, 1e-12},
                        Path{Activation::kGelu, at::kFloat, Bf16Gemms::kAuto, 1e-6},
                        Path{Activation::kSwiglu, at::kBFloat16, Bf16Gemms::kFp32, 2e-2},
                        Path{Activation::kSwiglu, at::kBFloat16, Bf16Gemms::kBf16, 2e-2},
                        Path{Activation::kSwiglu, at::kBFloat16, Bf16Gemms::kBf16, 2e-2, SwigluKernels::kPortable},
                        Path{Activation::kGelu, at::kBFloat16, Bf16Gemms::kFp32, 2e-2}}) {
    Bf16GemmsScope scope(p.gemms);
    SwigluKernelsScope kscope(p.kernels);
    SCOPED_TRACE(::testing::Message() << "act " << static_cast<int>(p.act) << ", " << p.dtype << ", "
                                      << (p.dtype == at::kBFloat16 ? Name(p.gemms) : "")
                                      << (p.kernels == SwigluKernels::kPortable ? ", portable loops" : ""));
    at::manual_seed(31);
    const int64_t f1 = p.act == Activation::kSwiglu ? 2 * f : f;
    // bf16-representable inputs, so that every path starts from the same numbers.
    auto bf = [](const at::Tensor& t) { return t.to(at::kBFloat16).to(at::kDouble); };
    const at::Tensor x0 = bf(at::randn({N, H})), w10 = bf(at::randn({4, H, f1}) * 0.3),
                     w20 = bf(at::randn({4, f, H}) * 0.3), R = bf(at::randn({N, H}));
    at::Tensor rw0 = at::rand({N}, at::kDouble);
    rw0[5] = 0.0;
    auto leaf = [&](const at::Tensor& t, at::ScalarType dt) { return t.to(dt).clone().requires_grad_(true); };
    at::Tensor x = leaf(x0, p.dtype), w1 = leaf(w10, p.dtype), w2 = leaf(w20, p.dtype), rw = leaf(rw0, at::kFloat);
    const at::Tensor y = GroupedMlp(x, w1, w2, p.act, rows, expert, rw);
    EXPECT_EQ(y.scalar_type(), p.dtype);
    (y.to(at::kDouble) * R).sum().backward();

    at::Tensor xr = leaf(x0, at::kDouble), w1r = leaf(w10, at::kDouble), w2r = leaf(w20, at::kDouble),
               rwr = leaf(rw.detach(), at::kDouble);
    std::vector<at::Tensor> parts;
    int64_t off = 0;
    for (size_t s = 0; s < rows.size(); off += rows[s], ++s) {
      parts.push_back(ReferenceMlp(xr.narrow(0, off, rows[s]), w1r[expert[s]], w2r[expert[s]], p.act));
    }
    ((at::cat(parts) * rwr.unsqueeze(1)) * R).sum().backward();
    EXPECT_LT(MaxRel(y, (at::cat(parts) * rwr.unsqueeze(1)).detach()), p.tol);
    EXPECT_LT(MaxRel(x.grad(), xr.grad()), p.tol);
    EXPECT_LT(MaxRel(w1.grad(), w1r.grad()), p.tol);
    EXPECT_LT(MaxRel(w2.grad(), w2r.grad()), p.tol);
    ASSERT_TRUE(rw.grad().defined());
    EXPECT_EQ(rw.grad().scalar_type(), at::kFloat);
    EXPECT_LT(MaxRel(rw.grad(), rwr.grad()), std::max(p.tol, 1e-6));  // fp32, as the weights
    EXPECT_EQ(y[5].abs().sum().item<double>(), 0.0);  // weight 0: the row contributes nothing
    EXPECT_NE(rw.grad()[5].item<double>(), 0.0);      // but its weight still has a gradient
  }
  const at::Tensor x = at::randn({N, H}), w1 = at::randn({4, H, 2 * f}), w2 = at::randn({4, f, H});
  EXPECT_THROW(GroupedMlp(x, w1, w2, Activation::kSwiglu, rows, expert, at::ones({N - 1})), c10::Error);
}

// With several intra-op threads, experts of at most 1/threads of the rows run side by side,
// one per thread, each product on its thread alone: the same one-thread products, in the same
// order per expert, as a run on one thread, so the results must be identical bit for bit, on
// every path (fused SwiGLU in fp32 and bf16 with either GEMMs and several segments per expert
// that sum into one weight gradient, GELU, row weights), with 2 and 3 threads. Then the
// one-thread run needs no new primitive: the side-by-side run made them all. An expert with
// more than 1/threads of the rows runs alone on all threads first: within rounding.
TEST(GroupedMlpTest, ExpertsSideBySideEqualOneThread) {
  const int threads = at::get_num_threads();
  const int64_t H = 32, f = 24, E = 8;
  // 7 experts with rows, 2 segments each for 0 and 5 (as under EP), one empty segment.
  const std::vector<int64_t> rows = {30, 41, 0, 25, 33, 28, 36, 22, 19, 27}, expert = {0, 1, 2, 3, 0, 4, 5, 6, 7, 5};
  const int64_t N = std::accumulate(rows.begin(), rows.end(), int64_t{0});
  struct Path {
    Activation act;
    at::ScalarType dtype;
    Bf16Gemms gemms;
  };
  for (const Path& p : {Path{Activation::kSwiglu, at::kFloat, Bf16Gemms::kAuto},
                        Path{Activation::kGelu, at::kFloat, Bf16Gemms::kAuto},
                        Path{Activation::kSwiglu, at::kBFloat16, Bf16Gemms::kBf16},
                        Path{Activation::kSwiglu, at::kBFloat16, Bf16Gemms::kFp32}}) {
    for (int n : {2, 3}) {
      for (bool big : {false, true}) {
        Bf16GemmsScope scope(p.gemms);
        SCOPED_TRACE(::testing::Message() << "act " << static_cast<int>(p.act) << ", " << p.dtype << ", "
                                          << Name(p.gemms) << ", " << n << " threads" << (big ? ", a big expert" : ""));
        std::vector<int64_t> r = rows;
        if (big) r[1] = 300;  // expert 1: more than a third of the rows
        const int64_t rows_total = std::accumulate(r.begin(), r.end(), int64_t{0});
        at::manual_seed(41);
        const int64_t f1 = p.act == Activation::kSwiglu ? 2 * f : f;
        const at::Tensor x0 = at::randn({rows_total, H}).to(p.dtype), gy = at::randn({rows_total, H}).to(p.dtype);
        const at::Tensor w10 = (at::randn({E, H, f1}) * 0.3).to(p.dtype), w20 = (at::randn({E, f, H}) * 0.3).to(p.dtype);
        const at::Tensor rw0 = at::rand({rows_total});
        struct Result {
          at::Tensor y, gx, gw1, gw2, grw;
        };
        auto run = [&](int t) {
          at::set_num_threads(t);
          at::Tensor x = x0.clone().requires_grad_(true), w1 = w10.clone().requires_grad_(true),
                     w2 = w20.clone().requires_grad_(true), rw = rw0.clone().requires_grad_(true);
          const at::Tensor y = GroupedMlp(x, w1, w2, p.act, r, expert, rw);
          y.backward(gy);
          at::set_num_threads(threads);
          return Result{y.detach(), x.grad(), w1.grad(), w2.grad(), rw.grad()};
        };
        common::SetMatmulCacheCapacity(4096);  // empty, with fresh counts
        const Result side = run(n);
        const int64_t made = common::GetMatmulCacheStats().misses;
        const Result one = run(1);
        // (bf16 GEMMs on a CPU without bf16 units: LibTorch's, no primitive to count.)
        const bool counted = !(p.dtype == at::kBFloat16 && p.gemms == Bf16Gemms::kBf16 && !common::HasAvx512Bf16());
        if (counted) {
          EXPECT_GT(made, 0);
        }
        if (!big) {
          if (counted) {
            EXPECT_EQ(common::GetMatmulCacheStats().misses, made) << "the side-by-side run did not use one-thread products";
          }
          EXPECT_TRUE(at::equal(side.y, one.y));
          EXPECT_TRUE(at::equal(side.gx, one.gx));
          EXPECT_TRUE(at::equal(side.gw1, one.gw1));
          EXPECT_TRUE(at::equal(side.gw2, one.gw2));
          EXPECT_TRUE(at::equal(side.grw, one.grw));
        } else {
          const double tol = p.dtype == at::kFloat ? 1e-6 : 1e-2;
          if (counted) {
            EXPECT_GT(common::GetMatmulCacheStats().misses, made);  // expert 1 ran on all threads
          }
          EXPECT_LT(MaxRel(side.y, one.y), tol);
          EXPECT_LT(MaxRel(side.gx, one.gx), tol);
          EXPECT_LT(MaxRel(side.gw1, one.gw1), tol);
          EXPECT_LT(MaxRel(side.gw2, one.gw2), tol);
          EXPECT_LT(MaxRel(side.grw, one.grw), tol);
          // The other experts ran side by side: their weight gradients are the one-thread ones.
          for (int64_t e : {0, 3, 4, 5, 6, 7}) {
            EXPECT_TRUE(at::equal(side.gw1[e], one.gw1[e])) << "expert " << e;
            EXPECT_TRUE(at::equal(side.gw2[e], one.gw2[e])) << "expert " << e;
          }
        }
        EXPECT_EQ(side.gw1[2].abs().sum().item<double>(), 0.0);  // only an empty segment
      }
    }
  }
  common::SetMatmulCacheCapacity(2048);
  (void)N;
}

// Side by side, every worker holds scratch of its own; with bf16 storage computing in fp32
// that includes fp32 copies of an expert's weights and weight gradients. For large experts
// (here 2 threads × 2 × 4 B × 3·H·F = 280 MiB for the backward) the workers' scratch would
// pass the budget of 256 MiB: the backward then runs one expert at a time on all threads, so
// a one-thread run has products to create; the forward (half that scratch) still ran side by
// side, so the one-thread run's forward creates none.
TEST(GroupedMlpTest, LargeExpertsRunOneAtATimeWhenScratchWouldBeLarge) {
  Bf16GemmsScope scope(Bf16Gemms::kFp32);
  const int threads = at::get_num_threads();
  const int64_t H = 2048, F = 3000, E = 4;
  const std::vector<int64_t> rows = {3, 4, 5, 6}, expert = {0, 1, 2, 3};
  at::manual_seed(42);
  const at::Tensor x0 = at::randn({18, H}).to(at::kBFloat16);
  const at::Tensor w10 = (at::randn({E, H, 2 * F}) * 0.02).to(at::kBFloat16), w20 = (at::randn({E, F, H}) * 0.02).to(at::kBFloat16);
  auto forward = [&](int t, bool backward) {
    at::set_num_threads(t);
    at::Tensor x = x0.clone().requires_grad_(true), w1 = w10.clone().requires_grad_(true), w2 = w20.clone().requires_grad_(true);
    const at::Tensor y = GroupedMlp(x, w1, w2, Activation::kSwiglu, rows, expert);
    if (backward) y.sum().backward();
    at::set_num_threads(threads);
    return y.detach();
  };
  common::SetMatmulCacheCapacity(4096);
  const at::Tensor y2 = forward(2, true);
  const int64_t made = common::GetMatmulCacheStats().misses;
  EXPECT_TRUE(at::equal(forward(1, false), y2));
  EXPECT_EQ(common::GetMatmulCacheStats().misses, made) << "the forward ran one expert at a time";
  forward(1, true);
  EXPECT_GT(common::GetMatmulCacheStats().misses, made) << "the backward ran side by side";
  common::SetMatmulCacheCapacity(2048);
}

// bf16 storage: every product accumulates in fp32 per segment and h is rounded to bf16 once,
// so the result is the fp32 computation on the bf16 inputs up to bf16 rounding of h, y and the
// gradients; gradients come back in bf16.
TEST(GroupedMlpTest, Bf16StorageFollowsFp32OnTheSameInputs) {
  at::manual_seed(12);
  const std::vector<int64_t> rows = {30, 0, 34}, expert = {1, 0, 1};
  const at::Tensor x0 = at::randn({64, 32}).to(at::kBFloat16), R = at::randn({64, 32}).to(at::kBFloat16);
  const at::Tensor w10 = (at::randn({2, 32, 48}) * 0.2).to(at::kBFloat16), w20 = (at::randn({2, 24, 32}) * 0.2).to(at::kBFloat16);
  auto run = [&](at::ScalarType dt) {
    auto leaf = [dt](const at::Tensor& t) { return t.to(dt).clone().requires_grad_(true); };
    at::Tensor x = leaf(x0), w1 = leaf(w10), w2 = leaf(w20);
    at::Tensor y = GroupedMlp(x, w1, w2, Activation::kSwiglu, rows, expert);
    (y.to(at::kFloat) * R.to(at::kFloat)).sum().backward();
    return std::vector<at::Tensor>{y, x.grad(), w1.grad(), w2.grad()};
  };
  const std::vector<at::Tensor> b = run(at::kBFloat16), f = run(at::kFloat);
  for (size_t i = 0; i < b.size(); ++i) {
    EXPECT_EQ(b[i].scalar_type(), at::kBFloat16) << i;
    EXPECT_LT(MaxRel(b[i], f[i]), 2e-2) << i;
  }
  EXPECT_EQ(b[2][0].abs().sum().item<double>(), 0.0);
}

// The products GroupedMlp computes with (common::MatmulOut, tested against fp64 in
// common/matmul_test), into fresh tensors.
at::Tensor Mm(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  common::MatmulOut(out, a, b);
  return out;
}

// bf16 GroupedMlp (ReLU) against a reference that makes the same GEMM calls on the same
// shapes, segment by segment, computing in `gemms`' dtype with h stored in bf16: the two must
// agree bit for bit. Segments big enough that conversions span several parallel chunks,
// experts with several segments in any order (later ones add to the expert's weight
// gradient), an expert with only an empty segment and one with none.
void ExpectBf16MlpIsPerSegmentGemms(Bf16Gemms gemms, uint64_t seed) {
  Bf16GemmsScope scope(gemms);
  const at::ScalarType ct = gemms == Bf16Gemms::kFp32 ? at::kFloat : at::kBFloat16;
  const int threads = at::get_num_threads();
  at::set_num_threads(2);
  at::manual_seed(seed);
  const int64_t H = 64, F = 80, E = 5;
  const std::vector<int64_t> rows = {300, 0, 170, 411, 1, 260}, expert = {2, 1, 0, 2, 3, 0};
  const int64_t N = std::accumulate(rows.begin(), rows.end(), int64_t{0});
  const at::Tensor x0 = at::randn({N, H}).to(at::kBFloat16), gy = at::randn({N, H}).to(at::kBFloat16);
  const at::Tensor w10 = (at::randn({E, H, F}) * 0.3).to(at::kBFloat16);
  const at::Tensor w20 = (at::randn({E, F, H}) * 0.3).to(at::kBFloat16);
  at::Tensor x = x0.clone().requires_grad_(true), w1 = w10.clone().requires_grad_(true),
             w2 = w20.clone().requires_grad_(true);
  const at::Tensor y = GroupedMlp(x, w1, w2, Activation::kRelu, rows, expert);
  y.backward(gy);

  const at::Tensor xc = x0.to(ct), gyc = gy.to(ct);
  at::Tensor y_want = at::empty({N, H}, at::kBFloat16), gx_want = at::empty({N, H}, at::kBFloat16);
  at::Tensor gw1_want = at::zeros({E, H, F}, at::kBFloat16), gw2_want = at::zeros({E, F, H}, at::kBFloat16);
  std::vector<bool> seen(E, false);
  for (int64_t e = 0; e < E; ++e) {
    const at::Tensor w1e = w10[e].to(ct), w2e = w20[e].to(ct);
    // An expert's weight gradient sums its segments in fp32 (computed in ct) and rounds once;
    // bf16 GEMMs round a lone segment's product themselves.
    int64_t filled = 0;
    for (size_t s = 0; s < rows.size(); ++s) filled += expert[s] == e && rows[s] > 0 ? 1 : 0;
    const at::ScalarType acc = filled > 1 ? at::kFloat : ct;
    at::Tensor gw1 = at::zeros({H, F}, acc), gw2 = at::zeros({F, H}, acc);
    int64_t off = 0;
    for (size_t s = 0; s < rows.size(); off += rows[s], ++s) {
      if (expert[s] != e || rows[s] == 0) continue;
      const at::Tensor xs = xc.narrow(0, off, rows[s]), gys = gyc.narrow(0, off, rows[s]);
      const at::Tensor h = Mm(xs, w1e).to(at::kBFloat16).to(ct);  // h is stored in bf16
      const at::Tensor a = at::relu(h);
      y_want.narrow(0, off, rows[s]).copy_(Mm(a, w2e));
      const at::Tensor gh = at::threshold_backward(Mm(gys, w2e.t()), h, 0);
      gx_want.narrow(0, off, rows[s]).copy_(Mm(gh, w1e.t()));
      common::MatmulOut(gw2, a.t(), gys, /*accumulate=*/seen[e]);
      common::MatmulOut(gw1, xs.t(), gh, /*accumulate=*/seen[e]);
      seen[e] = true;
    }
    gw1_want[e].copy_(gw1), gw2_want[e].copy_(gw2);
  }
  at::set_num_threads(threads);
  EXPECT_EQ(y.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(y, y_want));
  EXPECT_TRUE(at::equal(x.grad(), gx_want));
  EXPECT_TRUE(at::equal(w1.grad(), gw1_want));
  EXPECT_TRUE(at::equal(w2.grad(), gw2_want));
  EXPECT_EQ(w1.grad()[1].abs().sum().item<double>(), 0.0);  // only an empty segment
  EXPECT_EQ(w2.grad()[4].abs().sum().item<double>(), 0.0);  // no segment
  EXPECT_GT(w1.grad()[2].abs().sum().item<double>(), 0.0);
}

// With fp32 GEMMs (CPUs without bf16 units), bf16 storage is exactly fp32 compute on the
// widened operands, with h, y and the gradients rounded once to bf16 (round to nearest even);
// an expert's weight gradient sums its segments in fp32 before its one rounding.
TEST(GroupedMlpTest, Bf16StorageIsExactlyFp32ComputeOnWidenedOperands) {
  ExpectBf16MlpIsPerSegmentGemms(Bf16Gemms::kFp32, 21);
}

// With bf16 GEMMs (CPUs with bf16 units: products accumulate in fp32 inside the GEMM and
// each result is rounded once to bf16), it is exactly one bf16 product per segment, the
// activation on the bf16 values, and an expert's segments summed into an fp32 weight
// gradient (bf16 products into an fp32 out) that is rounded once.
TEST(GroupedMlpTest, Bf16GemmsAreLibTorchBf16MatmulsPerSegment) {
  ExpectBf16MlpIsPerSegmentGemms(Bf16Gemms::kBf16, 22);
}

// Under EP an expert's rows arrive in EP x ETP segments. Its bf16 weight gradient must not
// depend on that: 32 segments of one expert give, element by element, within one bf16 ulp
// of what one segment of the same rows gives (both round an fp32 sum once; rounding after
// every segment was off by up to several ulps). On both GEMM paths.
TEST(GroupedMlpTest, Bf16WeightGradientDoesNotDependOnTheSegments) {
  for (Bf16Gemms gemms : {Bf16Gemms::kBf16, Bf16Gemms::kFp32}) {
    SCOPED_TRACE(Name(gemms));
    Bf16GemmsScope scope(gemms);
    at::manual_seed(31);
    const int64_t N = 512, H = 64, F = 48;
    const at::Tensor x0 = at::randn({N, H}).to(at::kBFloat16), gy = at::randn({N, H}).to(at::kBFloat16);
    const at::Tensor w10 = (at::randn({1, H, 2 * F}) * 0.3).to(at::kBFloat16);
    const at::Tensor w20 = (at::randn({1, F, H}) * 0.3).to(at::kBFloat16);
    auto grads = [&](const std::vector<int64_t>& rows) {
      at::Tensor w1 = w10.clone().requires_grad_(true), w2 = w20.clone().requires_grad_(true);
      GroupedMlp(x0, w1, w2, Activation::kSwiglu, rows, std::vector<int64_t>(rows.size(), 0)).backward(gy);
      return std::pair<at::Tensor, at::Tensor>{w1.grad().to(at::kDouble), w2.grad().to(at::kDouble)};
    };
    const auto [one1, one2] = grads({N});
    const auto [many1, many2] = grads(std::vector<int64_t>(32, N / 32));
    // One ulp of a bf16 value v is 2^(floor(log2 |v|) - 7).
    auto ulps = [](const at::Tensor& got, const at::Tensor& want) {
      const at::Tensor ulp = at::pow(2.0, at::floor(at::log2(want.abs().clamp_min(1e-30))) - 7);
      return ((got - want).abs() / ulp).max().item<double>();
    };
    EXPECT_LE(ulps(many1, one1), 1.0);
    EXPECT_LE(ulps(many2, one2), 1.0);
  }
}

TEST(GroupedExpertsTest, EveryActivationMatchesPerExpertMlp) {
  for (Activation a : {Activation::kGelu, Activation::kRelu, Activation::kSwiglu}) {
    ExpertsConfig c{.hidden_size = 8, .ffn_hidden_size = 12, .num_experts = 4, .activation = a};
    auto ex = GroupedExperts::Create(c, 42);
    ASSERT_TRUE(ex.ok()) << ex.status();
    const std::vector<int64_t> counts = {5, 0, 2, 6};
    at::manual_seed(3);
    const at::Tensor x0 = at::randn({13, 8}), R = at::randn({13, 8});
    at::Tensor x = x0.clone().requires_grad_(true);
    auto y = ex->Forward(x, counts);
    ASSERT_TRUE(y.ok()) << y.status();
    (*y * R).sum().backward();

    at::Tensor xr = x0.clone().requires_grad_(true);
    int64_t off = 0;
    for (int e = 0; e < 4; ++e) {
      auto [w1, w2] = GroupedExperts::FullExpertWeights(c, 42, e);
      w1.requires_grad_(true);
      w2.requires_grad_(true);
      const at::Tensor yr = ReferenceMlp(xr.narrow(0, off, counts[e]), w1, w2, a);
      EXPECT_LT(MaxRel(y->narrow(0, off, counts[e]), yr), 1e-6) << e;
      (yr * R.narrow(0, off, counts[e])).sum().backward();
      if (counts[e] > 0) {
        EXPECT_LT(MaxRel(ex->fc1().grad()[e], w1.grad()), 1e-5) << e;
        EXPECT_LT(MaxRel(ex->fc2().grad()[e], w2.grad()), 1e-5) << e;
      } else {
        EXPECT_EQ(ex->fc1().grad()[e].abs().sum().item<double>(), 0.0);
      }
      off += counts[e];
    }
    EXPECT_LT(MaxRel(x.grad(), xr.grad()), 1e-6);
  }
}

// ETP shards sum to the full expert, and EP ranks hold the right experts: the same model
// under every (EP, ETP) split of the same seed.
TEST(GroupedExpertsTest, ShardsAcrossEpAndEtpRebuildTheSameModel) {
  const ExpertsConfig full{.hidden_size = 8, .ffn_hidden_size = 12, .num_experts = 4};
  auto ref = GroupedExperts::Create(full, 9);
  ASSERT_TRUE(ref.ok());
  at::manual_seed(4);
  const std::vector<int64_t> counts = {3, 4, 0, 2};
  const at::Tensor x = at::randn({9, 8}), R = at::randn({9, 8});
  auto yref = ref->Forward(x, counts);
  ASSERT_TRUE(yref.ok());
  (*yref * R).sum().backward();
  for (int ep : {1, 2, 4}) {
    for (int etp : {1, 2, 3}) {
      at::Tensor y = at::zeros({9, 8});
      const int local = 4 / ep;
      for (int er = 0; er < ep; ++er) {
        const int64_t begin = std::accumulate(counts.begin(), counts.begin() + er * local, int64_t{0});
        const std::vector<int64_t> mine(counts.begin() + er * local, counts.begin() + (er + 1) * local);
        const int64_t n = std::accumulate(mine.begin(), mine.end(), int64_t{0});
        for (int tr = 0; tr < etp; ++tr) {
          ExpertsConfig c = full;
          c.ep_size = ep, c.ep_rank = er, c.etp_size = etp, c.etp_rank = tr;
          auto ex = GroupedExperts::Create(c, 9);
          ASSERT_TRUE(ex.ok()) << ex.status();
          auto part = ex->Forward(x.narrow(0, begin, n), mine);
          ASSERT_TRUE(part.ok());
          y.narrow(0, begin, n).add_(*part);
          (*part * R.narrow(0, begin, n)).sum().backward();
          // This shard's gradient is its slice of the full expert's gradient.
          const int64_t fl = 12 / etp;
          for (int i = 0; i < local; ++i) {
            const at::Tensor g1 = ref->fc1().grad()[er * local + i];
            const at::Tensor want1 = at::cat({g1.narrow(1, tr * fl, fl), g1.narrow(1, 12 + tr * fl, fl)}, 1);
            EXPECT_LT((ex->fc1().grad()[i] - want1).abs().max().item<double>(), 1e-6);
            const at::Tensor want2 = ref->fc2().grad()[er * local + i].narrow(0, tr * fl, fl);
            EXPECT_LT((ex->fc2().grad()[i] - want2).abs().max().item<double>(), 1e-6);
          }
        }
      }
      EXPECT_LT(MaxRel(y, *yref), 1e-6) << "ep=" << ep << " etp=" << etp;
    }
  }
}

TEST(GroupedExpertsTest, Bf16FollowsFp32) {
  ExpertsConfig c{.hidden_size = 16, .ffn_hidden_size = 32, .num_experts = 2, .dtype = at::kBFloat16};
  auto bf = GroupedExperts::Create(c, 5);
  c.dtype = at::kFloat;
  auto fp = GroupedExperts::Create(c, 5);
  ASSERT_TRUE(bf.ok() && fp.ok());
  at::manual_seed(6);  // LibTorch seeds its default generator differently in every process
  const at::Tensor x = at::randn({10, 16});
  auto yb = bf->Forward(x, {4, 6});
  auto yf = fp->Forward(x, {4, 6});
  ASSERT_TRUE(yb.ok() && yf.ok());
  EXPECT_EQ(yb->scalar_type(), at::kBFloat16);
  EXPECT_LT(MaxRel(*yb, *yf), 3e-2);
}

// bf16 and fp16 storage: products accumulate in fp32 (whatever the CPU) and round once.
TEST(GroupedMatmulTest, LowPrecisionStorageAccumulatesInFp32) {
  for (at::ScalarType dt : {at::kBFloat16, at::kHalf}) {
    at::manual_seed(8);
    const std::vector<int64_t> counts = {40, 0, 24};
    at::Tensor x = at::randn({64, 256}).to(dt).requires_grad_(true);
    at::Tensor w = at::randn({3, 256, 32}).to(dt).requires_grad_(true);
    const at::Tensor y = GroupedMatmul(x, w, counts);
    EXPECT_EQ(y.scalar_type(), dt);
    const at::Tensor want = at::cat({at::mm(x.detach().narrow(0, 0, 40).to(at::kFloat), w.detach()[0].to(at::kFloat)),
                                     at::mm(x.detach().narrow(0, 40, 24).to(at::kFloat), w.detach()[2].to(at::kFloat))});
    // One rounding of an fp32 result: within half an ulp of the storage type (2^-8 for bf16).
    EXPECT_LT(((y.to(at::kFloat) - want).abs() / (want.abs() + 1e-3)).max().item<float>(), dt == at::kHalf ? 1e-3 : 8e-3);
    y.sum().backward();
    EXPECT_EQ(x.grad().scalar_type(), dt);
    EXPECT_EQ(w.grad().scalar_type(), dt);
    EXPECT_EQ(w.grad()[1].abs().sum().item<float>(), 0.0f);
  }
}

// SwiGLU runs through fused kernels with their own exponential (fp32 and bf16 storage): over
// the whole float range, against ATen's silu and its autograd, element by element. With
// identity weights h is x itself, so the test chooses the pre-activations: gates and ups from
// −120 to 120 (the exponential under- and overflows beyond ±88), ±inf, NaN.
TEST(GroupedMlpTest, FusedSwigluMatchesAtenOverTheWholeRange) {
  at::manual_seed(23);
  const int64_t f = 37, n = 64;  // F not a multiple of the vector width
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  at::Tensor h = at::linspace(-120, 120, n * 2 * f).reshape({n, 2 * f});
  h = h.index_select(1, at::randperm(2 * f));  // gates and ups of every size in every row
  const std::vector<std::pair<int64_t, float>> special = {{0, inf}, {1, -inf}, {2, nan}, {3, 88.5f},
                                                          {4, -88.5f}, {5, 87.2f}, {6, -87.2f}, {7, 0.0f}};
  for (auto [r, v] : special) h[r][r] = v, h[r][f + r + 1] = v;
  // bf16 storage both ways: fp32 GEMMs (h rounded into storage by the forward kernel) and
  // bf16 GEMMs (h, a, ga and gh all bf16, the kernels computing in fp32 between them).
  // fp32, and bf16 with bf16 GEMMs: both the AVX-512 kernels (where the CPU has AVX512-BF16)
  // and the portable ones.
  const std::vector<std::tuple<at::ScalarType, Bf16Gemms, SwigluKernels>> cases = {
      {at::kFloat, Bf16Gemms::kAuto, SwigluKernels::kAuto},
      {at::kFloat, Bf16Gemms::kAuto, SwigluKernels::kPortable},
      {at::kBFloat16, Bf16Gemms::kFp32, SwigluKernels::kAuto},
      {at::kBFloat16, Bf16Gemms::kBf16, SwigluKernels::kAuto},
      {at::kBFloat16, Bf16Gemms::kBf16, SwigluKernels::kPortable}};
  for (auto [dt, gemms, kernels] : cases) {
    Bf16GemmsScope scope(gemms);
    SwigluKernelsScope kscope(kernels);
    SCOPED_TRACE(::testing::Message() << (dt == at::kFloat ? "fp32" : Name(gemms))
                                      << (kernels == SwigluKernels::kPortable ? ", portable loops" : ""));
    const at::Tensor w1 = at::eye(2 * f).unsqueeze(0).to(dt), w2 = at::eye(f, 2 * f).unsqueeze(0).to(dt);
    const at::Tensor R = at::randn({n, 2 * f}).to(dt);
    at::Tensor x = h.clone().to(dt).requires_grad_(true);
    const at::Tensor y = GroupedMlp(x, w1, w2, Activation::kSwiglu, {n}, {0});
    (y * R).sum().backward();
    // Reference: ATen's ops in fp32 on the same storage-rounded values. (An inf or NaN in h
    // spreads over its row through the identity GEMMs, in both.)
    at::Tensor xr = h.clone().to(dt).to(at::kFloat).requires_grad_(true);
    const at::Tensor hr = at::mm(xr, w1[0].to(at::kFloat));
    const at::Tensor ar = at::silu(hr.narrow(1, 0, f)) * hr.narrow(1, f, f);
    const at::Tensor yr = at::mm(ar, w2[0].to(at::kFloat));
    (yr * R.to(at::kFloat)).sum().backward();
    // fp32: ATen's silu is within 1 ulp; ours measured 2e-7 (y) and 6e-7 (gradient) here, and
    // an error of 1e-5 in one coefficient of our exponential's polynomial gives 1.7e-6.
    // bf16: y and x.grad are rounded once with fp32 GEMMs; with bf16 GEMMs a and gh are
    // rounded too, which the identity GEMMs then pass on exactly: still one rounding each.
    const double rel = dt == at::kFloat ? 1e-6 : 8e-3;
    // d_gate = ga·up·s·(1 + gate·(1 − s)) has a zero near gate = −1.28, where both sides lose
    // the leading digits of 1 + gate·(1 − s) (seen: 1.7e-6 relative to a value 1e-5 of its
    // terms): its tolerance is relative to |ga·up·s|·(1 + |gate|·(1 − s)), the size of those terms.
    const at::Tensor hd = hr.detach().to(at::kDouble), gate = hd.narrow(1, 0, f), up = hd.narrow(1, f, f);
    const at::Tensor s = at::sigmoid(gate), ga = R.narrow(1, 0, f).to(at::kDouble);
    const at::Tensor terms = (ga * up * s).abs() * (1 + gate.abs() * (1 - s));
    auto check = [&](const at::Tensor& got, const at::Tensor& want, const at::Tensor& scale, const char* what) {
      const at::Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
      EXPECT_TRUE(at::equal(g.isnan(), w.isnan())) << what << " " << dt;
      EXPECT_TRUE(at::equal(g.isinf(), w.isinf())) << what << " " << dt;
      const at::Tensor err = at::where(w.isfinite(), (g - w).abs() - rel * (w.abs() + scale), at::zeros_like(w));
      EXPECT_LE(err.max().item<double>(), 1e-30) << what << " " << dt;
      EXPECT_GT(w.isfinite().sum().item<int64_t>(), w.numel() / 2) << what;  // most rows are checked
    };
    check(y, yr, at::zeros_like(hd), "y");
    check(x.grad(), xr.grad(), at::cat({terms, at::zeros_like(terms)}, 1), "d act / dh");
  }
}

TEST(GroupedExpertsTest, BadConfigAndInputsAreClearErrors) {
  auto e1 = GroupedExperts::Create({.hidden_size = 8, .ffn_hidden_size = 12, .num_experts = 6, .ep_size = 4}, 1);
  ASSERT_FALSE(e1.ok());
  EXPECT_THAT(std::string(e1.status().message()), HasSubstr("ep_size = 4 must divide num_experts = 6"));
  auto e2 = GroupedExperts::Create({.hidden_size = 8, .ffn_hidden_size = 12, .num_experts = 4, .etp_size = 5}, 1);
  ASSERT_FALSE(e2.ok());
  EXPECT_THAT(std::string(e2.status().message()), HasSubstr("etp_size = 5 must divide ffn_hidden_size = 12"));
  auto ok = GroupedExperts::Create({.hidden_size = 8, .ffn_hidden_size = 12, .num_experts = 2}, 1);
  ASSERT_TRUE(ok.ok());
  EXPECT_FALSE(ok->Forward(at::randn({4, 7}), {2, 2}).ok());
  EXPECT_FALSE(ok->Forward(at::randn({4, 8}), {4}).ok());
  auto bad_sum = ok->Forward(at::randn({4, 8}), {1, 2});
  ASSERT_FALSE(bad_sum.ok());
  EXPECT_THAT(std::string(bad_sum.status().message()), HasSubstr("sum to 3 but x has 4 rows"));
  // Tensors on another device (meta here; CUDA on a GPU machine) are refused, not read.
  const at::TensorOptions meta = at::TensorOptions().device(at::kMeta);
  EXPECT_THROW(GroupedMlp(at::empty({4, 8}, meta), at::empty({2, 8, 24}, meta), at::empty({2, 12, 8}, meta),
                          Activation::kSwiglu, {2, 2}),
               c10::Error);
}

}  // namespace
}  // namespace switchyard::experts
