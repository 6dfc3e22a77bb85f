// MoE layer forward + backward beside its limit and what users write instead, at two shapes
// (SwiGLU, T = 4096 tokens, H = 512):
//   coarse: F = 1024, E = 16, k = 2        fine-grained: F = 256, E = 64, k = 8
// in fp32 and bf16, 2 intra-op threads (this machine's cores).
//
//   tools/bazel run -c opt //moe:moe_layer_benchmark -- --benchmark_counters_tabular=true
//
// Freed memory stays in the heap (common::RetainFreedMemory), as in the workers.
//
// - BM_ExpertGemms: the same per-expert GEMMs (2 forward, 4 backward per expert) into
//   preallocated buffers, nothing else: the limit for the layer. In the dtype the layer's
//   GEMMs compute in (experts::CpuGemmComputeType: fp32 for bf16 storage on CPUs without
//   bf16 units, where LibTorch's own bf16 GEMM is a slow fallback).
// - BM_MoELayer: router + permute + grouped experts + unpermute, forward and backward.
// - BM_LoopMasks: (a) the tutorial loop, one weight tensor per expert, index_select/index_add.
// - BM_LoopStacked: (b) the same loop over one stacked [E, H, 2F] weight indexed per expert.
// - BM_Router: the router alone (forward + backward), to compare with the layer.
// - BM_GroupedExperts / BM_DenseMlp: the grouped expert MLP vs one dense MLP of equal FLOPs.
// - BM_PermuteUnpermute / BM_Memcpy: permute + weighted unpermute (forward) vs copying the
//   same bytes (the permuted tensor's size, once each way).
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd.h>

#include "benchmark/benchmark.h"
#include "common/heap.h"
#include "moe/dispatch/permute.h"
#include "moe/experts/experts.h"
#include "moe/moe_layer.h"

namespace switchyard::moe {
namespace {

constexpr int kThreads = 2;
constexpr int64_t kTokens = 4096, kHidden = 512;

struct Shape {
  int64_t ffn;
  int experts, k;
};
Shape ShapeOf(int64_t i) { return i == 0 ? Shape{1024, 16, 2} : Shape{256, 64, 8}; }
at::ScalarType DtypeOf(int64_t i) { return i == 0 ? at::kFloat : at::kBFloat16; }

MoEConfig LayerConfig(const Shape& s, at::ScalarType dtype) {
  MoEConfig c;
  c.router = {.hidden_size = kHidden, .num_experts = s.experts, .aux_loss = gate::AuxLoss::kBatch};
  c.router.topk.top_k = s.k;
  c.ffn_hidden_size = s.ffn;
  c.dtype = dtype;
  return c;
}

// The layer, its input, and its routing (shared by the baselines so all do the same work).
struct Setup {
  Shape shape;
  at::ScalarType dtype;
  std::optional<MoELayer> layer;
  at::Tensor x, grad_out, topk_idx, topk_w;
  at::Tensor probs;                          // [T, E] routing weights
  std::optional<dispatch::PermutePlan> plan;  // of the layer's routing
  std::vector<int64_t> counts;
  int64_t rows = 0;
};

Setup& Get(benchmark::State& state) {
  static std::map<std::pair<int64_t, int64_t>, std::unique_ptr<Setup>> cache;
  auto& s = cache[{state.range(0), state.range(1)}];
  if (!s) {
    common::RetainFreedMemory();
    at::set_num_threads(kThreads);
    at::manual_seed(0);
    s = std::make_unique<Setup>();
    s->shape = ShapeOf(state.range(0));
    s->dtype = DtypeOf(state.range(1));
    auto layer = MoELayer::Create(LayerConfig(s->shape, s->dtype), 1);
    if (!layer.ok()) std::abort();
    s->layer.emplace(*std::move(layer));
    s->x = at::randn({kTokens, kHidden}).to(s->dtype);
    s->grad_out = at::randn({kTokens, kHidden}).to(s->dtype);
    auto r = s->layer->router().Forward(s->x, {});
    if (!r.ok()) std::abort();
    s->topk_idx = r->routing.topk_indices;
    s->topk_w = r->routing.topk_weights.detach();
    const at::Tensor c = r->routing.tokens_per_expert;
    for (int e = 0; e < s->shape.experts; ++e) s->counts.push_back(c[e].item<int64_t>());
    s->probs = r->routing.probs.detach();
    auto plan = dispatch::MakePlan(r->routing.routing_map);
    if (!plan.ok()) std::abort();
    s->plan.emplace(*std::move(plan));
    s->rows = kTokens * s->shape.k;
  }
  at::set_num_threads(kThreads);
  return *s;
}

void Finish(benchmark::State& state, const Setup& s) {
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(kTokens) * state.iterations(), benchmark::Counter::kIsRate);
  state.SetLabel(std::string(s.shape.experts == 16 ? "coarse" : "fine") +
                 (s.dtype == at::kFloat ? " fp32" : " bf16"));
}

void BM_ExpertGemms(benchmark::State& state) {
  Setup& s = Get(state);
  const int64_t F = s.shape.ffn, N = s.rows, E = s.shape.experts;
  // The GEMMs the layer runs: bf16 storage computes in fp32 on CPUs without bf16 units.
  auto o = at::TensorOptions().dtype(experts::CpuGemmComputeType(s.dtype));
  at::Tensor x = at::randn({N, kHidden}, o), w1 = at::randn({E, kHidden, 2 * F}, o) * 0.02,
             w2 = at::randn({E, F, kHidden}, o) * 0.02;
  at::Tensor h = at::empty({N, 2 * F}, o), a = at::randn({N, F}, o), y = at::empty({N, kHidden}, o);
  at::Tensor gy = at::randn({N, kHidden}, o), ga = at::empty({N, F}, o), gh = at::randn({N, 2 * F}, o),
             gx = at::empty({N, kHidden}, o), gw1 = at::empty_like(w1), gw2 = at::empty_like(w2);
  for (auto _ : state) {
    int64_t off = 0;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = s.counts[e];
      if (n == 0) continue;
      auto rows = [&](at::Tensor& t) { return t.narrow(0, off, n); };
      at::Tensor hh = rows(h), yy = rows(y), gaa = rows(ga), gxx = rows(gx), g1 = gw1[e], g2 = gw2[e];
      at::mm_out(hh, rows(x), w1[e]);
      at::mm_out(yy, rows(a), w2[e]);
      at::mm_out(gaa, rows(gy), w2[e].t());
      at::mm_out(g2, rows(a).t(), rows(gy));
      at::mm_out(gxx, rows(gh), w1[e].t());
      at::mm_out(g1, rows(x).t(), rows(gh));
      off += n;
    }
    benchmark::DoNotOptimize(gw1.data_ptr());
  }
  Finish(state, s);
}

