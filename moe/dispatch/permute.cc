#include "moe/dispatch/permute.h"

#include <algorithm>
#include <cstring>

#include <immintrin.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/csrc/autograd/custom_function.h>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "common/bf16.h"
#include "common/cpu_clones.h"
#include "common/parallel.h"

namespace switchyard::dispatch {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Rows per parallel chunk: enough work per task to hide the thread pool's overhead.
constexpr int64_t kGrain = 64;
// Tokens per block of MakePlan's parallel passes.
constexpr int64_t kPlanBlock = 1024;
// Tokens ahead whose rows SumRows prefetches.
constexpr int64_t kAhead = 2;

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

using common::NarrowToBf16;
using common::WidenBf16;

// One row's bytes. Not memcpy: glibc switches to `rep movsb` from 2 KiB (an fp32 row of
// H = 512), slower here (permuting 8192 such rows: 2.5 ms with memcpy, 1.7 ms with this loop,
// on the 2-core AMD EPYC development machine).
SY_CPU_CLONES
void CopyRow(char* __restrict__ dst, const char* __restrict__ src, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) __builtin_memcpy(dst + i, src + i, 32);
  if (i < n) std::memcpy(dst + i, src + i, n - i);
}

// CopyRow with non-temporal stores, for rows written once and read much later (the permuted
// copies, [N, H] with N = k × T, pass through memory when they outgrow the cache): no read of
// the destination lines first. Needs a 64-byte aligned dst and whole 64-byte lines, and a
// fence after (RowWriter::Fence).
__attribute__((target("avx512f"))) void StreamRow512(char* __restrict__ dst, const char* __restrict__ src,
                                                     int64_t n) {
  for (int64_t i = 0; i < n; i += 64) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), _mm512_loadu_si512(src + i));
  }
}

__attribute__((target("avx2"))) void StreamRow256(char* __restrict__ dst, const char* __restrict__ src, int64_t n) {
  for (int64_t i = 0; i < n; i += 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
  }
}

enum class Stream { kNone, kAvx2, kAvx512 };

Stream StreamKind() {
  static const Stream kind = __builtin_cpu_supports("avx512f") ? Stream::kAvx512
                             : __builtin_cpu_supports("avx2")  ? Stream::kAvx2
                                                               : Stream::kNone;
  return kind;
}

// Outputs up to this size are written through the cache: they fit in the last-level cache
// (32 MiB on the development machine), where the next op finds them. Streamed, the coarse
// shape's permute + unpermute (8 MiB of bf16 rows) took 0.63 ms, 3.1x a memcpy of the bytes.
constexpr int64_t kStreamAbove = int64_t{16} << 20;

// Copies rows of `bytes` bytes into a base of `total` bytes; streams where the size, the CPU
// and the layout allow.
struct RowWriter {
  RowWriter(char* base, int64_t bytes, int64_t total)
      : kind(total > kStreamAbove && reinterpret_cast<uintptr_t>(base) % 64 == 0 && bytes % 64 == 0 ? StreamKind()
                                                                                                     : Stream::kNone) {}
  void operator()(char* __restrict__ dst, const char* __restrict__ src, int64_t n) const {
    switch (kind) {
      case Stream::kAvx512: return StreamRow512(dst, src, n);
      case Stream::kAvx2: return StreamRow256(dst, src, n);
      case Stream::kNone: return CopyRow(dst, src, n);
    }
  }
  // Orders this thread's streamed stores before what follows the parallel region.
  void Fence() const {
    if (kind != Stream::kNone) _mm_sfence();
  }
  Stream kind;
};

// Zeroes the rows of no token (empty capacity slots, row_token < 0); dropless layouts, where
// every row is some token's copy, have none.
void ZeroEmptyRows(char* base, int64_t row_bytes, const at::Tensor& row_token, int64_t copies) {
  const int64_t n = row_token.numel();
  if (copies == n) return;
  const int64_t* tok = row_token.data_ptr<int64_t>();
  at::parallel_for(0, n, 16 * kGrain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      if (tok[r] < 0) std::memset(base + r * row_bytes, 0, row_bytes);
    }
  });
}

