// The emulator against plain C++: thread and block indices, shuffles, barriers, shared memory
// and atomics compute what CUDA defines; bad launches, host pointers, divergent shuffles and
// stuck barriers are errors that name the problem; cuBLAS's GEMMs follow the column-major
// contract and its argument checks.
#include "third_party/cuda_emu/cuda_emu.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include <cublas_v2.h>
#include <cuda_bf16.h>

#include "gtest/gtest.h"

namespace {

// Writes each thread's global linear index where it belongs.
__global__ void IndexKernel(int* out) {
  const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int threads = blockDim.x * blockDim.y * blockDim.z;
  const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  out[block * threads + t] = block * 1000 + t;
}

// Block sums: within warps by __shfl_down_sync, across warps through shared memory. Also each
// lane's xor-partner, its lane − 1 (up) and lane 5's value (idx), and an atomic count.
__global__ void ReduceKernel(const float* in, float* sums, int* xor_partner, int* up, int* idx, int* count) {
  __shared__ float partial[32];
  const int t = threadIdx.x + blockDim.x * threadIdx.y, threads = blockDim.x * blockDim.y;
  const int g = blockIdx.x * threads + t;
  float v = in[g];
  for (int s = 16; s > 0; s /= 2) v += __shfl_down_sync(0xffffffffu, v, s);
  if (t % 32 == 0) partial[t / 32] = v;
  xor_partner[g] = __shfl_xor_sync(0xffffffffu, t, 3);
  up[g] = __shfl_up_sync(0xffffffffu, t, 1);
  idx[g] = __shfl_sync(0xffffffffu, t, 5);
  atomicAdd(count, 1);
  __syncthreads();
  if (t == 0) {
    float s = 0;
    for (int w = 0; w < threads / 32; ++w) s += partial[w];
    sums[blockIdx.x] = s;
  }
}

// Lanes 16-31 exit before the shuffle that names them.
__global__ void HalfWarpExitsKernel(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

// Half the warp waits at a shuffle that names the other half, which waits at the barrier.
__global__ void StuckKernel(float* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  } else {
    __syncthreads();
  }
}

__global__ void WriteKernel(float* out) { out[threadIdx.x] = 1.f; }

// Shuffles within segments of 8 lanes: a wrapping negative source, xor into an earlier and a
// later segment, down past the segment's end.
__global__ void SegmentShuffleKernel(int* idx, int* xor_early, int* xor_late, int* down) {
  const int t = threadIdx.x;
  idx[t] = __shfl_sync(0xffffffffu, t, -1, 8);          // lane 7 of the segment
  xor_early[t] = __shfl_xor_sync(0xffffffffu, t, 8, 8);  // later segments read an earlier one
  xor_late[t] = __shfl_xor_sync(0xffffffffu, t, 33, 16); // low 5 bits: 1
  down[t] = __shfl_down_sync(0xffffffffu, t, 3, 8);
}

__global__ void BadWidthKernel(int* out) { out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0, 12); }

// Threads 32-63 exit; the rest meet at a barrier, which exited threads do not hold up.
__global__ void EarlyExitBarrierKernel(int* out) {
  __shared__ int v[32];
  if (threadIdx.x >= 32) return;
  v[threadIdx.x] = threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = v[31 - threadIdx.x];
}

// Records the order in which blocks ran.
__global__ void BlockOrderKernel(int* counter, int* order) {
  if (threadIdx.x == 0) order[blockIdx.x] = atomicAdd(counter, 1);
}

// Thread 0 publishes its block's index in shared memory; everyone copies it out, after a
// barrier or (the bug) without one.
template <bool kBarrier>
__global__ void PublishKernel(int* out) {
  __shared__ int value;
  if (threadIdx.x == 0) value = blockIdx.x;
  if (kBarrier) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = value;
}

class CudaEmuTest : public ::testing::Test {
 protected:
  // A fresh context for the next test (some tests end in a fault), without their buffers.
  void TearDown() override { ASSERT_EQ(cudaDeviceReset(), cudaSuccess); }
};

