#include "dist/groups/comm.h"

#include <stdexcept>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "dist/groups/testing/collective_checks.h"
#include "dist/groups/testing/multi_process.h"
#include "dist/groups/testing/multi_rank.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace switchyard::groups {
namespace {

using testing::RunOptions;
using testing::RunRanksInProcesses;
using testing::RunRanks;
using ::testing::HasSubstr;

absl::Status Expect(bool ok, const std::string& what) {
  return ok ? absl::OkStatus() : absl::InternalError(what);
}

absl::Status CheckAllCollectivesOnEveryKind(Communicator& comm) {
  return testing::CheckAllCollectivesOnEveryKind(comm, at::kCPU);
}


#if !defined(SY_TORCH_NCCL)
TEST(Comm, NcclInABuildWithoutItIsAClearError) {
  EXPECT_THAT(std::string(NcclAvailable().message()), HasSubstr("--config=cuda against a CUDA LibTorch"));
  auto layout = Layout::Create({.world_size = 1});
  ASSERT_TRUE(layout.ok());
  auto comm = Communicator::Create(Store::InMemory(), 0, *layout, {.backend = Backend::kNccl, .device = 0});
  ASSERT_FALSE(comm.ok());
  EXPECT_THAT(std::string(comm.status().message()), HasSubstr("this build has no NCCL backend"));
}
#endif

TEST(Comm, EveryCollectiveOnEveryGroupKind) {
  for (LayoutSpec spec : {LayoutSpec{.world_size = 4, .tp = 2, .ep = 2},
                          LayoutSpec{.world_size = 8, .tp = 2, .pp = 2, .ep = 2, .etp = 1},
                          LayoutSpec{.world_size = 8, .ep = 4}, LayoutSpec{.world_size = 8, .tp = 2, .ep = 2}}) {
    absl::Status s = RunRanks({.layout = spec}, CheckAllCollectivesOnEveryKind);
    EXPECT_TRUE(s.ok()) << "world " << spec.world_size << ": " << s;
  }
}

TEST(Comm, BadArgumentsAreErrorsNamingTheGroup) {
  absl::Status s = RunRanks({.layout = {.world_size = 2}}, [](Communicator& comm) -> absl::Status {
    Group& g = comm.World();
    at::Tensor in = at::empty({2, 2}), wrong = at::empty({3, 2}), out = at::empty({2, 2}), one = at::empty({1, 2});
    // Negative counts whose sums fit the tensors (Gloo would be handed a negative split).
    std::vector<int64_t> negative(2, -1);
    negative[g.rank()] = 2;
    for (absl::Status bad : {g.AllGather(in, wrong).Wait(), g.ReduceScatter(in, wrong).Wait(),
                             g.AllToAllV(in, wrong, {1, 1}, {1, 1}).Wait(),
                             g.AllToAllV(in, out, {-1, 3}, {1, 1}).Wait(), g.AllGatherV(in, one, negative).Wait(),
                             g.AllGatherV(in, wrong, {2}).Wait(), g.Broadcast(in, 5).Wait(),
                             g.Send(in, g.rank()).Wait()}) {
      SY_RETURN_IF_ERROR(Expect(!bad.ok() && bad.message().find("group world, member") != std::string::npos,
                                "bad arguments accepted: " + bad.ToString()));
    }
    return absl::OkStatus();
  });
  EXPECT_TRUE(s.ok()) << s;
}

TEST(Comm, RankThatNeverJoinsTimesOutWithClearError) {
  absl::Status s = RunRanks({.layout = {.world_size = 3},
                             .collective_timeout = std::chrono::seconds(2),
                             .deadline = std::chrono::seconds(60),
                             .absent_ranks = {2}},
                            [](Communicator& comm) { return comm.World().Barrier().Wait(); });
  ASSERT_FALSE(s.ok());
  const std::string m(s.message());
  EXPECT_THAT(m, HasSubstr("rank 0: "));
  EXPECT_THAT(m, HasSubstr("rank 1: "));
  EXPECT_THAT(m, HasSubstr("group world"));
  EXPECT_THAT(m, ::testing::Not(HasSubstr("rank 2: ")));
}

// A rank function that throws (as a differentiable exchange does when its peer has already
// failed) is that rank's failure in the result, not the end of the test process.
TEST(Comm, RankThatThrowsIsReported) {
  absl::Status s = RunRanks({.layout = {.world_size = 2}}, [](Communicator& comm) -> absl::Status {
    if (comm.rank() == 1) throw std::runtime_error("boom");
    return absl::OkStatus();
  });
  EXPECT_THAT(std::string(s.message()), HasSubstr("rank 1: INTERNAL: threw: boom"));
  EXPECT_THAT(std::string(s.message()), ::testing::Not(HasSubstr("rank 0")));
}

// The same checks with every rank its own process (over TCP, as the launcher runs them).
TEST(Comm, EveryCollectiveAsProcesses) {
  for (LayoutSpec spec : {LayoutSpec{.world_size = 4, .tp = 2, .ep = 2},
                          LayoutSpec{.world_size = 4, .pp = 2, .ep = 2}}) {
    absl::Status s = RunRanksInProcesses({.layout = spec}, CheckAllCollectivesOnEveryKind);
    EXPECT_TRUE(s.ok()) << s;
  }
}

// A rank that dies is named with its signal; the others fail with a timeout, not a hang.
TEST(Comm, CrashedProcessIsNamed) {
  absl::Status s = RunRanksInProcesses(
      {.layout = {.world_size = 3}, .collective_timeout = std::chrono::seconds(3)},
      [](Communicator& comm) -> absl::Status {
        if (comm.rank() == 1) std::abort();
        return comm.World().Barrier().Wait();
      });
  ASSERT_FALSE(s.ok());
  const std::string m(s.message());
  EXPECT_THAT(m, HasSubstr("rank 1: killed by signal 6 (SIGABRT)"));
  EXPECT_THAT(m, HasSubstr("rank 0: exited with code 1"));
  EXPECT_THAT(m, HasSubstr("group world"));
}

}  // namespace
}  // namespace switchyard::groups
