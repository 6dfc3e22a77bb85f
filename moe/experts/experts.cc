#include "moe/experts/experts.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include <immintrin.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ThreadLocalState.h>
#include <torch/csrc/autograd/custom_function.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/bf16.h"
#include "common/cpu_clones.h"
#include "common/matmul.h"
#include "common/parallel.h"

namespace switchyard::experts {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using common::MatmulOut;

std::vector<int64_t> Offsets(const std::vector<int64_t>& counts) {
  std::vector<int64_t> off(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e) off[e + 1] = off[e] + counts[e];
  return off;
}

struct GroupedMatmulFn : torch::autograd::Function<GroupedMatmulFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const std::vector<int64_t>& counts, const std::vector<int64_t>& expert) {
    ctx->save_for_backward({x, w});
    ctx->saved_data["counts"] = counts;
    ctx->saved_data["expert"] = expert;
    const std::vector<int64_t> off = Offsets(counts);
    const at::ScalarType ct = CpuGemmComputeType(x.scalar_type());
    const at::Tensor xc = x.to(ct), wc = w.to(ct);
    at::Tensor out = at::empty({x.size(0), w.size(2)}, xc.options());
    for (size_t s = 0; s < counts.size(); ++s) {
      if (counts[s] == 0) continue;
      at::Tensor o = out.narrow(0, off[s], counts[s]);
      MatmulOut(o, xc.narrow(0, off[s], counts[s]), wc[expert[s]]);
    }
    return out.to(x.scalar_type());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::ScalarType ct = CpuGemmComputeType(saved[0].scalar_type());
    const at::Tensor x = saved[0].to(ct), w = saved[1].to(ct);
    const std::vector<int64_t> counts = ctx->saved_data["counts"].toIntVector();
    const std::vector<int64_t> expert = ctx->saved_data["expert"].toIntVector();
    const std::vector<int64_t> off = Offsets(counts);
    const at::Tensor g = grads[0].to(ct).contiguous();
    at::Tensor gx, gw;
    if (ctx->needs_input_grad(0)) {
      gx = at::empty_like(x);
      for (size_t s = 0; s < counts.size(); ++s) {
        if (counts[s] == 0) continue;
        at::Tensor o = gx.narrow(0, off[s], counts[s]);
        MatmulOut(o, g.narrow(0, off[s], counts[s]), w[expert[s]].t());
      }
    }
    if (ctx->needs_input_grad(1)) {
      // bf16 GEMMs sum an expert's segments into an fp32 gradient, rounded once at the end
      // (into bf16 it would round after every segment: up to EP x ETP times under EP).
      gw = at::empty(w.sizes(), w.options().dtype(ct == at::kBFloat16 ? at::kFloat : ct));
      std::vector<bool> written(w.size(0), false);
      for (size_t s = 0; s < counts.size(); ++s) {
        if (counts[s] == 0) continue;
        at::Tensor o = gw[expert[s]];
        const at::Tensor xs = x.narrow(0, off[s], counts[s]).t(), gs = g.narrow(0, off[s], counts[s]);
        if (written[expert[s]]) {
          MatmulOut(o, xs, gs, /*accumulate=*/true);  // a later segment of the same expert adds to its gradient
        } else {
          MatmulOut(o, xs, gs);
          written[expert[s]] = true;
        }
      }
      for (int64_t e = 0; e < w.size(0); ++e) {
        if (!written[e]) gw[e].zero_();
      }
    }
    if (gx.defined()) gx = gx.to(saved[0].scalar_type());
    if (gw.defined()) gw = gw.to(saved[1].scalar_type());
    return {gx, gw, at::Tensor(), at::Tensor()};
  }
};

// Segments grouped by expert: the fused MLP converts each expert's weights once and sums its
// gradient over all of that expert's segments before writing it.
struct Segments {
  std::vector<int64_t> off, rows;
  std::vector<std::vector<int64_t>> of_expert;
  int64_t max_rows = 0;
};

Segments MakeSegments(const std::vector<int64_t>& counts, const std::vector<int64_t>& expert, int64_t num_experts) {
  Segments sg;
  sg.off = Offsets(counts);
  sg.rows = counts;
  sg.of_expert.resize(num_experts);
  for (size_t s = 0; s < counts.size(); ++s) {
    if (counts[s] == 0) continue;
    sg.of_expert[expert[s]].push_back(static_cast<int64_t>(s));
    sg.max_rows = std::max(sg.max_rows, counts[s]);
  }
  return sg;
}

// --- Storage <-> compute conversions ------------------------------------------------------
// bf16 storage computing in fp32 converts every GEMM operand and result per expert. ATen's
// copy_ runs one TensorIterator and one parallel region per tensor: 12 per expert over a
// forward and backward, whose overhead at the fine-grained shape (64 experts of ~500 rows)
// cost as much as the conversions themselves. CastAll does all the conversions that are due
// at one point in one parallel region, with loops of our own.

SY_CPU_CLONES
void WidenBf16Span(const uint16_t* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = common::WidenBf16(src[i]);
}

SY_CPU_CLONES
void NarrowToBf16Span(const float* __restrict__ src, uint16_t* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = common::NarrowToBf16(src[i]);
}

// A conversion dst <- src of two tensors with the same number of elements.
struct Cast {
  at::Tensor dst, src;
};

// Runs every cast: fp32 <-> bf16 between contiguous tensors in one parallel region, anything
// else with copy_.
void CastAll(std::initializer_list<Cast> casts) {
  struct Span {
    char* dst;
    const char* src;
    bool widen;
  };
  std::vector<Span> spans;
  std::vector<int64_t> start = {0};  // span i covers elements [start[i], start[i + 1]) of the whole
  for (const Cast& c : casts) {
    at::Tensor dst = c.dst;
    const bool widen = dst.scalar_type() == at::kFloat && c.src.scalar_type() == at::kBFloat16;
    const bool narrow = dst.scalar_type() == at::kBFloat16 && c.src.scalar_type() == at::kFloat;
    if (!(widen || narrow) || !dst.is_contiguous() || !c.src.is_contiguous() || dst.numel() != c.src.numel()) {
      dst.copy_(c.src);
      continue;
    }
    if (dst.numel() == 0) continue;
    spans.push_back({static_cast<char*>(dst.data_ptr()), static_cast<const char*>(c.src.data_ptr()), widen});
    start.push_back(start.back() + dst.numel());
  }
  if (spans.empty()) return;
  at::parallel_for(0, start.back(), int64_t{1} << 15, [&](int64_t b, int64_t e) {
    size_t i = std::upper_bound(start.begin(), start.end(), b) - start.begin() - 1;
    for (; b < e; ++i) {
      const int64_t lo = b - start[i], n = std::min(e, start[i + 1]) - b;
      const Span& sp = spans[i];
      if (sp.widen) {
        WidenBf16Span(reinterpret_cast<const uint16_t*>(sp.src) + lo, reinterpret_cast<float*>(sp.dst) + lo, n);
      } else {
        NarrowToBf16Span(reinterpret_cast<const float*>(sp.src) + lo, reinterpret_cast<uint16_t*>(sp.dst) + lo, n);
      }
      b += n;
    }
  });
}

