// Token permutation: the k routed copies of every token grouped into contiguous per-expert
// blocks, and back. One pass over the data each way (rows are copied, never looped over by
// expert), autograd both ways, and experts with zero tokens just have empty blocks.
//
//   absl::StatusOr<PermutePlan> plan = MakePlan(routing.routing_map, /*capacity=*/-1);
//   at::Tensor rows = Permute(hidden, *plan);            // [N, H], expert 0's rows first
//   at::Tensor out = Unpermute(expert_out, routing.probs, *plan);  // [T, H], weighted sum of copies
//   // or, with the weights applied by the experts (what MoELayer does):
//   at::Tensor y = experts.Forward(rows, plan->rows_per_expert, {}, RowWeights(routing.probs, *plan));
//   at::Tensor out = Unpermute(y, *plan);                // [T, H], sum of copies
//
// Rows inside an expert's block are in token order. Two block layouts:
//  - dropless (capacity < 0): expert e's block has exactly its routed tokens;
//  - capacity (capacity = C >= 0): every block has C rows ([E, C, H] when viewed), its tokens
//    first and zero rows after them (dropped tokens are simply not in the routing map, so a
//    token whose every copy was dropped comes back as zeros).
#ifndef MOE_DISPATCH_PERMUTE_H_
#define MOE_DISPATCH_PERMUTE_H_

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"

namespace switchyard::dispatch {

struct PermutePlan {
  int64_t num_tokens = 0;
  int64_t num_experts = 0;
  std::vector<int64_t> rows_per_expert;  // [E]; in capacity layout all equal to C
  // Per permuted row (N rows): its token, -1 for an empty capacity slot; and its index into
  // the flattened [T, E] probs (0 for empty slots, whose weight is never used).
  at::Tensor row_token;       // [N] int64
  at::Tensor row_prob_index;  // [N] int64
  // The rows of token t are token_rows[token_offsets[t] .. token_offsets[t + 1]).
  at::Tensor token_offsets;   // [T + 1] int64
  at::Tensor token_rows;      // [number of routed copies] int64
  int64_t num_rows() const { return row_token.numel(); }
};

// routing_map: [T, E] bool, true where a copy of token t goes to expert e (after capacity
// dropping). capacity: -1 for dropless blocks; otherwise every expert gets exactly `capacity`
// rows and more than `capacity` tokens for one expert is an error.
absl::StatusOr<PermutePlan> MakePlan(const at::Tensor& routing_map, int64_t capacity = -1);

// tokens: [T, H] (any floating dtype, contiguous) → [N, H]; empty slots are zeros.
// Backward sums each token's row gradients.
at::Tensor Permute(const at::Tensor& tokens, const PermutePlan& plan);

// rows: [N, H]; probs: [T, E] routing weights (fp32, may carry autograd).
// out[t] = Σ over t's rows r of probs[t, expert(r)] · rows[r], accumulated in fp32; out has
// rows' dtype. Gradients flow to rows and to probs.
at::Tensor Unpermute(const at::Tensor& rows, const at::Tensor& probs, const PermutePlan& plan);

// The same without weights, for rows that already carry them (the experts applied
// RowWeights): out[t] = Σ over t's rows r of rows[r]. Its backward copies each token's
// gradient to its rows (no pass over the rows themselves, which the weighted one needs for
// the weights' gradient).
at::Tensor Unpermute(const at::Tensor& rows, const PermutePlan& plan);

// Each permuted row's routing weight, probs[t, expert(r)], fp32 [N] (0 in empty capacity
// slots); differentiable to probs. With experts::GroupedMlp's row_weights and the unweighted
// Unpermute this gives the weighted Unpermute's output.
at::Tensor RowWeights(const at::Tensor& probs, const PermutePlan& plan);

}  // namespace switchyard::dispatch

#endif  // MOE_DISPATCH_PERMUTE_H_
