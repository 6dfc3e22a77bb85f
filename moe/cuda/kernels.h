// CUDA kernels for the MoE layer's data movement and expert GEMMs, on raw device pointers
// (so they build without a CUDA LibTorch and can be checked on any GPU machine):
//   - PermuteRows / SumRows: the gather and the per-token (weighted) sum behind
//     moe/dispatch/permute.h, with the same plan arrays (row_token, token_offsets, token_rows);
//   - WeightedSumBackward: gradients of the weighted sum for rows and weights;
//   - GroupedGemm: out[block e] = x[block e] @ w[e] over per-expert row blocks, through
//     cuBLAS's grouped batched GEMM (or one cublasGemmEx per expert, for comparison);
//   - TopKRoute: softmax/sigmoid scores, top-k, optional normalisation and per-expert counts
//     in one pass per token (the router's fused kernel).
// Built only with --config=cuda. Every function returns cudaSuccess or the first error.
#ifndef MOE_CUDA_KERNELS_H_
#define MOE_CUDA_KERNELS_H_

#include <cstdint>

#include <cublas_v2.h>
#include <cuda_runtime.h>

namespace switchyard::cuda {

enum class DType { kFloat32, kBFloat16 };

// out[r] = in[row_token[r]] (a zero row where row_token[r] < 0); rows of `hidden` elements.
cudaError_t PermuteRows(const void* in, void* out, const int64_t* row_token, int64_t rows,
                        int64_t hidden, DType dtype, cudaStream_t stream);

// out[t] = Σ_{j ∈ [offsets[t], offsets[t+1])} w[token_rows[j]] · in[token_rows[j]] with fp32
// accumulation; w == nullptr means weight 1 (the backward of PermuteRows).
cudaError_t SumRows(const void* in, const float* w, const int64_t* token_offsets,
                    const int64_t* token_rows, void* out, int64_t tokens, int64_t hidden,
                    DType dtype, cudaStream_t stream);

// grad_rows[r] = w[r] · g[row_token[r]] (w == nullptr: weight 1); grad_w[r] =
// <g[row_token[r]], rows[r]> (0 for empty slots).
cudaError_t WeightedSumBackward(const void* g, const void* rows, const float* w,
                                const int64_t* row_token, void* grad_rows, float* grad_w,
                                int64_t n_rows, int64_t hidden, DType dtype, cudaStream_t stream);

// Row-major out[N, n_out] = x[N, n_in] @ w[E][n_in, n_out] per block; rows_per_expert is a host
// array. fp32 accumulation. `grouped`: one cublasGemmGroupedBatchedEx call (where every block
// is 16-byte aligned, as it requires; else the loop); else one cublasGemmEx per expert. n_in = 0
// gives zeros. A cuBLAS failure is named on stderr and returned as cudaErrorUnknown.
cudaError_t GroupedGemm(cublasHandle_t handle, const void* x, const void* w, void* out,
                        const int64_t* rows_per_expert, int experts, int64_t n_in, int64_t n_out,
                        DType dtype, bool grouped, cudaStream_t stream);

// logits [T, E] fp32 → indices [T, k] int64, weights [T, k] fp32, counts [E] int64 (added to,
// so zero it first). Softmax over all E before top-k (pre_softmax), or over the k chosen;
// sigmoid scores are normalised over the k chosen when `normalize`. Ties: lower expert index.
// NaN counts as -inf (the CPU router refuses non-finite logits before routing). A row holding
// +inf or nothing finite still gets valid experts (indices and counts) but meaningless weights:
// NaN with softmax over the k chosen; -inf with softmax over all E, whose scores are all NaN
// then and count as -inf, so the row takes experts 0..k-1. E ≤ 1024 and k ≤ 32.
cudaError_t TopKRoute(const float* logits, int64_t tokens, int experts, int k, bool sigmoid,
                      bool pre_softmax, bool normalize, float scaling, int64_t* indices,
                      float* weights, int64_t* counts, cudaStream_t stream);

}  // namespace switchyard::cuda

#endif  // MOE_CUDA_KERNELS_H_
