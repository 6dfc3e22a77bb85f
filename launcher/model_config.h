// What a job spec's model section means for one MoE layer: the MoELayer configuration
// (router options, experts, shared experts, precision, sequence parallelism).
//
//   absl::StatusOr<ResolvedJob> job = LoadJob("job.pbtxt");
//   for (int l : job->moe_layers) {
//     absl::StatusOr<moe::MoEConfig> c = MoELayerConfig(job->job, l);
//     auto layer = moe::MoELayer::Create(*c, seed + l, comm);
//   }
#ifndef LAUNCHER_MODEL_CONFIG_H_
#define LAUNCHER_MODEL_CONFIG_H_

#include "absl/status/statusor.h"
#include "launcher/job.pb.h"
#include "moe/moe_layer.h"

namespace switchyard::launcher {

// `layer` must be one of the job's MoE layers (ResolvedJob::moe_layers); the layer is named
// "layers.<layer>.mlp" in parameter tags and logs.
absl::StatusOr<moe::MoEConfig> MoELayerConfig(const Job& job, int layer);

}  // namespace switchyard::launcher

#endif  // LAUNCHER_MODEL_CONFIG_H_
