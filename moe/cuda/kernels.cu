#include "moe/cuda/kernels.h"

#include <cuda_bf16.h>

#include <cfloat>
#include <cstdint>
#include <cstdio>
#include <vector>

// Launches are written SY_LAUNCH(kernel, grid, block, shared bytes, stream)(arguments): the
// <<<>>> launch here, and a call into the CPU emulator (third_party/cuda_emu, which defines
// SY_LAUNCH) when the emulated tests (moe/cuda/BUILD's kernels_emu*) compile this file as C++.
#ifndef SY_LAUNCH
#define SY_LAUNCH(kernel, grid, block, shared_bytes, stream) kernel<<<grid, block, shared_bytes, stream>>>
#endif

namespace switchyard::cuda {
namespace {

constexpr int kThreads = 256;

__device__ inline float Load(const float* p, int64_t i) { return p[i]; }
__device__ inline float Load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ inline void Store(float* p, int64_t i, float v) { p[i] = v; }
__device__ inline void Store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16(v); }

// Bytes, one block per row.
__global__ void PermuteKernel(const char* in, char* out, const int64_t* row_token, int64_t rows,
                              int64_t row_bytes) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t t = row_token[r];
    char* o = out + r * row_bytes;
    for (int64_t i = threadIdx.x; i < row_bytes; i += blockDim.x) o[i] = t < 0 ? 0 : in[t * row_bytes + i];
  }
}

// 16-byte words, for rows of whole words and 16-byte aligned bases: a thread copies one word,
// over all (row, word) pairs, so that every thread of a block works whatever the row length (a
// block per row left half of 128 threads idle on 1 KiB rows).
__global__ void PermuteWordsKernel(const uint4* in, uint4* out, const int64_t* row_token, int64_t rows,
                                   int64_t words) {
  const int64_t total = rows * words;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / words, c = i % words, t = row_token[r];
    out[i] = t < 0 ? make_uint4(0, 0, 0, 0) : in[t * words + c];
  }
}

template <typename T>
__global__ void SumRowsKernel(const T* in, const float* w, const int64_t* off, const int64_t* rows,
                              T* out, int64_t tokens, int64_t hidden) {
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) {
      float acc = 0.f;
      for (int64_t j = off[t]; j < off[t + 1]; ++j) {
        const int64_t r = rows[j];
        acc += (w ? w[r] : 1.f) * Load(in, r * hidden + c);
      }
      Store(out, t * hidden + c, acc);
    }
  }
}

// SumRowsKernel in 16-byte words: a thread sums one word (8 bf16 or 4 fp32 values) of one
// token over its rows, for rows of whole words and 16-byte aligned bases. With one 2-byte load
// a thread in flight, as in the kernel above, a bf16 sum keeps only about 4 KB of loads in
// flight per SM, a fraction of what HBM needs to reach its bandwidth. Same order of additions.
template <typename T>
__global__ void SumRowsWordsKernel(const T* in, const float* w, const int64_t* off, const int64_t* rows,
                                   T* out, int64_t tokens, int64_t hidden) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t words = hidden / kVec, total = tokens * words;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / words, c = (i % words) * kVec;
    float acc[kVec];
    for (int e = 0; e < kVec; ++e) acc[e] = 0.f;
    const int64_t end = off[t + 1];
#pragma unroll 4
    for (int64_t j = off[t]; j < end; ++j) {
      const int64_t r = rows[j];
      const float wr = w ? w[r] : 1.f;
      const uint4 word = *reinterpret_cast<const uint4*>(in + r * hidden + c);
      const T* v = reinterpret_cast<const T*>(&word);
      for (int e = 0; e < kVec; ++e) acc[e] += wr * Load(v, e);
    }
    uint4 o;
    T* ov = reinterpret_cast<T*>(&o);
    for (int e = 0; e < kVec; ++e) Store(ov, e, acc[e]);
    *reinterpret_cast<uint4*>(out + t * hidden + c) = o;
  }
}

// How WeightedSumBackwardKernel walks a row: one value a thread at a time (any row), or one
// 16-byte word (rows of whole words at 16-byte aligned bases). As in SumRowsWordsKernel, one
// 2-byte load in flight a thread keeps too few bytes in flight per SM for HBM's bandwidth.
// (Types, not a second template argument, so that a launch names the kernel without a comma.)
template <typename T>
struct Elements {
  using Type = T;
  static constexpr int kVec = 1;
};
template <typename T>
struct Words {
  using Type = T;
  static constexpr int kVec = 16 / sizeof(T);
};