// The activation of one segment into a ([n, F]); h is [n, F], or [n, 2F] = [gate | up] for SwiGLU.
void ActivationForward(Activation act, const at::Tensor& h, at::Tensor& a) {
  switch (act) {
    case Activation::kSwiglu: {
      const int64_t f = a.size(1);
      at::silu_out(a, h.narrow(1, 0, f)).mul_(h.narrow(1, f, f));
      return;
    }
    case Activation::kGelu: at::gelu_out(a, h); return;
    case Activation::kRelu: at::clamp_min_out(a, h, 0); return;
  }
}

// gh = ga · d act(h) / dh. SwiGLU: d_up = ga·silu(gate), d_gate = silu'(gate)·ga·up, written
// into the two halves of gh; tmp is an [n, F] scratch.
void ActivationBackward(Activation act, const at::Tensor& ga, const at::Tensor& h, at::Tensor& gh, at::Tensor& tmp) {
  switch (act) {
    case Activation::kSwiglu: {
      const int64_t f = ga.size(1);
      const at::Tensor gate = h.narrow(1, 0, f), up = h.narrow(1, f, f);
      at::Tensor d_gate = gh.narrow(1, 0, f), d_up = gh.narrow(1, f, f);
      at::silu_out(d_up, gate).mul_(ga);
      at::silu_backward_out(d_gate, at::mul_out(tmp, ga, up), gate);
      return;
    }
    case Activation::kGelu: at::gelu_backward_out(gh, ga, h); return;
    case Activation::kRelu: at::threshold_backward_out(gh, ga, h, 0); return;
  }
}

// --- Fused SwiGLU -------------------------------------------------------------------------
// One pass per row block instead of ATen's separate silu, mul, silu_backward passes (the
// backward needed six, computing the exponential three times). The arithmetic is fp32
// whatever the storage; the loops are built for AVX-512, AVX2 and plain x86-64 and picked at
// load time; the exponential is our own so that GCC can vectorise it.

using common::NarrowToBf16;
using common::WidenBf16;

// e^x for the sigmoid, to within 2 ulp for |x| < 87 (Cephes' expf: x = k·ln2 + r with
// |r| ≤ ln2/2, e^r by a degree-7 polynomial, 2^k through the exponent bits). Below −87.3
// it returns 0 (e^x is subnormal there), above 88.7 +inf; NaN stays NaN. Branch-free, so
// that it vectorises; the rounding of k uses the 1.5·2^23 trick instead of floor.
inline float ExpForSigmoid(float x) {
  constexpr float kHi = 88.7f, kLo = -87.3f;
  float xc = x > kHi ? kHi : x;
  xc = xc < kLo ? kLo : xc;  // comparisons with NaN are false: NaN goes on through
  constexpr float kRound = 12582912.0f;  // 1.5·2^23
  float k = (xc * 1.44269504088896341f + kRound) - kRound;
  k = k > 127.0f ? 127.0f : k;
  const float r = (xc - k * 0.693359375f) - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float e = p * scale;
  e = x > kHi ? std::numeric_limits<float>::infinity() : e;
  e = x < kLo ? 0.0f : e;
  return e;
}

// Element access in fp32 for the two storage types the kernels take (bf16 as its bits).
inline float Load(const float* p, int64_t i) { return p[i]; }
inline float Load(const uint16_t* p, int64_t i) { return WidenBf16(p[i]); }
inline void Store(float* p, int64_t i, float v) { p[i] = v; }
inline void Store(uint16_t* p, int64_t i, float v) { p[i] = NarrowToBf16(v); }

// h row = [gate (f) | up (f)]. Forward: a = w·silu(gate)·up, rounded once into a's type; w
// is the row's routing weight (1 without one: then a is exactly silu(gate)·up).
template <typename H, typename A>
__attribute__((always_inline)) inline void SwigluForwardRow(const H* __restrict__ h, A* __restrict__ a, int64_t f,
                                                            float w) {
  for (int64_t c = 0; c < f; ++c) {
    const float g = Load(h, c);
    Store(a, c, w * (g / (1.0f + ExpForSigmoid(-g)) * Load(h, f + c)));
  }
}

SY_CPU_CLONES void SwigluForwardF32(const float* __restrict__ h, float* __restrict__ a, int64_t f, float w) {
  SwigluForwardRow(h, a, f, w);
}

// bf16 GEMMs (CPUs with bf16 units): h comes from the GEMM in bf16, a goes to the next in bf16.
SY_CPU_CLONES void SwigluForwardBf16(const uint16_t* __restrict__ h, uint16_t* __restrict__ a, int64_t f, float w) {
  SwigluForwardRow(h, a, f, w);
}

// bf16 storage with fp32 GEMMs: h comes from the fp32 GEMM; each value is rounded to bf16,
// stored in h_store, and the rounded value is what the activation (and the backward, which
// reads h_store) sees.
SY_CPU_CLONES void SwigluForwardRoundBf16(const float* __restrict__ h, uint16_t* __restrict__ h_store,
                                          float* __restrict__ a, int64_t f, float w) {
  for (int64_t c = 0; c < f; ++c) {
    const uint16_t gb = NarrowToBf16(h[c]), ub = NarrowToBf16(h[f + c]);
    h_store[c] = gb, h_store[f + c] = ub;
    const float g = WidenBf16(gb);
    a[c] = w * (g / (1.0f + ExpForSigmoid(-g)) * WidenBf16(ub));
  }
}

