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
//   preallocated buffers, nothing else, through common::MatmulOut as the layer's: the limit
//   for the layer. BM_ExpertGemmsAten: the same through at::mm_out. In the dtype the layer's
//   GEMMs compute in (experts::CpuGemmComputeType: fp32 for bf16 storage on CPUs without
//   bf16 units, where LibTorch's own bf16 GEMM is a slow fallback).
//   BM_ExpertGemmsSideBySide: the same GEMMs with whole experts side by side, one per
//   thread, each product on its thread alone (largest first, each thread taking the next
//   expert when done), as the layer's grouped experts run them with several threads and
//   experts enough: a stricter limit (see experts.cc, ExpertSchedule).
// - BM_MoELayer: router + permute + grouped experts + unpermute, forward and backward.
// - BM_LayerOverLimit: the two above timed in alternation, 20 pairs; `ratio` is the median of
//   the per-pair layer ÷ limit ratios (the figure to quote on a machine whose speed drifts),
//   `best_ratio` the layer's best time ÷ the limit's best time.
//   BM_LayerOverSideBySideLimit pairs the layer with BM_ExpertGemmsSideBySide likewise.
//   BM_ExpertsOverLimit and BM_ExpertsOverDense pair the grouped experts with the limit and
//   with the dense MLP of equal FLOPs in the same way.
// - BM_LoopMasks: (a) the tutorial loop, one weight tensor per expert, index_select/index_add.
// - BM_LoopStacked: (b) the same loop over one stacked [E, H, 2F] weight indexed per expert.
//   BM_LoopMasksOverLayer and BM_LoopStackedOverLayer pair each loop with the layer (8 pairs;
//   `ratio` = loop ÷ layer, how many times faster the layer is).
// - BM_Router: the router alone (forward + backward), to compare with the layer.
// - BM_GroupedExperts / BM_DenseMlp: the grouped expert MLP vs one dense MLP of equal FLOPs.
// - BM_PermuteUnpermute / BM_Memcpy: permute + weighted unpermute (forward) vs copying the
//   same bytes (the permuted tensor's size, once each way).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd.h>

#include "benchmark/benchmark.h"
#include "common/heap.h"
#include "common/matmul.h"
#include "common/paired_benchmark.h"
#include "common/parallel.h"
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

// The per-expert GEMMs alone, into preallocated buffers: one expert at a time, each product
// on all threads; or (side_by_side) whole experts on separate threads.
class ExpertGemms {
 public:
  explicit ExpertGemms(const Setup& s, bool side_by_side = false) : s_(s), side_by_side_(side_by_side) {
    const int64_t F = s.shape.ffn, N = s.rows, E = s.shape.experts;
    // The GEMMs the layer runs: bf16 storage computes in fp32 on CPUs without bf16 units.
    auto o = at::TensorOptions().dtype(experts::CpuGemmComputeType(s.dtype));
    x_ = at::randn({N, kHidden}, o), w1_ = at::randn({E, kHidden, 2 * F}, o) * 0.02;
    w2_ = at::randn({E, F, kHidden}, o) * 0.02;
    h_ = at::empty({N, 2 * F}, o), a_ = at::randn({N, F}, o), y_ = at::empty({N, kHidden}, o);
    gy_ = at::randn({N, kHidden}, o), ga_ = at::empty({N, F}, o), gh_ = at::randn({N, 2 * F}, o);
    gx_ = at::empty({N, kHidden}, o), gw1_ = at::empty_like(w1_), gw2_ = at::empty_like(w2_);
  }
  void operator()() {
    const int64_t E = s_.shape.experts;
    std::vector<int64_t> off(E + 1, 0);
    for (int64_t e = 0; e < E; ++e) off[e + 1] = off[e] + s_.counts[e];
    if (!side_by_side_) {
      for (int64_t e = 0; e < E; ++e) Expert(e, off[e]);
    } else {
      std::vector<int64_t> order(E);
      std::iota(order.begin(), order.end(), int64_t{0});
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return s_.counts[a] > s_.counts[b]; });
      std::atomic<int64_t> next{0};
      at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
        for (int64_t i = next++; i < E; i = next++) Expert(order[i], off[order[i]]);  // products on one thread each
      });
    }
    benchmark::DoNotOptimize(gw1_.data_ptr());
  }
  void Expert(int64_t e, int64_t off) {
    const int64_t n = s_.counts[e];
    if (n == 0) return;
    auto rows = [&](at::Tensor& t) { return t.narrow(0, off, n); };
    at::Tensor hh = rows(h_), yy = rows(y_), gaa = rows(ga_), gxx = rows(gx_), g1 = gw1_[e], g2 = gw2_[e];
    common::MatmulOut(hh, rows(x_), w1_[e]);
    common::MatmulOut(yy, rows(a_), w2_[e]);
    common::MatmulOut(gaa, rows(gy_), w2_[e].t());
    common::MatmulOut(g2, rows(a_).t(), rows(gy_));
    common::MatmulOut(gxx, rows(gh_), w1_[e].t());
    common::MatmulOut(g1, rows(x_).t(), rows(gh_));
  }
  bool operator()(benchmark::State&) {
    (*this)();
    return true;
  }

 private:
  const Setup& s_;
  bool side_by_side_;
  at::Tensor x_, w1_, w2_, h_, a_, y_, gy_, ga_, gh_, gx_, gw1_, gw2_;
};