void BM_MoELayer(benchmark::State& state) {
  Setup& s = Get(state);
  for (auto _ : state) {
    for (TaggedParam& p : s.layer->Parameters()) p.tensor.mutable_grad().reset();  // zero_grad(set_to_none)
    at::Tensor x = s.x.detach().requires_grad_(true);
    auto out = s.layer->Forward(x, {.training = true});
    if (!out.ok()) {
      state.SkipWithError(std::string(out.status().message()).c_str());
      return;
    }
    torch::autograd::backward({out->output, out->aux_loss}, {s.grad_out, at::ones({})});
    benchmark::DoNotOptimize(x.grad().data_ptr());
  }
  s.layer->router().weight().mutable_grad().reset();
  Finish(state, s);
}

at::Tensor Swiglu(const at::Tensor& h) {
  const int64_t f = h.size(1) / 2;
  return at::silu(h.narrow(1, 0, f)) * h.narrow(1, f, f);
}

// (a) and (b): the loop users write. `stacked`: one [E, H, 2F] weight indexed per expert.
void Loop(benchmark::State& state, bool stacked) {
  Setup& s = Get(state);
  const int E = s.shape.experts;
  const int64_t F = s.shape.ffn;
  auto o = at::TensorOptions().dtype(s.dtype);
  std::vector<at::Tensor> w1, w2;
  at::Tensor W1, W2;
  if (stacked) {
    W1 = (at::randn({E, kHidden, 2 * F}, o) * 0.02).requires_grad_(true);
    W2 = (at::randn({E, F, kHidden}, o) * 0.02).requires_grad_(true);
  } else {
    for (int e = 0; e < E; ++e) {
      w1.push_back((at::randn({kHidden, 2 * F}, o) * 0.02).requires_grad_(true));
      w2.push_back((at::randn({F, kHidden}, o) * 0.02).requires_grad_(true));
    }
  }
  for (auto _ : state) {
    at::Tensor x = s.x.detach().requires_grad_(true);
    at::Tensor out = at::zeros_like(x);
    for (int e = 0; e < E; ++e) {
      const at::Tensor where = (s.topk_idx == e).nonzero();  // [n, 2]: token, slot
      if (where.size(0) == 0) continue;
      const at::Tensor tok = where.select(1, 0), slot = where.select(1, 1);
      const at::Tensor xe = x.index_select(0, tok);
      const at::Tensor a = stacked ? Swiglu(xe.mm(W1[e])) : Swiglu(xe.mm(w1[e]));
      const at::Tensor ye = stacked ? a.mm(W2[e]) : a.mm(w2[e]);
      const at::Tensor we = s.topk_w.index({tok, slot}).unsqueeze(1).to(s.dtype);
      out = out.index_add(0, tok, ye * we);
    }
    out.backward(s.grad_out);
    benchmark::DoNotOptimize(x.grad().data_ptr());
  }
  Finish(state, s);
}
void BM_LoopMasks(benchmark::State& state) { Loop(state, false); }
void BM_LoopStacked(benchmark::State& state) { Loop(state, true); }

void BM_Router(benchmark::State& state) {
  Setup& s = Get(state);
  for (auto _ : state) {
    auto r = s.layer->router().Forward(s.x, {.training = true});
    if (!r.ok()) std::abort();
    (r->routing.probs.sum() + r->aux_loss).backward();
  }
  s.layer->router().weight().mutable_grad().reset();
  Finish(state, s);
}