// out[r] = in[t] for each row r of token t, zeros in empty slots. Token-major: a thread
// reads each of its tokens once and writes that token's rows, the same rows the token-major
// unpermute (and its backward) of those tokens reads, so they come back from that core's cache
// rather than another core's. (Row-major, reading in[row_token[r]], was 1.7× slower in
// permute + unpermute on the coarse bf16 shape, where the rows stay in cache: 1.55 against
// 0.91 ms, medians of 4 on the 2-core development machine.)
at::Tensor ScatterRows(const at::Tensor& in, const at::Tensor& row_token, const at::Tensor& offsets,
                       const at::Tensor& rows) {
  const int64_t n = row_token.numel(), t_count = offsets.numel() - 1, h = in.size(1);
  at::Tensor out = at::empty({n, h}, in.options());
  const int64_t bytes = h * in.element_size();
  const char* ip = static_cast<const char*>(in.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* rr = rows.data_ptr<int64_t>();
  ZeroEmptyRows(op, bytes, row_token, rows.numel());
  const RowWriter write(op, bytes, n * bytes);
  at::parallel_for(0, t_count, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      for (int64_t j = off[t]; j < off[t + 1]; ++j) write(op + rr[j] * bytes, ip + t * bytes, bytes);
    }
    write.Fence();
  });
  return out;
}

// acc = w·x (overwrite) or acc += w·x; acc and x never overlap. The fp32 and bf16 loops are
// built for AVX-512, AVX2 and plain x86-64 and picked at load time (SY_CPU_CLONES).
template <typename A, typename T>
inline void AxpyRow(A* __restrict__ acc, const T* __restrict__ x, A w, int64_t h, bool overwrite) {
  if (overwrite) {
    for (int64_t c = 0; c < h; ++c) acc[c] = w * A(x[c]);
  } else {
    for (int64_t c = 0; c < h; ++c) acc[c] += w * A(x[c]);
  }
}

SY_CPU_CLONES
void AxpyF32(float* __restrict__ acc, const float* __restrict__ x, float w, int64_t h, bool overwrite) {
  if (overwrite) {
    for (int64_t c = 0; c < h; ++c) acc[c] = w * x[c];
  } else {
    for (int64_t c = 0; c < h; ++c) acc[c] += w * x[c];
  }
}

SY_CPU_CLONES
void AxpyBf16(float* __restrict__ acc, const uint16_t* __restrict__ x, float w, int64_t h, bool overwrite) {
  for (int64_t c = 0; c < h; ++c) {
    const float v = WidenBf16(x[c]);
    acc[c] = overwrite ? w * v : acc[c] + w * v;
  }
}

SY_CPU_CLONES
void StoreBf16(uint16_t* __restrict__ out, const float* __restrict__ in, int64_t h) {
  for (int64_t c = 0; c < h; ++c) out[c] = NarrowToBf16(in[c]);
}

template <typename T, typename A>
inline void StoreRow(T* out, const A* acc, int64_t h) {
  for (int64_t c = 0; c < h; ++c) out[c] = T(acc[c]);
}
inline void StoreRow(c10::BFloat16* out, const float* acc, int64_t h) {
  StoreBf16(reinterpret_cast<uint16_t*>(out), acc, h);
}

template <>
inline void AxpyRow<float, float>(float* __restrict__ acc, const float* __restrict__ x, float w, int64_t h,
                                  bool overwrite) {
  AxpyF32(acc, x, w, h, overwrite);
}
template <>
inline void AxpyRow<float, c10::BFloat16>(float* __restrict__ acc, const c10::BFloat16* __restrict__ x,
                                          float w, int64_t h, bool overwrite) {
  AxpyBf16(acc, reinterpret_cast<const uint16_t*>(x), w, h, overwrite);
}

