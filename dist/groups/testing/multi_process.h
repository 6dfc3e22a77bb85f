// Runs a function on N ranks as N processes: the test binary re-executes itself once per
// rank, filtered to the current GoogleTest test, and in each child the same call runs that
// rank's function over a TCP store the parent hosts. Reports which ranks failed (exit code or
// signal, and the end of their stderr); kills every child past the deadline, never hangs.
//
//   TEST(Suite, Name) {
//     absl::Status s = RunRanksInProcesses({.layout = {.world_size = 4}}, Fn);
//     EXPECT_TRUE(s.ok()) << s;   // in a child, the call never returns
//   }
#ifndef DIST_GROUPS_TESTING_MULTI_PROCESS_H_
#define DIST_GROUPS_TESTING_MULTI_PROCESS_H_

#include <functional>

#include "absl/status/status.h"
#include "dist/groups/comm.h"
#include "dist/groups/testing/multi_rank.h"

namespace switchyard::groups::testing {

absl::Status RunRanksInProcesses(const RunOptions& options,
                                 std::function<absl::Status(Communicator&)> fn);

}  // namespace switchyard::groups::testing

#endif  // DIST_GROUPS_TESTING_MULTI_PROCESS_H_
