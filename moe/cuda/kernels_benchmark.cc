// The CUDA kernels against their limits on one GPU (events, manual time):
//   - BM_PermuteRows (+ SumRows, the weighted unpermute) vs BM_CopyD2D: a device-to-device
//     cudaMemcpy of the same bytes; goal ≥ 70% of its bandwidth.
//   - BM_GroupedGemm (bf16, cuBLAS grouped batched; /loop: one GEMM per expert) vs
//     BM_DenseGemm: one cuBLAS GEMM with the same FLOPs; goal ≥ 70% of its throughput.
//   - BM_TopKRoute: the fused router kernel.
// Shapes: T = 16384 tokens, H = 4096, k = 2 of E = 16 (coarse) or k = 8 of E = 64 with
// F = 1/4 of the coarse one (fine-grained), uniform routing.
//
//   built with --config=cuda; run on a GPU machine:  moe/cuda/kernels_benchmark
#include <algorithm>
#include <random>
#include <vector>

#include <cuda_bf16.h>

#include "benchmark/benchmark.h"
#include "moe/cuda/kernels.h"

namespace switchyard::cuda {
namespace {

constexpr int64_t kTokens = 16384, kHidden = 4096;

struct Shape {
  int experts, k;
  int64_t ffn;
};
Shape ShapeOf(int64_t i) { return i == 0 ? Shape{16, 2, 8192} : Shape{64, 8, 2048}; }

bool HaveGpu(benchmark::State& state) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    state.SkipWithError("no CUDA device");
    return false;
  }
  return true;
}

// Rows per expert for uniform routing of every token to k distinct experts.
std::vector<int64_t> Counts(const Shape& s) {
  std::mt19937 g(1);
  std::vector<int64_t> c(s.experts, 0);
  std::vector<int> e(s.experts);
  for (int64_t t = 0; t < kTokens; ++t) {
    for (int i = 0; i < s.experts; ++i) e[i] = i;
    std::shuffle(e.begin(), e.end(), g);
    for (int j = 0; j < s.k; ++j) ++c[e[j]];
  }
  return c;
}

template <typename F>
void Time(benchmark::State& state, F&& launch) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  launch();  // warm-up
  for (auto _ : state) {
    cudaEventRecord(a);
    launch();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    state.SetIterationTime(ms / 1e3);
  }
  if (cudaGetLastError() != cudaSuccess) state.SkipWithError("a kernel failed");
  cudaEventDestroy(a);
  cudaEventDestroy(b);
}

void BM_PermuteRows(benchmark::State& state) {
  if (!HaveGpu(state)) return;
  const Shape s = ShapeOf(state.range(0));
  const int64_t rows = kTokens * s.k;
  std::vector<int64_t> tok(rows);
  std::mt19937 g(2);
  for (int64_t r = 0; r < rows; ++r) tok[r] = g() % kTokens;
  void *in, *out;
  int64_t* dt;
  cudaMalloc(&in, kTokens * kHidden * 2);
  cudaMalloc(&out, rows * kHidden * 2);
  cudaMalloc(&dt, rows * 8);
  cudaMemcpy(dt, tok.data(), rows * 8, cudaMemcpyHostToDevice);
  Time(state, [&] { PermuteRows(in, out, dt, rows, kHidden, DType::kBFloat16, nullptr); });
  // Bytes moved: each output row read once and written once.
  state.SetBytesProcessed(state.iterations() * rows * kHidden * 2 * 2);
  cudaFree(in), cudaFree(out), cudaFree(dt);
}

void BM_SumRows(benchmark::State& state) {
  if (!HaveGpu(state)) return;
  const Shape s = ShapeOf(state.range(0));
  const int64_t rows = kTokens * s.k;
  std::vector<int64_t> off(kTokens + 1), tr(rows);
  std::mt19937 g(3);
  for (int64_t t = 0; t <= kTokens; ++t) off[t] = t * s.k;
  for (int64_t r = 0; r < rows; ++r) tr[r] = r;
  std::shuffle(tr.begin(), tr.end(), g);
  void *in, *out;
  float* w;
  int64_t *doff, *dtr;
  cudaMalloc(&in, rows * kHidden * 2);
  cudaMalloc(&out, kTokens * kHidden * 2);
  cudaMalloc(&w, rows * 4);
  cudaMalloc(&doff, (kTokens + 1) * 8);
  cudaMalloc(&dtr, rows * 8);
  cudaMemcpy(doff, off.data(), off.size() * 8, cudaMemcpyHostToDevice);
  cudaMemcpy(dtr, tr.data(), rows * 8, cudaMemcpyHostToDevice);
  Time(state, [&] { SumRows(in, w, doff, dtr, out, kTokens, kHidden, DType::kBFloat16, nullptr); });
  state.SetBytesProcessed(state.iterations() * (rows + kTokens) * kHidden * 2);
  cudaFree(in), cudaFree(out), cudaFree(w), cudaFree(doff), cudaFree(dtr);
}

