// The router as a layer: a gate weight [experts, hidden], optional input jitter and noisy
// gating (training only, reproducible from a seed), token- or expert-choice routing, the
// load-balancing loss (per batch, per sequence, or global over the data-parallel group), the
// z-loss, and aux-loss-free balancing with a per-expert bias.
//
//   absl::StatusOr<Router> router = Router::Create({.hidden_size = 512, .num_experts = 8}, seed);
//   absl::StatusOr<RouterOutput> out = router->Forward(hidden, {.training = true});
//   loss = loss + out->aux_loss + out->z_loss;       // both carry autograd to the gate weight
//   log("aux", out->aux_loss_value);
#ifndef MOE_GATE_ROUTER_MODULE_H_
#define MOE_GATE_ROUTER_MODULE_H_

#include <cstdint>
#include <functional>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"
#include "moe/gate/router.h"

namespace switchyard::gate {

enum class RoutingType { kTokenChoice, kExpertChoice };
enum class AuxLoss { kNone, kBatch, kSequence, kGlobal };

struct RouterConfig {
  int64_t hidden_size = 0;
  int num_experts = 0;
  RoutingType type = RoutingType::kTokenChoice;
  TopKOptions topk;  // top-k, scores, groups, capacity (expert choice: capacity_factor only)
  float jitter_eps = 0.0f;     // hidden × U(1 − eps, 1 + eps) in training
  bool noisy_gating = false;   // logits + N(0, 1) × softplus(hidden · W_noiseᵀ) in training
  AuxLoss aux_loss = AuxLoss::kBatch;
  double aux_loss_coeff = 0.01;
  double z_loss_coeff = 0.0;
  bool expert_bias = false;    // aux-loss-free balancing (see UpdateBias)
  double bias_update_rate = 1e-3;
  float init_std = 0.02f;      // gate weights ~ N(0, init_std²)
};

struct ForwardArgs {
  bool training = false;
  // AuxLoss::kSequence: the block's tokens are this many sequences of equal length, laid out
  // in this order.
  int64_t num_sequences = 1;
  SequenceOrder sequence_order = SequenceOrder::kWhole;
  // AuxLoss::kGlobal: sums a tensor over the data-parallel group (the caller's collective).
  std::function<at::Tensor(const at::Tensor&)> sum_over_dp;
  // AuxLoss::kGlobal: the data-parallel replicas (DP x CP) whose gradients the optimizer
  // averages. This router's share of the global loss is weighted by it, so that after the
  // average the global loss keeps the weight it has in one process: otherwise its gradient
  // shrinks by the DP size (as Megatron-LM's did: its issue 3672). The batch and sequence
  // losses are each replica's own and need nothing here (a caller whose block is split over
  // CP ranks weights their shares by CP itself, as the MoE layer does).
  int64_t dp_replicas = 1;
  // AuxLoss::kGlobal under gradient accumulation: which micro-batch of the optimizer step
  // this is. In training the loss's counts are the average over the step's micro-batches so
  // far (0 to this one; each summed over the data-parallel group), as in Megatron-Core's
  // global_aux_loss (after arXiv 2501.11873). 0 starts a step; a micro-batch follows the one
  // before, or repeats it (a forward that failed later, or recomputation), replacing its
  // counts. Every rank of the group must number them alike (checked in the counts' sum).
  // Outside training, and left at 0, each micro-batch counts alone; the step is untouched.
  int64_t micro_batch = 0;
  // A part of a block: under tensor or context parallelism each router of the group routes
  // a contiguous share of one block of tokens (a TP slice or share, a CP chunk). Its losses
  // are then its share of the block's (counts summed over the group with sum_over_block; the
  // z-loss divided by the block's token count), so that they add up over the group to what
  // one router of the whole block gives (Megatron-Core sums over its tp_cp group alike; the
  // MoE layer's block is its tp_cp group's tokens).
  // block_tokens < 0: the tokens given are the whole block.
  int64_t block_tokens = -1;
  int64_t block_offset = 0;  // this part's first token in the block
  std::function<at::Tensor(const at::Tensor&)> sum_over_block;
  // With a capacity: every part's rows of a [T, ...] tensor in block order (an all-gather),
  // so that capacity is counted over the block (gate::BlockOfTokens).
  std::function<at::Tensor(const at::Tensor&)> gather_over_block;
  // Ranks that meet again in later collectives (the MoE layer's: its pipeline stage) stop
  // together, not one alone with the rest waiting in their next collective until the
  // timeout: called once, after the logits and before any other collective of this call,
  // with whether this router's logits are finite; returns whether every rank's were (a rank
  // that fails before its router calls it with false on its way out). Unset: a part of a
  // block agrees over sum_over_block, a whole block needs nothing.
  std::function<bool(bool)> all_finite;
};

struct RouterOutput {
  Routing routing;
  at::Tensor logits;      // [T, E] fp32, before noise
  at::Tensor aux_loss;    // scalar with autograd; 0 when off
  at::Tensor z_loss;      // scalar with autograd; 0 when off
  double aux_loss_value = 0;  // detached, for logs
  double z_loss_value = 0;
};

class Router {
 public:
  // noise_stream: which stream jitter and noise draw from (the weights come from `seed`
  // alone). Data-parallel replicas need streams of their own, or every replica would add the
  // same noise to its tokens; stream 0 is what one process draws.
  static absl::StatusOr<Router> Create(const RouterConfig& config, uint64_t seed, uint64_t noise_stream = 0);

