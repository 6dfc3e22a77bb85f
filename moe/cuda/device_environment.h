// For the CUDA tests: one clear failure when the machine has no usable GPU (no driver, a
// driver older than the runtime, no device), instead of every case failing on its first
// cudaMalloc with a bare error number. A fatal failure in a global environment's SetUp makes
// GoogleTest run none of the tests. The variable is inline: one environment per binary,
// however many of its files include this.
#ifndef SWITCHYARD_MOE_CUDA_DEVICE_ENVIRONMENT_H_
#define SWITCHYARD_MOE_CUDA_DEVICE_ENVIRONMENT_H_

#include <cuda_runtime_api.h>

#include "gtest/gtest.h"

namespace switchyard::cuda {

class DeviceEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    int devices = 0;
    const cudaError_t err = cudaGetDeviceCount(&devices);
    ASSERT_EQ(err, cudaSuccess) << "no usable CUDA device: cudaGetDeviceCount says " << cudaGetErrorName(err)
                                << " (" << cudaGetErrorString(err) << ")";
    ASSERT_GT(devices, 0) << "no CUDA device";
  }
};

inline ::testing::Environment* const kDeviceEnvironment =
    ::testing::AddGlobalTestEnvironment(new DeviceEnvironment);

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_MOE_CUDA_DEVICE_ENVIRONMENT_H_
