// MoELayer: router + token dispatch + grouped experts (+ shared experts), the same numbers
// under every parallel layout.
//
//   MoEConfig c;
//   c.router = {.hidden_size = 512, .num_experts = 16, .topk = {.top_k = 2}};
//   c.ffn_hidden_size = 1024;
//   absl::StatusOr<MoELayer> layer = MoELayer::Create(c, seed, comm /* null: one process */);
//   absl::StatusOr<MoEOutput> out = layer->Forward(hidden, {.training = true});
//   loss = task_loss(out->output) + out->aux_loss + out->z_loss;
//
// Under a layout (`comm` given): `hidden` is this rank's tokens; with TP > 1 and no sequence
// parallelism they are replicated across the TP group, and each TP rank routes its slice of
// them (FastMoE's slice_group) and gathers the outputs back; with CP > 1 each CP rank holds
// its chunk of the replica's tokens. Routed copies go to their experts over the EP group
// (all-to-all) and, with ETP > 1, to every F slice of the expert.
// A block is one data-parallel replica's micro-batch: the tokens of its TP x CP ranks, their
// parts one after another CP rank by CP rank, each TP rank's slice or share in TP order
// (whatever the layout's order string). Capacity is counted over the block, as over a
// replica's tokens in one process (Megatron-Core and DeepSpeed count per rank), so TP and
// CP change no drop (also with expert choice, where every expert picks from
// the whole block). A part of a block keeps no padding slots, which change no number. Under
// CP, dropping by position is refused: a CP rank holds a chunk of every sequence, so the
// block is not the tokens in their order; the per-sequence aux loss needs the tokens position
// by position ([seq, batch], Megatron-Core's layout) and each CP chunk whole positions.
// Counting capacity over the block costs, per layer under TP or CP, an all-gather of the
// block's [B, k] choices and keys (B its tokens; expert choice: its [B, E] scores) and a
// [B, E] mask on every rank; dropless routing gathers nothing. Jitter and noise:
// each data-parallel replica draws its own; the ranks of a block draw the block's, as one
// process would on the block's tokens in block order. Under CP that is one process's order
// only where each CP rank holds a contiguous range of the micro-batch: with chunks of every
// sequence (Megatron's split) the noise rows, and exact-score ties under capacity, follow
// the block's order instead.
// The aux loss and z-loss are weighted like a task loss averaged over this data-parallel
// replica's tokens, which the optimizer then averages over the DP x CP replicas (the
// divisors of DESIGN.md): add them to the rank's loss as they are. Each rank's is its share:
// the TP group's shares add up to the loss of its block of tokens (under CP, the TP x CP
// ranks' shares add up to CP times it, as each CP rank's task loss must be CP times its
// share of the replica's, Megatron's loss x cp_size); the global aux loss's shares over the
// stage add up to DP x CP times the global batch's, so that the average gives it the weight
// it has in one process. (A trainer that normalises by the global token count, dividing by
// nothing, must divide these losses by DP x CP.)
// Bad input on one rank (hidden states of the wrong shape or kind, NaN or inf in them or in
// the logits) stops every rank of the pipeline stage with a clear error, at one point in the
// router (one all-reduce of a flag over the stage per forward), instead of leaving the
// others waiting for it in the dispatch or a loss's sum until the collective timeout. So
// every rank of the stage calls Forward as often as the others, even without EP or TP.
//
// Every parameter carries a tag (domain, module name, expert group, global expert indices,
// EP size) that the optimizer and the grad norm read; the layer never includes them.
#ifndef MOE_MOE_LAYER_H_
#define MOE_MOE_LAYER_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"
#include "dist/groups/comm.h"
#include "moe/experts/experts.h"
#include "moe/gate/router_module.h"

