#include "tests/cuda/axpy.h"

#include <cuda_runtime.h>

namespace switchyard::cuda_smoke {
namespace {

__global__ void Axpy(float a, const float* __restrict__ x, float* __restrict__ y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] = a * x[i] + y[i];
  }
}

}  // namespace

int LaunchAxpy(float a, const float* x, float* y, int64_t n) {
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  Axpy<<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), threads>>>(a, x, y, n);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace switchyard::cuda_smoke
