// common::MatmulOut beside at::mm_out (what callers used before), 2 intra-op threads:
//
//   tools/bazel run -c opt //common:matmul_benchmark
//
// - BM_Matmul/backend/dtype/layout: one 512 × 512 × 512 product, the size of a fine-grained
//   expert's GEMMs; layout 0: a @ b, 1: aᵀ @ b (a weight gradient), 2: a @ bᵀ (an input
//   gradient). backend 0: MatmulOut, 1: at::mm_out. `GFLOP/s` counts 2·M·N·K a call.
// - BM_MatmulTiny: an 8 × 8 × 8 product, so that the time is the per-call cost.
// - BM_MatmulOverAten: MatmulOut ÷ at::mm_out at 512³ in 50 alternating pairs of 16 calls
//   (common/paired_benchmark.h): `ratio`, the median per-pair ratio, is the figure to quote.
#include <string>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "benchmark/benchmark.h"
#include "common/matmul.h"
#include "common/paired_benchmark.h"

namespace switchyard::common {
namespace {

// a, b and out for an n × n × n product in `layout` (0: a @ b, 1: aᵀ @ b, 2: a @ bᵀ).
struct Operands {
  at::Tensor a, b, out;
  Operands(at::ScalarType dt, int64_t layout, int64_t n) {
    at::manual_seed(0);
    a = layout == 1 ? at::randn({n, n}).to(dt).t() : at::randn({n, n}).to(dt);
    b = layout == 2 ? at::randn({n, n}).to(dt).t() : at::randn({n, n}).to(dt);
    out = at::empty({n, n}, a.options());
  }
};

std::string Describe(at::ScalarType dt, int64_t layout) {
  return std::string(dt == at::kFloat ? "fp32" : "bf16") + (layout == 0 ? " a@b" : layout == 1 ? " aT@b" : " a@bT");
}

void Run(benchmark::State& state, int64_t n) {
  at::set_num_threads(2);
  const bool aten = state.range(0) == 1;
  const at::ScalarType dt = state.range(1) == 0 ? at::kFloat : at::kBFloat16;
  const int64_t layout = state.range(2);
  const auto [a, b, out] = Operands(dt, layout, n);
  SetMatmulBackend(aten ? MatmulBackend::kAten : MatmulBackend::kAuto);
  MatmulOut(out, a, b);  // creates the primitive outside the timed loop
  for (auto _ : state) {
    MatmulOut(out, a, b);
    benchmark::DoNotOptimize(out.data_ptr());
  }
  SetMatmulBackend(MatmulBackend::kAuto);
  state.counters["GFLOP/s"] =
      benchmark::Counter(2e-9 * n * n * n * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.SetLabel(std::string(aten ? "at::mm_out " : "MatmulOut ") + Describe(dt, layout));
}

void BM_Matmul(benchmark::State& state) { Run(state, 512); }

void BM_MatmulOverAten(benchmark::State& state) {
  at::set_num_threads(2);
  const at::ScalarType dt = state.range(0) == 0 ? at::kFloat : at::kBFloat16;
  const int64_t layout = state.range(1);
  const auto [a, b, out] = Operands(dt, layout, 512);
  auto calls = [&](MatmulBackend backend) {
    return [&, backend](benchmark::State&) {
      SetMatmulBackend(backend);
      for (int i = 0; i < 16; ++i) MatmulOut(out, a, b);
      SetMatmulBackend(MatmulBackend::kAuto);
      return true;
    };
  };
  auto aten = calls(MatmulBackend::kAten), ours = calls(MatmulBackend::kAuto);
  TimePairs(state, aten, ours);
  state.SetLabel(Describe(dt, layout));
}
void BM_MatmulTiny(benchmark::State& state) { Run(state, 8); }

BENCHMARK(BM_Matmul)
    ->ArgNames({"aten", "bf16", "layout"})
    ->ArgsProduct({{0, 1}, {0, 1}, {0, 1, 2}})
    ->UseRealTime()
    ->MinTime(1);
BENCHMARK(BM_MatmulOverAten)
    ->ArgNames({"bf16", "layout"})
    ->ArgsProduct({{0, 1}, {0, 1, 2}})
    ->UseManualTime()
    ->Iterations(50)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_MatmulTiny)->ArgNames({"aten", "bf16", "layout"})->ArgsProduct({{0, 1}, {1}, {0}})->UseRealTime();

}  // namespace
}  // namespace switchyard::common