template <typename T>
T* DeviceCopy(const std::vector<T>& h) {
  T* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, h.size() * sizeof(T)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return p;
}

template <typename T>
std::vector<T> HostCopy(const T* p, size_t n) {
  std::vector<T> h(n);
  EXPECT_EQ(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return h;
}

TEST_F(CudaEmuTest, ThreadAndBlockIndicesCoverTheGrid) {
  const dim3 grid(3, 2, 2), block(4, 3, 2);
  const int n = 12 * 24;
  int* d = DeviceCopy(std::vector<int>(n, -1));
  SY_LAUNCH(IndexKernel, grid, block, 0, nullptr)(d);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  const std::vector<int> h = HostCopy(d, n);
  for (int b = 0; b < 12; ++b) {
    for (int t = 0; t < 24; ++t) EXPECT_EQ(h[b * 24 + t], b * 1000 + t);
  }
  cudaFree(d);
}

TEST_F(CudaEmuTest, ShufflesBarriersSharedMemoryAndAtomics) {
  const int blocks = 3, threads = 128;  // as 64 × 2
  std::vector<float> in(blocks * threads);
  std::mt19937 g(1);
  std::uniform_int_distribution<int> d(-50, 50);
  for (float& v : in) v = static_cast<float>(d(g));  // integers: every order of sums is exact
  float* din = DeviceCopy(in);
  float* sums = nullptr;
  int *xp = nullptr, *up = nullptr, *idx = nullptr, *count = DeviceCopy(std::vector<int>{0});
  ASSERT_EQ(cudaMalloc(&sums, blocks * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&xp, in.size() * sizeof(int)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&up, in.size() * sizeof(int)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&idx, in.size() * sizeof(int)), cudaSuccess);
  SY_LAUNCH(ReduceKernel, blocks, dim3(64, 2), 0, nullptr)(din, sums, xp, up, idx, count);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  const std::vector<float> s = HostCopy(sums, blocks);
  const std::vector<int> x = HostCopy(xp, in.size()), u = HostCopy(up, in.size()), i5 = HostCopy(idx, in.size());
  for (int b = 0; b < blocks; ++b) {
    EXPECT_EQ(s[b], std::accumulate(in.begin() + b * threads, in.begin() + (b + 1) * threads, 0.f)) << b;
    for (int t = 0; t < threads; ++t) {
      const int lane = t % 32, warp = t - lane;
      EXPECT_EQ(x[b * threads + t], warp + (lane ^ 3));
      EXPECT_EQ(u[b * threads + t], lane == 0 ? t : t - 1);  // lane 0 keeps its own value
      EXPECT_EQ(i5[b * threads + t], warp + 5);
    }
  }
  EXPECT_EQ(HostCopy(count, 1)[0], blocks * threads);
  for (void* p : {static_cast<void*>(din), static_cast<void*>(sums), static_cast<void*>(xp), static_cast<void*>(up),
                  static_cast<void*>(idx), static_cast<void*>(count)}) {
    EXPECT_EQ(cudaFree(p), cudaSuccess);
  }
}

// Threads run in a shuffled order between sync points: without the barrier, some threads
// read the shared value before thread 0 has written it (the previous block's, here).
TEST_F(CudaEmuTest, MissingBarrierGivesWrongResults) {
  const int blocks = 8, threads = 64;
  int* out = nullptr;
  ASSERT_EQ(cudaMalloc(&out, blocks * threads * sizeof(int)), cudaSuccess);
  for (bool barrier : {true, false}) {
#if defined(__SANITIZE_THREAD__)
    // ThreadSanitizer reports the race the second run has on purpose (checked by hand).
    if (!barrier) continue;
#endif
    if (barrier) {
      SY_LAUNCH(PublishKernel<true>, blocks, threads, 0, nullptr)(out);
    } else {
      SY_LAUNCH(PublishKernel<false>, blocks, threads, 0, nullptr)(out);
    }
    ASSERT_EQ(cudaGetLastError(), cudaSuccess);
    const std::vector<int> h = HostCopy(out, blocks * threads);
    int wrong = 0;
    for (int i = 0; i < blocks * threads; ++i) wrong += h[i] != i / threads;
    if (barrier) {
      EXPECT_EQ(wrong, 0);
    } else {
      EXPECT_GT(wrong, blocks * threads / 4);  // about half
    }
  }
  cudaFree(out);
}

TEST_F(CudaEmuTest, ShuffleWidthsFollowTheProgrammingGuide) {
  int *idx = nullptr, *xe = nullptr, *xl = nullptr, *down = nullptr;
  for (int** p : {&idx, &xe, &xl, &down}) ASSERT_EQ(cudaMalloc(p, 32 * sizeof(int)), cudaSuccess);
  SY_LAUNCH(SegmentShuffleKernel, 1, 32, 0, nullptr)(idx, xe, xl, down);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  const std::vector<int> i = HostCopy(idx, 32), e = HostCopy(xe, 32), l = HostCopy(xl, 32), d = HostCopy(down, 32);
  for (int t = 0; t < 32; ++t) {
    const int base = t & ~7;
    EXPECT_EQ(i[t], base + 7) << t;
    EXPECT_EQ(e[t], (t ^ 8) < base + 8 ? t ^ 8 : t) << t;  // lanes 8-15 and 24-31 read 8 below
    EXPECT_EQ(l[t], t ^ 1) << t;
    EXPECT_EQ(d[t], t + 3 < base + 8 ? t + 3 : t) << t;
  }
  SY_LAUNCH(BadWidthKernel, 1, 32, 0, nullptr)(idx);
  EXPECT_EQ(cudaGetLastError(), cudaErrorLaunchFailure);
  EXPECT_NE(sy_emu::LastDiagnostic().find("width 12 is not a power of two"), std::string::npos)
      << sy_emu::LastDiagnostic();
}

TEST_F(CudaEmuTest, ExitedThreadsDoNotHoldUpABarrier) {
  int* out = nullptr;
  ASSERT_EQ(cudaMalloc(&out, 32 * sizeof(int)), cudaSuccess);
  SY_LAUNCH(EarlyExitBarrierKernel, 1, 64, 0, nullptr)(out);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  const std::vector<int> h = HostCopy(out, 32);
  for (int t = 0; t < 32; ++t) EXPECT_EQ(h[t], 31 - t);
}

TEST_F(CudaEmuTest, BlocksRunInAShuffledOrder) {
  const int blocks = 64;
  int* counter = DeviceCopy(std::vector<int>{0});
  int* order = nullptr;
  ASSERT_EQ(cudaMalloc(&order, blocks * sizeof(int)), cudaSuccess);
  SY_LAUNCH(BlockOrderKernel, blocks, 32, 0, nullptr)(counter, order);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  std::vector<int> h = HostCopy(order, blocks);
  int in_place = 0;
  for (int b = 0; b < blocks; ++b) in_place += h[b] == b;
  EXPECT_LT(in_place, blocks / 4);
  std::sort(h.begin(), h.end());
  for (int b = 0; b < blocks; ++b) EXPECT_EQ(h[b], b);  // each ran once
}

// The device has pools only as cudaDevAttrMemoryPoolsSupported last said: a caller that
// allocates from a pool without asking fails on the devices that have none.
TEST_F(CudaEmuTest, MemoryPoolsAsTheAttributeSays) {
  int pools = -1;
  ASSERT_EQ(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, 0), cudaSuccess);
  EXPECT_EQ(pools, 1);  // the first answer after a reset
  void* p = nullptr;
  EXPECT_EQ(cudaMallocAsync(&p, 16, nullptr), pools ? cudaSuccess : cudaErrorNotSupported);
  if (p != nullptr) {
    EXPECT_EQ(cudaFreeAsync(p, nullptr), cudaSuccess);
  }
  int again = -1;
  ASSERT_EQ(cudaDeviceGetAttribute(&again, cudaDevAttrMemoryPoolsSupported, 0), cudaSuccess);
  EXPECT_NE(again, pools);
  p = nullptr;
  EXPECT_EQ(cudaMallocAsync(&p, 16, nullptr), again ? cudaSuccess : cudaErrorNotSupported);
  if (p != nullptr) {
    EXPECT_EQ(cudaFreeAsync(p, nullptr), cudaSuccess);
  }
  // Without pools, cudaMalloc's memory cannot go back through cudaFreeAsync either.
  void* q = nullptr;
  ASSERT_EQ(cudaMalloc(&q, 16), cudaSuccess);
  EXPECT_EQ(cudaFreeAsync(q, nullptr), again ? cudaSuccess : cudaErrorNotSupported);
  cudaGetLastError();
}

