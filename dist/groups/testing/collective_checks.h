// Numeric checks of every collective, shared by the Gloo (CPU) and NCCL (GPU) tests: each
// expectation is computed from the layout's member lists, never by a collective.
//
//   absl::Status s = RunRanks({.layout = spec}, [](Communicator& c) {
//     return CheckAllCollectivesOnEveryKind(c, at::kCPU);
//   });
#ifndef DIST_GROUPS_TESTING_COLLECTIVE_CHECKS_H_
#define DIST_GROUPS_TESTING_COLLECTIVE_CHECKS_H_

#include <vector>

#include <c10/core/Device.h>

#include "absl/status/status.h"
#include "dist/groups/comm.h"

namespace switchyard::groups::testing {

// Sum, max and average of (rank + 1) over this rank's group of every kind.
absl::Status CheckEveryGroupKind(Communicator& comm, at::Device dev);

// all_gather, all_gather_v (some members give no rows), reduce_scatter (sum, max),
// all_to_all_v (uneven and zero-length splits), broadcast, send/recv and barrier on `g`,
// whose members are `members`; tensors on `dev`.
absl::Status CheckAllCollectives(Group& g, const std::vector<int>& members, int me, at::Device dev);

// Both of the above on the world and on every group kind.
absl::Status CheckAllCollectivesOnEveryKind(Communicator& comm, at::Device dev);

}  // namespace switchyard::groups::testing

#endif  // DIST_GROUPS_TESTING_COLLECTIVE_CHECKS_H_
