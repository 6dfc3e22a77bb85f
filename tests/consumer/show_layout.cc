// Parses a job spec with Switchyard's spec library and prints its expert-parallel groups.
#include <cstdio>
#include <string>

#include "absl/strings/str_join.h"
#include "dist/groups/layout.h"
#include "launcher/spec.h"

int main() {
  absl::StatusOr<switchyard::Job> job = switchyard::launcher::ParseJob(
      "parallel { tp: 2 ep: 2 } launch { nproc_per_node: 8 }", "inline");
  if (!job.ok()) return 1;
  absl::StatusOr<switchyard::launcher::ResolvedJob> r = switchyard::launcher::ValidateJob(*job);
  if (!r.ok()) {
    std::fprintf(stderr, "%s\n", std::string(r.status().message()).c_str());
    return 1;
  }
  for (const auto& g : r->layout.Groups(switchyard::groups::GroupKind::kEp)) {
    std::printf("[%s] ", absl::StrJoin(g, ",").c_str());
  }
  std::printf("\n");
  return 0;
}