TEST_F(CudaEmuTest, NewDeviceMemoryIsNaN) {
  float* p = nullptr;
  ASSERT_EQ(cudaMalloc(&p, 4 * sizeof(float)), cudaSuccess);
  for (float v : HostCopy(p, 4)) EXPECT_TRUE(std::isnan(v));
  cudaFree(p);
}

TEST_F(CudaEmuTest, BadLaunchConfigurationIsNotSticky) {
  float* p = nullptr;
  ASSERT_EQ(cudaMalloc(&p, 1024 * sizeof(float)), cudaSuccess);
  SY_LAUNCH(WriteKernel, 1, 1025, 0, nullptr)(p);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  EXPECT_NE(sy_emu::LastDiagnostic().find("WriteKernel"), std::string::npos) << sy_emu::LastDiagnostic();
  SY_LAUNCH(WriteKernel, 1, dim3(1, 1, 65), 0, nullptr)(p);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  SY_LAUNCH(WriteKernel, dim3(1, 65536), 1, 0, nullptr)(p);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  // Within CUDA's limits but more blocks than the emulator runs: refused, and later launches work.
  SY_LAUNCH(WriteKernel, dim3(1 << 13, 1 << 12), 1, 0, nullptr)(p);
  EXPECT_EQ(cudaGetLastError(), cudaErrorNotSupported);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);  // read and cleared
  SY_LAUNCH(WriteKernel, 1, 1024, 0, nullptr)(p);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(HostCopy(p, 1024), std::vector<float>(1024, 1.f));
  cudaFree(p);
}

