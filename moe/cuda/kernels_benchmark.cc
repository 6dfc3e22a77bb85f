// The CUDA kernels against their limits on one GPU (events, manual time):
//   - BM_PermuteRows (+ SumRows, the weighted unpermute, and WeightedSumBackward, its
//     backward) vs BM_CopyD2D: a device-to-device cudaMemcpy of the same bytes; goal ≥ 70% of
//     its bandwidth.
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

// SY_KERNELS_BENCHMARK_SMOKE: shapes small enough for the CPU emulator, which runs every
// benchmark for a few iterations as a test of this file (kernels_benchmark_emu_test); its
// times mean nothing.
#ifdef SY_KERNELS_BENCHMARK_SMOKE
constexpr int64_t kTokens = 96, kHidden = 64, kFfnCoarse = 96, kRouterTokens = 256;
#else
constexpr int64_t kTokens = 16384, kHidden = 4096, kFfnCoarse = 8192, kRouterTokens = 65536;
#endif

struct Shape {
  int experts, k;
  int64_t ffn;
};
Shape ShapeOf(int64_t i) { return i == 0 ? Shape{16, 2, kFfnCoarse} : Shape{64, 8, kFfnCoarse / 4}; }

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

// Times launch() (which returns the first CUDA error of what it enqueued) with events on the
// default stream, `reps` launches between the two events (for kernels of a few microseconds,
// whose launch latency would otherwise be timed too); an iteration is one launch. The first
// failure of any call skips the benchmark with its message instead of timing nothing (a zero
// iteration time makes Google Benchmark run ~1e9 iterations).
template <typename F>
void Time(benchmark::State& state, F&& launch, int reps = 1) {
  cudaEvent_t a = nullptr, b = nullptr;
  cudaError_t err = cudaEventCreate(&a);
  if (err == cudaSuccess) err = cudaEventCreate(&b);
  if (err == cudaSuccess) err = launch();  // warm-up
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  for (auto _ : state) {
    if (err != cudaSuccess) break;
    err = cudaEventRecord(a);
    for (int r = 0; r < reps && err == cudaSuccess; ++r) err = launch();
    if (err == cudaSuccess) err = cudaEventRecord(b);
    if (err == cudaSuccess) err = cudaEventSynchronize(b);
    float ms = 0;
    if (err == cudaSuccess) err = cudaEventElapsedTime(&ms, a, b);
    if (err != cudaSuccess) break;
    state.SetIterationTime(ms / 1e3 / reps);
  }
  if (err != cudaSuccess) state.SkipWithError(cudaGetErrorString(err));
  if (a != nullptr) cudaEventDestroy(a);
  if (b != nullptr) cudaEventDestroy(b);
}

// Device buffers of a benchmark, freed at the end; Ok() is false (and the benchmark skipped
// with the CUDA error) if an allocation or copy failed.
class Buffers {
 public:
  explicit Buffers(benchmark::State& state) : state_(state) {}
  ~Buffers() {
    for (void* p : ptrs_) cudaFree(p);
  }
  template <typename T>
  T* Alloc(int64_t bytes) {
    void* p = nullptr;
    Note(cudaMalloc(&p, bytes));
    if (p != nullptr) ptrs_.push_back(p);
    return static_cast<T*>(p);
  }
  void Note(cudaError_t e) {
    if (e != cudaSuccess && ok_) {
      ok_ = false;
      state_.SkipWithError(cudaGetErrorString(e));
    }
  }
  // n random values in [-1, 1) (bf16 or fp32): a 4M-element host pattern, repeated, so that
  // the GEMMs and the router see data like a model's rather than zeros (which draw less
  // power and run at higher clocks on these GPUs).
  template <typename T>
  void Random(T* dst, int64_t n) {
    constexpr int64_t kPattern = int64_t{1} << 22;
    std::vector<T> h(std::min(n, kPattern));
    uint32_t x = 2463534242u;
    for (T& v : h) {
      x ^= x << 13, x ^= x >> 17, x ^= x << 5;
      v = static_cast<T>(static_cast<float>(x) * (2.0f / 4294967296.0f) - 1.0f);
    }
    for (int64_t i = 0; i < n && ok_; i += static_cast<int64_t>(h.size())) {
      const int64_t m = std::min<int64_t>(h.size(), n - i);
      Note(cudaMemcpy(dst + i, h.data(), m * sizeof(T), cudaMemcpyHostToDevice));
    }
  }
  bool Ok() const { return ok_; }