// One forward + backward of the whole layer.
class LayerStep {
 public:
  explicit LayerStep(Setup& s) : s_(s) {}
  ~LayerStep() { s_.layer->router().weight().mutable_grad().reset(); }
  // False (and the benchmark skipped with the reason) if the layer refuses its input.
  bool operator()(benchmark::State& state) {
    for (TaggedParam& p : s_.layer->Parameters()) p.tensor.mutable_grad().reset();  // zero_grad(set_to_none)
    at::Tensor x = s_.x.detach().requires_grad_(true);
    auto out = s_.layer->Forward(x, {.training = true});
    if (!out.ok()) {
      state.SkipWithError(std::string(out.status().message()).c_str());
      return false;
    }
    torch::autograd::backward({out->output, out->aux_loss}, {s_.grad_out, at::ones({})});
    benchmark::DoNotOptimize(x.grad().data_ptr());
    return true;
  }

 private:
  Setup& s_;
};

// The same GEMMs through at::mm_out (what the layer called before common::MatmulOut).
void BM_ExpertGemmsAten(benchmark::State& state) {
  Setup& s = Get(state);
  ExpertGemms gemms(s);
  common::SetMatmulBackend(common::MatmulBackend::kAten);
  for (auto _ : state) gemms();
  common::SetMatmulBackend(common::MatmulBackend::kAuto);
  Finish(state, s);
}

void BM_ExpertGemms(benchmark::State& state) {
  Setup& s = Get(state);
  ExpertGemms gemms(s);
  for (auto _ : state) gemms();
  Finish(state, s);
}

void BM_ExpertGemmsSideBySide(benchmark::State& state) {
  Setup& s = Get(state);
  ExpertGemms gemms(s, /*side_by_side=*/true);
  for (auto _ : state) gemms();
  Finish(state, s);
}

void BM_MoELayer(benchmark::State& state) {
  Setup& s = Get(state);
  LayerStep layer(s);
  for (auto _ : state) {
    if (!layer(state)) return;
  }
  Finish(state, s);
}

// step ÷ base, timed in pairs (common/paired_benchmark.h): `ratio` is the median of the
// per-pair ratios. A step's operator()(state) returns false after skipping the benchmark with
// an error.
constexpr int kPairs = 20;
constexpr int kLoopPairs = 8;  // the loops take up to 2 s each in fp32

template <typename Base, typename Step>
void Paired(benchmark::State& state, Setup& s, Base& base, Step& step) {
  if (common::TimePairs(state, base, step)) Finish(state, s);
}

template <typename Step>
void OverLimit(benchmark::State& state, Setup& s, Step& step) {
  ExpertGemms gemms(s);
  Paired(state, s, gemms, step);
}

void BM_LayerOverLimit(benchmark::State& state) {
  Setup& s = Get(state);
  LayerStep layer(s);
  OverLimit(state, s, layer);
}

void BM_LayerOverSideBySideLimit(benchmark::State& state) {
  Setup& s = Get(state);
  LayerStep layer(s);
  ExpertGemms gemms(s, /*side_by_side=*/true);
  Paired(state, s, gemms, layer);
}

at::Tensor Swiglu(const at::Tensor& h) {
  const int64_t f = h.size(1) / 2;
  return at::silu(h.narrow(1, 0, f)) * h.narrow(1, f, f);
}