  // hidden: [T, hidden_size]. Jitter and noise draw from this router's own generator, so a
  // run is reproducible from the seed alone. A part of a block (ForwardArgs.block_tokens)
  // draws the whole block's and keeps its own rows, so that the block's routers add what
  // one router of the whole block would.
  absl::StatusOr<RouterOutput> Forward(const at::Tensor& hidden, const ForwardArgs& args);

  // Aux-loss-free balancing after an optimizer step: `tokens_per_expert` must already be
  // summed over every rank that shares this router. The layer passes Routing's counts, the
  // copies routed before any dropping (each expert's demand); Megatron-Core's update counts
  // the copies kept after dropping, which is the same number when dropless (the only case
  // DeepSeek-V3's aux-loss-free balancing runs in) and never above capacity otherwise.
  // Bad counts (shape, NaN, negative) are an error and leave the bias as it was.
  absl::Status UpdateBias(const at::Tensor& tokens_per_expert);

  const RouterConfig& config() const { return config_; }
  at::Tensor& weight() { return weight_; }              // [E, H] fp32, requires grad
  at::Tensor& noise_weight() { return noise_weight_; }  // [E, H] or undefined
  const at::Tensor& expert_bias() const { return expert_bias_; }  // [E] or undefined

 private:
  Router() = default;
  RouterConfig config_;
  at::Tensor weight_, noise_weight_, expert_bias_;
  at::Generator generator_;
  // Whether this call takes part in a training step's global aux loss.
  bool StepsGlobalLoss(const ForwardArgs& args) const {
    return args.training && config_.aux_loss == AuxLoss::kGlobal && config_.aux_loss_coeff > 0 &&
           config_.type == RoutingType::kTokenChoice;
  }
  // AuxLoss::kGlobal: the counts summed over this step's micro-batches so far (and without
  // the last one), and how many.
  at::Tensor step_counts_, step_before_last_;
  int64_t step_micro_batches_ = 0;
};

// hidden · weightᵀ in fp32 with autograd: hidden [T, H] in any float dtype, weight [E, H] fp32.
// On CPUs all three products (forward, input and weight gradient) run on cached oneDNN matmul
// primitives (common::MatmulOut; at 4096 × 512 × 64 on the 2-core development machine 0.57 ms
// forward and 0.57 input gradient (~470 GFLOP/s), 0.67 weight gradient, against 2.6 ms forward
// for at::matmul with OpenBLAS's AVX2 kernels under OPENBLAS_CORETYPE=Haswell); hidden is
// converted to fp32 once. Elsewhere at::matmul of hidden
// in fp32. The input gradient comes back in hidden's dtype.
at::Tensor RouterLogits(const at::Tensor& hidden, const at::Tensor& weight);

// hidden × U(1 − eps, 1 + eps), elementwise, drawn from `gen`.
at::Tensor ApplyJitter(const at::Tensor& hidden, float eps, at::Generator& gen);

}  // namespace switchyard::gate

#endif  // MOE_GATE_ROUTER_MODULE_H_