 private:
  benchmark::State& state_;
  std::vector<void*> ptrs_;
  bool ok_ = true;
};

// A device array of `rows` random tokens (each row's source token, as a plan's row_token).
int64_t* RandomRowTokens(Buffers& buf, int64_t rows, uint32_t seed) {
  std::vector<int64_t> tok(rows);
  std::mt19937 g(seed);
  for (int64_t r = 0; r < rows; ++r) tok[r] = g() % kTokens;
  int64_t* dt = buf.Alloc<int64_t>(rows * 8);
  if (buf.Ok()) buf.Note(cudaMemcpy(dt, tok.data(), rows * 8, cudaMemcpyHostToDevice));
  return dt;
}

void BM_PermuteRows(benchmark::State& state) {
  if (!HaveGpu(state)) return;
  const Shape s = ShapeOf(state.range(0));
  const int64_t rows = kTokens * s.k;
  Buffers buf(state);
  void* in = buf.Alloc<void>(kTokens * kHidden * 2);
  void* out = buf.Alloc<void>(rows * kHidden * 2);
  int64_t* dt = RandomRowTokens(buf, rows, 2);
  if (!buf.Ok()) return;
  Time(state, [&] { return PermuteRows(in, out, dt, rows, kHidden, DType::kBFloat16, nullptr); });
  // Bytes moved: each output row read once and written once. (At k = 8 of 64 some source
  // rows are read again from L2, which this counts as memory traffic.)
  state.SetBytesProcessed(state.iterations() * rows * kHidden * 2 * 2);
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
  Buffers buf(state);
  void* in = buf.Alloc<void>(rows * kHidden * 2);
  void* out = buf.Alloc<void>(kTokens * kHidden * 2);
  float* w = buf.Alloc<float>(rows * 4);
  int64_t* doff = buf.Alloc<int64_t>((kTokens + 1) * 8);
  int64_t* dtr = buf.Alloc<int64_t>(rows * 8);
  if (buf.Ok()) buf.Random(w, rows);
  if (buf.Ok()) buf.Note(cudaMemcpy(doff, off.data(), off.size() * 8, cudaMemcpyHostToDevice));
  if (buf.Ok()) buf.Note(cudaMemcpy(dtr, tr.data(), rows * 8, cudaMemcpyHostToDevice));
  if (!buf.Ok()) return;
  Time(state, [&] { return SumRows(in, w, doff, dtr, out, kTokens, kHidden, DType::kBFloat16, nullptr); });
  state.SetBytesProcessed(state.iterations() * (rows + kTokens) * kHidden * 2);
}

void BM_WeightedSumBackward(benchmark::State& state) {
  if (!HaveGpu(state)) return;
  const Shape s = ShapeOf(state.range(0));
  const int64_t rows = kTokens * s.k;
  Buffers buf(state);
  auto* grad = buf.Alloc<__nv_bfloat16>(kTokens * kHidden * 2);
  auto* x = buf.Alloc<__nv_bfloat16>(rows * kHidden * 2);
  void* grad_rows = buf.Alloc<void>(rows * kHidden * 2);
  float* w = buf.Alloc<float>(rows * 4);
  float* grad_w = buf.Alloc<float>(rows * 4);
  int64_t* dt = RandomRowTokens(buf, rows, 4);
  if (buf.Ok()) buf.Random(grad, kTokens * kHidden);
  if (buf.Ok()) buf.Random(x, rows * kHidden);
  if (buf.Ok()) buf.Random(w, rows);
  if (!buf.Ok()) return;
  Time(state, [&] {
    return WeightedSumBackward(grad, x, w, dt, grad_rows, grad_w, rows, kHidden, DType::kBFloat16, nullptr);
  });
  // Bytes moved: per row, its token's gradient read (gathered), x read, the row gradient written.
  state.SetBytesProcessed(state.iterations() * rows * kHidden * 2 * 3);
}