// kVec values from p into v, and back.
template <int kVec, typename T>
__device__ inline void LoadVec(const T* p, float (&v)[kVec]) {
  if constexpr (kVec == 1) {
    v[0] = Load(p, 0);
  } else {
    const uint4 word = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&word);
    for (int i = 0; i < kVec; ++i) v[i] = Load(e, i);
  }
}
template <int kVec, typename T>
__device__ inline void StoreVec(T* p, const float (&v)[kVec]) {
  if constexpr (kVec == 1) {
    Store(p, 0, v[0]);
  } else {
    uint4 word;
    T* e = reinterpret_cast<T*>(&word);
    for (int i = 0; i < kVec; ++i) Store(e, i, v[i]);
    *reinterpret_cast<uint4*>(p) = word;
  }
}

// One block per row: grad_rows[r] = w[r] · g[tok[r]] and grad_w[r] = <g[tok[r]], x[r]>, the dot
// reduced across the block's warps through shared memory (a block may handle several rows,
// hence the second barrier).
template <typename V>
__global__ void WeightedSumBackwardKernel(const typename V::Type* g, const typename V::Type* x, const float* w,
                                          const int64_t* tok, typename V::Type* grad_rows, float* grad_w, int64_t n,
                                          int64_t hidden) {
  constexpr int kVec = V::kVec;
  __shared__ float partial[kThreads / 32];
  const int64_t chunks = hidden / kVec;
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const int64_t t = tok[r];
    const float wr = w ? w[r] : 1.f;
    float dot = 0.f;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      float gv[kVec], xv[kVec], out[kVec];
      if (t < 0) {
        for (int i = 0; i < kVec; ++i) out[i] = 0.f;
      } else {
        LoadVec<kVec>(g + t * hidden + c * kVec, gv);
        LoadVec<kVec>(x + r * hidden + c * kVec, xv);
        for (int i = 0; i < kVec; ++i) {
          out[i] = wr * gv[i];
          dot += gv[i] * xv[i];
        }
      }
      StoreVec<kVec>(grad_rows + r * hidden + c * kVec, out);
    }
    for (int s = 16; s > 0; s /= 2) dot += __shfl_down_sync(0xffffffffu, dot, s);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = dot;
    __syncthreads();
    if (threadIdx.x == 0) {
      float sum = 0.f;
      for (int i = 0; i < static_cast<int>(blockDim.x) / 32; ++i) sum += partial[i];
      grad_w[r] = t < 0 ? 0.f : sum;
    }
    __syncthreads();
  }
}

// Grids of the grid-stride kernels: one block per item up to this many. (kernels_emu_test
// builds this file with a small cap, so that its blocks loop over several items.)
#ifndef SY_MAX_GRID_BLOCKS
#define SY_MAX_GRID_BLOCKS (65535 * 8)
#endif
int Blocks(int64_t n) { return static_cast<int>(n < SY_MAX_GRID_BLOCKS ? (n > 0 ? n : 1) : SY_MAX_GRID_BLOCKS); }

// The better of (value, index) pairs: higher value, then lower index.
__device__ inline bool Better(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }

// One warp per token; lane l holds experts l, l + 32, ...
constexpr int kMaxPerLane = 32;  // E ≤ 1024