void Mlp(benchmark::State& state, bool grouped) {
  Setup& s = Get(state);
  experts::ExpertsConfig c{.hidden_size = kHidden, .ffn_hidden_size = s.shape.ffn,
                           .num_experts = grouped ? s.shape.experts : 1, .dtype = s.dtype};
  auto ex = experts::GroupedExperts::Create(c, 3);
  if (!ex.ok()) std::abort();
  const std::vector<int64_t> counts = grouped ? s.counts : std::vector<int64_t>{s.rows};
  // Rows that need a gradient, as inside the layer: all six GEMMs per expert run.
  const at::Tensor rows = at::randn({s.rows, kHidden}).to(s.dtype).requires_grad_(true);
  const at::Tensor g = at::randn({s.rows, kHidden}).to(s.dtype);
  for (auto _ : state) {
    ex->fc1().mutable_grad().reset();
    ex->fc2().mutable_grad().reset();
    rows.mutable_grad().reset();
    auto y = ex->Forward(rows, counts);
    y->backward(g);
  }
  Finish(state, s);
}
void BM_GroupedExperts(benchmark::State& state) { Mlp(state, true); }
void BM_DenseMlp(benchmark::State& state) { Mlp(state, false); }

void BM_PermuteUnpermute(benchmark::State& state) {
  Setup& s = Get(state);
  const at::Tensor& probs = s.probs;
  const dispatch::PermutePlan* plan = &*s.plan;
  for (auto _ : state) {
    at::Tensor rows = dispatch::Permute(s.x, *plan);
    benchmark::DoNotOptimize(dispatch::Unpermute(rows, probs, *plan).data_ptr());
  }
  state.SetBytesProcessed(state.iterations() * 2 * s.rows * kHidden * s.x.element_size());
  Finish(state, s);
}

// The two halves alone (forward), to see which one costs.
void PermuteHalf(benchmark::State& state, bool permute) {
  Setup& s = Get(state);
  const at::Tensor& probs = s.probs;
  const dispatch::PermutePlan* plan = &*s.plan;
  const at::Tensor rows = dispatch::Permute(s.x, *plan);
  for (auto _ : state) {
    benchmark::DoNotOptimize(
        (permute ? dispatch::Permute(s.x, *plan) : dispatch::Unpermute(rows, probs, *plan)).data_ptr());
  }
  state.SetBytesProcessed(state.iterations() * s.rows * kHidden * s.x.element_size());
  Finish(state, s);
}
void BM_Permute(benchmark::State& state) { PermuteHalf(state, true); }
void BM_Unpermute(benchmark::State& state) { PermuteHalf(state, false); }

// Forward and backward of permute + weighted unpermute (what the layer pays besides routing).
void BM_PermuteUnpermuteFwdBwd(benchmark::State& state) {
  Setup& s = Get(state);
  const at::Tensor& probs = s.probs;
  const dispatch::PermutePlan* plan = &*s.plan;
  const at::Tensor x = s.x.detach().requires_grad_(true), p = probs.detach().requires_grad_(true);
  for (auto _ : state) {
    x.mutable_grad().reset();
    p.mutable_grad().reset();
    dispatch::Unpermute(dispatch::Permute(x, *plan), p, *plan).backward(s.grad_out);
  }
  Finish(state, s);
}

void BM_Memcpy(benchmark::State& state) {
  Setup& s = Get(state);
  const at::Tensor a = at::randn({s.rows, kHidden}).to(s.dtype);
  at::Tensor b = at::empty_like(a), c = at::empty_like(a);
  for (auto _ : state) {
    b.copy_(a);
    c.copy_(b);
    benchmark::DoNotOptimize(c.data_ptr());
  }
  state.SetBytesProcessed(state.iterations() * 2 * s.rows * kHidden * s.x.element_size());
  Finish(state, s);
}

void Shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"shape", "bf16"})->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(4);
  for (int shape : {0, 1}) {
    for (int dt : {0, 1}) b->Args({shape, dt});
  }
}

BENCHMARK(BM_ExpertGemms)->Apply(Shapes);
BENCHMARK(BM_MoELayer)->Apply(Shapes);
BENCHMARK(BM_LoopMasks)->Apply(Shapes);
BENCHMARK(BM_LoopStacked)->Apply(Shapes);
BENCHMARK(BM_Router)->Apply(Shapes);
BENCHMARK(BM_GroupedExperts)->Apply(Shapes);
BENCHMARK(BM_DenseMlp)->Apply(Shapes);
BENCHMARK(BM_PermuteUnpermute)->Apply(Shapes);
BENCHMARK(BM_Permute)->Apply(Shapes);
BENCHMARK(BM_Unpermute)->Apply(Shapes);
BENCHMARK(BM_PermuteUnpermuteFwdBwd)->Apply(Shapes);
BENCHMARK(BM_Memcpy)->Apply(Shapes);

}  // namespace
}  // namespace switchyard::moe