void BM_CopyD2D(benchmark::State& state) {
  if (!HaveGpu(state)) return;
  const Shape s = ShapeOf(state.range(0));
  const int64_t bytes = kTokens * s.k * kHidden * 2;
  Buffers buf(state);
  void* a = buf.Alloc<void>(bytes);
  void* b = buf.Alloc<void>(bytes);
  if (!buf.Ok()) return;
  Time(state, [&] { return cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, nullptr); });
  state.SetBytesProcessed(state.iterations() * bytes * 2);  // read + write, as above
}

void Gemm(benchmark::State& state, bool dense, bool grouped) {
  if (!HaveGpu(state)) return;
  const Shape s = ShapeOf(state.range(0));
  const std::vector<int64_t> counts = dense ? std::vector<int64_t>{kTokens * s.k} : Counts(s);
  const int experts = static_cast<int>(counts.size());
  const int64_t rows = kTokens * s.k;
  Buffers buf(state);
  __nv_bfloat16* x = buf.Alloc<__nv_bfloat16>(rows * kHidden * 2);
  __nv_bfloat16* w = buf.Alloc<__nv_bfloat16>(experts * kHidden * s.ffn * 2);
  void* y = buf.Alloc<void>(rows * s.ffn * 2);
  if (buf.Ok()) buf.Random(x, rows * kHidden);
  if (buf.Ok()) buf.Random(w, experts * kHidden * s.ffn);
  if (!buf.Ok()) return;
  cublasHandle_t h;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
    state.SkipWithError("cublasCreate failed");
    return;
  }
  Time(state, [&] {
    return GroupedGemm(h, x, w, y, counts.data(), experts, kHidden, s.ffn, DType::kBFloat16, grouped, nullptr);
  });
  state.counters["TFLOP/s"] = benchmark::Counter(2.0 * rows * kHidden * s.ffn * state.iterations() / 1e12,
                                                 benchmark::Counter::kIsRate);
  cublasDestroy(h);
}
void BM_GroupedGemm(benchmark::State& state) { Gemm(state, false, true); }
void BM_GroupedGemmLoop(benchmark::State& state) { Gemm(state, false, false); }
void BM_DenseGemm(benchmark::State& state) { Gemm(state, true, false); }

void BM_TopKRoute(benchmark::State& state) {
  if (!HaveGpu(state)) return;
  const int64_t T = kRouterTokens;
  const int E = static_cast<int>(state.range(0)), k = static_cast<int>(state.range(1));
  Buffers buf(state);
  float* logits = buf.Alloc<float>(T * E * 4);
  float* w = buf.Alloc<float>(T * k * 4);
  int64_t* idx = buf.Alloc<int64_t>(T * k * 8);
  int64_t* counts = buf.Alloc<int64_t>(E * 8);
  if (buf.Ok()) buf.Random(logits, T * E);  // random logits: no every-token tie on experts 0..k-1
  if (!buf.Ok()) return;
  // 20 routings between the events: one takes tens of microseconds, near the launch latency.
  Time(state, [&] {
    const cudaError_t e = cudaMemsetAsync(counts, 0, E * 8, nullptr);
    return e != cudaSuccess ? e : TopKRoute(logits, T, E, k, false, true, false, 1.f, idx, w, counts, nullptr);
  }, /*reps=*/20);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(T) * state.iterations(), benchmark::Counter::kIsRate);
}

BENCHMARK(BM_PermuteRows)->ArgName("fine")->Arg(0)->Arg(1)->UseManualTime();
BENCHMARK(BM_SumRows)->ArgName("fine")->Arg(0)->Arg(1)->UseManualTime();
BENCHMARK(BM_WeightedSumBackward)->ArgName("fine")->Arg(0)->Arg(1)->UseManualTime();
BENCHMARK(BM_CopyD2D)->ArgName("fine")->Arg(0)->Arg(1)->UseManualTime();
BENCHMARK(BM_GroupedGemm)->ArgName("fine")->Arg(0)->Arg(1)->UseManualTime();
BENCHMARK(BM_GroupedGemmLoop)->ArgName("fine")->Arg(0)->Arg(1)->UseManualTime();
BENCHMARK(BM_DenseGemm)->ArgName("fine")->Arg(0)->Arg(1)->UseManualTime();
BENCHMARK(BM_TopKRoute)->ArgNames({"E", "k"})->Args({64, 2})->Args({256, 8})->UseManualTime();

}  // namespace
}  // namespace switchyard::cuda
