// Token-choice top-k routing: scores, top-k (optionally group-limited), weights, capacity
// with drop policies, and the router losses. The math runs in fp32 whatever the input
// dtype, and gradients reach the logits through the weights and the losses.
//
//   TopKOptions o{.top_k = 2, .capacity_factor = 1.25};
//   absl::StatusOr<Routing> r = TopKRoute(logits /* [tokens, experts] */, o);
//   // r->probs: [T, E] routing weights (0 where not routed or dropped); r->routing_map: bool
//
// Semantics follow Megatron-Core's topk_routing_with_score_function and
// apply_router_token_dropping (checked against its numbers in router_test.cc), except where
// this header says otherwise. Ties are deterministic: among equal scores the lower expert
// index is chosen, and among equal capacity keys the lower token index is kept.
#ifndef MOE_GATE_ROUTER_H_
#define MOE_GATE_ROUTER_H_

#include <cstdint>

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"

namespace switchyard::gate {

enum class ScoreFunction { kSoftmax, kSigmoid };

// Over capacity, which routed tokens an expert keeps. Ties go to the lower token index
// (deterministic; Megatron-Core leaves ties to torch.topk).
enum class DropPolicy {
  kByScore,     // the highest routing weights
  kByPosition,  // the earliest tokens
};

struct TopKOptions {
  int top_k = 2;
  ScoreFunction score = ScoreFunction::kSoftmax;
  // Softmax: over all experts before top-k (true), or over the k chosen logits (false).
  bool pre_softmax = false;
  // Group-limited routing: experts split into num_groups; each token keeps the group_topk
  // groups whose best top_k / group_topk scores sum highest, then picks top_k inside them.
  int num_groups = 0;
  int group_topk = 0;
  float scaling_factor = 1.0f;
  // Capacity per expert = ceil(tokens × top_k / experts × capacity_factor); 0: dropless.
  double capacity_factor = 0.0;
  DropPolicy drop_policy = DropPolicy::kByScore;
  // Every expert gets exactly `capacity` slots; unfilled ones are padding (weight 0).
  bool pad_to_capacity = false;
};

struct Routing {
  // Each token's chosen experts, best first, and their weights, before any dropping
  // (token choice only; empty for expert choice).
  at::Tensor topk_indices;       // [T, k] int64
  at::Tensor topk_weights;       // [T, k] fp32, with autograd
  at::Tensor probs;              // [T, E] fp32 weights; 0 where not routed, dropped or padding
  at::Tensor routing_map;        // [T, E] bool: slots that go to the expert (with padding)
  at::Tensor tokens_per_expert;  // [E] int64: routed slots before any dropping
  at::Tensor dropped;            // [T, E] bool: routed but over capacity
  int64_t capacity = -1;         // -1: dropless
};

// `logits`: [T, E], any floating dtype. `expert_bias` ([E], optional): added to the scores
// only to choose experts (aux-loss-free balancing); weights come from unbiased scores. Unlike
// Megatron-Core, which applies it with sigmoid scores only, it works with every score
// function. Errors name the option: k out of range, bad groups, NaN/inf logits.
absl::StatusOr<Routing> TopKRoute(const at::Tensor& logits, const TopKOptions& options,
                                  const at::Tensor& expert_bias = at::Tensor());

// Expert-choice routing (Zhou et al., 2022): scores are a softmax over experts per token;
// every expert takes the `capacity` tokens with its highest scores (ties: lower token
// index), capacity = ceil(tokens × capacity_factor / experts), at most the token count. A
// token may get several experts or none (then it passes through the layer's residual).
// tokens_per_expert is the capacity for every expert; nothing counts as dropped.
absl::StatusOr<Routing> ExpertChoiceRoute(const at::Tensor& logits, double capacity_factor);

// ceil(tokens × top_k / num_experts × capacity_factor).
int64_t ExpertCapacity(int64_t tokens, int top_k, int num_experts, double capacity_factor);

// The scores the load-balancing loss averages (softmax; or sigmoid normalised per token) and
// the top-k token counts per expert, as Megatron-Core's compute_routing_scores_for_aux_loss.
struct AuxLossInputs {
  at::Tensor scores;             // [T, E] fp32, with autograd
  at::Tensor routing_map;        // [T, E] bool: each token's top-k experts by these scores
  at::Tensor tokens_per_expert;  // [E]
};
absl::StatusOr<AuxLossInputs> AuxLossScores(const at::Tensor& logits, int top_k, ScoreFunction score);

// Switch/GShard load-balancing loss α·E·Σᵢ fᵢ·Pᵢ with fᵢ = nᵢ / (k·T) and Pᵢ = mean over the T
// tokens of scores[:, i]. For the global variant pass counts and T summed over the DP group.
at::Tensor LoadBalancingLoss(const at::Tensor& scores, const at::Tensor& tokens_per_expert,
                             int64_t total_tokens, int top_k, double coeff);

// The same loss per sequence, averaged over the sequences: tokens are `num_sequences`
// sequences laid out one after another ([batch, seq] order), and fᵢ, Pᵢ are counted within
// each. Equals Megatron-Core's seq_aux_loss (which takes tokens in [seq, batch] order).
absl::StatusOr<at::Tensor> SequenceLoadBalancingLoss(const at::Tensor& scores,
                                                     const at::Tensor& routing_map,
                                                     int64_t num_sequences, int top_k,
                                                     double coeff);

// Aux-loss-free balancing: bias + rate·sign(mean(n) − n), where n are the token counts of
// the last step summed over every rank that shares the router (the caller all-reduces).
// Under-loaded experts move up, over-loaded ones down, exactly average ones stay.
at::Tensor UpdateExpertBias(const at::Tensor& expert_bias, const at::Tensor& tokens_per_expert,
                            double rate);

// Router z-loss β·mean over tokens of logsumexp(logits)².
at::Tensor ZLoss(const at::Tensor& logits, double coeff);

}  // namespace switchyard::gate

#endif  // MOE_GATE_ROUTER_H_
