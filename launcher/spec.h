// The job spec: parse protobuf text format, then validate every rule before any process
// starts. Errors name the field path, the value and what was expected:
//
//   absl::StatusOr<ResolvedJob> job = LoadJob("job.pbtxt");
//   // job.status(): "parallel.ep: 3 does not divide model.moe.num_experts = 8"
#ifndef LAUNCHER_SPEC_H_
#define LAUNCHER_SPEC_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "dist/groups/layout.h"
#include "launcher/job.pb.h"

namespace switchyard::launcher {

// A valid job with everything derived from it.
struct ResolvedJob {
  Job job;  // as written, with defaults
  groups::Layout layout;
  int world_size = 1;
  int micro_batch_size = 1;        // per rank
  int grad_accumulation_steps = 1;  // micro-batches per step on each rank
  std::vector<int> moe_layers;     // indices of the layers with an MoE FFN
};

// Parses `text` (protobuf text format). `source` names it in errors ("job.pbtxt:3:5: ...").
absl::StatusOr<Job> ParseJob(absl::string_view text, absl::string_view source);

// Checks every field and the layout. `world_size` is the number of ranks the job will run on
// (nnodes × nproc_per_node, or what an outer launcher such as Slurm says); 0 means the
// spec's own nnodes × nproc_per_node.
absl::StatusOr<ResolvedJob> ValidateJob(const Job& job, int world_size = 0);

// Reads, parses and validates a spec file.
absl::StatusOr<ResolvedJob> LoadJob(const std::string& path, int world_size = 0);

}  // namespace switchyard::launcher

#endif  // LAUNCHER_SPEC_H_