TEST_F(CudaEmuTest, HostPointerArgumentIsAStickyFault) {
  std::vector<float> host(32);
  SY_LAUNCH(WriteKernel, 1, 32, 0, nullptr)(host.data());
  EXPECT_EQ(cudaGetLastError(), cudaErrorIllegalAddress);
  EXPECT_NE(sy_emu::LastDiagnostic().find("WriteKernel: argument 0 is not a device pointer"), std::string::npos)
      << sy_emu::LastDiagnostic();
  EXPECT_EQ(host, std::vector<float>(32, 0.f));  // the kernel did not run
  // The context is lost, as after a fault on a GPU.
  EXPECT_EQ(cudaGetLastError(), cudaErrorIllegalAddress);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorIllegalAddress);
  float* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, 4), cudaErrorIllegalAddress);
}

// The last error is each host thread's own; a fault is every thread's.
TEST_F(CudaEmuTest, LastErrorPerThreadFaultForAll) {
  EXPECT_EQ(cudaFree(reinterpret_cast<void*>(0x10)), cudaErrorInvalidDevicePointer);
  cudaError_t seen = cudaErrorUnknown;
  std::thread([&] { seen = cudaGetLastError(); }).join();
  EXPECT_EQ(seen, cudaSuccess);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidDevicePointer);
  std::vector<float> host(32);
  SY_LAUNCH(WriteKernel, 1, 32, 0, nullptr)(host.data());  // a fault
  std::thread([&] { seen = cudaGetLastError(); }).join();
  EXPECT_EQ(seen, cudaErrorIllegalAddress);
}