__global__ void TopKKernel(const float* logits, int64_t tokens, int E, int k, bool sigmoid,
                           bool pre_softmax, bool normalize, float scaling, int64_t* indices,
                           float* weights, int64_t* counts) {
  const int lane = threadIdx.x % 32;
  const int64_t t = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (t >= tokens) return;
  const float* z = logits + t * E;
  float v[kMaxPerLane];
  const int per_lane = (E + 31) / 32;
  float mx = -INFINITY;
  for (int i = 0; i < per_lane; ++i) {
    const int e = lane + 32 * i;
    // NaN counts as -inf, as on the CPU (whose router refuses non-finite logits before this).
    v[i] = e < E && !isnan(z[e]) ? z[e] : -INFINITY;
    if (e < E) mx = fmaxf(mx, v[i]);
  }
  for (int s = 16; s > 0; s /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, s));
  if (sigmoid || pre_softmax) {
    float sum = 0.f;
    for (int i = 0; i < per_lane; ++i) {
      const int e = lane + 32 * i;
      if (e >= E) continue;
      v[i] = sigmoid ? 1.f / (1.f + __expf(-v[i])) : __expf(v[i] - mx);
      sum += v[i];
    }
    for (int s = 16; s > 0; s /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, s);
    if (!sigmoid) {
      for (int i = 0; i < per_lane; ++i) v[i] /= sum;
    }
    // A row with +inf or nothing finite gives NaN scores here: -inf, as above.
    for (int i = 0; i < per_lane; ++i) v[i] = isnan(v[i]) ? -INFINITY : v[i];
  }
  float chosen_v[32];
  int chosen_i[32];
  uint32_t taken = 0;  // bit i: expert lane + 32 i already chosen
  for (int j = 0; j < k; ++j) {
    // From (-inf, past every expert): any expert not taken beats it, even at -inf, so that
    // bi is always a valid expert.
    float bv = -INFINITY;
    int bi = 1 << 30;
    for (int i = 0; i < per_lane; ++i) {
      const int e = lane + 32 * i;
      if (e < E && !(taken >> i & 1u) && Better(v[i], e, bv, bi)) bv = v[i], bi = e;
    }
    for (int s = 16; s > 0; s /= 2) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, s);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, s);
      if (Better(ov, oi, bv, bi)) bv = ov, bi = oi;
    }
    // (Cannot happen after the NaN handling above; kept so that no count lands outside [0, E).)
    if (bi >= E) bi = 0;
    chosen_v[j] = bv;
    chosen_i[j] = bi;
    if (bi % 32 == lane) taken |= 1u << (bi / 32);
  }
  if (lane != 0) return;
  float denom = 1.f;
  if (!sigmoid && !pre_softmax) {  // softmax over the chosen logits
    // chosen_v[0] is the largest; kept apart, since the loop below overwrites chosen_v[0] first.
    const float top = chosen_v[0];
    float s = 0.f;
    for (int j = 0; j < k; ++j) s += __expf(chosen_v[j] - top);
    for (int j = 0; j < k; ++j) chosen_v[j] = __expf(chosen_v[j] - top) / s;
  } else if (normalize) {
    float s = 0.f;
    for (int j = 0; j < k; ++j) s += chosen_v[j];
    denom = s + 1e-20f;
  }
  for (int j = 0; j < k; ++j) {
    indices[t * k + j] = chosen_i[j];
    weights[t * k + j] = chosen_v[j] / denom * scaling;
    atomicAdd(reinterpret_cast<unsigned long long*>(counts + chosen_i[j]), 1ull);
  }
}

cudaDataType_t CublasType(DType d) { return d == DType::kFloat32 ? CUDA_R_32F : CUDA_R_16BF; }

// cuBLAS statuses do not fit cudaError_t: a failure is named on stderr and becomes
// cudaErrorUnknown.
cudaError_t Cublas(const char* what, cublasStatus_t st) {
  if (st == CUBLAS_STATUS_SUCCESS) return cudaSuccess;
  std::fprintf(stderr, "moe/cuda: %s failed: %s (%s)\n", what, cublasGetStatusName(st), cublasGetStatusString(st));
  return cudaErrorUnknown;
}
int64_t Bytes(DType d) { return d == DType::kFloat32 ? 4 : 2; }

// Whether the current device has stream-ordered memory pools (cudaMallocAsync).
bool HasMemoryPools() {
  int device = 0, supported = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, device) == cudaSuccess && supported != 0;
}

}  // namespace

cudaError_t PermuteRows(const void* in, void* out, const int64_t* row_token, int64_t rows,
                        int64_t hidden, DType dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int64_t row_bytes = hidden * Bytes(dtype);
  const bool words16 = row_bytes % 16 == 0 && (reinterpret_cast<uintptr_t>(in) | reinterpret_cast<uintptr_t>(out)) % 16 == 0;
  if (words16) {
    const int64_t words = row_bytes / 16;
    SY_LAUNCH(PermuteWordsKernel, Blocks((rows * words + kThreads - 1) / kThreads), kThreads, 0, stream)(
        static_cast<const uint4*>(in), static_cast<uint4*>(out), row_token, rows, words);
  } else {
    SY_LAUNCH(PermuteKernel, Blocks(rows), 128, 0, stream)(static_cast<const char*>(in), static_cast<char*>(out),
                                                    row_token, rows, row_bytes);
  }
  return cudaGetLastError();
}

