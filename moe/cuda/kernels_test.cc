// The CUDA kernels against plain C++ references (and, for top-k, Megatron-Core's numbers in
// moe/gate/testdata/megatron_router.txt, which the CPU router is checked against too).
// Needs a GPU: tagged "gpu", built with --config=cuda. kernels_emu_test runs the same file on
// the CPU emulator (third_party/cuda_emu).
#include "moe/cuda/kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <cuda_bf16.h>

#include "gtest/gtest.h"
#include "moe/cuda/device_environment.h"

namespace switchyard::cuda {
namespace {

// Evaluates x once (a launch or a GEMM) and names the error.
#define CHECK_CUDA(x)                                          \
  do {                                                         \
    const cudaError_t check_cuda_error = (x);                  \
    ASSERT_EQ(check_cuda_error, cudaSuccess) << cudaGetErrorString(check_cuda_error); \
  } while (0)

// A device copy of a host vector. A failed cudaMalloc or cudaMemcpy is left in
// cudaGetLastError(), which every test checks after making its copies.
template <typename T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(const std::vector<T>& h) : n(h.size()) {
    cudaMalloc(&p, std::max<size_t>(1, n) * sizeof(T));
    if (n) cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice);
  }
  explicit Dev(size_t count) : n(count) { cudaMalloc(&p, std::max<size_t>(1, n) * sizeof(T)); }
  ~Dev() { cudaFree(p); }
  std::vector<T> Host() const {
    std::vector<T> h(n);
    if (n) {
      const cudaError_t err = cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
      if (err != cudaSuccess) ADD_FAILURE() << "copy to the host: " << cudaGetErrorString(err);
    }
    return h;
  }
};

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (float& x : v) x = d(g);
  return v;
}

// A plan like moe/dispatch's MakePlan for a random top-k map, with `slots` empty rows.
struct Plan {
  std::vector<int64_t> row_token, offsets, token_rows;
};
Plan MakePlan(int64_t T, int E, int k, uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<std::vector<int64_t>> by_expert(E);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int> e(E);
    for (int i = 0; i < E; ++i) e[i] = i;
    std::shuffle(e.begin(), e.end(), g);
    std::sort(e.begin(), e.begin() + k);
    for (int j = 0; j < k; ++j) by_expert[e[j]].push_back(t);
  }
  Plan p;
  std::vector<std::vector<int64_t>> rows_of(T);
  for (int e = 0; e < E; ++e) {
    for (int64_t t : by_expert[e]) {
      rows_of[t].push_back(p.row_token.size());
      p.row_token.push_back(t);
    }
    p.row_token.push_back(-1);  // an empty capacity slot after every block
  }
  p.offsets.push_back(0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t r : rows_of[t]) p.token_rows.push_back(r);
    p.offsets.push_back(p.token_rows.size());
  }
  return p;
}

float RoundBf16(float v) { return __bfloat162float(__float2bfloat16(v)); }

