// A small CUDA kernel (y = a·x + y) that proves the nvcc path of the build works.
#ifndef TESTS_CUDA_AXPY_H_
#define TESTS_CUDA_AXPY_H_

#include <cstdint>

namespace switchyard::cuda_smoke {

// Runs y = a·x + y on the current device for n floats (device pointers); returns the
// cudaError_t of the launch as an int (0 = success).
int LaunchAxpy(float a, const float* x, float* y, int64_t n);

}  // namespace switchyard::cuda_smoke

#endif  // TESTS_CUDA_AXPY_H_