cudaError_t SumRows(const void* in, const float* w, const int64_t* token_offsets,
                    const int64_t* token_rows, void* out, int64_t tokens, int64_t hidden,
                    DType dtype, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  const int64_t vec = 16 / Bytes(dtype);
  if (hidden % vec == 0 && (reinterpret_cast<uintptr_t>(in) | reinterpret_cast<uintptr_t>(out)) % 16 == 0) {
    const int blocks = Blocks((tokens * (hidden / vec) + kThreads - 1) / kThreads);
    if (dtype == DType::kFloat32) {
      SY_LAUNCH(SumRowsWordsKernel, blocks, kThreads, 0, stream)(static_cast<const float*>(in), w, token_offsets,
                                                          token_rows, static_cast<float*>(out), tokens, hidden);
    } else {
      SY_LAUNCH(SumRowsWordsKernel, blocks, kThreads, 0, stream)(static_cast<const __nv_bfloat16*>(in), w, token_offsets,
                                                          token_rows, static_cast<__nv_bfloat16*>(out), tokens,
                                                          hidden);
    }
    return cudaGetLastError();
  }
  if (dtype == DType::kFloat32) {
    SY_LAUNCH(SumRowsKernel, Blocks(tokens), 128, 0, stream)(static_cast<const float*>(in), w, token_offsets, token_rows,
                                                      static_cast<float*>(out), tokens, hidden);
  } else {
    SY_LAUNCH(SumRowsKernel, Blocks(tokens), 128, 0, stream)(static_cast<const __nv_bfloat16*>(in), w, token_offsets,
                                                      token_rows, static_cast<__nv_bfloat16*>(out), tokens, hidden);
  }
  return cudaGetLastError();
}

cudaError_t WeightedSumBackward(const void* g, const void* rows, const float* w,
                                const int64_t* row_token, void* grad_rows, float* grad_w,
                                int64_t n_rows, int64_t hidden, DType dtype, cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  const int blocks = Blocks(n_rows);
  const bool words = hidden % (16 / Bytes(dtype)) == 0 &&
                     (reinterpret_cast<uintptr_t>(g) | reinterpret_cast<uintptr_t>(rows) |
                      reinterpret_cast<uintptr_t>(grad_rows)) % 16 == 0;
  if (dtype == DType::kFloat32) {
    const auto* gp = static_cast<const float*>(g);
    const auto* xp = static_cast<const float*>(rows);
    auto* op = static_cast<float*>(grad_rows);
    if (words) {
      SY_LAUNCH(WeightedSumBackwardKernel<Words<float>>, blocks, kThreads, 0, stream)(gp, xp, w, row_token, op,
                                                                                       grad_w, n_rows, hidden);
    } else {
      SY_LAUNCH(WeightedSumBackwardKernel<Elements<float>>, blocks, kThreads, 0, stream)(gp, xp, w, row_token, op,
                                                                                          grad_w, n_rows, hidden);
    }
  } else {
    const auto* gp = static_cast<const __nv_bfloat16*>(g);
    const auto* xp = static_cast<const __nv_bfloat16*>(rows);
    auto* op = static_cast<__nv_bfloat16*>(grad_rows);
    if (words) {
      SY_LAUNCH(WeightedSumBackwardKernel<Words<__nv_bfloat16>>, blocks, kThreads, 0, stream)(
          gp, xp, w, row_token, op, grad_w, n_rows, hidden);
    } else {
      SY_LAUNCH(WeightedSumBackwardKernel<Elements<__nv_bfloat16>>, blocks, kThreads, 0, stream)(
          gp, xp, w, row_token, op, grad_w, n_rows, hidden);
    }
  }
  return cudaGetLastError();
}

