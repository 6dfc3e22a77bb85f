// Token exchanges between ranks, each differentiable (its backward is the matching reverse
// exchange), and the expert dispatcher built from them.
//
//   DispatchState st;
//   absl::StatusOr<at::Tensor> rows = DispatchToExperts(permuted, plan.rows_per_expert, groups, &st);
//   at::Tensor out = experts.Forward(*rows, st.rows_per_segment, st.segment_expert);
//   absl::StatusOr<at::Tensor> back = CombineFromExperts(out, st, groups);   // rows in `permuted` order
//
// Dispatch (Megatron-Core's all-to-all dispatcher with expert tensor parallel):
//  1. exchange per-expert row counts over the EP group (all-gather), then all_to_all_v the
//     rows, so every rank receives the rows of its own experts from every EP peer;
//  2. with ETP > 1, all-gather those rows over the ETP group: every F-slice of an expert
//     sees all of its tokens;
//  3. hand the received (member, source, local expert) blocks to the experts as they are,
//     each block a segment of its expert (the grouped GEMM takes segments in any order), so
//     no copy regroups them.
// Combine reverses each step; the ETP step sums the partial outputs of the F slices and
// keeps this rank's rows (a reduce-scatter). Collective failures (a dead peer, a timeout)
// become statuses naming the group and op. Tensors of any floating dtype; bf16 and fp16 are
// summed in fp32 (dist/groups moves bf16 as 16-bit words where Gloo has no bf16).
#ifndef MOE_DISPATCH_EXCHANGE_H_
#define MOE_DISPATCH_EXCHANGE_H_

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"
#include "dist/groups/comm.h"

namespace switchyard::dispatch {

// Splits n rows over `parts` members as evenly as possible (the first n % parts get one more).
std::vector<int64_t> EvenSplit(int64_t n, int parts);

// Differentiable collectives along dim 0. Each throws c10::Error (with the group's status
// message) on failure; the Dispatch/Combine/Slice/Gather functions below return statuses.
// all_to_all_v; backward: the reverse all_to_all_v.
at::Tensor AllToAllVRows(const at::Tensor& x, groups::Group& g, const std::vector<int64_t>& send,
                         const std::vector<int64_t>& recv);
// all_gather_v; backward: sum every member's gradient of this rank's block (reduce-scatter).
at::Tensor AllGatherVRows(const at::Tensor& x, groups::Group& g, const std::vector<int64_t>& counts);
// The sum over members of block rank() of x (x has Σ counts rows); backward: all_gather_v.
at::Tensor ReduceScatterVRows(const at::Tensor& x, groups::Group& g, const std::vector<int64_t>& counts);

// Tokens replicated across a group (TP without sequence parallelism): each member takes its
// block of rows (FastMoE's slice_group) ...
absl::StatusOr<at::Tensor> SliceTokens(const at::Tensor& x, groups::Group& g,
                                       const std::vector<int64_t>& counts);
// ... and the outputs are gathered back. The consumer of the gathered tensor is replicated
// too, so each member's gradient is already the full one: the backward of the gather takes
// this member's block, and the backward of the slice all-gathers the input gradient.
absl::StatusOr<at::Tensor> GatherTokens(const at::Tensor& y, groups::Group& g,
                                        const std::vector<int64_t>& counts);

struct ExpertGroups {
  groups::Group* ep = nullptr;   // null or size 1: no all-to-all
  groups::Group* etp = nullptr;  // null or size 1: no F-slice exchange
  int num_experts = 1;           // global; every EP member holds num_experts / ep of them
};

struct DispatchState {
  std::vector<int64_t> send_counts, recv_counts;  // per EP member
  std::vector<int64_t> etp_counts;                // rows each ETP member brought
  // The dispatched rows as consecutive segments, each of one local expert (some may be empty).
  std::vector<int64_t> rows_per_segment;
  std::vector<int64_t> segment_expert;
};

// permuted: [N, H] rows grouped by global expert with rows_per_expert (size num_experts).
absl::StatusOr<at::Tensor> DispatchToExperts(const at::Tensor& permuted,
                                             const std::vector<int64_t>& rows_per_expert,
                                             const ExpertGroups& groups, DispatchState* state);
// Per-row values riding with the rows (the routing weights, fp32 [N] in `permuted` order):
// moved by the same exchanges as DispatchToExperts moved the rows, so that they line up with
// its output. Backward: the reverse exchanges, the ETP step summing the members' gradients.
absl::StatusOr<at::Tensor> DispatchRowWeights(const at::Tensor& weights, const DispatchState& state,
                                              const ExpertGroups& groups);
// expert_out: the experts' output for DispatchToExperts' rows (a partial sum over F slices
// when ETP > 1). Returns rows in the order of `permuted`.
absl::StatusOr<at::Tensor> CombineFromExperts(const at::Tensor& expert_out, const DispatchState& state,
                                              const ExpertGroups& groups);

}  // namespace switchyard::dispatch

#endif  // MOE_DISPATCH_EXCHANGE_H_