namespace switchyard::moe {

struct MoEConfig {
  gate::RouterConfig router;            // hidden_size, num_experts, top-k and capacity, losses
  int64_t ffn_hidden_size = 0;          // per routed expert
  experts::Activation activation = experts::Activation::kSwiglu;
  int num_shared_experts = 0;           // always-on experts, one dense MLP of the summed size
  int64_t shared_ffn_hidden_size = 0;   // 0: ffn_hidden_size × num_shared_experts
  // The shared experts' output times sigmoid(x · w_gateᵀ) per token (Qwen2-MoE; Megatron-Core's
  // moe_shared_expert_gate): w_gate [1, hidden] in `dtype`, the logit computed in fp32.
  bool shared_expert_gate = false;
  // Scale each routed copy's input by its routing weight (Llama 4; Megatron-Core's
  // moe_apply_probs_on_input) instead of fc2's input: expert(w · x) rather than w · expert(x).
  // Token-choice routing with top_k = 1 only, as in Megatron-Core.
  bool apply_probs_on_input = false;
  at::ScalarType dtype = at::kFloat;    // experts' weights and activations; the router is fp32
  bool sequence_parallel = false;       // tokens already split across TP (no slicing)
  std::string name = "moe";             // module name in parameter tags
  float init_std = 0.02f;
};

enum class ParamDomain {
  kDense,                // the same on every rank of the data-parallel group
  kDenseTpReplicated,    // replicated across TP but fed different tokens there: sum over TP too
  kExpert,               // routed experts: reduced over EDP, divided by DP × CP
};

struct ParamTag {
  std::string name;                 // "moe.router.weight", "moe.experts.fc1", ...
  ParamDomain domain = ParamDomain::kDense;
  std::string expert_group;         // the layer's name, for expert params
  int first_global_expert = -1;     // dim 0 index i of an expert tensor is expert first + i
  int num_local_experts = 0;
  int ep_size = 1;
  int etp_size = 1;
};

struct TaggedParam {
  at::Tensor tensor;  // shares storage and .grad() with the layer's parameter
  ParamTag tag;
};

struct MoEForwardArgs {
  bool training = false;
  // Per-sequence aux loss: the sequences in the block (no CP), of equal length, laid out as
  // `sequence_order` says: whole sequences one after another ([batch, seq]), or position by
  // position ([seq, batch], Megatron-Core's layout). With sequence parallelism the TP ranks'
  // shares joined in TP order must be that block: Megatron-Core's [seq / tp, batch] slices
  // are, in kInterleaved order.
  int64_t num_sequences = 1;
  gate::SequenceOrder sequence_order = gate::SequenceOrder::kWhole;
  // The global aux loss under gradient accumulation: this micro-batch's index in the
  // optimizer step (gate::ForwardArgs::micro_batch: in training the counts are averaged over
  // the step's micro-batches so far; one may be repeated, replacing its counts). 0 starts a
  // step; left at 0, each micro-batch counts alone.
  int64_t micro_batch = 0;
  // Optional [T] bool, true for the tokens that count and false for padding: padding tokens
  // are not routed and take no capacity, and the losses, counts and capacity are those of
  // the real tokens alone, as if the padding were not there; their output rows are 0 and
  // their gradient 0. (Megatron-Core 0.16's padding_mask keeps padding out of the losses but
  // still routes it.) Each rank gives its own tokens' mask; under TP slicing the TP ranks
  // share their tokens and must give the same mask: every call under TP slicing checks that
  // they hold as many tokens and agree on having a mask (one all-reduce of 6 numbers over the
  // TP group, masked or not: a rank without a mask must meet one with), then compares the
  // masks bit for bit (a second, of 2 × ⌈T / 62⌉ numbers).
  // Not with the per-sequence aux loss, whose sequences must be whole.
  at::Tensor valid_tokens;
};

struct MoEOutput {
  at::Tensor output;               // [T, H] in the input's dtype
  at::Tensor aux_loss, z_loss;     // scalars with autograd (this rank's share)
  double aux_loss_value = 0, z_loss_value = 0;
  at::Tensor tokens_per_expert;    // [E] routed copies before dropping, this rank's tokens
  int64_t dropped = 0;             // routed copies dropped for capacity on this rank
};

// DESIGN.md's gradient reduction for a parameter's tag, its sum part, in place: dense
// parameters over DP × CP; dense ones replicated across TP (whose ranks route different
// tokens) over DP × CP, then TP; expert parameters over EDP. (The optimizer's average then
// divides by the replicas.) Groups of one rank are skipped.
absl::Status SumGradient(groups::Communicator& comm, const ParamTag& tag, at::Tensor& grad);

class MoELayer {
 public:
  // comm: null for one process; otherwise the layout gives EP, ETP and TP, and must agree
  // with the config (num_experts % EP, ffn_hidden_size % ETP).
  static absl::StatusOr<MoELayer> Create(const MoEConfig& config, uint64_t seed,
                                         groups::Communicator* comm = nullptr);

  absl::StatusOr<MoEOutput> Forward(const at::Tensor& hidden, const MoEForwardArgs& args);

  // Aux-loss-free balancing after a step: sums `tokens_per_expert` over every rank that
  // routes different tokens with this router (the pipeline stage), then moves the bias.
  absl::Status UpdateExpertBias(const at::Tensor& tokens_per_expert);

  std::vector<TaggedParam> Parameters();
  const MoEConfig& config() const { return config_; }
  gate::Router& router() { return *router_; }
  experts::GroupedExperts& routed_experts() { return *experts_; }
  experts::GroupedExperts* shared_experts() { return shared_ ? &*shared_ : nullptr; }
  at::Tensor& shared_expert_gate() { return shared_gate_; }  // [1, H]; undefined when off

 private:
  MoELayer() = default;
  groups::Group* GroupOrNull(groups::GroupKind kind) const;
  // Each member's place in its block (CP-major, then TP), by the group's member index.
  std::vector<int> BlockOrder(groups::Group& block) const;
  absl::Status CheckHidden(const at::Tensor& hidden) const;
  // Forward of every given token (MoEForwardArgs.valid_tokens unset).
  absl::StatusOr<MoEOutput> ForwardTokens(const at::Tensor& hidden, const MoEForwardArgs& args);
  MoEConfig config_;
  groups::Communicator* comm_ = nullptr;
  std::optional<gate::Router> router_;
  std::optional<experts::GroupedExperts> experts_;
  std::optional<experts::GroupedExperts> shared_;
  at::Tensor shared_gate_;
};

}  // namespace switchyard::moe

#endif  // MOE_MOE_LAYER_H_