// Backward of a = w·silu(gate)·up, from h and gw = dL/d(w·act) (the fc2 input's gradient):
// with s = sigmoid(gate) and d = w·gw, d_gate = d·up·s·(1 + gate·(1 − s)), d_up = d·gate·s,
// into gh = [d_gate | d_up]; a = w·gate·s·up again (fc2's input, for its weight gradient);
// writes the products gw·silu(gate)·up into prod (when not null), whose sum is dL/dw. gh and
// a are stored in gw's type (the type of the GEMMs that read them). (Summing in this loop
// instead, over 16 partial sums, cost it its AVX-512 vectorisation: experts ÷ GEMM limit
// 1.065 → 1.09–1.10 at both bf16 shapes.)
template <typename H, typename G>
__attribute__((always_inline)) inline void SwigluBackwardRow(const H* __restrict__ h, const G* __restrict__ gw,
                                                             G* __restrict__ gh, G* __restrict__ a, int64_t f,
                                                             float w, float* __restrict__ prod) {
  for (int64_t c = 0; c < f; ++c) {
    const float g = Load(h, c), u = Load(h, f + c), s = 1.0f / (1.0f + ExpForSigmoid(-g)), silu = g * s;
    const float dw = Load(gw, c), d = w * dw, act = silu * u;
    Store(a, c, w * act);
    Store(gh, c, d * u * s * (1.0f + g * (1.0f - s)));
    Store(gh, f + c, d * silu);
    if (prod != nullptr) prod[c] = dw * act;
  }
}

SY_CPU_CLONES void SwigluBackwardF32(const float* __restrict__ h, const float* __restrict__ gw, float* __restrict__ gh,
                                     float* __restrict__ a, int64_t f, float w, float* __restrict__ prod) {
  SwigluBackwardRow(h, gw, gh, a, f, w, prod);
}

SY_CPU_CLONES void SwigluBackwardBf16F32(const uint16_t* __restrict__ h, const float* __restrict__ gw,
                                         float* __restrict__ gh, float* __restrict__ a, int64_t f, float w,
                                         float* __restrict__ prod) {
  SwigluBackwardRow(h, gw, gh, a, f, w, prod);
}

SY_CPU_CLONES void SwigluBackwardBf16(const uint16_t* __restrict__ h, const uint16_t* __restrict__ gw,
                                      uint16_t* __restrict__ gh, uint16_t* __restrict__ a, int64_t f, float w,
                                      float* __restrict__ prod) {
  SwigluBackwardRow(h, gw, gh, a, f, w, prod);
}

// --- SwiGLU written for AVX-512 + AVX512-BF16 ------------------------------------------
// For bf16 GEMMs (the CPUs that run them natively all have these units) and for fp32 storage
// with fp32 GEMMs on the same CPUs (the loads and stores then are plain fp32). Here: e^(−|gate|) through
// vscalefps (which gives 0 and denormals where the exponent runs out, so no clamps), sigmoid =
// 1/(1 + e) or e/(1 + e) by rcp14 and one Newton step on 1 + e ∈ [1, 2], and vcvtneps2bf16 for
// the rounding (to nearest even, as NarrowToBf16; it flushes denormal results to zero). Same
// special values as ATen's silu: silu(+inf) = inf, silu(−inf) = NaN, NaN stays NaN. On rows
// in cache (512 × 256, 2-core AMD EPYC Zen 5) forward 0.27 against 0.43 ns an element for
// the portable loop, backward 0.47 against 0.80; inside the experts, where the backward reads
// the saved h from memory, the experts' forward + backward gains 1–2.5%. Full vectors are
// loaded unmasked: with masked loads for every vector the backward ran 2× slower there.
#define SY_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))
SY_INTRINSICS_BEGIN

// 16 bf16 values, or the first n < 16 of them (the rest zero).
SY_AVX512BF16 inline __m512 LoadBf16x16(const uint16_t* p, int64_t n) {
  const __m256i v = n >= 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                            : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

SY_AVX512BF16 inline void StoreBf16x16(uint16_t* p, __m512 v, int64_t n) {
  const __m256i b = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
  if (n >= 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), b);
  } else {
    _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), b);
  }
}

// sigmoid(g) for 16 lanes.
SY_AVX512BF16 inline __m512 Sigmoid16(__m512 g) {
  // x = −|g| ≤ 0 (NaN stays NaN: max_ps returns its second operand then).
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-104.0f), _mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(k, _mm512_set1_ps(-0.693359375f), x);
  r = _mm512_fmadd_ps(k, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512 e = _mm512_scalef_ps(p, k);  // e^x ∈ [0, 1]
  const __m512 d = _mm512_add_ps(e, _mm512_set1_ps(1.0f));
  const __m512 r0 = _mm512_rcp14_ps(d);
  const __m512 inv = _mm512_mul_ps(r0, _mm512_fnmadd_ps(d, r0, _mm512_set1_ps(2.0f)));
  const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mask_mul_ps(inv, neg, inv, e);  // gate < 0: e^gate / (1 + e^gate)
}

// 16 fp32 values, or the first n < 16 of them (the rest zero).
SY_AVX512BF16 inline __m512 Load16(const float* p, int64_t n) {
  return n >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
}
SY_AVX512BF16 inline __m512 Load16(const uint16_t* p, int64_t n) { return LoadBf16x16(p, n); }

SY_AVX512BF16 inline void Store16(float* p, __m512 v, int64_t n) {
  if (n >= 16) {
    _mm512_storeu_ps(p, v);
  } else {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
  }
}
SY_AVX512BF16 inline void Store16(uint16_t* p, __m512 v, int64_t n) { StoreBf16x16(p, v, n); }

// T: float (fp32 GEMMs on fp32 storage) or uint16_t (bf16 GEMMs: bf16 storage, as its bits).
template <typename T>
SY_AVX512BF16 void SwigluForwardAvx512(const T* __restrict__ h, T* __restrict__ a, int64_t f, float w) {
  const __m512 wv = _mm512_set1_ps(w);
  for (int64_t c = 0; c < f; c += 16) {
    const int64_t m = f - c;
    const __m512 g = Load16(h + c, m), u = Load16(h + f + c, m);
    const __m512 silu = _mm512_mul_ps(g, Sigmoid16(g));
    Store16(a + c, _mm512_mul_ps(wv, _mm512_mul_ps(silu, u)), m);
  }
}

// As SwigluBackwardRow; returns Σ gw·silu(gate)·up (the row weight's gradient).
template <typename T>
SY_AVX512BF16 float SwigluBackwardAvx512(const T* __restrict__ h, const T* __restrict__ gw, T* __restrict__ gh,
                                         T* __restrict__ a, int64_t f, float w) {
  const __m512 wv = _mm512_set1_ps(w), one = _mm512_set1_ps(1.0f);
  __m512 dot = _mm512_setzero_ps();
  for (int64_t c = 0; c < f; c += 16) {
    const int64_t m = f - c;
    const __m512 g = Load16(h + c, m), u = Load16(h + f + c, m), dw = Load16(gw + c, m);
    const __m512 s = Sigmoid16(g), silu = _mm512_mul_ps(g, s), act = _mm512_mul_ps(silu, u);
    const __m512 d = _mm512_mul_ps(wv, dw);
    Store16(a + c, _mm512_mul_ps(wv, act), m);
    // d·up·s·(1 + gate·(1 − s))
    const __m512 t = _mm512_fmadd_ps(g, _mm512_sub_ps(one, s), one);
    Store16(gh + c, _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(d, u), s), t), m);
    Store16(gh + f + c, _mm512_mul_ps(d, silu), m);
    dot = _mm512_add_ps(dot, _mm512_mul_ps(dw, act));  // lanes past the end: dw = 0
  }
  return _mm512_reduce_add_ps(dot);
}

