// A CPU emulator of the part of CUDA that moe/cuda uses, so that its kernels and its host code
// run in CPU-only tests: a .cu file compiled as C++ with this header included first, linked
// with this library instead of libcudart and cuBLAS. Declarations and types come from the
// real CUDA headers (so every signature is the toolkit's own); this library defines the
// functions.
//
//   // kernels written with SY_LAUNCH(kernel, grid, block, shared_bytes, stream)(args...),
//   // which is the <<<>>> launch under nvcc and sy_emu::Launcher here.
//   #include "third_party/cuda_emu/cuda_emu.h"
//   #include "moe/cuda/kernels.cu"
//
// What it models:
//   - Every CUDA thread of a block is a fiber; __syncthreads() and the warp shuffles
//     (__shfl_sync, _xor, _up, _down) wait until every thread they involve has arrived, and a
//     block that cannot go on is an error naming the kernel, the block and what each thread
//     waits on: a shuffle whose mask names a lane that has exited or waits elsewhere (at a
//     barrier, say), a lane outside its own mask or reading from outside it, a bad width.
//     Exited threads count as arrived at a barrier (as on sm_70 and later), and barriers
//     reached from different places in the code release together. Blocks run one after
//     another in a shuffled order. Threads of a block interleave only at those points: warps
//     in a random order, each run as far as it can go before the next (as a GPU may let one
//     warp run far ahead), its lanes in a random order. So a missing barrier or a dependence
//     on block order shows as a wrong result. The order is seeded by the launch shape and
//     the block: runs repeat.
//   - __shared__ variables are function-local statics: zero at the first launch, then holding
//     what the last block left (a GPU leaves them undefined).
//   - Device memory is host memory from cudaMalloc, filled with 0xff bytes (NaN as floats),
//     as a GPU leaves it undefined. Kernel pointer arguments must point into a device
//     allocation (or be null), else the launch fails with a sticky cudaErrorIllegalAddress;
//     copies and memsets must lie inside one allocation (else cudaErrorInvalidValue, as a
//     failed call, not sticky), and cuBLAS's operands too (else a sticky
//     cudaErrorIllegalAddress). Each with a message on stderr. Accesses a kernel makes past
//     the end of an allocation show only under AddressSanitizer.
//   - Launch limits (threads per block ≤ 1024 in x·y·z, x, y ≤ 1024, z ≤ 64; grid y, z ≤
//     65535; static shared memory is a function-local static here) give
//     cudaErrorInvalidConfiguration, as the runtime does; grids of over 16M blocks, legal on a
//     GPU, cudaErrorNotSupported (more than the emulator runs).
//   - cudaDeviceReset() frees every allocation and stream and clears a fault, as the real one
//     destroys the context.
//   - Streams complete every operation when it is issued, so the order of operations on one
//     stream holds and nothing ever overlaps; events record the host's clock (their elapsed
//     times time the emulator, not a GPU).
//   - cuBLAS: cublasGemmEx and cublasGemmGroupedBatchedEx in column-major form, fp32 or bf16
//     operands (C of their type, or fp32) with fp32 compute, with the documented checks of
//     sizes and leading dimensions, every group checked before any is computed, and device
//     arrays of device pointers for the grouped call.
//   - Memory pools: the device has none until cudaDevAttrMemoryPoolsSupported is asked,
//     which then answers yes and no in turn, the device having pools or not accordingly
//     (cudaMallocAsync and cudaFreeAsync fail with cudaErrorNotSupported without), so that a
//     caller's both paths run and one that never asks fails. On a GPU the answer is fixed, so
//     a caller that keeps it across another query would fail here and not there.
// What it does not model: timing, concurrency between blocks or streams, __expf's reduced
// accuracy (it is expf here), warp-synchronous code without *_sync intrinsics, faults that a
// GPU reports only at the next synchronisation (here at once), host memory a GPU may reach
// (HMM), alignment rules of the grouped GEMM, and what real cuBLAS does beyond its
// documented contract. Under ThreadSanitizer the fibers are separate threads to it and
// __syncthreads() orders memory, so races between threads of one block are reported (between
// blocks not: blocks are ordered one after another; and conservatively, a thread's writes
// before it exits are not ordered before the reads of threads that pass a later barrier);
// under AddressSanitizer, accesses outside device allocations are.
#ifndef THIRD_PARTY_CUDA_EMU_CUDA_EMU_H_
#define THIRD_PARTY_CUDA_EMU_CUDA_EMU_H_

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>

#include <cuda_runtime.h>

