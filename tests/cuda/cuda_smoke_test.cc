// GPU check of the CUDA build: the nvcc-compiled kernel gives a·x + y, and NCCL all-reduces
// across every visible GPU (one communicator per device, one process). Needs a GPU: tagged
// "gpu", so the default test run skips it.
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdio>
#include <vector>

#include "gtest/gtest.h"
#include "tests/cuda/axpy.h"

namespace {

#define CUDA_OK(x) ASSERT_EQ((x), cudaSuccess) << cudaGetErrorString(x)
#define NCCL_OK(x) ASSERT_EQ((x), ncclSuccess) << ncclGetErrorString(x)

TEST(CudaSmoke, NcclVersionLinks) {
  int version = 0;
  NCCL_OK(ncclGetVersion(&version));
  EXPECT_GE(version, 20000);  // NCCL 2.x encodes 2.28.9 as 22809
  std::printf("NCCL version code %d\n", version);
}

TEST(CudaSmoke, AxpyKernel) {
  int devices = 0;
  CUDA_OK(cudaGetDeviceCount(&devices));
  ASSERT_GT(devices, 0);
  const int64_t n = (1 << 20) + 3;
  std::vector<float> x(n), y(n);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = static_cast<float>(i % 97);
    y[i] = static_cast<float>(i % 13);
  }
  float *dx, *dy;
  CUDA_OK(cudaMalloc(&dx, n * sizeof(float)));
  CUDA_OK(cudaMalloc(&dy, n * sizeof(float)));
  CUDA_OK(cudaMemcpy(dx, x.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dy, y.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  ASSERT_EQ(switchyard::cuda_smoke::LaunchAxpy(2.0f, dx, dy, n), 0);
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<float> out(n);
  CUDA_OK(cudaMemcpy(out.data(), dy, n * sizeof(float), cudaMemcpyDeviceToHost));
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(out[i], 2.0f * x[i] + y[i]) << i;
  cudaFree(dx);
  cudaFree(dy);
}

TEST(CudaSmoke, NcclAllReduceOverVisibleGpus) {
  int devices = 0;
  CUDA_OK(cudaGetDeviceCount(&devices));
  ASSERT_GT(devices, 0);
  std::vector<ncclComm_t> comms(devices);
  NCCL_OK(ncclCommInitAll(comms.data(), devices, nullptr));
  const size_t n = 4096;
  std::vector<float*> bufs(devices);
  std::vector<cudaStream_t> streams(devices);
  for (int d = 0; d < devices; ++d) {
    CUDA_OK(cudaSetDevice(d));
    CUDA_OK(cudaMalloc(&bufs[d], n * sizeof(float)));
    std::vector<float> h(n, static_cast<float>(d + 1));
    CUDA_OK(cudaMemcpy(bufs[d], h.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_OK(cudaStreamCreate(&streams[d]));
  }
  NCCL_OK(ncclGroupStart());
  for (int d = 0; d < devices; ++d) {
    NCCL_OK(ncclAllReduce(bufs[d], bufs[d], n, ncclFloat, ncclSum, comms[d], streams[d]));
  }
  NCCL_OK(ncclGroupEnd());
  const float expect = devices * (devices + 1) / 2.0f;
  for (int d = 0; d < devices; ++d) {
    CUDA_OK(cudaSetDevice(d));
    CUDA_OK(cudaStreamSynchronize(streams[d]));
    std::vector<float> h(n);
    CUDA_OK(cudaMemcpy(h.data(), bufs[d], n * sizeof(float), cudaMemcpyDeviceToHost));
    EXPECT_EQ(h[0], expect);
    EXPECT_EQ(h[n - 1], expect);
    cudaFree(bufs[d]);
    ncclCommDestroy(comms[d]);
  }
}

}  // namespace