SY_INTRINSICS_END
#undef SY_AVX512BF16

std::atomic<SwigluKernels> swiglu_kernels{SwigluKernels::kAuto};

// Whether SwiGLU runs the AVX-512 kernels (built for AVX512-BF16, so only on CPUs with it,
// also for fp32; elsewhere the portable loops).
bool UseAvx512Swiglu() { return common::HasAvx512Bf16() && swiglu_kernels.load() == SwigluKernels::kAuto; }

// Σ v, over 16 partial sums so that it vectorises (one running sum is a serial chain).
SY_CPU_CLONES float SumF32(const float* __restrict__ v, int64_t n) {
  constexpr int kLanes = 16;
  float part[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += v[c + l];
  }
  float sum = 0;
  for (; c < n; ++c) sum += v[c];
  for (int l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

// Whether GroupedMlp runs SwiGLU through the fused kernels: fp32 or bf16 storage, computed
// in fp32 or (where the CPU has bf16 units) bf16 GEMMs. fp16 and fp64 keep ATen's ops.
bool FusedSwiglu(Activation act, at::ScalarType storage) {
  return act == Activation::kSwiglu && (storage == at::kFloat || storage == at::kBFloat16);
}

// Rows per parallel task: about 16K elements each.
int64_t RowGrain(int64_t f) { return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(f, 1)); }

// hs: [n, 2F] GEMM output, fp32 or bf16; a: [n, F] in the GEMMs' compute type. h_store: with
// bf16 storage and fp32 GEMMs, the same rows of the saved h (bf16), into which hs is rounded;
// else undefined (hs is the saved h). w: the rows' routing weights, or null (all 1).
void SwigluForward(const at::Tensor& hs, const at::Tensor& h_store, at::Tensor& a, const float* w) {
  const int64_t n = hs.size(0), f = a.size(1);
  const bool bf16 = hs.scalar_type() == at::kBFloat16;
  TORCH_INTERNAL_ASSERT(a.scalar_type() == hs.scalar_type());
  void* hp = hs.data_ptr();
  void* ap = a.data_ptr();
  uint16_t* sp = h_store.defined() ? static_cast<uint16_t*>(h_store.data_ptr()) : nullptr;
  // The AVX-512 kernels take h and a of one type (not the rounding into a bf16 h_store).
  const bool avx512 = sp == nullptr && UseAvx512Swiglu();
  at::parallel_for(0, n, RowGrain(f), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t hr = r * 2 * f, ar = r * f;
      const float wr = w != nullptr ? w[r] : 1.0f;
      if (avx512 && bf16) {
        SwigluForwardAvx512(static_cast<uint16_t*>(hp) + hr, static_cast<uint16_t*>(ap) + ar, f, wr);
      } else if (avx512) {
        SwigluForwardAvx512(static_cast<float*>(hp) + hr, static_cast<float*>(ap) + ar, f, wr);
      } else if (bf16) {
        SwigluForwardBf16(static_cast<uint16_t*>(hp) + hr, static_cast<uint16_t*>(ap) + ar, f, wr);
      } else if (sp != nullptr) {
        SwigluForwardRoundBf16(static_cast<float*>(hp) + hr, sp + hr, static_cast<float*>(ap) + ar, f, wr);
      } else {
        SwigluForwardF32(static_cast<float*>(hp) + hr, static_cast<float*>(ap) + ar, f, wr);
      }
    }
  });
}

// h: [n, 2F] saved pre-activation, fp32 or bf16; ga: [n, F] (the fc2 input's gradient) in the
// GEMMs' compute type, and gh ([n, 2F]) and a ([n, F], fc2's input recomputed for its weight
// gradient) in it too. w: the rows' routing weights, or null (all 1); dw: where their
// gradients go, or null.
void SwigluBackward(const at::Tensor& h, const at::Tensor& ga, at::Tensor& gh, at::Tensor& a, const float* w,
                    float* dw) {
  const int64_t n = h.size(0), f = ga.size(1);
  const bool h_bf16 = h.scalar_type() == at::kBFloat16, g_bf16 = ga.scalar_type() == at::kBFloat16;
  TORCH_INTERNAL_ASSERT(gh.scalar_type() == ga.scalar_type() && a.scalar_type() == ga.scalar_type() &&
                        (h_bf16 || !g_bf16));
  void *hp = h.data_ptr(), *gap = ga.data_ptr(), *ghp = gh.data_ptr(), *ap = a.data_ptr();
  // The AVX-512 kernels take h, ga, gh and a of one type (not bf16 h with fp32 GEMMs).
  const bool avx512 = h_bf16 == g_bf16 && UseAvx512Swiglu();
  // h was saved in the forward and comes from memory, not from the cache like the GEMM's ga;
  // its rows are prefetched about 8 KiB ahead. Without this the AVX-512 backward of 64
  // experts × 512 rows (bf16, F = 256), each after its ga GEMM, took 2.6-2.95 ms against
  // 2.1-2.2 with h in cache; with it, 2.1-2.3 (2-core AMD EPYC Zen 5). Layer ÷ GEMM limit at
  // the fine bf16 shape, means of 6 alternating runs: 1.163 → 1.155.
  const int64_t h_row_bytes = 2 * f * h.element_size();
  const int64_t ahead = std::max<int64_t>(2, 8192 / std::max<int64_t>(h_row_bytes, 1));
  auto prefetch_h_row = [&](int64_t r) {
    common::PrefetchBytes(static_cast<const char*>(hp) + r * h_row_bytes, h_row_bytes);
  };
  at::parallel_for(0, n, RowGrain(f), [&](int64_t b, int64_t e) {
    // The portable loops write the weight gradient's products here; the AVX-512 kernel sums them itself.
    const bool products = dw != nullptr && !avx512;
    std::vector<float> scratch(products ? f : 0);
    float* prod = products ? scratch.data() : nullptr;
    for (int64_t r = b; r < std::min(e, b + ahead); ++r) prefetch_h_row(r);
    for (int64_t r = b; r < e; ++r) {
      if (r + ahead < e) prefetch_h_row(r + ahead);
      const int64_t hr = r * 2 * f, gr = r * f;
      const float wr = w != nullptr ? w[r] : 1.0f;
      if (avx512) {
        const float dot =
            g_bf16 ? SwigluBackwardAvx512(static_cast<uint16_t*>(hp) + hr, static_cast<uint16_t*>(gap) + gr,
                                          static_cast<uint16_t*>(ghp) + hr, static_cast<uint16_t*>(ap) + gr, f, wr)
                   : SwigluBackwardAvx512(static_cast<float*>(hp) + hr, static_cast<float*>(gap) + gr,
                                          static_cast<float*>(ghp) + hr, static_cast<float*>(ap) + gr, f, wr);
        if (dw != nullptr) dw[r] = dot;
        continue;
      }
      if (g_bf16) {
        SwigluBackwardBf16(static_cast<uint16_t*>(hp) + hr, static_cast<uint16_t*>(gap) + gr,
                           static_cast<uint16_t*>(ghp) + hr, static_cast<uint16_t*>(ap) + gr, f, wr, prod);
      } else if (h_bf16) {
        SwigluBackwardBf16F32(static_cast<uint16_t*>(hp) + hr, static_cast<float*>(gap) + gr,
                              static_cast<float*>(ghp) + hr, static_cast<float*>(ap) + gr, f, wr, prod);
      } else {
        SwigluBackwardF32(static_cast<float*>(hp) + hr, static_cast<float*>(gap) + gr, static_cast<float*>(ghp) + hr,
                          static_cast<float*>(ap) + gr, f, wr, prod);
      }
      if (dw != nullptr) dw[r] = SumF32(prod, f);
    }
  });
}

