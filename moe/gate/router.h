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
// Options reproduce DeepSpeed 0.19.8's and torchtitan 0.3.0's routing (checked against
// their numbers in peer_router_test.cc):
//   DeepSpeed top1gating (use_rts=False): {.top_k = 1, .pre_softmax = true,
//       .drop_policy = kByPosition}; DeepSpeed leaves which tokens over capacity it drops to
//       torch.topk's order among equal entries, we drop the latest.
//   top2gating (no 2nd-expert sampling): {.top_k = 2, .pre_softmax = true,
//       .weight_norm = kKept, .drop_policy = kByChoiceThenPosition}
//   topkgating: {.top_k = k, .pre_softmax = true, .weight_norm = kKept,
//       .drop_policy = kByScore ("probs") or kByPosition ("position")}
//   each with DeepSpeed's capacity_factor (0 for drop_tokens=False) and min_capacity.
//   torchtitan's TokenChoiceTopKRouter: {.top_k, .score = score_func, .pre_softmax = true,
//       .num_groups = num_expert_groups, .group_topk = num_limited_groups,
//       .group_score_topk = 2, .weight_norm = route_norm ? kTopK : kNone,
//       .scaling_factor = route_scale}; its bias update is UpdateExpertBias(.., center=true).
#ifndef MOE_GATE_ROUTER_H_
#define MOE_GATE_ROUTER_H_

#include <cstdint>
#include <functional>

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"

