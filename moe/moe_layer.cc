#include "moe/moe_layer.h"

#include <algorithm>
#include <functional>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "moe/dispatch/exchange.h"
#include "moe/dispatch/permute.h"

namespace switchyard::moe {
namespace {

using groups::GroupKind;

// Independent streams for the router, the routed and the shared experts from one seed.
constexpr uint64_t kExpertSeedSalt = 0x5157ull;
constexpr uint64_t kSharedSeedSalt = 0x5348ull;
constexpr uint64_t kSharedGateSeedSalt = 0x5347ull;

absl::Status Sum(groups::Group& g, at::Tensor& t) {
  return g.AllReduce(t, groups::ReduceOp::kSum).Wait();
}

// A sum over `g` as the router takes it: a new tensor, failures thrown (and caught as a
// status at Forward's boundary).
std::function<at::Tensor(const at::Tensor&)> SumOver(groups::Group& g) {
  return [&g](const at::Tensor& t) {
    at::Tensor s = t.contiguous().clone();
    const absl::Status st = Sum(g, s);
    TORCH_CHECK(st.ok(), std::string(st.message()));
    return s;
  };
}

}  // namespace

std::vector<int> MoELayer::BlockOrder(groups::Group& block) const {
  const groups::Layout& l = comm_->layout();
  std::vector<int> order;
  for (int r : block.ranks()) {
    const groups::DenseCoord d = l.Dense(r);
    order.push_back(d.cp * l.tp() + d.tp);
  }
  return order;
}

groups::Group* MoELayer::GroupOrNull(GroupKind kind) const {
  if (comm_ == nullptr || !comm_->Has(kind)) return nullptr;
  groups::Group& g = comm_->Get(kind);
  return g.size() > 1 ? &g : nullptr;
}

absl::StatusOr<MoELayer> MoELayer::Create(const MoEConfig& config, uint64_t seed,
                                          groups::Communicator* comm) {
  MoELayer layer;
  layer.config_ = config;
  layer.comm_ = comm;
  const int E = config.router.num_experts;
  experts::ExpertsConfig ec{.hidden_size = config.router.hidden_size,
                            .ffn_hidden_size = config.ffn_hidden_size,
                            .num_experts = E,
                            .activation = config.activation,
                            .dtype = config.dtype,
                            .init_std = config.init_std};
  if (comm != nullptr) {
    const groups::Layout& l = comm->layout();
    if (E % l.ep() != 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: parallel.ep = %d does not divide num_experts = %d", config.name, l.ep(), E));
    }
    if (config.ffn_hidden_size % l.etp() != 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: parallel.etp = %d does not divide ffn_hidden_size = %d", config.name, l.etp(),
          config.ffn_hidden_size));
    }
    if (l.cp() > 1) {
      // A block is then the CP ranks' chunks one after another, each a chunk of every
      // sequence: not the tokens in their order, as one process sees them. (The per-sequence
      // aux loss needs only each token's sequence: Forward checks that the chunks allow it.)
      const gate::RouterConfig& rc = config.router;
      const bool token_choice = rc.type == gate::RoutingType::kTokenChoice;
      if (token_choice && rc.topk.capacity_factor > 0 && rc.topk.drop_policy != gate::DropPolicy::kByScore) {
        return absl::UnimplementedError(absl::StrFormat(
            "%s: dropping by position with context parallelism (parallel.cp = %d) is not supported: the CP ranks' "
            "chunks are not the tokens' order; drop by score",
            config.name, l.cp()));
      }
    }
    const groups::ExpertCoord c = l.Expert(comm->rank());
    ec.ep_size = l.ep();
    ec.ep_rank = c.ep;
    ec.etp_size = l.etp();
    ec.etp_rank = c.etp;
  }
  // Every data-parallel replica draws its own jitter and noise; the TP x CP ranks of a block share its draw.
  const uint64_t noise_stream = comm != nullptr ? static_cast<uint64_t>(comm->layout().Dense(comm->rank()).dp) : 0;
  SY_ASSIGN_OR_RETURN(gate::Router router, gate::Router::Create(config.router, seed, noise_stream));
  layer.router_.emplace(std::move(router));
  SY_ASSIGN_OR_RETURN(experts::GroupedExperts ex, experts::GroupedExperts::Create(ec, seed ^ kExpertSeedSalt));
  layer.experts_.emplace(std::move(ex));
  if (config.shared_ffn_hidden_size < 0 || (config.shared_ffn_hidden_size > 0 && config.num_shared_experts == 0)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: shared_ffn_hidden_size = %d needs num_shared_experts > 0 (and must be >= 0; 0: ffn_hidden_size x "
        "num_shared_experts)", config.name, config.shared_ffn_hidden_size));
  }
  if (config.num_shared_experts > 0) {
    const int64_t f = config.shared_ffn_hidden_size > 0 ? config.shared_ffn_hidden_size
                                                        : config.ffn_hidden_size * config.num_shared_experts;
    experts::ExpertsConfig sc{.hidden_size = config.router.hidden_size,
                              .ffn_hidden_size = f,
                              .num_experts = 1,
                              .activation = config.activation,
                              .dtype = config.dtype,
                              .init_std = config.init_std};
    SY_ASSIGN_OR_RETURN(experts::GroupedExperts shared, experts::GroupedExperts::Create(sc, seed ^ kSharedSeedSalt));
    layer.shared_.emplace(std::move(shared));
    if (config.shared_expert_gate) {
      at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed ^ kSharedGateSeedSalt);
      layer.shared_gate_ = (at::randn({1, config.router.hidden_size}, gen) * config.init_std)
                               .to(config.dtype)
                               .requires_grad_(true);
    }
  } else if (config.num_shared_experts < 0) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: num_shared_experts = %d must be >= 0",
                                                      config.name, config.num_shared_experts));
  }
  if (config.apply_probs_on_input &&
      (config.router.type != gate::RoutingType::kTokenChoice || config.router.topk.top_k != 1)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: apply_probs_on_input needs token-choice routing with top_k = 1 (got %s, top_k = %d)", config.name,
        config.router.type == gate::RoutingType::kTokenChoice ? "token choice" : "expert choice",
        config.router.topk.top_k));
  }
  if (config.shared_expert_gate && config.num_shared_experts == 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: shared_expert_gate needs num_shared_experts > 0", config.name));
  }
  return layer;
}