// Whether GroupedMlpFn has row weights: [N] for N > 0 rows (none: an empty tensor).
bool Weighted(const at::Tensor& rw, const at::Tensor& x) { return x.size(0) > 0 && rw.numel() == x.size(0); }

// The row weights from row `first` on, or null (no weights: all 1).
const float* WeightsFrom(const at::Tensor& rw, int64_t first) {
  return rw.numel() > 0 ? rw.data_ptr<float>() + first : nullptr;
}

// Runs body(e, worker) for every expert e with rows; worker < Workers() names the scratch
// buffers the call may use. With several intra-op threads and at least 2 experts a thread
// (counting only those of at most 1/threads of the rows), whole experts run side by side,
// one per thread, each product on its thread alone (common::MatmulOut in a parallel region),
// largest first, each thread taking the next when done; experts bigger than that run before,
// one at a time on all threads. One product of ~500 rows split over threads pays for the
// split (at the fine-grained shape, 2 threads: 92 % of twice one thread's speed).
// Each worker has scratch of its own: `fixed_bytes` (weight-sized buffers) plus `row_bytes`
// per row of the largest segment it may meet; when the workers' scratch would pass
// kSideScratchBudget (large experts on many threads, whose products split well anyway),
// experts run one at a time.
constexpr int64_t kSideScratchBudget = int64_t{256} << 20;

class ExpertSchedule {
 public:
  ExpertSchedule(const Segments& sg, int64_t fixed_bytes, int64_t row_bytes) {
    const int64_t E = static_cast<int64_t>(sg.of_expert.size());
    std::vector<int64_t> work(E, 0);
    int64_t total = 0;
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t s : sg.of_expert[e]) work[e] += sg.rows[s];
      total += work[e];
    }
    const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
    for (int64_t e = 0; e < E; ++e) {
      if (work[e] == 0) continue;
      (threads > 1 && work[e] * threads <= total ? side_ : alone_).push_back(e);
    }
    if (threads < 2 || static_cast<int64_t>(side_.size()) < 2 * threads) {
      OneAtATime();
      return;
    }
    for (int64_t e : side_) {
      for (int64_t s : sg.of_expert[e]) side_rows_ = std::max(side_rows_, sg.rows[s]);
    }
    if (threads * (fixed_bytes + side_rows_ * row_bytes) > kSideScratchBudget) {
      OneAtATime();
      return;
    }
    std::stable_sort(side_.begin(), side_.end(), [&](int64_t a, int64_t b) { return work[a] > work[b]; });
    workers_ = threads;
  }
  int64_t Workers() const { return workers_; }
  // The rows of the largest segment worker w may meet (its scratch size): worker 0 runs the
  // experts that run alone too.
  int64_t MaxRows(const Segments& sg, int64_t w) const { return w == 0 ? sg.max_rows : side_rows_; }
  template <typename Body>
  void Run(const Body& body) const {
    for (int64_t e : alone_) body(e, 0);
    if (side_.empty()) return;
    std::atomic<size_t> next{0};
    // The caller's thread-local state (grad mode off inside an autograd function, among others)
    // on every thread: at::parallel_for does not carry it over.
    const at::ThreadLocalState caller;
    at::parallel_for(0, workers_, 1, [&](int64_t begin, int64_t end) {
      const at::ThreadLocalStateGuard guard(caller);
      for (int64_t w = begin; w < end; ++w) {
        for (size_t i = next++; i < side_.size(); i = next++) body(side_[i], w);
      }
    });
  }

 private:
  void OneAtATime() {  // every expert, in expert order
    alone_.insert(alone_.end(), side_.begin(), side_.end());
    std::sort(alone_.begin(), alone_.end());
    side_.clear();
    side_rows_ = 0;
  }

  std::vector<int64_t> alone_, side_;
  int64_t workers_ = 1, side_rows_ = 0;
};