TEST_F(CudaEmuTest, ShuffleNamingAnExitedLaneIsAnError) {
  float* p = nullptr;
  ASSERT_EQ(cudaMalloc(&p, 32 * sizeof(float)), cudaSuccess);
  SY_LAUNCH(HalfWarpExitsKernel, 1, 32, 0, nullptr)(p);
  EXPECT_EQ(cudaGetLastError(), cudaErrorLaunchFailure);
  const std::string d = sy_emu::LastDiagnostic();
  EXPECT_NE(d.find("HalfWarpExitsKernel block (0, 0, 0): block cannot go on"), std::string::npos) << d;
  EXPECT_NE(d.find("threads 0-15: a shuffle (mask ffffffff), threads 16-31: exited"), std::string::npos) << d;
}

TEST_F(CudaEmuTest, BarrierThatPartOfTheBlockNeverReachesIsAnError) {
  float* p = nullptr;
  ASSERT_EQ(cudaMalloc(&p, 64 * sizeof(float)), cudaSuccess);
  SY_LAUNCH(StuckKernel, 2, 64, 0, nullptr)(p);
  EXPECT_EQ(cudaGetLastError(), cudaErrorLaunchFailure);
  const std::string d = sy_emu::LastDiagnostic();
  EXPECT_NE(d.find("threads 0-15: a shuffle (mask ffffffff), threads 16-63: __syncthreads"), std::string::npos) << d;
}