namespace sy_emu {

// The thread a kernel body runs as (only valid inside a kernel).
struct ThreadContext {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
const ThreadContext& Current();

// __syncthreads().
void Barrier();

// A warp shuffle: returns `bits` as held by lane `src_lane` of the calling lane's warp, once
// every lane of `mask` has called it. `what` names the intrinsic in errors; a `width` that
// is not a power of two up to 32 fails the launch.
uint64_t Shuffle(const char* what, unsigned mask, uint64_t bits, int src_lane, int width);

// The calling thread's lane in its warp.
int Lane();

// Whether [p, p + bytes) lies inside one device allocation.
bool IsDeviceRange(const void* p, size_t bytes);

// Runs `thread` as every thread of a grid; reports bad launches and kernel errors through the
// runtime's last error. `bad_argument` is non-empty when a pointer argument failed its check.
void RunKernel(const char* kernel, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
               const std::string& bad_argument, const std::function<void()>& thread);

// The last message the emulator printed (for the emulator's own tests).
std::string LastDiagnostic();

template <typename T>
void CheckArgument(const char* kernel, int index, const T& value, std::string& bad) {
  if constexpr (std::is_pointer_v<T>) {
    if (value != nullptr && bad.empty() && !IsDeviceRange(value, 0)) {
      bad = std::string(kernel) + ": argument " + std::to_string(index) + " is not a device pointer";
    }
  }
}

// SY_LAUNCH(kernel, ...)(args...): checks the arguments, then runs the kernel on every thread.
template <typename F>
class Launcher {
 public:
  Launcher(const char* kernel, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream, F body)
      : kernel_(kernel), grid_(grid), block_(block), shared_bytes_(shared_bytes), stream_(stream), body_(body) {}

  template <typename... A>
  void operator()(A... args) {
    std::string bad;
    int index = 0;
    (CheckArgument(kernel_, index++, args, bad), ...);
    RunKernel(kernel_, grid_, block_, shared_bytes_, stream_, bad, [&] { body_(args...); });
  }

 private:
  const char* kernel_;
  dim3 grid_, block_;
  size_t shared_bytes_;
  cudaStream_t stream_;
  F body_;
};

template <typename T>
uint64_t ToBits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move up to 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T FromBits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace sy_emu

#define SY_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  ::sy_emu::Launcher(#kernel, grid, block, shared_bytes, stream, [&](auto... sy_emu_args) { kernel(sy_emu_args...); })

// Device built-ins.
#define threadIdx (::sy_emu::Current().thread_idx)
#define blockIdx (::sy_emu::Current().block_idx)
#define blockDim (::sy_emu::Current().block_dim)
#define gridDim (::sy_emu::Current().grid_dim)
#define warpSize 32
// One copy per kernel; blocks run one after another, so each has it to itself.
#undef __shared__
#define __shared__ static

inline void __syncthreads() { ::sy_emu::Barrier(); }

namespace sy_emu {
// A shuffle's width must be a power of two up to 32 (else the launch fails); the lane
// arithmetic below assumes one, so an invalid width is computed as 32 and reported.
inline bool ValidWidth(int width) { return width >= 1 && width <= 32 && (width & (width - 1)) == 0; }
inline int SegmentBase(int lane, int width) { return lane & ~((ValidWidth(width) ? width : 32) - 1); }
}  // namespace sy_emu

// Lane arithmetic as CUDA's programming guide gives it: a source outside the caller's
// segment of `width` lanes wraps (shfl), or leaves the caller its own value (xor into a later
// segment, up before the segment, down past it); the xor mask's low 5 bits count.
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = ::sy_emu::Lane(), w = ::sy_emu::ValidWidth(width) ? width : 32;
  return ::sy_emu::FromBits<T>(::sy_emu::Shuffle("__shfl_sync", mask, ::sy_emu::ToBits(v),
                                                 ::sy_emu::SegmentBase(lane, width) + (src & (w - 1)), width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::sy_emu::Lane(), w = ::sy_emu::ValidWidth(width) ? width : 32;
  const int src = lane ^ (lane_mask & 31);
  return ::sy_emu::FromBits<T>(::sy_emu::Shuffle("__shfl_xor_sync", mask, ::sy_emu::ToBits(v),
                                                 src < ::sy_emu::SegmentBase(lane, width) + w ? src : lane, width));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::sy_emu::Lane(), w = ::sy_emu::ValidWidth(width) ? width : 32;
  const int64_t src = lane + int64_t{delta};
  return ::sy_emu::FromBits<T>(::sy_emu::Shuffle(
      "__shfl_down_sync", mask, ::sy_emu::ToBits(v),
      src < ::sy_emu::SegmentBase(lane, width) + w ? static_cast<int>(src) : lane, width));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::sy_emu::Lane();
  const int64_t src = lane - int64_t{delta};
  return ::sy_emu::FromBits<T>(::sy_emu::Shuffle("__shfl_up_sync", mask, ::sy_emu::ToBits(v),
                                                 src >= ::sy_emu::SegmentBase(lane, width) ? static_cast<int>(src) : lane,
                                                 width));
}

// Atomic as ThreadSanitizer sees it too (to it, the threads of a block are threads).
template <typename T>
T atomicAdd(T* p, T v) {
  if constexpr (std::is_integral_v<T>) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
  } else {
    T old, sum;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    do {
      sum = old + v;
    } while (!__atomic_compare_exchange(p, &old, &sum, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
  }
}

inline float __expf(float x) { return std::exp(x); }
using std::isnan;

#endif  // THIRD_PARTY_CUDA_EMU_CUDA_EMU_H_