// y = (rw ⊙ act(x @ w1[e])) @ w2[e] per segment, one segment at a time (an expert's segments
// in order; experts side by side as ExpertSchedule decides), so that the
// activation and its backward run on a block still in cache instead of streaming [N, F]
// tensors through memory between separate ops. rw: optional fp32 [N] row weights (the
// routing weights, applied to fc2's input as Megatron-Core's fused permute does; their
// gradient <dL/d(fc2 input), act> comes from the block in cache too). Saves x and the
// pre-activation h; the backward recomputes act(h) per segment for the fc2 weight gradient.
// Low-precision storage computes in CpuGemmComputeType per segment: h is rounded to storage
// once and the activation reads the rounded value, so forward and backward see the same h.
struct GroupedMlpFn : torch::autograd::Function<GroupedMlpFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                            const at::Tensor& rw, const std::vector<int64_t>& counts, const std::vector<int64_t>& expert,
                            int64_t act_id) {
    const Activation act = static_cast<Activation>(act_id);
    const at::ScalarType ct = CpuGemmComputeType(x.scalar_type());
    const bool low = ct != x.scalar_type();
    const bool fused = FusedSwiglu(act, x.scalar_type());
    const Segments sg = MakeSegments(counts, expert, w1.size(0));
    const int64_t H = x.size(1), F1 = w1.size(2), F = w2.size(1);
    at::Tensor h = at::empty({x.size(0), F1}, x.options()), y = at::empty({x.size(0), H}, x.options());
    const at::TensorOptions co = x.options().dtype(ct);
    const int64_t cb = c10::elementSize(ct);
    const ExpertSchedule schedule(sg, low ? (H * F1 + F * H) * cb : 0, (F + (low ? 2 * H + F1 : 0)) * cb);
    struct Scratch {
      at::Tensor a, x, h, y, w1, w2;
    };
    std::vector<Scratch> bufs(schedule.Workers());
    for (int64_t w = 0; w < schedule.Workers(); ++w) {
      const int64_t m = schedule.MaxRows(sg, w);
      Scratch& b = bufs[w];
      b.a = at::empty({m, F}, co);
      if (low) {
        b.x = at::empty({m, H}, co), b.h = at::empty({m, F1}, co), b.y = at::empty({m, H}, co);
        b.w1 = at::empty({H, F1}, co), b.w2 = at::empty({F, H}, co);
      }
    }
    schedule.Run([&](int64_t e, int64_t worker) {
      const Scratch& b = bufs[worker];
      const at::Tensor w1e = low ? b.w1 : w1[e], w2e = low ? b.w2 : w2[e];
      bool first = true;
      for (int64_t s : sg.of_expert[e]) {
        const int64_t n = sg.rows[s];
        auto rows = [&](const at::Tensor& t) { return t.narrow(0, sg.off[s], n); };
        auto scratch = [&](const at::Tensor& t) { return t.narrow(0, 0, n); };
        const at::Tensor xs = low ? scratch(b.x) : rows(x);
        if (low && first) {
          CastAll({{b.w1, w1[e]}, {b.w2, w2[e]}, {xs, rows(x)}});
        } else if (low) {
          CastAll({{xs, rows(x)}});
        }
        first = false;
        at::Tensor hs = low ? scratch(b.h) : rows(h);
        MatmulOut(hs, xs, w1e);
        at::Tensor as = scratch(b.a);
        if (fused) {
          SwigluForward(hs, low ? rows(h) : at::Tensor(), as, WeightsFrom(rw, sg.off[s]));  // also rounds h into storage
        } else {
          if (low) hs.copy_(rows(h).copy_(hs));
          ActivationForward(act, hs, as);
          if (Weighted(rw, x)) as.mul_(rows(rw).unsqueeze(1));
        }
        at::Tensor ys = low ? scratch(b.y) : rows(y);
        MatmulOut(ys, as, w2e);
        if (low) CastAll({{rows(y), ys}});
      }
    });
    ctx->save_for_backward({x, w1, w2, h, rw});
    ctx->saved_data["counts"] = counts;
    ctx->saved_data["expert"] = expert;
    ctx->saved_data["act"] = act_id;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w1 = saved[1], &w2 = saved[2], &h = saved[3], &rw = saved[4];
    const Activation act = static_cast<Activation>(ctx->saved_data["act"].toInt());
    const Segments sg = MakeSegments(ctx->saved_data["counts"].toIntVector(),
                                     ctx->saved_data["expert"].toIntVector(), w1.size(0));
    const at::ScalarType ct = CpuGemmComputeType(x.scalar_type());
    const bool low = ct != x.scalar_type();
    const bool fused = FusedSwiglu(act, x.scalar_type());
    const at::Tensor gy = grads[0].to(x.scalar_type()).contiguous();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    const int64_t H = x.size(1), F1 = w1.size(2), F = w2.size(1);
    at::Tensor gx = need_x ? at::empty_like(x) : at::Tensor();
    at::Tensor gw1 = need_w ? at::empty_like(w1) : at::Tensor(), gw2 = need_w ? at::empty_like(w2) : at::Tensor();
    // The row weights' gradient: every row lies in some segment, so every entry is written.
    const bool weighted = Weighted(rw, x), need_rw = weighted && ctx->needs_input_grad(3);
    at::Tensor grw = need_rw ? at::empty_like(rw) : at::Tensor();
    const at::TensorOptions co = x.options().dtype(ct);
    const int64_t cb = c10::elementSize(ct);
    bool split = false;  // an expert whose rows come in several segments (sum32 below)
    for (const std::vector<int64_t>& of : sg.of_expert) split = split || of.size() > 1;
    const bool tmp_rows = act == Activation::kSwiglu && !fused;
    const int64_t fixed = ((low ? (need_w ? 2 : 1) : 0) * cb + (split && !low && ct == at::kBFloat16 ? 4 : 0)) *
                          (H * F1 + F * H);
    const ExpertSchedule schedule(sg, fixed, (2 * F + F1 + (tmp_rows ? F : 0) + (low ? 3 * H + (fused ? 0 : F1) : 0)) * cb);
    struct Scratch {
      at::Tensor a, ga, gh, tmp, x, h, gy, gx, w1, w2, gw1, gw2;
      at::Tensor gw1_sum, gw2_sum;  // made when first needed
    };
    std::vector<Scratch> bufs(schedule.Workers());
    for (int64_t w = 0; w < schedule.Workers(); ++w) {
      const int64_t m = schedule.MaxRows(sg, w);
      Scratch& b = bufs[w];
      b.a = at::empty({m, F}, co), b.ga = at::empty({m, F}, co), b.gh = at::empty({m, F1}, co);
      if (tmp_rows) b.tmp = at::empty({m, F}, co);
      if (low) {
        b.x = at::empty({m, H}, co), b.gy = at::empty({m, H}, co), b.gx = at::empty({m, H}, co);
        b.w1 = at::empty({H, F1}, co), b.w2 = at::empty({F, H}, co);
        if (need_w) b.gw1 = at::empty({H, F1}, co), b.gw2 = at::empty({F, H}, co);
        if (!fused) b.h = at::empty({m, F1}, co);
      }
    }
    if (need_w) {
      for (int64_t e = 0; e < w1.size(0); ++e) {
        if (sg.of_expert[e].empty()) gw1[e].zero_(), gw2[e].zero_();
      }
    }
    // bf16 GEMMs: an expert with several segments (EP x ETP of them under EP) sums their
    // weight gradients in fp32 and rounds once, as one segment of all its rows would.
    schedule.Run([&](int64_t e, int64_t worker) {
      Scratch& b = bufs[worker];
      const at::Tensor w1e = low ? b.w1 : w1[e], w2e = low ? b.w2 : w2[e];
      const bool sum32 = need_w && !low && ct == at::kBFloat16 && sg.of_expert[e].size() > 1;  // (non-empty ones)
      if (sum32 && !b.gw1_sum.defined()) {
        b.gw1_sum = at::empty({H, F1}, x.options().dtype(at::kFloat));
        b.gw2_sum = at::empty({F, H}, x.options().dtype(at::kFloat));
      }
      at::Tensor gw1e, gw2e;
      if (need_w) {
        gw1e = low ? b.gw1 : sum32 ? b.gw1_sum : gw1[e];
        gw2e = low ? b.gw2 : sum32 ? b.gw2_sum : gw2[e];
      }
      bool first = true;
      for (int64_t s : sg.of_expert[e]) {
        const int64_t n = sg.rows[s];
        auto rows = [&](const at::Tensor& t) { return t.narrow(0, sg.off[s], n); };
        auto scratch = [&](const at::Tensor& t) { return t.narrow(0, 0, n); };
        const at::Tensor xs = low ? scratch(b.x) : rows(x);
        const at::Tensor gys = low ? scratch(b.gy) : rows(gy);
        if (low && first) {
          CastAll({{b.w1, w1[e]}, {b.w2, w2[e]}, {xs, rows(x)}, {gys, rows(gy)}});
        } else if (low) {
          CastAll({{xs, rows(x)}, {gys, rows(gy)}});
        }
        at::Tensor ga = scratch(b.ga), gh = scratch(b.gh), as = scratch(b.a);
        MatmulOut(ga, gys, w2e.t());  // the gradient of fc2's input (rw ⊙ act)
        if (fused) {
          SwigluBackward(rows(h), ga, gh, as, WeightsFrom(rw, sg.off[s]),
                         need_rw ? grw.data_ptr<float>() + sg.off[s] : nullptr);  // reads h in its storage type
        } else {
          const at::Tensor hs = low ? scratch(b.h).copy_(rows(h)) : rows(h);
          if (need_w || weighted) ActivationForward(act, hs, as);
          if (weighted) {
            const at::Tensor rws = rows(rw).unsqueeze(1);
            if (need_rw) rows(grw).copy_((ga.to(at::kFloat) * as.to(at::kFloat)).sum(1));
            ga.mul_(rws);
            as.mul_(rws);
          }
          at::Tensor tmp = b.tmp.defined() ? scratch(b.tmp) : at::Tensor();
          ActivationBackward(act, ga, hs, gh, tmp);
        }
        if (need_w) {
          if (first) {
            MatmulOut(gw2e, as.t(), gys);
          } else {
            MatmulOut(gw2e, as.t(), gys, /*accumulate=*/true);  // a later segment of the same expert adds to its gradient
          }
        }
        if (need_x) {
          at::Tensor gxs = low ? scratch(b.gx) : rows(gx);
          MatmulOut(gxs, gh, w1e.t());
          if (low) CastAll({{rows(gx), gxs}});
        }
        if (need_w) {
          if (first) {
            MatmulOut(gw1e, xs.t(), gh);
          } else {
            MatmulOut(gw1e, xs.t(), gh, /*accumulate=*/true);
          }
        }
        first = false;
      }
      if (need_w && (low || sum32)) CastAll({{gw1[e], gw1e}, {gw2[e], gw2e}});
    });
    return {gx, ctx->needs_input_grad(1) ? gw1 : at::Tensor(), ctx->needs_input_grad(2) ? gw2 : at::Tensor(), grw,
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

uint64_t ExpertSeed(uint64_t seed, int expert) {
  // splitmix64 of (seed, expert): nearby seeds and experts give unrelated streams.
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (static_cast<uint64_t>(expert) + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::atomic<Bf16Gemms> bf16_gemms{Bf16Gemms::kAuto};

}  // namespace

void SetBf16Gemms(Bf16Gemms choice) { bf16_gemms.store(choice); }

void SetSwigluKernels(SwigluKernels choice) { swiglu_kernels.store(choice); }

at::ScalarType CpuGemmComputeType(at::ScalarType storage) {
  if (storage == at::kBFloat16) {
    // oneDNN's bf16 GEMM needs AVX512-BF16 (or AMX); without it LibTorch falls back to a
    // scalar loop (measured on an AVX2 machine: 4.5 GFLOP/s bf16 against 100 fp32).
    const bool native = common::HasAvx512Bf16();
    switch (bf16_gemms.load()) {
      case Bf16Gemms::kFp32: return at::kFloat;
      case Bf16Gemms::kBf16: return storage;
      case Bf16Gemms::kAuto: return native ? storage : at::kFloat;
    }
  }
  if (storage == at::kHalf) return at::kFloat;
  return storage;
}

namespace {

// Checks a segment description against N rows and E experts; returns each segment's expert
// (segment s is expert s when segment_expert is empty).
std::vector<int64_t> SegmentExperts(const char* who, int64_t n, int64_t num_experts,
                                    const std::vector<int64_t>& rows_per_segment,
                                    const std::vector<int64_t>& segment_expert) {
  std::vector<int64_t> expert = segment_expert;
  if (expert.empty()) {
    TORCH_CHECK(static_cast<int64_t>(rows_per_segment.size()) == num_experts, who, ": ",
                rows_per_segment.size(), " row counts for ", num_experts, " experts");
    expert.resize(rows_per_segment.size());
    std::iota(expert.begin(), expert.end(), 0);
  }
  TORCH_CHECK(expert.size() == rows_per_segment.size(), who, ": ", rows_per_segment.size(), " segments but ",
              expert.size(), " segment experts");
  int64_t total = 0;
  for (size_t s = 0; s < expert.size(); ++s) {
    TORCH_CHECK(rows_per_segment[s] >= 0, who, ": negative row count");
    TORCH_CHECK(expert[s] >= 0 && expert[s] < num_experts, who, ": segment ", s, " names expert ", expert[s],
                " of ", num_experts);
    total += rows_per_segment[s];
  }
  TORCH_CHECK(total == n, who, ": row counts sum to ", total, " but x has ", n, " rows");
  return expert;
}

}  // namespace

at::Tensor GroupedMatmul(const at::Tensor& x, const at::Tensor& w,
                         const std::vector<int64_t>& rows_per_segment,
                         const std::vector<int64_t>& segment_expert) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && x.size(1) == w.size(1),
              "GroupedMatmul: x must be [N, in] and w [E, in, out]; got ", x.sizes(), " and ", w.sizes());
  const std::vector<int64_t> expert =
      SegmentExperts("GroupedMatmul", x.size(0), w.size(0), rows_per_segment, segment_expert);
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "GroupedMatmul: x and w dtypes differ");
  return GroupedMatmulFn::apply(x.contiguous(), w.contiguous(), rows_per_segment, expert);
}

