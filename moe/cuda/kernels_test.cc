// The CUDA kernels against plain C++ references (and, for top-k, Megatron-Core's numbers in
// moe/gate/testdata/megatron_router.txt, which the CPU router is checked against too).
// Needs a GPU: tagged "gpu", built with --config=cuda.
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

namespace switchyard::cuda {
namespace {

#define CHECK_CUDA(x) ASSERT_EQ((x), cudaSuccess) << cudaGetErrorString(x)

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
    if (n) cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
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

TEST(CudaKernelsTest, PermuteSumAndBackwardMatchCpu) {
  const int64_t T = 301, H = 72;
  const int E = 8, k = 2;
  const Plan plan = MakePlan(T, E, k, 1);
  const int64_t N = plan.row_token.size();
  const std::vector<float> x = Random(T * H, 2), w = Random(N, 3), g = Random(T * H, 4);
  Dev<float> dx(x), dw(w), dg(g), drows(N * H), dsum(T * H), dgrad_rows(N * H), dgrad_w(N);
  Dev<int64_t> dtok(plan.row_token), doff(plan.offsets), dtr(plan.token_rows);
  CHECK_CUDA(PermuteRows(dx.p, drows.p, dtok.p, N, H, DType::kFloat32, nullptr));
  CHECK_CUDA(SumRows(drows.p, dw.p, doff.p, dtr.p, dsum.p, T, H, DType::kFloat32, nullptr));
  CHECK_CUDA(WeightedSumBackward(dg.p, drows.p, dw.p, dtok.p, dgrad_rows.p, dgrad_w.p, N, H, DType::kFloat32, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<float> rows = drows.Host(), sum = dsum.Host(), grows = dgrad_rows.Host(), gw = dgrad_w.Host();
  for (int64_t r = 0; r < N; ++r) {
    const int64_t t = plan.row_token[r];
    double dot = 0;
    for (int64_t c = 0; c < H; ++c) {
      ASSERT_EQ(rows[r * H + c], t < 0 ? 0.f : x[t * H + c]);
      ASSERT_NEAR(grows[r * H + c], t < 0 ? 0.f : w[r] * g[t * H + c], 1e-6);
      if (t >= 0) dot += double(g[t * H + c]) * x[t * H + c];
    }
    ASSERT_NEAR(gw[r], dot, 1e-4 * (1 + std::abs(dot)));
  }
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c = 0; c < H; ++c) {
      double want = 0;
      for (int64_t j = plan.offsets[t]; j < plan.offsets[t + 1]; ++j) want += double(w[plan.token_rows[j]]) * x[t * H + c];
      ASSERT_NEAR(sum[t * H + c], want, 1e-5 * (1 + std::abs(want)));
    }
  }
}

TEST(CudaKernelsTest, GroupedGemmMatchesCpuInFp32AndBf16) {
  const int E = 5;
  const int64_t in = 64, out = 48;
  const std::vector<int64_t> counts = {17, 0, 33, 1, 9};
  const int64_t N = 60;
  const std::vector<float> x = Random(N * in, 5), w = Random(E * in * out, 6);
  std::vector<double> want(N * out, 0);
  int64_t off = 0;
  for (int e = 0; e < E; ++e) {
    for (int64_t r = off; r < off + counts[e]; ++r)
      for (int64_t o = 0; o < out; ++o)
        for (int64_t i = 0; i < in; ++i) want[r * out + o] += double(x[r * in + i]) * w[(e * in + i) * out + o];
    off += counts[e];
  }
  cublasHandle_t h;
  ASSERT_EQ(cublasCreate(&h), CUBLAS_STATUS_SUCCESS);
  for (bool grouped : {false, true}) {
    Dev<float> dx(x), dw(w), dy(N * out);
    CHECK_CUDA(GroupedGemm(h, dx.p, dw.p, dy.p, counts.data(), E, in, out, DType::kFloat32, grouped, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    const std::vector<float> y = dy.Host();
    for (int64_t i = 0; i < N * out; ++i) ASSERT_NEAR(y[i], want[i], 1e-4 * (1 + std::abs(want[i]))) << grouped;

    std::vector<__nv_bfloat16> xb(x.size()), wb(w.size());
    for (size_t i = 0; i < x.size(); ++i) xb[i] = __float2bfloat16(x[i]);
    for (size_t i = 0; i < w.size(); ++i) wb[i] = __float2bfloat16(w[i]);
    Dev<__nv_bfloat16> bx(xb), bw(wb), by(N * out);
    CHECK_CUDA(GroupedGemm(h, bx.p, bw.p, by.p, counts.data(), E, in, out, DType::kBFloat16, grouped, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    const std::vector<__nv_bfloat16> yb = by.Host();
    for (int64_t i = 0; i < N * out; ++i) {
      ASSERT_NEAR(__bfloat162float(yb[i]), want[i], 0.05 * (1 + std::abs(want[i]))) << grouped;
    }
  }
  cublasDestroy(h);
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
    CHECK_CUDA(TopKRoute(dl.p, T, E, k, sigmoid, pre, /*normalize=*/sigmoid && k > 1, scaling, di.p, dw.p, dc.p, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    const std::vector<int64_t> idx = di.Host(), counts = dc.Host();
    const std::vector<float> w = dw.Host();
    const std::vector<double>& probs = c.tensors.at("probs").second;
    std::vector<int64_t> want_counts(E, 0);
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> got(E, 0);
      for (int j = 0; j < k; ++j) got[idx[t * k + j]] = w[t * k + j];
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

}  // namespace
}  // namespace switchyard::cuda