// (a) and (b): the loop users write, one forward + backward. `stacked`: one [E, H, 2F] weight
// indexed per expert (its backward writes a full-size gradient per expert).
class LoopStep {
 public:
  LoopStep(const Setup& s, bool stacked) : s_(s), stacked_(stacked) {
    const int E = s.shape.experts;
    const int64_t F = s.shape.ffn;
    auto o = at::TensorOptions().dtype(s.dtype);
    if (stacked) {
      W1_ = (at::randn({E, kHidden, 2 * F}, o) * 0.02).requires_grad_(true);
      W2_ = (at::randn({E, F, kHidden}, o) * 0.02).requires_grad_(true);
    } else {
      for (int e = 0; e < E; ++e) {
        w1_.push_back((at::randn({kHidden, 2 * F}, o) * 0.02).requires_grad_(true));
        w2_.push_back((at::randn({F, kHidden}, o) * 0.02).requires_grad_(true));
      }
    }
  }
  bool operator()(benchmark::State&) {
    at::Tensor x = s_.x.detach().requires_grad_(true);
    at::Tensor out = at::zeros_like(x);
    for (int e = 0; e < s_.shape.experts; ++e) {
      const at::Tensor where = (s_.topk_idx == e).nonzero();  // [n, 2]: token, slot
      if (where.size(0) == 0) continue;
      const at::Tensor tok = where.select(1, 0), slot = where.select(1, 1);
      const at::Tensor xe = x.index_select(0, tok);
      const at::Tensor a = stacked_ ? Swiglu(xe.mm(W1_[e])) : Swiglu(xe.mm(w1_[e]));
      const at::Tensor ye = stacked_ ? a.mm(W2_[e]) : a.mm(w2_[e]);
      const at::Tensor we = s_.topk_w.index({tok, slot}).unsqueeze(1).to(s_.dtype);
      out = out.index_add(0, tok, ye * we);
    }
    out.backward(s_.grad_out);
    benchmark::DoNotOptimize(x.grad().data_ptr());
    return true;
  }

 private:
  const Setup& s_;
  const bool stacked_;
  std::vector<at::Tensor> w1_, w2_;
  at::Tensor W1_, W2_;
};

void Loop(benchmark::State& state, bool stacked) {
  Setup& s = Get(state);
  LoopStep loop(s, stacked);
  for (auto _ : state) loop(state);
  Finish(state, s);
}
void BM_LoopMasks(benchmark::State& state) { Loop(state, false); }
void BM_LoopStacked(benchmark::State& state) { Loop(state, true); }
// How many times faster the layer is than (a) and (b), in pairs: `ratio` = loop ÷ layer.
void LoopOverLayer(benchmark::State& state, bool stacked) {
  Setup& s = Get(state);
  LayerStep layer(s);
  LoopStep loop(s, stacked);
  Paired(state, s, layer, loop);
}
void BM_LoopMasksOverLayer(benchmark::State& state) { LoopOverLayer(state, false); }
void BM_LoopStackedOverLayer(benchmark::State& state) { LoopOverLayer(state, true); }

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

// One forward + backward of the grouped expert MLP alone (or, with one expert, of the dense
// MLP of equal FLOPs).
class MlpStep {
 public:
  MlpStep(const Setup& s, bool grouped) {
    experts::ExpertsConfig c{.hidden_size = kHidden, .ffn_hidden_size = s.shape.ffn,
                             .num_experts = grouped ? s.shape.experts : 1, .dtype = s.dtype};
    auto ex = experts::GroupedExperts::Create(c, 3);
    if (!ex.ok()) std::abort();
    ex_.emplace(*std::move(ex));
    counts_ = grouped ? s.counts : std::vector<int64_t>{s.rows};
    // Rows that need a gradient, as inside the layer: all six GEMMs per expert run.
    rows_ = at::randn({s.rows, kHidden}).to(s.dtype).requires_grad_(true);
    g_ = at::randn({s.rows, kHidden}).to(s.dtype);
  }
  bool operator()(benchmark::State&) {
    ex_->fc1().mutable_grad().reset();
    ex_->fc2().mutable_grad().reset();
    rows_.mutable_grad().reset();
    auto y = ex_->Forward(rows_, counts_);
    y->backward(g_);
    return true;
  }

 private:
  std::optional<experts::GroupedExperts> ex_;
  std::vector<int64_t> counts_;
  at::Tensor rows_, g_;
};

void Mlp(benchmark::State& state, bool grouped) {
  Setup& s = Get(state);
  MlpStep step(s, grouped);
  for (auto _ : state) step(state);
  Finish(state, s);
}
void BM_GroupedExperts(benchmark::State& state) { Mlp(state, true); }
// The grouped experts ÷ the GEMM limit, in pairs (what the experts add: activation, conversions).
void BM_ExpertsOverLimit(benchmark::State& state) {
  Setup& s = Get(state);
  MlpStep step(s, true);
  OverLimit(state, s, step);
}
// The grouped experts ÷ the dense MLP of equal FLOPs, in pairs.
void BM_ExpertsOverDense(benchmark::State& state) {
  Setup& s = Get(state);
  MlpStep dense(s, false), grouped(s, true);
  Paired(state, s, dense, grouped);
}
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