at::Tensor GroupedMlp(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, Activation activation,
                      const std::vector<int64_t>& rows_per_segment, const std::vector<int64_t>& segment_expert,
                      const at::Tensor& row_weights) {
  const int64_t f1 = w2.dim() == 3 ? (activation == Activation::kSwiglu ? 2 : 1) * w2.size(1) : -1;
  TORCH_CHECK(x.dim() == 2 && w1.dim() == 3 && w2.dim() == 3 && x.size(1) == w1.size(1) &&
                  w1.size(0) == w2.size(0) && w1.size(2) == f1 && w2.size(2) == x.size(1),
              "GroupedMlp: x must be [N, H], w1 [E, H, F] ([E, H, 2F] for SwiGLU) and w2 [E, F, H]; got ",
              x.sizes(), ", ", w1.sizes(), " and ", w2.sizes());
  const std::vector<int64_t> expert =
      SegmentExperts("GroupedMlp", x.size(0), w1.size(0), rows_per_segment, segment_expert);
  TORCH_CHECK(x.scalar_type() == w1.scalar_type() && x.scalar_type() == w2.scalar_type(),
              "GroupedMlp: x, w1 and w2 dtypes differ");
  // Its fused activations and conversions are host loops.
  TORCH_CHECK(x.device().is_cpu() && w1.device().is_cpu() && w2.device().is_cpu() &&
                  (!row_weights.defined() || row_weights.device().is_cpu()),
              "GroupedMlp: takes CPU tensors (the CUDA grouped GEMM is in moe/cuda)");
  TORCH_CHECK(!row_weights.defined() || (row_weights.dim() == 1 && row_weights.size(0) == x.size(0)),
              "GroupedMlp: row_weights must be [", x.size(0), "] (one per row of x); got ",
              row_weights.defined() ? row_weights.sizes() : at::IntArrayRef{});
  // No weights: an empty tensor (LibTorch 1.13's custom functions take no undefined inputs).
  const at::Tensor rw = row_weights.defined() ? row_weights.to(at::kFloat).contiguous() : at::empty({0}, at::kFloat);
  return GroupedMlpFn::apply(x.contiguous(), w1.contiguous(), w2.contiguous(), rw, rows_per_segment, expert,
                             static_cast<int64_t>(activation));
}