// out[t] = Σ_{r ∈ rows(t)} w[r] · in[r] (w absent: 1), fp32 accumulation.
at::Tensor SumRows(const at::Tensor& in, const at::Tensor* w, const at::Tensor& offsets,
                   const at::Tensor& rows) {
  const int64_t t_count = offsets.numel() - 1, h = in.size(1);
  at::Tensor out = at::empty({t_count, h}, in.options());
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* rr = rows.data_ptr<int64_t>();
  const float* wp = w ? w->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "SumRows", [&] {
    using A = Acc<scalar_t>;
    const scalar_t* ip = in.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, t_count, kGrain, [&](int64_t b, int64_t e) {
      // fp32/fp64 rows accumulate in the output row itself; bf16/fp16 in an fp32 scratch row.
      constexpr bool kDirect = std::is_same_v<scalar_t, A>;
      std::vector<A> scratch(kDirect ? 0 : h);
      for (int64_t t = b; t < e; ++t) {
        // The rows of a token lie in different expert blocks, so the hardware prefetcher
        // cannot see the next one coming: fetch the rows kAhead tokens ahead. (Measured on
        // the coarse bf16 shape: unpermute 1.7 → 1.2 ms, best of 4; fp32 within noise.)
        if (t + kAhead < e) {
          for (int64_t j = off[t + kAhead]; j < off[t + kAhead + 1]; ++j) {
            common::PrefetchBytes(ip + rr[j] * h, h * static_cast<int64_t>(sizeof(scalar_t)));
          }
        }
        scalar_t* o = op + t * h;
        const int64_t first = off[t], n = off[t + 1] - first;
        if (n == 0) {
          std::memset(o, 0, h * sizeof(scalar_t));
          continue;
        }
        if (n == 1 && !wp) {
          std::memcpy(o, ip + rr[first] * h, h * sizeof(scalar_t));
          continue;
        }
        // (The cast is a no-op where it is used: scalar_t is A when kDirect.)
        A* acc = kDirect ? reinterpret_cast<A*>(o) : scratch.data();
        AxpyRow(acc, ip + rr[first] * h, wp ? A(wp[rr[first]]) : A(1), h, /*overwrite=*/true);
        for (int64_t j = first + 1; j < first + n; ++j) {
          AxpyRow(acc, ip + rr[j] * h, wp ? A(wp[rr[j]]) : A(1), h, /*overwrite=*/false);
        }
        if (!kDirect) StoreRow(o, acc, h);
      }
    });
  });
  return out;
}

// out = w·g and returns <g, x>, accumulated in A. The fp32 version keeps 8 partial sums so
// the compiler can vectorise it (a single running sum is a serial chain).
template <typename T, typename A = Acc<T>>
inline A ScaleAndDot(T* __restrict__ out, const T* __restrict__ g, const T* __restrict__ x, A w, int64_t h) {
  A dot = 0;
  for (int64_t c = 0; c < h; ++c) {
    out[c] = T(w * A(g[c]));
    dot += A(g[c]) * A(x[c]);
  }
  return dot;
}

// out = w·g and returns <g, x> in fp32, keeping 8 partial sums so that the compiler can
// vectorise it (a single running sum is a serial chain). load widens one element to fp32,
// store narrows one back.
template <typename T, typename Load, typename Store>
__attribute__((always_inline)) inline float ScaleAndDotLanes(T* __restrict__ out, const T* __restrict__ g,
                                                             const T* __restrict__ x, float w, int64_t h,
                                                             Load load, Store store) {
  constexpr int kLanes = 8;
  float part[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= h; c += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float gv = load(g[c + l]);
      out[c + l] = store(w * gv);
      part[l] += gv * load(x[c + l]);
    }
  }
  float dot = 0;
  for (; c < h; ++c) {
    const float gv = load(g[c]);
    out[c] = store(w * gv);
    dot += gv * load(x[c]);
  }
  for (int l = 0; l < kLanes; ++l) dot += part[l];
  return dot;
}

SY_CPU_CLONES
float ScaleAndDotF32(float* __restrict__ out, const float* __restrict__ g, const float* __restrict__ x,
                     float w, int64_t h) {
  auto same = [](float v) { return v; };
  return ScaleAndDotLanes(out, g, x, w, h, same, same);
}