namespace switchyard::gate {

enum class ScoreFunction { kSoftmax, kSigmoid };

// Over capacity, which routed tokens an expert keeps. Ties go to the lower token index
// (deterministic; Megatron-Core leaves ties to torch.topk).
enum class DropPolicy {
  kByScore,     // the highest routing weights (with WeightNorm::kKept: the raw scores)
  kByPosition,  // the earliest tokens
  // Every token's first choice before any token's second choice, and so on down the k
  // choices; within one choice rank the earliest tokens (GShard; DeepSpeed's top2gating).
  kByChoiceThenPosition,
};

// Whether and when each token's top-k weights are divided by their sum.
enum class WeightNorm {
  // Sigmoid scores with top_k > 1 by (sum + 1e-20); other weights as they are (Megatron-Core).
  kSigmoidTopK,
  kNone,  // never (torchtitan's route_norm = False)
  kTopK,  // by (sum + 1e-20), every score function and k (torchtitan's route_norm = True)
  // After capacity dropping, by the sum over the slots the token kept, at least FLT_EPSILON:
  // a token that lost a slot puts its whole weight on the rest (DeepSpeed's top2gating and
  // topkgating). Before dropping the weights are the raw scores, and kByScore ranks those.
  kKept,
};

struct TopKOptions {
  int top_k = 2;
  ScoreFunction score = ScoreFunction::kSoftmax;
  // Softmax: over all experts before top-k (true), or over the k chosen logits (false).
  bool pre_softmax = false;
  // Group-limited routing: experts split into num_groups; each token keeps the group_topk
  // groups whose best group_score_topk scores sum highest, then picks top_k inside them.
  int num_groups = 0;
  int group_topk = 0;
  // 0: top_k / group_topk (Megatron-Core); DeepSeek-V3 and torchtitan always sum the best 2.
  int group_score_topk = 0;
  WeightNorm weight_norm = WeightNorm::kSigmoidTopK;
  float scaling_factor = 1.0f;  // applied after weight_norm
  // Capacity per expert = max(ceil(tokens × top_k / experts × capacity_factor), min_capacity);
  // capacity_factor 0: dropless (min_capacity then unused). Computed in double; DeepSpeed's
  // fp32 ceil differs only where the product is within fp32 rounding of a whole number.
  double capacity_factor = 0.0;
  int64_t min_capacity = 0;  // DeepSpeed's min_capacity
  DropPolicy drop_policy = DropPolicy::kByScore;
  // Every expert gets exactly `capacity` slots; unfilled ones are padding (weight 0).
  bool pad_to_capacity = false;
};

struct Routing {
  // Each token's chosen experts, best first, and their weights, before any dropping
  // (token choice only; empty for expert choice).
  at::Tensor topk_indices;       // [T, k] int64
  at::Tensor topk_weights;       // [T, k] fp32, with autograd (WeightNorm::kKept: as if none dropped)
  at::Tensor probs;              // [T, E] fp32 weights; 0 where not routed, dropped or padding
  at::Tensor routing_map;        // [T, E] bool: slots that go to the expert (with padding)
  at::Tensor tokens_per_expert;  // [E] int64: routed slots before any dropping
  at::Tensor dropped;            // [T, E] bool: routed but over capacity
  int64_t capacity = -1;         // -1: dropless
  // When the choice was a plain top-k of the softmax over all experts (softmax before top-k,
  // no groups, no bias): those scores ([T, E] fp32, with autograd) and each token's top-k
  // before dropping ([T, E] bool), which are what AuxLossScores would compute again.
  // Undefined otherwise.
  at::Tensor softmax_scores, chosen;
};

// OK when `options` can route over `num_experts` experts; otherwise what is wrong, by name.
// TopKRoute checks this itself; a router checks it once when it is made.
absl::Status CheckTopKOptions(const TopKOptions& options, int64_t num_experts);

// No NaN or inf in t (one vectorised pass for contiguous fp32; ATen's isfinite otherwise).
bool AllFinite(const at::Tensor& t);

// `logits`: [T, E], any floating dtype. `expert_bias` ([E], optional): added to the scores
// only to choose experts (aux-loss-free balancing); weights come from unbiased scores. Unlike
// Megatron-Core, which applies it with sigmoid scores only, it works with every score
// function. Errors name the option: k out of range, bad groups, NaN/inf logits.
//
// `block` (optional): these tokens are rows [offset, offset + T) of a block of block_tokens
// that several routers share (a TP x CP group's slices, shares or chunks). Capacity is then
// the block's, counted and ranked over all of its tokens as one router of the whole block
// would: `gather` returns a [T, ...] tensor's rows of every part, in block order (an
// all-gather of each part's chosen experts, [T, k], and when dropping by score their keys,
// [T, k] too; expert choice gathers its [T, E] scores). Every part must make the same
// gathers, so every router of a block takes the same options. A part keeps no padding slots
// (it cannot hold fixed [E, C] blocks; padding changes no number).
struct BlockOfTokens {
  int64_t block_tokens = 0;
  int64_t offset = 0;
  std::function<at::Tensor(const at::Tensor&)> gather;
};
absl::StatusOr<Routing> TopKRoute(const at::Tensor& logits, const TopKOptions& options,
                                  const at::Tensor& expert_bias = at::Tensor(),
                                  const BlockOfTokens* block = nullptr);

// Expert-choice routing (Zhou et al., 2022): scores are a softmax over experts per token;
// every expert takes the `capacity` tokens with its highest scores (ties: lower token
// index), capacity = ceil(tokens × capacity_factor / experts), at most the token count. A
// token may get several experts or none (then it passes through the layer's residual).
// tokens_per_expert is the capacity for every expert; nothing counts as dropped.
// `block`: as for TopKRoute: capacity comes from the block's token count and every expert
// picks from the whole block's tokens; a part returns its rows, and its tokens_per_expert
// counts those rows only (the parts' counts add up to the capacity).
absl::StatusOr<Routing> ExpertChoiceRoute(const at::Tensor& logits, double capacity_factor,
                                          const BlockOfTokens* block = nullptr);

// ceil(tokens × top_k / num_experts × capacity_factor), at most `tokens` (an expert gets each
// token at most once).
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
// DeepSpeed's l_aux is this with α = 1 and softmax scores, counts before dropping; but its
// top2gating counts first choices only: pass those counts and top_k = 1.
at::Tensor LoadBalancingLoss(const at::Tensor& scores, const at::Tensor& tokens_per_expert,
                             int64_t total_tokens, int top_k, double coeff);

// How a block's tokens hold its sequences of equal length.
enum class SequenceOrder {
  kWhole,        // one sequence after another: [batch, seq] (token t is in sequence t / len)
  kInterleaved,  // position by position: [seq, batch], Megatron-Core's layout (sequence t % batch)
};

// The same loss per sequence, averaged over the sequences: tokens are `num_sequences`
// sequences of equal length in `order`, and fᵢ, Pᵢ are counted within each. Equals
// Megatron-Core's seq_aux_loss, which takes tokens in kInterleaved order.
absl::StatusOr<at::Tensor> SequenceLoadBalancingLoss(const at::Tensor& scores,
                                                     const at::Tensor& routing_map,
                                                     int64_t num_sequences, int top_k,
                                                     double coeff,
                                                     SequenceOrder order = SequenceOrder::kWhole);

// A part of a block of `block_tokens` tokens, `num_sequences` sequences of equal length in
// `order`: the part's t-th token is token `first_token` + t of the block (a TP rank's
// contiguous share when the group splits the block). SequenceCounts: the part's per-sequence
// top-k counts [num_sequences, E]. SequenceLoadBalancingLossOfPart: its share of the block's
// sequence loss, given `block_counts` (the counts summed over every part); the parts' shares
// add up to SequenceLoadBalancingLoss of the whole block.
absl::StatusOr<at::Tensor> SequenceCounts(const at::Tensor& routing_map, int64_t first_token,
                                          int64_t block_tokens, int64_t num_sequences,
                                          SequenceOrder order = SequenceOrder::kWhole);
absl::StatusOr<at::Tensor> SequenceLoadBalancingLossOfPart(const at::Tensor& scores, int64_t first_token,
                                                           int64_t block_tokens, const at::Tensor& block_counts,
                                                           int top_k, double coeff,
                                                           SequenceOrder order = SequenceOrder::kWhole);

// Aux-loss-free balancing: bias + rate·sign(mean(n) − n), where n are the token counts of
// the last step summed over every rank that shares the router (the caller all-reduces).
// Under-loaded experts move up, over-loaded ones down, exactly average ones stay.
// `center`: subtract the step's mean from the step, so the mean bias never moves (torchtitan;
// Megatron-Core does not).
at::Tensor UpdateExpertBias(const at::Tensor& expert_bias, const at::Tensor& tokens_per_expert,
                            double rate, bool center = false);

// Router z-loss β·mean over tokens of logsumexp(logits)². With `total_tokens` ≥ 0 the sum
// over these tokens is divided by that count instead: a part's share of a larger block's loss.
// No tokens: 0.
at::Tensor ZLoss(const at::Tensor& logits, double coeff, int64_t total_tokens = -1);

}  // namespace switchyard::gate

#endif  // MOE_GATE_ROUTER_H_