std::pair<at::Tensor, at::Tensor> GroupedExperts::FullExpertWeights(const ExpertsConfig& c,
                                                                    uint64_t seed, int expert) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(ExpertSeed(seed, expert));
  const int64_t f1 = c.activation == Activation::kSwiglu ? 2 * c.ffn_hidden_size : c.ffn_hidden_size;
  at::Tensor fc1 = at::empty({c.hidden_size, f1}, at::kFloat).normal_(0.0, c.init_std, gen);
  at::Tensor fc2 = at::empty({c.ffn_hidden_size, c.hidden_size}, at::kFloat).normal_(0.0, c.init_std, gen);
  return {fc1, fc2};
}

absl::StatusOr<GroupedExperts> GroupedExperts::Create(const ExpertsConfig& c, uint64_t seed) {
  if (c.hidden_size < 1 || c.ffn_hidden_size < 1 || c.num_experts < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "experts: hidden_size = %d, ffn_hidden_size = %d and num_experts = %d must all be at least 1",
        c.hidden_size, c.ffn_hidden_size, c.num_experts));
  }
  if (c.ep_size < 1 || c.num_experts % c.ep_size != 0 || c.ep_rank < 0 || c.ep_rank >= c.ep_size) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "experts: ep_size = %d must divide num_experts = %d (ep_rank = %d)", c.ep_size, c.num_experts, c.ep_rank));
  }
  if (c.etp_size < 1 || c.ffn_hidden_size % c.etp_size != 0 || c.etp_rank < 0 || c.etp_rank >= c.etp_size) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "experts: etp_size = %d must divide ffn_hidden_size = %d (etp_rank = %d)", c.etp_size,
        c.ffn_hidden_size, c.etp_rank));
  }
  if (!at::isFloatingType(c.dtype)) return absl::InvalidArgumentError("experts: dtype must be floating point");
  if (!(c.init_std >= 0) || !std::isfinite(c.init_std)) {
    return absl::InvalidArgumentError(absl::StrFormat("experts: init_std = %g must be finite and >= 0", c.init_std));
  }
  GroupedExperts x;
  x.config_ = c;
  const int64_t fl = x.local_ffn(), lo = c.etp_rank * fl;
  std::vector<at::Tensor> fc1, fc2;
  for (int i = 0; i < x.num_local_experts(); ++i) {
    auto [w1, w2] = FullExpertWeights(c, seed, x.first_expert() + i);
    if (c.activation == Activation::kSwiglu) {
      fc1.push_back(at::cat({w1.narrow(1, lo, fl), w1.narrow(1, c.ffn_hidden_size + lo, fl)}, 1));
    } else {
      fc1.push_back(w1.narrow(1, lo, fl));
    }
    fc2.push_back(w2.narrow(0, lo, fl));
  }
  x.fc1_ = at::stack(fc1).to(c.dtype).contiguous().requires_grad_(true);
  x.fc2_ = at::stack(fc2).to(c.dtype).contiguous().requires_grad_(true);
  return x;
}

at::Tensor GroupedExperts::LocalShard(const at::Tensor& full, bool fc1) const {
  const int64_t fl = local_ffn(), lo = config_.etp_rank * fl;
  const at::Tensor mine = full.narrow(0, first_expert(), num_local_experts());
  if (!fc1) return mine.narrow(1, lo, fl);
  if (config_.activation != Activation::kSwiglu) return mine.narrow(2, lo, fl);
  return at::cat({mine.narrow(2, lo, fl), mine.narrow(2, config_.ffn_hidden_size + lo, fl)}, 2);
}

absl::StatusOr<at::Tensor> GroupedExperts::Forward(const at::Tensor& rows,
                                                   const std::vector<int64_t>& rows_per_segment,
                                                   const std::vector<int64_t>& segment_expert,
                                                   const at::Tensor& row_weights) {
  if (!rows.defined() || rows.dim() != 2 || rows.size(1) != config_.hidden_size) {
    return absl::InvalidArgumentError(absl::StrFormat("experts: rows must be [N, %d]", config_.hidden_size));
  }
  if (segment_expert.empty() && static_cast<int>(rows_per_segment.size()) != num_local_experts()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "experts: %d row counts for %d local experts", rows_per_segment.size(), num_local_experts()));
  }
  try {
    return GroupedMlp(rows.to(config_.dtype), fc1_, fc2_, config_.activation, rows_per_segment, segment_expert,
                      row_weights);
  } catch (const c10::Error& e) {
    return absl::InvalidArgumentError(absl::StrCat("experts: ", e.what_without_backtrace()));
  }
}

}  // namespace switchyard::experts