SY_CPU_CLONES
float ScaleAndDotBf16(uint16_t* __restrict__ out, const uint16_t* __restrict__ g, const uint16_t* __restrict__ x,
                      float w, int64_t h) {
  return ScaleAndDotLanes(out, g, x, w, h, [](uint16_t b) { return WidenBf16(b); },
                          [](float v) { return NarrowToBf16(v); });
}

template <>
inline float ScaleAndDot<c10::BFloat16, float>(c10::BFloat16* __restrict__ out, const c10::BFloat16* __restrict__ g,
                                               const c10::BFloat16* __restrict__ x, float w, int64_t h) {
  return ScaleAndDotBf16(reinterpret_cast<uint16_t*>(out), reinterpret_cast<const uint16_t*>(g),
                         reinterpret_cast<const uint16_t*>(x), w, h);
}

template <>
inline float ScaleAndDot<float, float>(float* __restrict__ out, const float* __restrict__ g,
                                       const float* __restrict__ x, float w, int64_t h) {
  return ScaleAndDotF32(out, g, x, w, h);
}

// The backward of the weighted sum: grad_rows[r] = w[r] · g[t], grad_w[r] = <g[t], rows[r]> for
// each row r of token t (token-major, as ScatterRows and SumRows; zeros in empty slots).
void WeightedSumBackward(const at::Tensor& g, const at::Tensor& rows, const at::Tensor& w,
                         const at::Tensor& row_token, const at::Tensor& offsets, const at::Tensor& token_rows,
                         at::Tensor& grad_rows, at::Tensor& grad_w) {
  const int64_t n = rows.size(0), h = rows.size(1), t_count = offsets.numel() - 1;
  const int64_t copies = token_rows.numel();
  grad_rows = at::empty_like(rows);
  grad_w = copies == n ? at::empty({n}, w.options()) : at::zeros({n}, w.options());
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* rr = token_rows.data_ptr<int64_t>();
  const float* wp = w.data_ptr<float>();
  float* gw = grad_w.data_ptr<float>();
  ZeroEmptyRows(static_cast<char*>(grad_rows.data_ptr()), h * grad_rows.element_size(), row_token, copies);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "WeightedSumBackward", [&] {
    using A = Acc<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* rp = rows.data_ptr<scalar_t>();
    scalar_t* grp = grad_rows.data_ptr<scalar_t>();
    at::parallel_for(0, t_count, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        for (int64_t j = off[t]; j < off[t + 1]; ++j) {
          const int64_t r = rr[j];
          gw[r] = static_cast<float>(ScaleAndDot(grp + r * h, gp + t * h, rp + r * h, A(wp[r]), h));
        }
      }
    });
  });
}