// The data-movement kernels in fp32 and bf16, for rows of whole 16-byte words (H = 72) and of
// odd bytes (H = 13, the byte loop), with an empty slot after every expert's block: the
// permutation bit for bit, the weighted and the plain (w = nullptr) sums and the backward
// against double-precision sums of the same (rounded) values.
void ExpectPermuteSumAndBackwardMatchCpu(int64_t T, int E, int k, const std::vector<int64_t>& hidden) {
  const Plan plan = MakePlan(T, E, k, 1);
  const int64_t N = plan.row_token.size();
  for (DType dt : {DType::kFloat32, DType::kBFloat16}) {
    for (int64_t H : hidden) {
      const bool bf16 = dt == DType::kBFloat16;
      SCOPED_TRACE(::testing::Message() << (bf16 ? "bf16" : "fp32") << " H = " << H);
      std::vector<float> x = Random(T * H, 2), g = Random(T * H, 4);
      const std::vector<float> w = Random(N, 3);
      if (bf16) {
        for (float& v : x) v = RoundBf16(v);
        for (float& v : g) v = RoundBf16(v);
      }
      // Element i of a device row tensor in fp32 (bf16 tensors hold the rounded values).
      std::vector<std::vector<float>> host;  // rows, sum, plain sum, grad rows
      Dev<float> dw(w), dgrad_w(N);
      Dev<int64_t> dtok(plan.row_token), doff(plan.offsets), dtr(plan.token_rows);
      auto run = [&](auto zero) {
        using T_ = decltype(zero);
        auto to = [](const std::vector<float>& v) {
          std::vector<T_> o(v.size());
          for (size_t i = 0; i < v.size(); ++i) o[i] = static_cast<T_>(v[i]);
          return o;
        };
        Dev<T_> dx(to(x)), dg(to(g)), drows(N * H), dsum(T * H), dplain(T * H), dgrad_rows(N * H);
        CHECK_CUDA(cudaGetLastError());
        CHECK_CUDA(PermuteRows(dx.p, drows.p, dtok.p, N, H, dt, nullptr));
        CHECK_CUDA(SumRows(drows.p, dw.p, doff.p, dtr.p, dsum.p, T, H, dt, nullptr));
        CHECK_CUDA(SumRows(drows.p, nullptr, doff.p, dtr.p, dplain.p, T, H, dt, nullptr));
        CHECK_CUDA(WeightedSumBackward(dg.p, drows.p, dw.p, dtok.p, dgrad_rows.p, dgrad_w.p, N, H, dt, nullptr));
        CHECK_CUDA(cudaDeviceSynchronize());
        for (const Dev<T_>* d : {&drows, &dsum, &dplain, &dgrad_rows}) {
          const std::vector<T_> h = d->Host();
          host.emplace_back(h.size());
          for (size_t i = 0; i < h.size(); ++i) host.back()[i] = static_cast<float>(h[i]);
        }
      };
      if (bf16) {
        run(__nv_bfloat16());
      } else {
        run(0.f);
      }
      if (::testing::Test::HasFatalFailure()) return;
      const std::vector<float>&rows = host[0], &sum = host[1], &plain = host[2], &grows = host[3];
      const std::vector<float> gw = dgrad_w.Host();
      // Results stored in bf16 are rounded once: within 2^-8 relative, plus a little absolute.
      const double rel = bf16 ? 8e-3 : 1e-5;
      int64_t bad = 0;
      for (int64_t r = 0; r < N; ++r) {
        const int64_t t = plan.row_token[r];
        double dot = 0;
        for (int64_t c = 0; c < H; ++c) {
          if (rows[r * H + c] != (t < 0 ? 0.f : x[t * H + c])) ++bad;
          const double want = t < 0 ? 0.0 : double(w[r]) * g[t * H + c];
          if (std::abs(grows[r * H + c] - want) > 1e-6 + rel * std::abs(want)) ++bad;
          if (t >= 0) dot += double(g[t * H + c]) * x[t * H + c];
        }
        if (std::abs(gw[r] - dot) > 1e-4 * (1 + std::abs(dot))) ++bad;
      }
      EXPECT_EQ(bad, 0) << "permuted rows, row gradients or weight gradients";
      bad = 0;
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t c = 0; c < H; ++c) {
          double want = 0, want_plain = 0;
          for (int64_t j = plan.offsets[t]; j < plan.offsets[t + 1]; ++j) {
            want += double(w[plan.token_rows[j]]) * x[t * H + c];
            want_plain += x[t * H + c];
          }
          if (std::abs(sum[t * H + c] - want) > 1e-5 * (1 + std::abs(want)) + rel * std::abs(want)) ++bad;
          if (std::abs(plain[t * H + c] - want_plain) > 1e-5 * (1 + std::abs(want_plain)) + rel * std::abs(want_plain)) ++bad;
        }
      }
      EXPECT_EQ(bad, 0) << "weighted or plain sums";
    }
  }
}

TEST(CudaKernelsTest, PermuteSumAndBackwardMatchCpu) { ExpectPermuteSumAndBackwardMatchCpu(301, 8, 2, {72, 13}); }

