// Runs a function on N ranks as threads of one test process, each with its own
// Communicator over a shared in-memory store. Reports which ranks failed, and never hangs
// past the deadline (a stuck run ends the process with a message naming the stuck ranks).
//
//   absl::Status s = RunRanks({.world_size = 4, .layout = {.world_size = 4, .ep = 2}},
//       [](Communicator& comm) -> absl::Status { ... });
//   EXPECT_TRUE(s.ok()) << s;
#ifndef DIST_GROUPS_TESTING_MULTI_RANK_H_
#define DIST_GROUPS_TESTING_MULTI_RANK_H_

#include <chrono>
#include <functional>

#include "absl/status/status.h"
#include "dist/groups/comm.h"
#include "dist/groups/layout.h"

namespace switchyard::groups::testing {

struct RunOptions {
  LayoutSpec layout;  // layout.world_size ranks are started
  std::chrono::milliseconds collective_timeout = std::chrono::seconds(30);
  std::chrono::milliseconds deadline = std::chrono::seconds(120);
  // Ranks that never create their communicator (to test timeouts).
  std::vector<int> absent_ranks;
  // kNccl: rank r uses CUDA device r.
  Backend backend = Backend::kGloo;
};

// OK when every rank's function returned OK; otherwise an error listing each failed rank
// and its status.
absl::Status RunRanks(const RunOptions& options, std::function<absl::Status(Communicator&)> fn);

}  // namespace switchyard::groups::testing

#endif  // DIST_GROUPS_TESTING_MULTI_RANK_H_