struct PermuteFn : torch::autograd::Function<PermuteFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& row_token,
                            const at::Tensor& offsets, const at::Tensor& rows) {
    ctx->save_for_backward({offsets, rows});
    return ScatterRows(x, row_token, offsets, rows);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    return {SumRows(grads[0].contiguous(), nullptr, s[0], s[1]), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct UnpermuteFn : torch::autograd::Function<UnpermuteFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& row_token, const at::Tensor& offsets,
                            const at::Tensor& rows) {
    ctx->save_for_backward({x, w, row_token, offsets, rows});
    return SumRows(x, &w, offsets, rows);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    at::Tensor grad_rows, grad_w;
    WeightedSumBackward(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], grad_rows, grad_w);
    return {grad_rows, grad_w, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The plain sum of each token's rows; backward: each token's gradient copied to its rows.
struct SumFn : torch::autograd::Function<SumFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& row_token,
                            const at::Tensor& offsets, const at::Tensor& rows) {
    ctx->save_for_backward({row_token, offsets, rows});
    return SumRows(x, nullptr, offsets, rows);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    return {ScatterRows(grads[0].contiguous(), s[0], s[1], s[2]), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// w[r] = probs[row_prob_index[r]] for the rows of a token, 0 in empty slots (row_token < 0);
// backward: each row's gradient written back to its (token, expert) entry of a zero [T, E]
// gradient. Every entry belongs to at most one row, so nothing accumulates. (ATen's
// index_select + mask, and index_add in the backward: 0.7 ms forward + backward at 4096 × 64,
// k = 8, on the development machine.)
struct RowWeightsFn : torch::autograd::Function<RowWeightsFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& probs, const at::Tensor& index,
                            const at::Tensor& row_token) {
    ctx->save_for_backward({index, row_token});
    ctx->saved_data["sizes"] = probs.sizes().vec();
    const int64_t n = index.numel();
    at::Tensor w = at::empty({n}, probs.options());
    const float* p = probs.data_ptr<float>();
    const int64_t *ip = index.data_ptr<int64_t>(), *tp = row_token.data_ptr<int64_t>();
    float* wp = w.data_ptr<float>();
    at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) wp[r] = tp[r] >= 0 ? p[ip[r]] : 0.0f;
    });
    return w;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const at::Tensor g = grads[0].to(at::kFloat).contiguous();
    at::Tensor gp = at::zeros(ctx->saved_data["sizes"].toIntVector(), g.options());
    const int64_t n = g.numel();
    const float* gr = g.data_ptr<float>();
    const int64_t *ip = s[0].data_ptr<int64_t>(), *tp = s[1].data_ptr<int64_t>();
    float* out = gp.data_ptr<float>();
    at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        if (tp[r] >= 0) out[ip[r]] = gr[r];
      }
    });
    return {gp, at::Tensor(), at::Tensor()};
  }
};

void CheckRows(const at::Tensor& x, int64_t rows, const char* what) {
  TORCH_CHECK(x.defined() && x.dim() == 2 && x.size(0) == rows, what, ": expected [", rows,
              ", hidden] rows, got ", x.defined() ? x.sizes() : at::IntArrayRef{});
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), what, ": rows must be floating point");
  TORCH_CHECK(x.device().is_cpu(), what, ": takes CPU tensors (the CUDA kernels are in moe/cuda)");
}

}  // namespace

