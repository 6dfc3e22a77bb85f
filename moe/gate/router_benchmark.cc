// Router forward + backward, Switchyard's TopKRoute beside the same math written the obvious
// way with plain LibTorch ops (torch.topk, softmax, scatter: what Megatron-Core's unfused
// path does), for T ∈ {4096, 65536} tokens, E ∈ {8, 64, 256} experts, k ∈ {1, 2, 8}.
//
//   tools/bazel run -c opt //moe/gate:router_benchmark -- --benchmark_counters_tabular=true
//
// Intra-op threads: 1 (set below), so figures are per core. Freed memory stays in the heap
// (common::RetainFreedMemory), as in the workers.
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "benchmark/benchmark.h"
#include "common/heap.h"
#include "moe/gate/router.h"

namespace switchyard::gate {
namespace {

struct Inputs {
  at::Tensor logits, upstream;
};

Inputs Make(benchmark::State& state) {
  common::RetainFreedMemory();  // as the workers do
  at::set_num_threads(1);
  at::manual_seed(0);
  const int64_t T = state.range(0), E = state.range(1);
  return {at::randn({T, E}), at::randn({T, E})};
}

void Report(benchmark::State& state) {
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(state.range(0)) * state.iterations(),
                                                  benchmark::Counter::kIsRate);
}

void BM_TopKRoute(benchmark::State& state) {
  Inputs in = Make(state);
  const int k = static_cast<int>(state.range(2));
  for (auto _ : state) {
    at::Tensor x = in.logits.detach().requires_grad_(true);
    absl::StatusOr<Routing> r = TopKRoute(x, {.top_k = k});
    (r->probs * in.upstream).sum().backward();
    benchmark::DoNotOptimize(x.grad().data_ptr());
  }
  Report(state);
}

// With capacity (factor 1, dropping by score): the cost of choosing each expert's kept slots.
void BM_TopKRouteCapacity(benchmark::State& state) {
  Inputs in = Make(state);
  const int k = static_cast<int>(state.range(2));
  for (auto _ : state) {
    at::Tensor x = in.logits.detach().requires_grad_(true);
    absl::StatusOr<Routing> r = TopKRoute(x, {.top_k = k, .capacity_factor = 1.0});
    (r->probs * in.upstream).sum().backward();
    benchmark::DoNotOptimize(x.grad().data_ptr());
  }
  Report(state);
}

void BM_PlainOps(benchmark::State& state) {
  Inputs in = Make(state);
  const int k = static_cast<int>(state.range(2));
  for (auto _ : state) {
    at::Tensor x = in.logits.detach().requires_grad_(true);
    auto [scores, idx] = at::topk(x, k, 1);
    at::Tensor probs = at::zeros_like(x).scatter(1, idx, at::softmax(scores, -1));
    at::Tensor map = at::zeros_like(x, at::kBool).scatter_(1, idx, true);
    benchmark::DoNotOptimize(map.sum(0).data_ptr());
    (probs * in.upstream).sum().backward();
    benchmark::DoNotOptimize(x.grad().data_ptr());
  }
  Report(state);
}

void Shapes(benchmark::internal::Benchmark* b) {
  for (int64_t T : {4096, 65536})
    for (int64_t E : {8, 64, 256})
      for (int64_t k : {1, 2, 8})
        if (k <= E) b->Args({T, E, k});
}

BENCHMARK(BM_TopKRoute)->Apply(Shapes)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_TopKRouteCapacity)->Apply(Shapes)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_PlainOps)->Apply(Shapes)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace switchyard::gate