// More rows than the grids have blocks (65535 × 8), so that each block of WeightedSumBackward
// handles several rows, the case its second barrier is for (and SumRows' blocks loop too).
// The emulated build (kernels_emu_test) caps grids at 7 blocks instead, and runs a smaller
// case: the loops are the same, and 600000 rows are hours of fibers.
TEST(CudaKernelsTest, GridStrideLoopsOverLargeInputs) {
#ifdef SY_CUDA_EMULATED_TEST
  const int64_t T = 1500;
#else
  const int64_t T = 300000;
#endif
  ExpectPermuteSumAndBackwardMatchCpu(T, 4, 2, {72});  // rows across 3 warps, whose sums the barriers order
}

// Both paths (the grouped call and the loop) in fp32 and bf16, with an expert of no rows. The
// bf16 reference multiplies the bf16-rounded inputs (as the GPU does) in double: its output is
// rounded once to bf16 (2^-8 relative). fp32 runs without TF32 (cuBLAS's default math mode).
TEST(CudaKernelsTest, GroupedGemmMatchesCpuInFp32AndBf16) {
  const int E = 5;
  const int64_t in = 64, out = 48;
  const std::vector<int64_t> counts = {17, 0, 33, 1, 9};
  const int64_t N = 60;
  const std::vector<float> x = Random(N * in, 5), w = Random(E * in * out, 6);
  std::vector<float> xr(x.size()), wr(w.size());
  for (size_t i = 0; i < x.size(); ++i) xr[i] = RoundBf16(x[i]);
  for (size_t i = 0; i < w.size(); ++i) wr[i] = RoundBf16(w[i]);
  auto product = [&](const std::vector<float>& a, const std::vector<float>& b) {
    std::vector<double> p(N * out, 0);
    int64_t off = 0;
    for (int e = 0; e < E; ++e) {
      for (int64_t r = off; r < off + counts[e]; ++r)
        for (int64_t o = 0; o < out; ++o)
          for (int64_t i = 0; i < in; ++i) p[r * out + o] += double(a[r * in + i]) * b[(e * in + i) * out + o];
      off += counts[e];
    }
    return p;
  };
  const std::vector<double> want = product(x, w), want_bf16 = product(xr, wr);
  cublasHandle_t h;
  ASSERT_EQ(cublasCreate(&h), CUBLAS_STATUS_SUCCESS);
  // No reduced-precision split-K reductions: the bf16 tolerance assumes one rounding.
  ASSERT_EQ(cublasSetMathMode(h, static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH |
                                                            CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)),
            CUBLAS_STATUS_SUCCESS);
  for (bool grouped : {false, true}) {
    SCOPED_TRACE(grouped ? "grouped" : "loop");
    Dev<float> dx(x), dw(w), dy(N * out);
    std::vector<__nv_bfloat16> xb(x.size()), wb(w.size());
    for (size_t i = 0; i < x.size(); ++i) xb[i] = __float2bfloat16(x[i]);
    for (size_t i = 0; i < w.size(); ++i) wb[i] = __float2bfloat16(w[i]);
    Dev<__nv_bfloat16> bx(xb), bw(wb), by(N * out);
    CHECK_CUDA(cudaGetLastError());
    CHECK_CUDA(GroupedGemm(h, dx.p, dw.p, dy.p, counts.data(), E, in, out, DType::kFloat32, grouped, nullptr));
    CHECK_CUDA(GroupedGemm(h, bx.p, bw.p, by.p, counts.data(), E, in, out, DType::kBFloat16, grouped, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    const std::vector<float> y = dy.Host();
    const std::vector<__nv_bfloat16> yb = by.Host();
    int64_t bad = 0, bad_bf16 = 0;
    for (int64_t i = 0; i < N * out; ++i) {
      if (std::abs(y[i] - want[i]) > 1e-4 * (1 + std::abs(want[i]))) ++bad;
      if (std::abs(__bfloat162float(yb[i]) - want_bf16[i]) > 1e-3 + 8e-3 * std::abs(want_bf16[i])) ++bad_bf16;
    }
    EXPECT_EQ(bad, 0) << "fp32 entries off";
    EXPECT_EQ(bad_bf16, 0) << "bf16 entries off";
  }
  cublasDestroy(h);
}

// The branches the shapes above do not reach: a misaligned base pointer (the byte path for
// rows of whole words), WeightedSumBackward without weights, SumRows for a token of no rows
// and from a misaligned base, GroupedGemm with an empty inner dimension and with no rows, and
// top-k over rows with NaN or nothing finite.
TEST(CudaKernelsTest, EdgeCases) {
  const int64_t T = 5, H = 8, N = 6;
  const std::vector<int64_t> tok = {3, -1, 0, 4, 4, 1};
  const std::vector<float> x = Random(T * H + 1, 11), g = Random(T * H, 12);
  Dev<float> dx(x), dg(g), drows(N * H + 1), dgrad(N * H), dgw(N);
  Dev<int64_t> dtok(tok);
  CHECK_CUDA(cudaGetLastError());
  // x and the rows one float (4 bytes) past their allocations' 256-byte alignment.
  CHECK_CUDA(PermuteRows(dx.p + 1, drows.p + 1, dtok.p, N, H, DType::kFloat32, nullptr));
  CHECK_CUDA(WeightedSumBackward(dg.p, drows.p + 1, nullptr, dtok.p, dgrad.p, dgw.p, N, H, DType::kFloat32, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<float> rows = drows.Host(), grad = dgrad.Host();
  for (int64_t r = 0; r < N; ++r) {
    for (int64_t c = 0; c < H; ++c) {
      EXPECT_EQ(rows[1 + r * H + c], tok[r] < 0 ? 0.f : x[1 + tok[r] * H + c]) << r << " " << c;
      EXPECT_EQ(grad[r * H + c], tok[r] < 0 ? 0.f : g[tok[r] * H + c]) << r << " " << c;
    }
  }

  // SumRows with a token of no rows (a zero row out), in 16-byte words (aligned) and by
  // elements (one float past the alignment).
  {
    const std::vector<int64_t> offsets = {0, 2, 2, 3}, token_rows = {0, 2, 1};
    const std::vector<float> in = Random(3 * H + 1, 13);
    Dev<float> din(in), dout(3 * H + 1);
    Dev<int64_t> doff(offsets), dtr(token_rows);
    CHECK_CUDA(cudaGetLastError());
    for (int shift : {0, 1}) {
      CHECK_CUDA(SumRows(din.p + shift, nullptr, doff.p, dtr.p, dout.p + shift, 3, H, DType::kFloat32, nullptr));
      CHECK_CUDA(cudaDeviceSynchronize());
      const std::vector<float> out = dout.Host();
      for (int64_t c = 0; c < H; ++c) {
        const float* x = in.data() + shift;
        EXPECT_FLOAT_EQ(out[shift + c], x[c] + x[2 * H + c]) << shift << " " << c;
        EXPECT_EQ(out[shift + H + c], 0.f) << shift << " " << c;
        EXPECT_EQ(out[shift + 2 * H + c], x[H + c]) << shift << " " << c;
      }
    }
  }

  cublasHandle_t h;
  ASSERT_EQ(cublasCreate(&h), CUBLAS_STATUS_SUCCESS);
  const std::vector<int64_t> counts = {2, 0, 3}, none = {0, 0, 0};
  Dev<float> dy(std::vector<float>(5 * 4, 7.f)), dw(3 * 4);
  CHECK_CUDA(cudaGetLastError());
  for (bool grouped : {false, true}) {
    // n_in = 0: every output is an empty sum, 0.
    CHECK_CUDA(GroupedGemm(h, dx.p, dw.p, dy.p, counts.data(), 3, 0, 4, DType::kFloat32, grouped, nullptr));
    // No rows at all: nothing to do, nothing written.
    CHECK_CUDA(GroupedGemm(h, dx.p, dw.p, dy.p, none.data(), 3, 4, 4, DType::kFloat32, grouped, nullptr));
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  for (float v : dy.Host()) EXPECT_EQ(v, 0.f);
  cublasDestroy(h);

  // Row 0: a NaN (counts as -inf), row 1: all -inf, row 2: a +inf (NaN scores after the
  // pre-softmax; -inf then). Every chosen index must be an expert; row 0 never picks expert 2.
  const int E = 4, k = 2;
  const float inf = INFINITY;
  const std::vector<float> logits = {0.5f, 0.1f, NAN, 0.3f, -inf, -inf, -inf, -inf, 0.2f, inf, 0.1f, 0.0f};
  for (bool pre : {false, true}) {
    Dev<float> dl(logits), dwt(3 * k);
    Dev<int64_t> di(3 * k), dc(std::vector<int64_t>(E, 0));
    CHECK_CUDA(cudaGetLastError());
    CHECK_CUDA(TopKRoute(dl.p, 3, E, k, false, pre, false, 1.f, di.p, dwt.p, dc.p, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    const std::vector<int64_t> idx = di.Host(), c = dc.Host();
    for (int64_t i : idx) EXPECT_TRUE(i >= 0 && i < E) << i;
    EXPECT_EQ(idx[0], 0) << pre;
    EXPECT_EQ(idx[1], 3) << pre;
    int64_t total = 0;
    for (int64_t n : c) total += n;
    EXPECT_EQ(total, 3 * k);
  }
}

// Megatron-Core's routing cases without groups or bias, as router_test reads them.
struct Case {
  std::map<std::string, std::string> options;
  std::map<std::string, std::pair<std::vector<int64_t>, std::vector<double>>> tensors;
};
std::map<std::string, Case> LoadMegatron() {
  std::ifstream in("moe/gate/testdata/megatron_router.txt");
  std::map<std::string, Case> cases;
  std::string line, current;
  while (std::getline(in, line)) {
    std::istringstream s(line);
    std::string word;
    s >> word;
    if (word == "case") {
      s >> current;
    } else if (word == "option") {
      std::string k, v;
      s >> k >> v;
      cases[current].options[k] = v;
    } else if (word == "tensor") {
      std::string name, shape, colon;
      s >> name >> shape >> colon;
      std::vector<int64_t> dims;
      std::istringstream ds(shape);
      for (std::string d; std::getline(ds, d, ',');) {
        if (d != "scalar") dims.push_back(std::stoll(d));
      }
      std::vector<double> v;
      for (double x; s >> x;) v.push_back(x);
      cases[current].tensors[name] = {dims, v};
    }
  }
  return cases;
}

TEST(CudaKernelsTest, TopKRouteMatchesMegatronFixtures) {
  const std::map<std::string, Case> cases = LoadMegatron();
  ASSERT_FALSE(cases.empty()) << "fixture file missing";
  int checked = 0;
  for (const auto& [name, c] : cases) {
    if (c.options.count("kind") == 0 || c.options.at("kind") != "routing" || c.options.count("num_groups") ||
        c.tensors.count("expert_bias")) {
      continue;
    }
    const auto& [dims, logits_d] = c.tensors.at("logits");
    const int64_t T = dims[0];
    const int E = static_cast<int>(dims[1]);
    const int k = std::stoi(c.options.at("topk"));
    const bool sigmoid = c.options.count("score_function") && c.options.at("score_function") == "sigmoid";
    const bool pre = c.options.count("use_pre_softmax") && c.options.at("use_pre_softmax") == "True";
    const float scaling = c.options.count("scaling_factor") ? std::stof(c.options.at("scaling_factor")) : 1.f;
    std::vector<float> logits(logits_d.begin(), logits_d.end());
    Dev<float> dl(logits), dw(T * k);
    Dev<int64_t> di(T * k), dc(std::vector<int64_t>(E, 0));
    CHECK_CUDA(cudaGetLastError());
    CHECK_CUDA(TopKRoute(dl.p, T, E, k, sigmoid, pre, /*normalize=*/sigmoid && k > 1, scaling, di.p, dw.p, dc.p, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    const std::vector<int64_t> idx = di.Host(), counts = dc.Host();
    const std::vector<float> w = dw.Host();
    const std::vector<double>& probs = c.tensors.at("probs").second;
    std::vector<int64_t> want_counts(E, 0);
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> got(E, 0);
      for (int j = 0; j < k; ++j) {
        ASSERT_TRUE(idx[t * k + j] >= 0 && idx[t * k + j] < E) << name << " token " << t << ": " << idx[t * k + j];
        got[idx[t * k + j]] = w[t * k + j];
      }
      for (int e = 0; e < E; ++e) {
        const double want = probs[t * E + e];
        if (want != 0) ++want_counts[e];
        ASSERT_NEAR(got[e], want, 1e-6 * std::max(1.0, std::abs(want))) << name << " token " << t << " expert " << e;
      }
    }
    EXPECT_EQ(counts, want_counts) << name;
    ++checked;
  }
  EXPECT_GE(checked, 6);
}

// More experts than a warp has lanes (the fixtures above have E ≤ 16): each lane holds
// several experts, and the taken bits, the expert of lane + 32·i and the per-lane partial sums
// all come into play. Logits on a grid of 1/64 in [-6, 6], so rows have exact ties (lower
// expert first) and distinct logits stay far apart in every score. Against a reference in
// double; tolerance 5e-6 relative: __expf is within 2 + floor(1.173·|x|) ulp (CUDA's
// programming guide; ≤ 16 ulp, 1.9e-6, for the arguments here, logit − max ≥ −12), and a
// softmax sum over up to 1024 experts rounds up to 37 times in fp32 (32 per lane, then 5 across
// the warp): 2.2e-6 more; with the numerator, the division and the scaling, at worst ~4.5e-6.
TEST(CudaKernelsTest, TopKRouteManyExpertsMatchesReference) {
  const int64_t T = 96;
  int checked = 0;
  for (int E : {33, 64, 100, 256, 1000, 1024}) {
    for (int k : {2, 8, 32}) {
      if (k > E) continue;
      for (int mode = 0; mode < 3; ++mode) {  // softmax over the k chosen, softmax over all E, sigmoid
        const bool sigmoid = mode == 2, pre = mode == 1, normalize = sigmoid;
        const float scaling = mode == 1 ? 2.5f : 1.f;
        std::vector<float> logits = Random(T * E, 1000 * E + 10 * k + mode);
        for (float& v : logits) v = std::round(std::clamp(2.f * v, -6.f, 6.f) * 64.f) / 64.f;
        Dev<float> dl(logits), dw(T * k);
        Dev<int64_t> di(T * k), dc(std::vector<int64_t>(E, 0));
        CHECK_CUDA(cudaGetLastError());
        CHECK_CUDA(TopKRoute(dl.p, T, E, k, sigmoid, pre, normalize, scaling, di.p, dw.p, dc.p, nullptr));
        CHECK_CUDA(cudaDeviceSynchronize());
        const std::vector<int64_t> idx = di.Host(), counts = dc.Host();
        const std::vector<float> w = dw.Host();
        std::vector<int64_t> want_counts(E, 0);
        for (int64_t t = 0; t < T; ++t) {
          const float* z = logits.data() + t * E;
          std::vector<double> score(E);
          const double mx = *std::max_element(z, z + E);
          double sum = 0;
          for (int e = 0; e < E; ++e) {
            score[e] = sigmoid ? 1.0 / (1.0 + std::exp(-double(z[e]))) : pre ? std::exp(z[e] - mx) : z[e];
            sum += score[e];
          }
          if (pre) for (double& v : score) v /= sum;
          std::vector<int> order(E);
          for (int e = 0; e < E; ++e) order[e] = e;
          std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return score[a] > score[b]; });
          std::vector<double> want(k);
          double chosen_sum = 0, top = score[order[0]];
          for (int j = 0; j < k; ++j) chosen_sum += sigmoid ? score[order[j]] : std::exp(score[order[j]] - top);
          for (int j = 0; j < k; ++j) {
            const double s = score[order[j]];
            want[j] = (mode == 0 ? std::exp(s - top) / chosen_sum : sigmoid ? s / (chosen_sum + 1e-20) : s) * scaling;
            ++want_counts[order[j]];
          }
          for (int j = 0; j < k; ++j) {
            ASSERT_EQ(idx[t * k + j], order[j]) << "E=" << E << " k=" << k << " mode " << mode << " token " << t << " place " << j;
            ASSERT_NEAR(w[t * k + j], want[j], 5e-6 * std::abs(want[j]) + 1e-12)
                << "E=" << E << " k=" << k << " mode " << mode << " token " << t << " place " << j;
          }
        }
        EXPECT_EQ(counts, want_counts) << "E=" << E << " k=" << k << " mode " << mode;
        ++checked;
      }
    }
  }
  EXPECT_EQ(checked, 54);
}

}  // namespace
}  // namespace switchyard::cuda