absl::StatusOr<PermutePlan> MakePlan(const at::Tensor& routing_map, int64_t capacity) {
  if (!routing_map.defined() || routing_map.dim() != 2 || routing_map.scalar_type() != at::kBool) {
    return absl::InvalidArgumentError("permute: routing_map must be a [tokens, experts] bool tensor");
  }
  if (!routing_map.device().is_cpu()) {
    return absl::InvalidArgumentError("permute: routing_map must be a CPU tensor (the CUDA kernels are in moe/cuda)");
  }
  const at::Tensor map = routing_map.contiguous();
  const int64_t T = map.size(0), E = map.size(1);
  const bool* m = map.data_ptr<bool>();
  PermutePlan p;
  p.num_tokens = T;
  p.num_experts = E;
  p.rows_per_expert.assign(E, 0);
  // The experts of token t, in order: the map is mostly false (k of E), so 8 entries are
  // read as one word, all-false words skipped, and the set ones found by their bits (the low
  // bit of each byte gathered into one byte by a multiply) rather than by a branch per entry.
  // (The whole plan at 4096 × 64 with k = 8 on the development machine, serially: ~1 ms with
  // a branch per entry, 0.63 ms this way.)
  auto for_each_expert = [&](int64_t t, auto&& f) {
    const bool* row = m + t * E;
    int64_t e = 0;
    for (; e + 8 <= E; e += 8) {
      uint64_t word;
      std::memcpy(&word, row + e, sizeof(word));
      if (word == 0) continue;
      // Byte j of the word is 0 or 1 (little-endian): bit j of `bits`.
      for (uint32_t bits = static_cast<uint32_t>((word * 0x0102040810204080ull) >> 56); bits != 0; bits &= bits - 1) {
        f(e + __builtin_ctz(bits));
      }
    }
    for (; e < E; ++e) {
      if (row[e]) f(e);
    }
  };
  // Two passes over blocks of tokens, in parallel: count each block's rows per expert, then
  // (after a prefix sum over the blocks) write them. Rows inside an expert's block stay in
  // token order whatever the threads.
  const int64_t blocks = std::max<int64_t>(1, (T + kPlanBlock - 1) / kPlanBlock);
  std::vector<int64_t> block_rows(blocks * E, 0), block_copies(blocks + 1, 0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* rows = block_rows.data() + b * E;
      int64_t copies = 0;
      for (int64_t t = b * kPlanBlock; t < std::min(T, (b + 1) * kPlanBlock); ++t) {
        for_each_expert(t, [&](int64_t e) {
          ++rows[e];
          ++copies;
        });
      }
      block_copies[b + 1] = copies;
    }
  });
  for (int64_t b = 0; b < blocks; ++b) {
    block_copies[b + 1] += block_copies[b];
    for (int64_t e = 0; e < E; ++e) p.rows_per_expert[e] += block_rows[b * E + e];
  }
  const int64_t copies = block_copies[blocks];
  if (capacity >= 0) {
    for (int64_t e = 0; e < E; ++e) {
      if (p.rows_per_expert[e] > capacity) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "permute: expert %d has %d tokens, more than the capacity %d (drop before permuting)",
            e, p.rows_per_expert[e], capacity));
      }
    }
  }
  // block_rows becomes each block's first row in each expert's block.
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) {
    if (capacity >= 0) p.rows_per_expert[e] = capacity;
    start[e + 1] = start[e] + p.rows_per_expert[e];
    int64_t next = start[e];
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n = block_rows[b * E + e];
      block_rows[b * E + e] = next;
      next += n;
    }
  }
  const int64_t N = start[E];
  p.row_token = at::full({N}, -1, at::kLong);
  p.row_prob_index = at::zeros({N}, at::kLong);
  p.token_offsets = at::empty({T + 1}, at::kLong);
  p.token_rows = at::empty({copies}, at::kLong);
  int64_t* rt = p.row_token.data_ptr<int64_t>();
  int64_t* rp = p.row_prob_index.data_ptr<int64_t>();
  int64_t* off = p.token_offsets.data_ptr<int64_t>();
  int64_t* tr = p.token_rows.data_ptr<int64_t>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* cursor = block_rows.data() + b * E;
      int64_t k = block_copies[b];
      for (int64_t t = b * kPlanBlock; t < std::min(T, (b + 1) * kPlanBlock); ++t) {
        off[t] = k;
        for_each_expert(t, [&](int64_t e) {
          const int64_t r = cursor[e]++;
          rt[r] = t;
          rp[r] = t * E + e;
          tr[k++] = r;
        });
      }
    }
  });
  off[T] = copies;
  return p;
}

at::Tensor Permute(const at::Tensor& tokens, const PermutePlan& plan) {
  CheckRows(tokens, plan.num_tokens, "Permute");
  return PermuteFn::apply(tokens.contiguous(), plan.row_token, plan.token_offsets, plan.token_rows);
}

at::Tensor Unpermute(const at::Tensor& rows, const at::Tensor& probs, const PermutePlan& plan) {
  CheckRows(rows, plan.num_rows(), "Unpermute");
  return UnpermuteFn::apply(rows.contiguous(), RowWeights(probs, plan), plan.row_token, plan.token_offsets,
                            plan.token_rows);
}

at::Tensor Unpermute(const at::Tensor& rows, const PermutePlan& plan) {
  CheckRows(rows, plan.num_rows(), "Unpermute");
  return SumFn::apply(rows.contiguous(), plan.row_token, plan.token_offsets, plan.token_rows);
}

at::Tensor RowWeights(const at::Tensor& probs, const PermutePlan& plan) {
  TORCH_CHECK(probs.defined() && probs.dim() == 2 && probs.size(0) == plan.num_tokens &&
                  probs.size(1) == plan.num_experts,
              "routing probs must be [", plan.num_tokens, ", ", plan.num_experts, "]");
  TORCH_CHECK(probs.device().is_cpu(), "RowWeights: takes CPU tensors (the CUDA kernels are in moe/cuda)");
  return RowWeightsFn::apply(probs.to(at::kFloat).contiguous(), plan.row_prob_index, plan.row_token);
}

}  // namespace switchyard::dispatch
