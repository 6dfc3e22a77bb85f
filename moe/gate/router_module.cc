#include "moe/gate/router_module.h"

#include <string>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/custom_function.h>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "common/matmul.h"

namespace switchyard::gate {

at::Tensor ApplyJitter(const at::Tensor& hidden, float eps, at::Generator& gen) {
  const at::Tensor u = at::empty(hidden.sizes(), hidden.options()).uniform_(1.0 - eps, 1.0 + eps, gen);
  return hidden * u;
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// logits = x · Wᵀ in fp32, forward and both backward products on cached oneDNN matmul
// primitives (common::MatmulOut). x (fp32 or bf16) is converted to fp32 once, and that copy
// is what the weight gradient reads; the input gradient comes back in x's dtype. The weight
// gradient is computed as (xᵀ · g)ᵀ: at 4096 tokens × 512 × 64 experts, 0.67 against 0.81 ms
// for gᵀ · x (whose M = E is short), 2.63 against 2.97 at 256 experts, the same at 16. (Before
// MatmulOut: oneDNN's inner product through ATen's mkldnn ops, which build their primitive
// descriptors and reorder every tensor on every call. The logits are the same bits; this
// forward + backward takes 0.74x the inner product's time at 16 experts and 0.95-0.99x at 64,
// on the 2-core development machine.)
struct LogitsFn : torch::autograd::Function<LogitsFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w) {
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    ctx->save_for_backward({xf, w});
    at::Tensor logits = at::empty({xf.size(0), w.size(0)}, xf.options());
    common::MatmulOut(logits, xf, w.t());
    return logits;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &xf = saved[0], &w = saved[1];
    const at::Tensor g = grads[0].to(at::kFloat).contiguous();
    at::Tensor gx, gw;
    if (ctx->needs_input_grad(0)) {
      gx = at::empty(xf.sizes(), g.options());
      common::MatmulOut(gx, g, w);
      gx = gx.to(static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt()));
    }
    if (ctx->needs_input_grad(1)) {
      at::Tensor gwt = at::empty({w.size(1), w.size(0)}, g.options());
      common::MatmulOut(gwt, xf.t(), g);
      gw = gwt.t().contiguous();
    }
    return {gx, gw};
  }
};

// Logits with NaN or inf: from the hidden states or from an overflow on finite ones.
absl::Status NotFiniteError(const at::Tensor& hidden) {
  if (!at::isfinite(hidden).all().item<bool>()) {
    return absl::InvalidArgumentError("router: hidden states hold NaN or inf; refusing to route");
  }
  return absl::InvalidArgumentError(
      "router: logits contain NaN or inf on finite hidden states; refusing to route (check the model for "
      "overflow upstream)");
}

}  // namespace

at::Tensor RouterLogits(const at::Tensor& hidden, const at::Tensor& weight) {
  const bool cpu = hidden.device().is_cpu() && weight.device().is_cpu() && hidden.dim() == 2 &&
                   weight.dim() == 2 && weight.scalar_type() == at::kFloat && hidden.size(1) == weight.size(1);
  if (!cpu) return at::matmul(hidden.to(at::kFloat), weight.t());
  return LogitsFn::apply(hidden, weight);
}