absl::Status MoELayer::CheckHidden(const at::Tensor& hidden) const {
  const int64_t H = config_.router.hidden_size;
  if (!hidden.defined() || hidden.dim() != 2 || hidden.size(1) != H) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: hidden states must be [tokens, %d]", config_.name, H));
  }
  if (!at::isFloatingType(hidden.scalar_type()) || !hidden.device().is_cpu()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: hidden states must be a floating-point CPU tensor (the layer computes on the CPU); got %s on %s",
        config_.name, c10::toString(hidden.scalar_type()), hidden.device().str()));
  }
  return absl::OkStatus();
}

absl::StatusOr<MoEOutput> MoELayer::Forward(const at::Tensor& hidden, const MoEForwardArgs& args) {
  const at::Tensor& m = args.valid_tokens;
  MoEForwardArgs inner = args;
  inner.valid_tokens = at::Tensor();
  groups::Group* slice = config_.sequence_parallel ? nullptr : GroupOrNull(GroupKind::kSlice);
  if (!m.defined() && slice == nullptr) return ForwardTokens(hidden, inner);
  absl::Status bad = CheckHidden(hidden);
  if (m.defined()) {
    if (bad.ok() && (m.dim() != 1 || m.scalar_type() != at::kBool || !m.device().is_cpu() || m.size(0) != hidden.size(0))) {
      bad = absl::InvalidArgumentError(absl::StrFormat(
          "%s: valid_tokens must be a [%d] bool CPU tensor, one entry per token; got %s %s on %s", config_.name,
          hidden.size(0), c10::toString(m.scalar_type()), c10::str(m.sizes()), m.device().str()));
    } else if (bad.ok() && config_.router.type == gate::RoutingType::kTokenChoice &&
               config_.router.aux_loss == gate::AuxLoss::kSequence && config_.router.aux_loss_coeff > 0) {
      bad = absl::InvalidArgumentError(absl::StrFormat(
          "%s: valid_tokens with the per-sequence aux loss is not supported (its sequences must be whole); use the "
          "batch or global aux loss", config_.name));
    }
  }
  bool forwarded = false;  // ForwardTokens was called (it reaches the stage's agreement)
  auto release = [&] {
    forwarded = true;
    (void)ForwardTokens(at::Tensor(), inner);  // fails as bad hidden states do, which the stage hears
  };
  // This rank's own work first (nothing here meets another rank, so a failure is only
  // this rank's bad input): the kept positions, and under TP slicing the mask's bits.
  at::Tensor keep;
  std::vector<int64_t> bits;  // 62 mask bits per word
  if (m.defined() && bad.ok()) {
    try {
      keep = m.nonzero().squeeze(1);
      if (slice != nullptr) {
        const at::Tensor mc = m.contiguous();
        const bool* p = mc.data_ptr<bool>();
        bits.assign((m.size(0) + 61) / 62, 0);
        for (int64_t i = 0; i < m.size(0); ++i) bits[i / 62] |= static_cast<int64_t>(p[i]) << (i % 62);
      }
    } catch (const c10::Error& e) {
      bad = absl::InternalError(absl::StrCat(config_.name, ": valid_tokens: ", e.what_without_backtrace()));
    }
  }
  if (slice != nullptr) {
    // The TP ranks hold the same tokens and each routes an even slice of the real ones: their
    // masks must be the same, or their slices and gathers would not fit. Maxima of (v, −v)
    // over the group give every member the same verdict, from the same numbers: first each
    // member's (mask state, token count, kept count), then, where every member has the same
    // good mask so far, its bits (all members then send as many).
    auto all_equal = [&](const std::vector<int64_t>& v, bool* equal) -> absl::Status {
      const int64_t n = static_cast<int64_t>(v.size());
      *equal = true;
      if (n == 0) return absl::OkStatus();
      at::Tensor t = at::empty({2 * n}, at::kLong);
      int64_t* d = t.data_ptr<int64_t>();
      for (int64_t i = 0; i < n; ++i) d[i] = v[i], d[n + i] = -v[i];
      SY_RETURN_IF_ERROR(slice->AllReduce(t, groups::ReduceOp::kMax).Wait());
      for (int64_t i = 0; i < n; ++i) *equal = *equal && d[i] == -d[n + i];
      return absl::OkStatus();
    };
    const int64_t state = !bad.ok() ? 2 : m.defined() ? 1 : 0;
    const int64_t tokens = hidden.defined() && hidden.dim() >= 1 ? hidden.size(0) : -1;
    bool same = false;
    absl::Status st = all_equal({state, tokens, keep.defined() ? keep.numel() : -1}, &same);
    if (st.ok() && same && state == 1) st = all_equal(bits, &same);
    if (!st.ok() && bad.ok()) bad = st;
    if (!same && bad.ok()) {
      bad = absl::InvalidArgumentError(absl::StrFormat(
          "%s: the TP ranks of %s hold the same tokens but gave different token counts or valid_tokens (some none, "
          "or one of them bad input: see its error); under TP slicing each must give the same", config_.name,
          slice->name()));
    }
  }
  if (!bad.ok()) {
    // The rest of the stage waits for this rank in the router's agreement and the block's
    // exchanges: it fails there as a rank with bad hidden states does, and reports why.
    release();
    return bad;
  }
  if (!m.defined()) return ForwardTokens(hidden, inner);
  try {
    // The real tokens, in order: routing, experts and losses see nothing else.
    const at::Tensor real = hidden.index_select(0, keep);
    forwarded = true;
    SY_ASSIGN_OR_RETURN(MoEOutput out, ForwardTokens(real, inner));
    out.output = at::zeros({hidden.size(0), out.output.size(1)}, out.output.options()).index_copy(0, keep, out.output);
    return out;
  } catch (const c10::Error& e) {
    // Before ForwardTokens the stage still waits to hear from this rank; after it, its
    // collectives are done.
    if (!forwarded) release();
    return absl::InternalError(absl::StrCat(config_.name, ": valid_tokens: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<MoEOutput> MoELayer::ForwardTokens(const at::Tensor& hidden, const MoEForwardArgs& args) {
  // The routers of one block of tokens (a data-parallel replica's micro-batch, the TP x CP
  // ranks' tokens) each route a part of it: their TP slice of the tokens the TP group holds,
  // or (sequence parallel) their own share, of their CP rank's chunk. Their losses and
  // capacity are the block's (else TP = 2 would double the aux and z-loss gradients).
  const int cp = comm_ != nullptr ? comm_->layout().cp() : 1;
  groups::Group* slice = config_.sequence_parallel ? nullptr : GroupOrNull(GroupKind::kSlice);
  groups::Group* block = cp > 1                      ? GroupOrNull(GroupKind::kTpCp)
                         : slice != nullptr          ? slice
                         : config_.sequence_parallel ? GroupOrNull(GroupKind::kTp)
                                                     : nullptr;
  // Every rank of the stage meets the others in the dispatch and the losses' sums: one
  // that fails alone would leave them waiting there until the timeout. They agree once, in
  // the router, after the logits (NaN or inf hidden states give NaN or inf logits); a rank
  // that fails before its router states its failure there on its way out.
  groups::Group* stage = GroupOrNull(GroupKind::kGate);
  std::function<bool(bool)> all_finite;
  bool agreed = false;  // this rank has reached the agreement (or failed in it)
  if (stage != nullptr) {
    all_finite = [sum = SumOver(*stage), &agreed](bool ok) {
      agreed = true;
      return sum(at::full({1}, ok ? 0 : 1, at::kLong)).item<int64_t>() == 0;
    };
  }
  auto stop = [&](absl::Status s) {
    if (all_finite && !agreed) {
      try {
        all_finite(false);
      } catch (const c10::Error&) {
        // The rank's own error is the one to report.
      }
    }
    return s;
  };
  absl::Status input = CheckHidden(hidden);
  try {
    std::vector<int64_t> slices, parts;  // this rank's tokens' TP slices; the block's parts
    if (slice != nullptr && input.ok()) slices = dispatch::EvenSplit(hidden.size(0), slice->size());
    if (block != nullptr && block == slice) {  // every member holds the same tokens
      if (!input.ok()) return stop(input);
      parts = slices;
    } else if (block != nullptr) {
      // Each member checks its own tokens, and the verdict travels with the exchange of the
      // parts' sizes.
      at::Tensor n = at::zeros({block->size() + 1}, at::kLong);
      if (input.ok()) n[block->rank()] = slice != nullptr ? slices[slice->rank()] : hidden.size(0);
      n[block->size()] = input.ok() ? 0 : 1;
      if (absl::Status st = Sum(*block, n); !st.ok()) return stop(st);
      if (!input.ok()) return stop(input);
      if (n[block->size()].item<int64_t>() > 0) {
        return stop(absl::InvalidArgumentError(absl::StrFormat(
            "%s: another rank of %s had bad hidden states or valid_tokens (see its error)", config_.name,
            block->name())));
      }
      parts.assign(n.data_ptr<int64_t>(), n.data_ptr<int64_t>() + block->size());
    } else if (!input.ok()) {
      return stop(input);
    }
    // The per-sequence aux loss's sequences must divide the block (every member of the
    // block finds out together; the rest of the stage in the router).
    const int64_t block_tokens = block != nullptr ? std::accumulate(parts.begin(), parts.end(), int64_t{0})
                                                  : hidden.size(0);
    const bool per_sequence = config_.router.type == gate::RoutingType::kTokenChoice &&
                              config_.router.aux_loss == gate::AuxLoss::kSequence && config_.router.aux_loss_coeff > 0;
    if (per_sequence && (args.num_sequences < 1 || block_tokens % args.num_sequences != 0)) {
      return stop(absl::InvalidArgumentError(absl::StrFormat(
          "%s: num_sequences = %d must be >= 1 and divide the %d tokens of the block (the per-sequence aux loss)",
          config_.name, args.num_sequences, block_tokens)));
    }
    // Under CP each rank holds a chunk of every sequence. Position by position ([seq, batch],
    // as Megatron-Core's CP chunks are), a chunk of whole positions keeps each token's
    // sequence at its block index mod num_sequences, which is all the loss needs; whole
    // sequences one after another cannot be chunked so.
    if (per_sequence && cp > 1 && block != nullptr && args.num_sequences > 1) {
      if (args.sequence_order != gate::SequenceOrder::kInterleaved) {
        return stop(absl::InvalidArgumentError(absl::StrFormat(
            "%s: the per-sequence aux loss under context parallelism (parallel.cp = %d) needs the tokens position by "
            "position (MoEForwardArgs.sequence_order = kInterleaved, [seq, batch]): each CP rank holds a chunk of "
            "every sequence", config_.name, cp)));
      }
      const std::vector<int> order = BlockOrder(*block);
      const int tp = comm_->layout().tp();
      std::vector<int64_t> chunk(cp, 0);
      for (size_t i = 0; i < parts.size(); ++i) chunk[order[i] / tp] += parts[i];
      for (int c = 0; c < cp; ++c) {
        if (chunk[c] % args.num_sequences != 0) {
          return stop(absl::InvalidArgumentError(absl::StrFormat(
              "%s: under context parallelism each CP rank must hold whole positions of the %d sequences (the "
              "per-sequence aux loss): CP rank %d holds %d tokens", config_.name, args.num_sequences, c, chunk[c])));
        }
      }
    }
    at::Tensor x = hidden;
    if (slice != nullptr) {
      absl::StatusOr<at::Tensor> mine = dispatch::SliceTokens(hidden, *slice, slices);
      if (!mine.ok()) return stop(mine.status());
      x = *std::move(mine);
    }
    gate::ForwardArgs ga{
        .training = args.training, .num_sequences = args.num_sequences, .sequence_order = args.sequence_order};
    ga.micro_batch = args.micro_batch;
    if (comm_ != nullptr) ga.dp_replicas = int64_t{comm_->layout().dp()} * comm_->layout().cp();
    if (block != nullptr) {
      ga.block_tokens = block_tokens;
      // The block's order is one process's: CP rank by CP rank, each TP rank's part in TP
      // order, whatever order the layout's order string gives the group's members.
      const std::vector<int> order = BlockOrder(*block);
      for (size_t m = 0; m < parts.size(); ++m) {
        if (order[m] < order[block->rank()]) ga.block_offset += parts[m];
      }
      ga.sum_over_block = SumOver(*block);
      ga.gather_over_block = [block, parts, block_tokens, order](const at::Tensor& t) {
        std::vector<int64_t> shape = t.sizes().vec();
        shape[0] = block_tokens;
        at::Tensor all = at::empty(shape, t.options());
        const absl::Status st = block->AllGatherV(t.contiguous(), all, parts).Wait();
        TORCH_CHECK(st.ok(), std::string(st.message()));
        if (std::is_sorted(order.begin(), order.end())) return all;
        // Members' parts, gathered in member order, into block order.
        std::vector<int64_t> first(parts.size() + 1, 0);
        std::partial_sum(parts.begin(), parts.end(), first.begin() + 1);
        std::vector<at::Tensor> in_order(parts.size());
        for (size_t m = 0; m < parts.size(); ++m) in_order[order[m]] = all.narrow(0, first[m], parts[m]);
        return at::cat(in_order);
      };
    }
    ga.all_finite = all_finite;
    if (stage != nullptr) {
      ga.sum_over_dp = SumOver(*stage);
    } else {
      ga.sum_over_dp = [](const at::Tensor& t) { return t; };
    }
    absl::StatusOr<gate::RouterOutput> routed = router_->Forward(x, ga);
    if (!routed.ok()) return stop(routed.status());  // (nothing more to say once it has agreed)
    gate::RouterOutput& r = *routed;
    if (cp > 1) {
      // The CP ranks' shares add up to their block's losses, which the optimizer's average
      // over DP x CP would divide by CP (the global loss is weighted by DP x CP already).
      if (config_.router.aux_loss != gate::AuxLoss::kGlobal) {
        r.aux_loss = r.aux_loss * static_cast<double>(cp);
        r.aux_loss_value *= cp;
      }
      r.z_loss = r.z_loss * static_cast<double>(cp);
      r.z_loss_value *= cp;
    }
    const gate::Routing& routing = r.routing;
    // A part of a block keeps no padding slots (see gate::BlockOfTokens).
    const bool fixed_blocks = routing.capacity >= 0 && config_.router.topk.pad_to_capacity &&
                              config_.router.type == gate::RoutingType::kTokenChoice && block == nullptr;
    SY_ASSIGN_OR_RETURN(dispatch::PermutePlan plan,
                        dispatch::MakePlan(routing.routing_map, fixed_blocks ? routing.capacity : -1));
    const at::Tensor xe = x.to(config_.dtype);
    const at::Tensor rows = dispatch::Permute(xe, plan);
    const dispatch::ExpertGroups eg{.ep = GroupOrNull(GroupKind::kEp),
                                    .etp = GroupOrNull(GroupKind::kEtp),
                                    .num_experts = config_.router.num_experts};
    dispatch::DispatchState st;
    SY_ASSIGN_OR_RETURN(at::Tensor local_rows, dispatch::DispatchToExperts(rows, plan.rows_per_expert, eg, &st));
    // The routing weights travel with the rows and scale fc2's input inside the experts,
    // where the rows are in cache (their gradient too); the combine is then a plain sum, whose
    // backward need not read the expert outputs again.
    SY_ASSIGN_OR_RETURN(at::Tensor local_w,
                        dispatch::DispatchRowWeights(dispatch::RowWeights(routing.probs, plan), st, eg));
    if (config_.apply_probs_on_input) {  // expert(w · x): the weight scales the copy, in fp32
      local_rows = (local_rows * local_w.unsqueeze(1)).to(config_.dtype);
      local_w = at::Tensor();
    }
    SY_ASSIGN_OR_RETURN(at::Tensor expert_out,
                        experts_->Forward(local_rows, st.rows_per_segment, st.segment_expert, local_w));
    SY_ASSIGN_OR_RETURN(at::Tensor back, dispatch::CombineFromExperts(expert_out, st, eg));
    at::Tensor y = dispatch::Unpermute(back, plan);
    if (shared_) {
      SY_ASSIGN_OR_RETURN(at::Tensor s, shared_->Forward(xe, {xe.size(0)}));
      if (shared_gate_.defined()) {
        s = s * at::sigmoid(at::mm(xe.to(at::kFloat), shared_gate_.to(at::kFloat).t())).to(config_.dtype);
      }
      y = y + s;
    }
    if (slice != nullptr) {
      SY_ASSIGN_OR_RETURN(y, dispatch::GatherTokens(y, *slice, slices));
    }

    MoEOutput out;
    out.output = y.to(hidden.scalar_type());
    out.aux_loss = r.aux_loss;
    out.z_loss = r.z_loss;
    out.aux_loss_value = r.aux_loss_value;
    out.z_loss_value = r.z_loss_value;
    out.tokens_per_expert = routing.tokens_per_expert;
    // Dropless routing drops nothing (its `dropped` is all false): no pass over [T, E] for it.
    out.dropped = routing.capacity >= 0 && routing.dropped.defined() ? routing.dropped.sum().item<int64_t>() : 0;
    return out;
  } catch (const c10::Error& e) {
    // (Thrown before the agreement, as by an allocation that failed: the others are told.)
    return stop(absl::InternalError(absl::StrCat(config_.name, ": ", e.what_without_backtrace())));
  }
}

absl::Status SumGradient(groups::Communicator& comm, const ParamTag& tag, at::Tensor& grad) {
  auto over = [&](GroupKind kind) -> absl::Status {
    return comm.Has(kind) ? Sum(comm.Get(kind), grad) : absl::OkStatus();
  };
  switch (tag.domain) {
    case ParamDomain::kDense: return over(GroupKind::kDpCp);
    case ParamDomain::kDenseTpReplicated:
      SY_RETURN_IF_ERROR(over(GroupKind::kDpCp));
      return over(GroupKind::kTp);
    case ParamDomain::kExpert: return over(GroupKind::kEdp);
  }
  return absl::InvalidArgumentError(absl::StrCat(tag.name, ": unknown parameter domain"));
}

absl::Status MoELayer::UpdateExpertBias(const at::Tensor& tokens_per_expert) {
  const int E = config_.router.num_experts;
  absl::Status mine;
  if (!tokens_per_expert.defined() || tokens_per_expert.dim() != 1 || tokens_per_expert.size(0) != E ||
      !tokens_per_expert.device().is_cpu()) {
    mine = absl::InvalidArgumentError(
        absl::StrFormat("%s: tokens_per_expert must be a CPU tensor of shape [%d] (MoEOutput.tokens_per_expert)",
                        config_.name, E));
  } else {
    const at::Tensor c = tokens_per_expert.to(at::kDouble);
    if (!c.isfinite().all().item<bool>() || (c < 0).any().item<bool>()) {
      mine = absl::InvalidArgumentError(
          absl::StrFormat("%s: tokens_per_expert must be finite counts >= 0", config_.name));
    }
  }
  // Every rank of the stage reaches the sum, good counts or not, so that bad ones fail them
  // all at once (not by a timeout) and a negative count cannot hide in the sum.
  at::Tensor n = at::zeros({E + 1}, at::kDouble);
  if (mine.ok()) {
    n.narrow(0, 0, E).copy_(tokens_per_expert.to(at::kDouble));
  } else {
    n[E] = 1.0;
  }
  groups::Group* stage = GroupOrNull(GroupKind::kGate);
  if (stage != nullptr) {
    SY_RETURN_IF_ERROR(Sum(*stage, n));
  }
  SY_RETURN_IF_ERROR(mine);
  if (n[E].item<double>() > 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: another rank of %s had bad tokens_per_expert (see its error)", config_.name, stage->name()));
  }
  return router_->UpdateBias(n.narrow(0, 0, E));
}

std::vector<TaggedParam> MoELayer::Parameters() {
  const int tp = comm_ ? comm_->layout().tp() : 1;
  const ParamDomain replicated = tp > 1 ? ParamDomain::kDenseTpReplicated : ParamDomain::kDense;
  const std::string& n = config_.name;
  std::vector<TaggedParam> out;
  out.push_back({router_->weight(), {.name = n + ".router.weight", .domain = replicated}});
  if (router_->noise_weight().defined()) {
    out.push_back({router_->noise_weight(), {.name = n + ".router.noise_weight", .domain = replicated}});
  }
  const experts::ExpertsConfig& ec = experts_->config();
  for (auto [suffix, t] : {std::pair<const char*, at::Tensor>{".experts.fc1", experts_->fc1()},
                           {".experts.fc2", experts_->fc2()}}) {
    out.push_back({t,
                   {.name = n + suffix,
                    .domain = ParamDomain::kExpert,
                    .expert_group = n,
                    .first_global_expert = experts_->first_expert(),
                    .num_local_experts = experts_->num_local_experts(),
                    .ep_size = ec.ep_size,
                    .etp_size = ec.etp_size}});
  }
  if (shared_) {
    out.push_back({shared_->fc1(), {.name = n + ".shared_experts.fc1", .domain = replicated}});
    out.push_back({shared_->fc2(), {.name = n + ".shared_experts.fc2", .domain = replicated}});
    if (shared_gate_.defined()) {
      out.push_back({shared_gate_, {.name = n + ".shared_experts.gate_weight", .domain = replicated}});
    }
  }
  return out;
}

}  // namespace switchyard::moe