void BM_CopyD2D(benchmark::State& state) {
  if (!HaveGpu(state)) return;
  const Shape s = ShapeOf(state.range(0));
  const int64_t bytes = kTokens * s.k * kHidden * 2;
  void *a, *b;
  cudaMalloc(&a, bytes);
  cudaMalloc(&b, bytes);
  Time(state, [&] { cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, nullptr); });
  state.SetBytesProcessed(state.iterations() * bytes * 2);  // read + write, as above
  cudaFree(a), cudaFree(b);
}

void Gemm(benchmark::State& state, bool dense, bool grouped) {
  if (!HaveGpu(state)) return;
  const Shape s = ShapeOf(state.range(0));
  const std::vector<int64_t> counts = dense ? std::vector<int64_t>{kTokens * s.k} : Counts(s);
  const int experts = static_cast<int>(counts.size());
  const int64_t rows = kTokens * s.k;
  void *x, *w, *y;
  cudaMalloc(&x, rows * kHidden * 2);
  cudaMalloc(&w, experts * kHidden * s.ffn * 2);
  cudaMalloc(&y, rows * s.ffn * 2);
  cudaMemset(x, 0, rows * kHidden * 2);
  cudaMemset(w, 0, experts * kHidden * s.ffn * 2);
  cublasHandle_t h;
  cublasCreate(&h);
  Time(state, [&] { GroupedGemm(h, x, w, y, counts.data(), experts, kHidden, s.ffn, DType::kBFloat16, grouped, nullptr); });
  state.counters["TFLOP/s"] = benchmark::Counter(2.0 * rows * kHidden * s.ffn * state.iterations() / 1e12,
                                                 benchmark::Counter::kIsRate);
  cublasDestroy(h);
  cudaFree(x), cudaFree(w), cudaFree(y);
}
void BM_GroupedGemm(benchmark::State& state) { Gemm(state, false, true); }
void BM_GroupedGemmLoop(benchmark::State& state) { Gemm(state, false, false); }
void BM_DenseGemm(benchmark::State& state) { Gemm(state, true, false); }

void BM_TopKRoute(benchmark::State& state) {
  if (!HaveGpu(state)) return;
  const int64_t T = 65536;
  const int E = static_cast<int>(state.range(0)), k = static_cast<int>(state.range(1));
  float *logits, *w;
  int64_t *idx, *counts;
  cudaMalloc(&logits, T * E * 4);
  cudaMemset(logits, 0, T * E * 4);
  cudaMalloc(&w, T * k * 4);
  cudaMalloc(&idx, T * k * 8);
  cudaMalloc(&counts, E * 8);
  Time(state, [&] {
    cudaMemsetAsync(counts, 0, E * 8, nullptr);
    TopKRoute(logits, T, E, k, false, true, false, 1.f, idx, w, counts, nullptr);
  });
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(T) * state.iterations(), benchmark::Counter::kIsRate);
  cudaFree(logits), cudaFree(w), cudaFree(idx), cudaFree(counts);
}

BENCHMARK(BM_PermuteRows)->ArgName("fine")->Arg(0)->Arg(1)->UseManualTime();
BENCHMARK(BM_SumRows)->ArgName("fine")->Arg(0)->Arg(1)->UseManualTime();
BENCHMARK(BM_CopyD2D)->ArgName("fine")->Arg(0)->Arg(1)->UseManualTime();
BENCHMARK(BM_GroupedGemm)->ArgName("fine")->Arg(0)->Arg(1)->UseManualTime();
BENCHMARK(BM_GroupedGemmLoop)->ArgName("fine")->Arg(0)->Arg(1)->UseManualTime();
BENCHMARK(BM_DenseGemm)->ArgName("fine")->Arg(0)->Arg(1)->UseManualTime();
BENCHMARK(BM_TopKRoute)->ArgNames({"E", "k"})->Args({64, 2})->Args({256, 8})->UseManualTime();

}  // namespace
}  // namespace switchyard::cuda