absl::StatusOr<Router> Router::Create(const RouterConfig& c, uint64_t seed, uint64_t noise_stream) {
  if (c.hidden_size < 1 || c.num_experts < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "router: hidden_size = %d and num_experts = %d must both be at least 1", c.hidden_size,
        c.num_experts));
  }
  if (!(c.jitter_eps >= 0 && c.jitter_eps < 1)) {
    return absl::InvalidArgumentError(absl::StrFormat("router: jitter_eps = %g must be in [0, 1)", c.jitter_eps));
  }
  // NaN fails every comparison: without these a NaN coefficient would switch its loss off
  // silently, and a NaN rate would turn the bias into NaN and route every token to experts 0..k-1.
  for (auto [name, v] : {std::pair<const char*, double>{"aux_loss_coeff", c.aux_loss_coeff},
                         {"z_loss_coeff", c.z_loss_coeff},
                         {"bias_update_rate", c.bias_update_rate},
                         {"init_std", c.init_std}}) {
    if (!(v >= 0) || !std::isfinite(v)) {
      return absl::InvalidArgumentError(absl::StrFormat("router: %s = %g must be finite and >= 0", name, v));
    }
  }
  if (c.type == RoutingType::kTokenChoice) {
    if (absl::Status s = CheckTopKOptions(c.topk, c.num_experts); !s.ok()) return s;
  } else {
    // Expert choice takes its capacity factor alone; a bias it would never use is a mistake.
    if (!(c.topk.capacity_factor > 0) || !std::isfinite(c.topk.capacity_factor)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "router: expert-choice routing needs capacity_factor > 0; got %g", c.topk.capacity_factor));
    }
    if (c.expert_bias) {
      return absl::InvalidArgumentError("router: expert_bias steers token-choice routing only, not expert choice");
    }
  }
  Router r;
  r.config_ = c;
  r.generator_ = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto init = [&](int64_t rows) {
    return (at::empty({rows, c.hidden_size}, at::kFloat).normal_(0.0, c.init_std, r.generator_))
        .requires_grad_(true);
  };
  r.weight_ = init(c.num_experts);
  if (c.noisy_gating) r.noise_weight_ = init(c.num_experts);
  if (c.expert_bias) r.expert_bias_ = at::zeros({c.num_experts}, at::kFloat);
  if (noise_stream != 0) {
    // splitmix64 of the pair: nearby streams get unrelated seeds.
    uint64_t z = seed + 0x9E3779B97F4A7C15ull * (noise_stream + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    r.generator_ = at::make_generator<at::CPUGeneratorImpl>(z ^ (z >> 31));
  }
  return r;
}

