// Matrix products on the CPU through oneDNN primitives that are created once per shape and
// layout and then reused.
//
// Why not at::mm_out: for every call LibTorch builds a new oneDNN primitive descriptor (bf16)
// or calls OpenBLAS (fp32). Measured on this project's 2-core AVX-512 machine, for the 384
// GEMMs of a fine-grained expert step (64 experts × 6 products of ~512 rows):
// - bf16: at::mm_out took 1.06–1.08× one dense product of equal FLOPs; cached primitives took
//   1.00–1.01× (identical bits: both run oneDNN's kernels).
// - fp32: OpenBLAS (Debian's) took 1.2–1.3× as long as oneDNN with the Cooperlake kernels it
//   picks itself on that CPU, ~1.9× with OPENBLAS_CORETYPE=Haswell (that machine's setting).
#ifndef SWITCHYARD_COMMON_MATMUL_H_
#define SWITCHYARD_COMMON_MATMUL_H_

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace switchyard::common {

// out = a @ b, or out += a @ b with `accumulate`. a: [M, K], b: [K, N], out: [M, N], all on
// the CPU, one dtype, except that bf16 operands may have an fp32 out (kept in fp32, not
// rounded to bf16: for sums of several products). No autograd: call it inside autograd
// functions or on tensors that need no gradient. a and b may be transposed views (either stride 1); out must have unit column
// stride. If out shares memory with a or b, the product goes through a temporary. fp32, and bf16 on CPUs with AVX512-BF16 (fp32 accumulation, one rounding), run on a
// cached oneDNN primitive; other dtypes, layouts and devices call at::mm_out / addmm_
// (bf16 operands into fp32: at::mm on the widened operands). Called inside a parallel
// region (several products at once, one per thread), it runs on the calling thread alone.
void MatmulOut(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate = false);

// Which path MatmulOut takes (tests compare them): kAuto as above, kAten always LibTorch.
enum class MatmulBackend { kAuto, kAten };
void SetMatmulBackend(MatmulBackend backend);

// The primitive cache: at most `capacity` primitives (least recently used evicted first);
// 2048 unless the environment sets SWITCHYARD_MATMUL_CACHE_CAPACITY. Each primitive holds its
// generated kernels, ~90 KB measured for 512-row bf16 products, and takes ~0.25 ms to create.
struct MatmulCacheStats {
  int64_t size = 0, hits = 0, misses = 0, capacity = 0;
  int64_t refused = 0;  // problems oneDNN refused (LibTorch computes them)
};
MatmulCacheStats GetMatmulCacheStats();
void SetMatmulCacheCapacity(int64_t capacity);  // also empties the cache and its counts

}  // namespace switchyard::common

#endif  // SWITCHYARD_COMMON_MATMUL_H_