cudaError_t GroupedGemm(cublasHandle_t handle, const void* x, const void* w, void* out,
                        const int64_t* rows_per_expert, int experts, int64_t n_in, int64_t n_out,
                        DType dtype, bool grouped, cudaStream_t stream) {
  if (Cublas("cublasSetStream", cublasSetStream(handle, stream)) != cudaSuccess) return cudaErrorUnknown;
  const int64_t eb = Bytes(dtype);
  int64_t total = 0;
  for (int e = 0; e < experts; ++e) total += rows_per_expert[e];
  if (total == 0 || n_out == 0) return cudaSuccess;
  // An empty inner dimension: a product of zeros (cuBLAS refuses the zero leading dimensions).
  if (n_in == 0) return cudaMemsetAsync(out, 0, total * n_out * eb, stream);
  const cudaDataType_t type = CublasType(dtype);
  // Row-major out[n, o] = x[n, i] @ w[i, o] is column-major outᵀ = wᵀ xᵀ: m = o, n = rows, k = i.
  std::vector<const void*> a, b;
  std::vector<void*> c;
  std::vector<int> m, n, kk, lda, ldb, ldc, size;
  int64_t off = 0;
  for (int e = 0; e < experts; ++e) {
    const int64_t rows = rows_per_expert[e];
    if (rows > 0) {
      a.push_back(static_cast<const char*>(w) + e * n_in * n_out * eb);
      b.push_back(static_cast<const char*>(x) + off * n_in * eb);
      c.push_back(static_cast<char*>(out) + off * n_out * eb);
      m.push_back(static_cast<int>(n_out));
      n.push_back(static_cast<int>(rows));
      kk.push_back(static_cast<int>(n_in));
      lda.push_back(static_cast<int>(n_out));
      ldb.push_back(static_cast<int>(n_in));
      ldc.push_back(static_cast<int>(n_out));
      size.push_back(1);
    }
    off += rows;
  }
  const int groups = static_cast<int>(a.size());
  const float one = 1.f, zero = 0.f;
  // The grouped call wants 16-byte aligned matrices (cuBLAS's documented requirement); other
  // offsets take the loop.
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  for (int g = 0; grouped && g < groups; ++g) grouped = aligned(a[g]) && aligned(b[g]) && aligned(c[g]);
  if (!grouped) {
    for (int g = 0; g < groups; ++g) {
      if (Cublas("cublasGemmEx",
                 cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, m[g], n[g], kk[g], &one, a[g], type, lda[g], b[g],
                              type, ldb[g], &zero, c[g], type, ldc[g], CUBLAS_COMPUTE_32F,
                              CUBLAS_GEMM_DEFAULT)) != cudaSuccess) {
        return cudaErrorUnknown;
      }
    }
    return cudaGetLastError();
  }
  // The grouped call takes device arrays of pointers.
  std::vector<const void*> ptrs;
  ptrs.insert(ptrs.end(), a.begin(), a.end());
  ptrs.insert(ptrs.end(), b.begin(), b.end());
  ptrs.insert(ptrs.end(), c.begin(), c.end());
  // From the stream-ordered pool where the device has one; some virtualised GPUs do not
  // (cudaDevAttrMemoryPoolsSupported = 0, where cudaMallocAsync fails with error 801), and get
  // cudaMalloc, whose cudaFree waits for the whole device.
  const bool pools = HasMemoryPools();
  void** dev = nullptr;
  const size_t bytes = ptrs.size() * sizeof(void*);
  cudaError_t err = pools ? cudaMallocAsync(reinterpret_cast<void**>(&dev), bytes, stream)
                          : cudaMalloc(reinterpret_cast<void**>(&dev), bytes);
  if (err != cudaSuccess) return err;
  err = cudaMemcpyAsync(dev, ptrs.data(), ptrs.size() * sizeof(void*), cudaMemcpyHostToDevice, stream);
  std::vector<cublasOperation_t> op(groups, CUBLAS_OP_N);
  std::vector<float> alpha(groups, 1.f), beta(groups, 0.f);
  if (err == cudaSuccess &&
      Cublas("cublasGemmGroupedBatchedEx",
             cublasGemmGroupedBatchedEx(handle, op.data(), op.data(), m.data(), n.data(), kk.data(), alpha.data(),
                                        const_cast<const void* const*>(dev), type, lda.data(),
                                        const_cast<const void* const*>(dev + groups), type, ldb.data(),
                                        beta.data(), dev + 2 * groups, type, ldc.data(), groups, size.data(),
                                        CUBLAS_COMPUTE_32F)) != cudaSuccess) {
    err = cudaErrorUnknown;
  }
  // The host arrays above must outlive the call, and without pools nothing may still read
  // `dev` when it is freed: wait for the stream, whatever happened.
  const cudaError_t synced = cudaStreamSynchronize(stream);
  if (err == cudaSuccess) err = synced;
  const cudaError_t freed = pools ? cudaFreeAsync(dev, stream) : cudaFree(dev);
  return err != cudaSuccess ? err : freed;
}

cudaError_t TopKRoute(const float* logits, int64_t tokens, int experts, int k, bool sigmoid,
                      bool pre_softmax, bool normalize, float scaling, int64_t* indices,
                      float* weights, int64_t* counts, cudaStream_t stream) {
  if (experts < 1 || experts > 32 * kMaxPerLane || k < 1 || k > 32 || k > experts) return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  const int64_t threads = tokens * 32;
  const int blocks = static_cast<int>((threads + kThreads - 1) / kThreads);
  SY_LAUNCH(TopKKernel, blocks, kThreads, 0, stream)(logits, tokens, experts, k, sigmoid, pre_softmax, normalize,
                                              scaling, indices, weights, counts);
  return cudaGetLastError();
}

}  // namespace switchyard::cuda
