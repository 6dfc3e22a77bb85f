#include "launcher/model_config.h"

#include "absl/status/status.h"
#include "absl/strings/str_format.h"

namespace switchyard::launcher {

absl::StatusOr<moe::MoEConfig> MoELayerConfig(const Job& job, int layer) {
  const Model& m = job.model();
  if (layer < 0 || layer >= m.num_layers()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("layer %d: the model has layers 0 to %d", layer, m.num_layers() - 1));
  }
  const MoE& e = m.moe();
  const Router& r = e.router();
  moe::MoEConfig c;
  c.name = absl::StrFormat("layers.%d.mlp", layer);
  c.router.hidden_size = m.hidden_size();
  c.router.num_experts = e.num_experts();
  c.router.type = r.type() == Router::EXPERT_CHOICE ? gate::RoutingType::kExpertChoice
                                                     : gate::RoutingType::kTokenChoice;
  gate::TopKOptions& t = c.router.topk;
  t.top_k = e.top_k();
  t.score = r.score() == Router::SIGMOID ? gate::ScoreFunction::kSigmoid : gate::ScoreFunction::kSoftmax;
  t.pre_softmax = r.pre_softmax();
  t.weight_norm = r.normalize_topk() ? gate::WeightNorm::kTopK : gate::WeightNorm::kSigmoidTopK;
  t.scaling_factor = r.scaling_factor();
  t.num_groups = r.num_groups();
  t.group_topk = r.group_topk();
  t.capacity_factor = r.capacity_factor();
  t.drop_policy = r.drop_policy() == Router::DROP_BY_POSITION ? gate::DropPolicy::kByPosition
                                                              : gate::DropPolicy::kByScore;
  t.pad_to_capacity = r.pad_to_capacity();
  c.router.jitter_eps = r.jitter_eps();
  c.router.noisy_gating = r.noisy_gating();
  switch (r.aux_loss()) {
    case Router::AUX_NONE: c.router.aux_loss = gate::AuxLoss::kNone; break;
    case Router::AUX_BATCH: c.router.aux_loss = gate::AuxLoss::kBatch; break;
    case Router::AUX_SEQUENCE: c.router.aux_loss = gate::AuxLoss::kSequence; break;
    case Router::AUX_GLOBAL: c.router.aux_loss = gate::AuxLoss::kGlobal; break;
  }
  c.router.aux_loss_coeff = r.aux_loss_coeff();
  c.router.z_loss_coeff = r.z_loss_coeff();
  c.router.expert_bias = r.expert_bias();
  c.router.bias_update_rate = r.bias_update_rate();
  c.ffn_hidden_size = e.ffn_hidden_size();
  switch (m.activation()) {
    case SWIGLU: c.activation = experts::Activation::kSwiglu; break;
    case GELU: c.activation = experts::Activation::kGelu; break;
    case RELU: c.activation = experts::Activation::kRelu; break;
  }
  c.num_shared_experts = e.num_shared_experts();
  c.shared_ffn_hidden_size = e.shared_ffn_hidden_size();
  c.shared_expert_gate = e.shared_expert_gate();
  c.apply_probs_on_input = e.apply_probs_on_input();
  switch (job.train().precision()) {
    case Train::FP32: c.dtype = at::kFloat; break;
    case Train::BF16: c.dtype = at::kBFloat16; break;
    case Train::FP16: c.dtype = at::kHalf; break;
  }
  c.sequence_parallel = job.parallel().sequence_parallel();
  return c;
}

}  // namespace switchyard::launcher
