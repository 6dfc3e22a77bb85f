// NCCL process groups: every collective on every group kind with CUDA tensors, ranks as
// threads of this process, rank r on CUDA device r (NCCL refuses two ranks on one device,
// so a world of n needs n GPUs). The same checks as the Gloo test, expectations computed
// from the layout's member lists.
#include <ATen/ATen.h>
#if defined(SY_TORCH_NCCL)
#include <c10/cuda/CUDAFunctions.h>
#endif

#include "dist/groups/comm.h"
#include "dist/groups/testing/collective_checks.h"
#include "dist/groups/testing/multi_rank.h"
#include "gtest/gtest.h"

namespace switchyard::groups {
namespace {

TEST(Nccl, Available) { EXPECT_TRUE(NcclAvailable().ok()) << NcclAvailable(); }

// --config=cuda against a CPU-only LibTorch (Debian's) builds this test without NCCL; then
// Available fails with the reason and nothing else runs.
#if defined(SY_TORCH_NCCL)
// The multi-rank tests skip below 2 GPUs rather than fail: NCCL refuses two ranks of one
// communicator on the same device, so a 1-GPU machine cannot run them at all (it runs the
// one-GPU job below, which does not reach NCCL).
int Gpus() { return static_cast<int>(c10::cuda::device_count()); }

TEST(Nccl, EveryCollectiveOnEveryGroupKind) {
  if (Gpus() < 2) GTEST_SKIP() << "needs 2 GPUs (one per rank); " << Gpus() << " visible";
  std::vector<LayoutSpec> layouts = {{.world_size = 2, .ep = 2}, {.world_size = 2, .tp = 2}};
  if (Gpus() >= 4) {
    layouts.push_back({.world_size = 4, .tp = 2, .ep = 2});
    layouts.push_back({.world_size = 4, .ep = 2, .etp = 2});
  }
  if (Gpus() >= 8) layouts.push_back({.world_size = 8, .tp = 2, .pp = 2, .ep = 2});
  for (const LayoutSpec& spec : layouts) {
    absl::Status s = testing::RunRanks({.layout = spec, .backend = Backend::kNccl}, [](Communicator& comm) {
      return testing::CheckAllCollectivesOnEveryKind(comm, at::Device(at::kCUDA, comm.rank()));
    });
    EXPECT_TRUE(s.ok()) << "world " << spec.world_size << ": " << s;
  }
}

// A one-GPU job: one rank on GPU 0 with the NCCL backend, every collective on every group
// kind (each of size 1) with CUDA tensors, zero-length all_gather_v and all_to_all_v parts
// included. Groups of one need no process group, so this checks the facade's CUDA-tensor path
// for them, not NCCL's communication, which needs the multi-rank tests above.
TEST(Nccl, EveryCollectiveOnOneGpu) {
  if (Gpus() < 1) GTEST_SKIP() << "needs a GPU";
  absl::Status s = testing::RunRanks({.layout = {.world_size = 1}, .backend = Backend::kNccl}, [](Communicator& comm) {
    return testing::CheckAllCollectivesOnEveryKind(comm, at::Device(at::kCUDA, 0));
  });
  EXPECT_TRUE(s.ok()) << s;
}

// CPU tensors on an NCCL communicator still go over Gloo.
TEST(Nccl, CpuTensorsStillUseGloo) {
  if (Gpus() < 2) GTEST_SKIP() << "needs 2 GPUs (one per rank); " << Gpus() << " visible";
  absl::Status s = testing::RunRanks({.layout = {.world_size = 2, .ep = 2}, .backend = Backend::kNccl},
                                     [](Communicator& comm) {
    return testing::CheckAllCollectivesOnEveryKind(comm, at::kCPU);
  });
  EXPECT_TRUE(s.ok()) << s;
}

TEST(Nccl, DeviceThatDoesNotExistIsAClearError) {
  auto layout = Layout::Create({.world_size = 1});
  ASSERT_TRUE(layout.ok());
  auto comm = Communicator::Create(Store::InMemory(), 0, *layout, {.backend = Backend::kNccl, .device = Gpus()});
  ASSERT_FALSE(comm.ok());
  EXPECT_NE(std::string(comm.status().message()).find("does not exist"), std::string::npos) << comm.status();
}

#endif  // SY_TORCH_NCCL

}  // namespace
}  // namespace switchyard::groups