TEST_F(CudaEmuTest, CopiesMustStayInsideOneAllocation) {
  float* p = nullptr;
  ASSERT_EQ(cudaMalloc(&p, 8 * sizeof(float)), cudaSuccess);
  std::vector<float> h(9, 2.f);
  EXPECT_EQ(cudaMemcpy(p, h.data(), 9 * sizeof(float), cudaMemcpyHostToDevice), cudaErrorInvalidValue);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  EXPECT_EQ(cudaMemcpy(p + 1, h.data(), 7 * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  // Direction reversed: the destination is the host vector.
  EXPECT_EQ(cudaMemcpy(h.data(), p, 4, cudaMemcpyHostToDevice), cudaErrorInvalidValue);
  EXPECT_EQ(cudaMemset(p, 0, 9 * sizeof(float)), cudaErrorInvalidValue);
  // cudaMemcpyDefault takes either direction, but not past an allocation's end.
  EXPECT_EQ(cudaMemcpy(p, h.data(), 8 * sizeof(float), cudaMemcpyDefault), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(h.data(), p + 1, 8 * sizeof(float), cudaMemcpyDefault), cudaErrorInvalidValue);
  EXPECT_EQ(cudaFree(p + 1), cudaErrorInvalidDevicePointer);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidDevicePointer);
  EXPECT_EQ(cudaFree(p), cudaSuccess);
}

// Column-major C = alpha·op(A)·op(B) + beta·C with leading dimensions above the row counts,
// against a plain loop.
TEST_F(CudaEmuTest, GemmExFollowsTheColumnMajorContract) {
  const int m = 5, n = 4, k = 3, lda = 7, ldb = 6, ldc = 8;
  std::mt19937 g(2);
  std::uniform_int_distribution<int> d(-4, 4);
  std::vector<float> a(lda * std::max(m, k)), b(ldb * std::max(n, k)), c(ldc * n);
  for (float& v : a) v = d(g);
  for (float& v : b) v = d(g);
  for (float& v : c) v = d(g);
  cublasHandle_t h;
  ASSERT_EQ(cublasCreate(&h), CUBLAS_STATUS_SUCCESS);
  for (cublasOperation_t ta : {CUBLAS_OP_N, CUBLAS_OP_T}) {
    for (cublasOperation_t tb : {CUBLAS_OP_N, CUBLAS_OP_T}) {
      float *da = DeviceCopy(a), *db = DeviceCopy(b), *dc = DeviceCopy(c);
      const float alpha = 2.f, beta = -1.f;
      ASSERT_EQ(cublasGemmEx(h, ta, tb, m, n, k, &alpha, da, CUDA_R_32F, lda, db, CUDA_R_32F, ldb, &beta, dc,
                             CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                CUBLAS_STATUS_SUCCESS);
      const std::vector<float> got = HostCopy(dc, c.size());
      for (int j = 0; j < n; ++j) {
        for (int i = 0; i < ldc; ++i) {
          float want = c[i + j * ldc];  // rows past m are untouched
          if (i < m) {
            float s = 0;
            for (int l = 0; l < k; ++l) {
              s += (ta == CUBLAS_OP_N ? a[i + l * lda] : a[l + i * lda]) *
                   (tb == CUBLAS_OP_N ? b[l + j * ldb] : b[j + l * ldb]);
            }
            want = alpha * s + beta * want;
          }
          EXPECT_EQ(got[i + j * ldc], want) << ta << tb << " " << i << " " << j;
        }
      }
      cudaFree(da), cudaFree(db), cudaFree(dc);
    }
  }
  // lda below m, and k = 0 with ldb = 0: rejected as cuBLAS documents.
  float* dc = DeviceCopy(c);
  const float one = 1.f, zero = 0.f;
  EXPECT_EQ(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, dc, CUDA_R_32F, m - 1, dc, CUDA_R_32F, k, &zero,
                         dc, CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_INVALID_VALUE);
  EXPECT_EQ(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, 0, &one, dc, CUDA_R_32F, m, dc, CUDA_R_32F, 0, &zero, dc,
                         CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_INVALID_VALUE);
  // A product whose C runs past its allocation is a fault.
  EXPECT_EQ(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, dc, CUDA_R_32F, m, dc, CUDA_R_32F, k, &zero,
                         dc + 20, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_EXECUTION_FAILED);
  EXPECT_EQ(cudaGetLastError(), cudaErrorIllegalAddress);
  cublasDestroy(h);
}

// bf16 operands with fp32 compute: the output rounded once; beta = 0 ignores NaN in C.
TEST_F(CudaEmuTest, GroupedGemmTakesDeviceArraysOfPointers) {
  const int m = 3, n = 2, k = 4;
  std::vector<__nv_bfloat16> a(2 * m * k), b(2 * k * n);
  for (size_t i = 0; i < a.size(); ++i) a[i] = __float2bfloat16(0.1f * (i + 1));
  for (size_t i = 0; i < b.size(); ++i) b[i] = __float2bfloat16(0.3f - 0.05f * i);
  __nv_bfloat16 *da = DeviceCopy(a), *db = DeviceCopy(b), *dc = nullptr;
  ASSERT_EQ(cudaMalloc(&dc, 2 * m * n * sizeof(__nv_bfloat16)), cudaSuccess);  // NaN until written
  std::vector<const void*> ptrs = {da, da + m * k, db, db + k * n, dc, dc + m * n};
  const void** dptrs = DeviceCopy(ptrs);
  cublasHandle_t h;
  ASSERT_EQ(cublasCreate(&h), CUBLAS_STATUS_SUCCESS);
  const cublasOperation_t op[1] = {CUBLAS_OP_N};
  const int ms[1] = {m}, ns[1] = {n}, ks[1] = {k}, size[1] = {2};
  const float alpha[1] = {1.f}, beta[1] = {0.f};
  ASSERT_EQ(cublasGemmGroupedBatchedEx(h, op, op, ms, ns, ks, alpha, dptrs, CUDA_R_16BF, ms, dptrs + 2, CUDA_R_16BF,
                                       ks, beta, const_cast<void* const*>(dptrs + 4), CUDA_R_16BF, ms, 1, size,
                                       CUBLAS_COMPUTE_32F),
            CUBLAS_STATUS_SUCCESS);
  const std::vector<__nv_bfloat16> c = HostCopy(dc, 2 * m * n);
  for (int p = 0; p < 2; ++p) {
    for (int j = 0; j < n; ++j) {
      for (int i = 0; i < m; ++i) {
        float s = 0;
        for (int l = 0; l < k; ++l) {
          s += __bfloat162float(a[p * m * k + i + l * m]) * __bfloat162float(b[p * k * n + l + j * k]);
        }
        EXPECT_EQ(__bfloat162float(c[p * m * n + i + j * m]), __bfloat162float(__float2bfloat16(s))) << p << i << j;
      }
    }
  }
  // Two groups of different shapes (m 3 and 2, one and two problems), fp32 C from bf16
  // operands: each problem against its own loop; a bad ldc in the second group fails the
  // call before the first group's C is written.
  {
    float* c32 = nullptr;
    ASSERT_EQ(cudaMalloc(&c32, 3 * m * n * sizeof(float)), cudaSuccess);
    std::vector<const void*> p2 = {da, da + m * k, da + 2 * 4, db, db + k * n, db, c32, c32 + m * n, c32 + 2 * m * n};
    const void** dp2 = DeviceCopy(p2);
    const cublasOperation_t ops[2] = {CUBLAS_OP_N, CUBLAS_OP_N};
    const int ms2[2] = {m, 2}, ns2[2] = {n, n}, ks2[2] = {k, k}, lda2[2] = {m, 2}, ldc2[2] = {m, 2}, sizes[2] = {1, 2};
    const float alpha2[2] = {1.f, -2.f}, beta2[2] = {0.f, 0.f};
    int ldc_bad[2] = {m, 1};
    EXPECT_EQ(cublasGemmGroupedBatchedEx(h, ops, ops, ms2, ns2, ks2, alpha2, dp2, CUDA_R_16BF, lda2, dp2 + 3,
                                         CUDA_R_16BF, ks2, beta2, const_cast<void* const*>(dp2 + 6), CUDA_R_32F,
                                         ldc_bad, 2, sizes, CUBLAS_COMPUTE_32F),
              CUBLAS_STATUS_INVALID_VALUE);
    for (float v : HostCopy(c32, 3 * m * n)) EXPECT_TRUE(std::isnan(v)) << "written before the check failed";
    ASSERT_EQ(cublasGemmGroupedBatchedEx(h, ops, ops, ms2, ns2, ks2, alpha2, dp2, CUDA_R_16BF, lda2, dp2 + 3,
                                         CUDA_R_16BF, ks2, beta2, const_cast<void* const*>(dp2 + 6), CUDA_R_32F,
                                         ldc2, 2, sizes, CUBLAS_COMPUTE_32F),
              CUBLAS_STATUS_SUCCESS);
    const std::vector<float> c2 = HostCopy(c32, 3 * m * n);
    const int64_t a_off[3] = {0, m * k, 2 * 4}, b_off[3] = {0, k * n, 0}, c_off[3] = {0, m * n, 2 * m * n};
    for (int q = 0; q < 3; ++q) {
      const int g = q == 0 ? 0 : 1, rows = ms2[g];
      for (int j = 0; j < n; ++j) {
        for (int i = 0; i < rows; ++i) {
          float acc = 0;
          for (int l = 0; l < k; ++l) {
            acc += __bfloat162float(a[a_off[q] + i + l * lda2[g]]) * __bfloat162float(b[b_off[q] + l + j * k]);
          }
          EXPECT_EQ(c2[c_off[q] + i + j * ldc2[g]], alpha2[g] * acc) << q << " " << i << " " << j;
        }
      }
    }
  }
  // The same call with the host's pointer array: a fault, as on a GPU.
  EXPECT_EQ(cublasGemmGroupedBatchedEx(h, op, op, ms, ns, ks, alpha, ptrs.data(), CUDA_R_16BF, ms, ptrs.data() + 2,
                                       CUDA_R_16BF, ks, beta, const_cast<void* const*>(ptrs.data() + 4), CUDA_R_16BF,
                                       ms, 1, size, CUBLAS_COMPUTE_32F),
            CUBLAS_STATUS_EXECUTION_FAILED);
  EXPECT_NE(sy_emu::LastDiagnostic().find("not a device array of 2 pointers"), std::string::npos);
  cublasDestroy(h);
}

}  // namespace