absl::StatusOr<RouterOutput> Router::Forward(const at::Tensor& hidden, const ForwardArgs& args) {
  if (!hidden.defined() || hidden.dim() != 2 || hidden.size(1) != config_.hidden_size) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "router: hidden states must be [tokens, %d]", config_.hidden_size));
  }
  // The global aux loss of a training step's micro-batches: the next one, or the last one
  // again (its forward failed later, or is recomputed), whose counts it then replaces.
  const bool stepped = StepsGlobalLoss(args);
  if (stepped && (args.micro_batch < 0 || (args.micro_batch > 0 && args.micro_batch != step_micro_batches_ &&
                                           args.micro_batch != step_micro_batches_ - 1))) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "router: micro_batch = %d does not follow the step's %d micro-batch(es) so far (0 starts a step; the global "
        "aux loss averages the counts over the step's micro-batches)",
        args.micro_batch, step_micro_batches_));
  }
  const bool part = args.block_tokens >= 0;
  if (part && (!args.sum_over_block || args.block_offset < 0 ||
               hidden.size(0) > args.block_tokens - args.block_offset)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "router: a part of a block needs ForwardArgs.sum_over_block and tokens [%d, %d) inside the block of %d",
        args.block_offset, args.block_offset + hidden.size(0), args.block_tokens));
  }
  RouterOutput out;
  const bool jitter = args.training && config_.jitter_eps > 0, noisy = args.training && config_.noisy_gating;
  // Router math in fp32 whatever the model's dtype; RouterLogits converts hidden itself, in
  // the copy it makes anyway, unless jitter or the noise product needs x in fp32 first.
  at::Tensor x = jitter || noisy ? hidden.to(at::kFloat) : hidden;
  // A part of a block draws the block's jitter and noise and keeps its own rows.
  const int64_t T = hidden.size(0), draw = part ? args.block_tokens : T, first = part ? args.block_offset : 0;
  if (jitter) {
    const float eps = config_.jitter_eps;
    x = x * at::empty({draw, x.size(1)}, x.options()).uniform_(1.0 - eps, 1.0 + eps, generator_).narrow(0, first, T);
  }
  out.logits = RouterLogits(x, weight_);
  at::Tensor logits = out.logits;
  if (noisy) {
    const at::Tensor scale = at::softplus(at::matmul(x, noise_weight_.t()));
    const at::Tensor noise = at::empty({draw, logits.size(1)}, logits.options()).normal_(0.0, 1.0, generator_);
    logits = logits + noise.narrow(0, first, T) * scale;
  }
  if (args.all_finite || part) {
    // NaN or inf in one router's logits would stop that router alone, before the gathers and
    // sums the others then wait in: they find out together.
    const bool mine = AllFinite(logits.contiguous());
    const bool all = args.all_finite ? args.all_finite(mine)
                                     : args.sum_over_block(at::full({1}, mine ? 0.0f : 1.0f)).item<float>() == 0;
    if (!mine) return NotFiniteError(hidden);
    if (!all) {
      return absl::InvalidArgumentError(
          "router: another rank stopped before routing (NaN or inf in its hidden states or logits, or bad "
          "hidden states: see its error)");
    }
  }
  const BlockOfTokens block{.block_tokens = args.block_tokens, .offset = args.block_offset,
                            .gather = args.gather_over_block};
  absl::StatusOr<Routing> routing = config_.type == RoutingType::kExpertChoice
                                        ? ExpertChoiceRoute(logits, config_.topk.capacity_factor, part ? &block : nullptr)
                                        : TopKRoute(logits, config_.topk, expert_bias_, part ? &block : nullptr);
  if (!routing.ok()) return routing.status();
  out.routing = *std::move(routing);

  out.aux_loss = at::zeros({}, at::kFloat);
  if (config_.aux_loss != AuxLoss::kNone && config_.aux_loss_coeff > 0 &&
      config_.type == RoutingType::kTokenChoice) {
    // The routing's own scores and choice when they are the aux loss's (the default
    // softmax-then-top-k): not a second softmax, top-k and count over [T, E].
    const Routing& ro = out.routing;
    absl::StatusOr<AuxLossInputs> in =
        ro.softmax_scores.defined()
            ? AuxLossInputs{.scores = ro.softmax_scores, .routing_map = ro.chosen, .tokens_per_expert = ro.tokens_per_expert}
            : AuxLossScores(logits, config_.topk.top_k, config_.topk.score);
    if (!in.ok()) return in.status();
    if (config_.aux_loss == AuxLoss::kSequence && part) {
      absl::StatusOr<at::Tensor> counts =
          SequenceCounts(in->routing_map, args.block_offset, args.block_tokens, args.num_sequences,
                         args.sequence_order);
      if (!counts.ok()) return counts.status();
      absl::StatusOr<at::Tensor> l =
          SequenceLoadBalancingLossOfPart(in->scores, args.block_offset, args.block_tokens,
                                          args.sum_over_block(*counts), config_.topk.top_k, config_.aux_loss_coeff,
                                          args.sequence_order);
      if (!l.ok()) return l.status();
      out.aux_loss = *l;
    } else if (config_.aux_loss == AuxLoss::kSequence) {
      absl::StatusOr<at::Tensor> l =
          SequenceLoadBalancingLoss(in->scores, in->routing_map, args.num_sequences, config_.topk.top_k,
                                    config_.aux_loss_coeff, args.sequence_order);
      if (!l.ok()) return l.status();
      out.aux_loss = *l;
    } else if (config_.aux_loss == AuxLoss::kGlobal) {
      if (!args.sum_over_dp) {
        return absl::InvalidArgumentError("router: the global aux loss needs ForwardArgs.sum_over_dp");
      }
      // Counts and the token total summed in double (the total exact past 2^24 tokens over
      // the stage; the counts then enter the loss's fp32 arithmetic).
      // One sum over the group: the counts, then (1, micro_batch, micro_batch²), whose sums
      // tell every rank whether all gave the same micro_batch (Σ(m − mine)² = 0), then the
      // token total.
      const double mb = static_cast<double>(args.micro_batch);
      const int64_t E = in->tokens_per_expert.size(0);
      const at::Tensor sums = args.sum_over_dp(
          at::cat({in->tokens_per_expert.to(at::kDouble), at::tensor({1.0, mb, mb * mb, static_cast<double>(T)}, at::kDouble)}));
      const at::Tensor counts = sums.narrow(0, 0, E);
      const double* tail = sums.data_ptr<double>() + E;
      const int64_t total = static_cast<int64_t>(tail[3]);
      if (stepped) {
        if (tail[2] - 2 * mb * tail[1] + tail[0] * mb * mb != 0) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "router: the ranks that sum the global aux loss gave different micro_batch values (this one %d): it "
              "averages one step's micro-batches, which every rank must number alike", args.micro_batch));
        }
        if (args.micro_batch == 0) {
          step_before_last_ = at::zeros_like(counts);
          step_micro_batches_ = 0;
        } else if (args.micro_batch == step_micro_batches_ - 1) {
          --step_micro_batches_;  // the last micro-batch again: its counts replace the earlier ones
        } else {
          step_before_last_ = step_counts_;
        }
        step_counts_ = step_before_last_ + counts;
        ++step_micro_batches_;
      }
      // The step's average counts (this micro-batch's alone outside a training step); the
      // token total is this micro-batch's (Megatron-Core's).
      const at::Tensor mean =
          (stepped ? step_counts_ / static_cast<double>(step_micro_batches_) : counts).to(at::kFloat);
      out.aux_loss = LoadBalancingLoss(in->scores, mean, total, config_.topk.top_k, config_.aux_loss_coeff);
      if (args.dp_replicas != 1) out.aux_loss = out.aux_loss * static_cast<double>(args.dp_replicas);
    } else if (part) {
      out.aux_loss = LoadBalancingLoss(in->scores, args.sum_over_block(in->tokens_per_expert.to(at::kFloat)),
                                       args.block_tokens, config_.topk.top_k, config_.aux_loss_coeff);
    } else {
      out.aux_loss = LoadBalancingLoss(in->scores, in->tokens_per_expert, T, config_.topk.top_k,
                                       config_.aux_loss_coeff);
    }
  }
  out.z_loss = config_.z_loss_coeff > 0 ? ZLoss(logits, config_.z_loss_coeff, part ? args.block_tokens : -1)
                                        : at::zeros({}, at::kFloat);
  out.aux_loss_value = out.aux_loss.item<double>();
  out.z_loss_value = out.z_loss.item<double>();
  return out;
}

absl::Status Router::UpdateBias(const at::Tensor& tokens_per_expert) {
  const int64_t E = config_.num_experts;
  if (!tokens_per_expert.defined() || tokens_per_expert.dim() != 1 || tokens_per_expert.size(0) != E ||
      !tokens_per_expert.device().is_cpu()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "router: tokens_per_expert must be a CPU tensor of shape [%d]; got %s", E,
        tokens_per_expert.defined() ? c10::str(tokens_per_expert.sizes(), " on ", tokens_per_expert.device())
                                    : std::string("none")));
  }
  const at::Tensor n = tokens_per_expert.to(at::kDouble);
  if (!n.isfinite().all().item<bool>() || (n < 0).any().item<bool>()) {
    return absl::InvalidArgumentError("router: tokens_per_expert must be finite counts >= 0");
  }
  if (!expert_bias_.defined()) return absl::OkStatus();
  expert_bias_ = UpdateExpertBias(expert_bias_, tokens_per_expert, config_.bias_update_rate);
  return absl::OkStatus();
}

}  // namespace switchyard::gate