// Permute + weighted unpermute ÷ the two memcpys above, in alternating pairs of kCopyReps
// calls each (ratio = permutation ÷ memcpy): on a shared host the standalone times of these
// memory-bound loops move with the neighbours' cache and memory traffic, so that comparing
// BM_PermuteUnpermute with BM_Memcpy from separate runs gave anything from 1.1 to 2.2 at the
// coarse shape, whose rows fit in the cache.
constexpr int kCopyReps = 8;
constexpr int kCopyPairs = 50;

class PermuteUnpermuteStep {
 public:
  explicit PermuteUnpermuteStep(const Setup& s) : s_(s) {}
  bool operator()(benchmark::State&) {
    for (int i = 0; i < kCopyReps; ++i) {
      const at::Tensor rows = dispatch::Permute(s_.x, *s_.plan);
      benchmark::DoNotOptimize(dispatch::Unpermute(rows, s_.probs, *s_.plan).data_ptr());
    }
    return true;
  }

 private:
  const Setup& s_;
};

class MemcpyStep {
 public:
  explicit MemcpyStep(const Setup& s)
      : a_(at::randn({s.rows, kHidden}).to(s.dtype)), b_(at::empty_like(a_)), c_(at::empty_like(a_)) {}
  bool operator()(benchmark::State&) {
    for (int i = 0; i < kCopyReps; ++i) {
      b_.copy_(a_);
      c_.copy_(b_);
      benchmark::DoNotOptimize(c_.data_ptr());
    }
    return true;
  }

 private:
  at::Tensor a_, b_, c_;
};

void BM_PermuteUnpermuteOverMemcpy(benchmark::State& state) {
  Setup& s = Get(state);
  MemcpyStep copy(s);
  PermuteUnpermuteStep permute(s);
  Paired(state, s, copy, permute);
}

void ShapeArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"shape", "bf16"})->Unit(benchmark::kMillisecond);
  for (int shape : {0, 1}) {
    for (int dt : {0, 1}) b->Args({shape, dt});
  }
}
void Shapes(benchmark::internal::Benchmark* b) { ShapeArgs(b->UseRealTime()->MinTime(4)); }

BENCHMARK(BM_ExpertGemms)->Apply(Shapes);
BENCHMARK(BM_ExpertGemmsSideBySide)->Apply(Shapes);
BENCHMARK(BM_ExpertGemmsAten)->Apply(Shapes);
BENCHMARK(BM_MoELayer)->Apply(Shapes);
BENCHMARK(BM_LayerOverLimit)->Apply(ShapeArgs)->UseManualTime()->Iterations(kPairs);
BENCHMARK(BM_LayerOverSideBySideLimit)->Apply(ShapeArgs)->UseManualTime()->Iterations(kPairs);
BENCHMARK(BM_LoopMasks)->Apply(Shapes);
BENCHMARK(BM_LoopStacked)->Apply(Shapes);
BENCHMARK(BM_LoopMasksOverLayer)->Apply(ShapeArgs)->UseManualTime()->Iterations(kLoopPairs);
BENCHMARK(BM_LoopStackedOverLayer)->Apply(ShapeArgs)->UseManualTime()->Iterations(kLoopPairs);
BENCHMARK(BM_Router)->Apply(Shapes);
BENCHMARK(BM_GroupedExperts)->Apply(Shapes);
BENCHMARK(BM_ExpertsOverLimit)->Apply(ShapeArgs)->UseManualTime()->Iterations(kPairs);
BENCHMARK(BM_ExpertsOverDense)->Apply(ShapeArgs)->UseManualTime()->Iterations(kPairs);
BENCHMARK(BM_DenseMlp)->Apply(Shapes);
BENCHMARK(BM_PermuteUnpermute)->Apply(Shapes);
BENCHMARK(BM_Permute)->Apply(Shapes);
BENCHMARK(BM_Unpermute)->Apply(Shapes);
BENCHMARK(BM_PermuteUnpermuteFwdBwd)->Apply(Shapes);
BENCHMARK(BM_Memcpy)->Apply(Shapes);
BENCHMARK(BM_PermuteUnpermuteOverMemcpy)->Apply(ShapeArgs)->UseManualTime()->Iterations(kCopyPairs);

}  // namespace
}  // namespace switchyard::moe
