#include "moe/moe_layer.h"

#include <chrono>
#include <functional>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "dist/groups/comm.h"
#include "dist/groups/testing/multi_process.h"
#include "dist/groups/testing/multi_rank.h"
#include "moe/dispatch/exchange.h"
#include "moe/testing/rel_err.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace switchyard::moe {
namespace {

using groups::Communicator;
using groups::GroupKind;
using ::testing::HasSubstr;

constexpr int64_t kHidden = 8, kFfn = 12;
constexpr int kExperts = 8;
constexpr uint64_t kSeed = 1234;

absl::Status Expect(bool ok, const std::string& what) { return ok ? absl::OkStatus() : absl::InternalError(what); }

using testing::RelErr;

struct Case {
  std::string name;
  groups::LayoutSpec layout;
  int num_experts = kExperts;
  int top_k = 2;
  double capacity_factor = 0;  // 0: dropless
  gate::DropPolicy drop_policy = gate::DropPolicy::kByScore;
  bool pad_to_capacity = false;
  experts::Activation activation = experts::Activation::kSwiglu;
  int shared_experts = 0;
  bool shared_gate = false;         // the shared experts' sigmoid gate
  bool probs_on_input = false;      // routing weights scale the experts' input (top-1)
  int pad_every = 0;                // > 0: every pad_every-th token of the global batch is padding
  std::vector<int64_t> dp_tokens;   // tokens of each data-parallel block (0 allowed)
  std::vector<int> silent_experts;  // experts no token picks
  at::ScalarType dtype = at::kFloat;
  double tolerance = 1e-5;          // relative, per tensor and per expert
  int ranks_without_tokens = 0;     // ranks (or TP slices) that route nothing: checked
  // The load-balancing loss on the ranks (default: global when dropless, else per batch),
  // the z-loss, and for the per-sequence loss the sequences' length.
  std::optional<gate::AuxLoss> aux;
  double z_loss = 0;
  int64_t seq_len = 0;
  gate::SequenceOrder sequence_order = gate::SequenceOrder::kWhole;
  bool sequence_parallel = false;   // each TP rank gets its share of the DP block's tokens
  // Training mode with input jitter and noisy gating (one DP block: other replicas draw
  // other noise than one process).
  bool training = false;
  bool expert_choice = false;  // each expert picks capacity_factor x T / E tokens (no aux loss)
  bool processes = false;      // ranks as processes over TCP (as the launcher runs them), not threads
  bool pre_softmax = false;    // softmax over all experts before top-k (the job spec's default)
};

gate::AuxLoss AuxOf(const Case& c) {
  if (c.expert_choice) return gate::AuxLoss::kNone;
  return c.aux.value_or(c.capacity_factor > 0 ? gate::AuxLoss::kBatch : gate::AuxLoss::kGlobal);
}

MoEConfig Config(const Case& c) {
  MoEConfig m;
  m.router = {.hidden_size = kHidden, .num_experts = c.num_experts};
  m.router.topk.top_k = c.top_k;
  m.router.topk.capacity_factor = c.capacity_factor;
  m.router.topk.drop_policy = c.drop_policy;
  m.router.topk.pad_to_capacity = c.pad_to_capacity;
  m.router.topk.pre_softmax = c.pre_softmax;
  m.router.init_std = 0.5f;  // spread logits so routing is decisive
  m.ffn_hidden_size = kFfn;
  m.activation = c.activation;
  m.num_shared_experts = c.shared_experts;
  m.shared_expert_gate = c.shared_gate;
  m.apply_probs_on_input = c.probs_on_input;
  m.dtype = c.dtype;
  m.sequence_parallel = c.sequence_parallel;
  m.init_std = 0.3f;
  m.router.aux_loss = AuxOf(c);
  m.router.z_loss_coeff = c.z_loss;
  if (c.expert_choice) m.router.type = gate::RoutingType::kExpertChoice;
  if (c.training) {
    m.router.jitter_eps = 0.1f;
    m.router.noisy_gating = true;
  }
  return m;
}

void Silence(MoELayer& layer, const std::vector<int>& experts) {
  at::NoGradGuard no_grad;
  for (int e : experts) layer.router().weight()[e][0] = -50.0f;  // feature 0 is a constant 3: logit ≈ −150
}

struct Reference {
  at::Tensor x, R, out, x_grad, router_grad, noise_grad, fc1_grad, fc2_grad, shared_fc1_grad, shared_fc2_grad,
      shared_gate_grad;
  double aux = 0, z = 0;
  int64_t dropped = 0;
  at::Tensor tokens_per_expert;
};

// The inputs every run shares, in the layer's dtype.
struct Inputs {
  at::Tensor x, R;
};
Inputs MakeInputs(const Case& c) {
  at::manual_seed(99);
  const int64_t T = std::accumulate(c.dp_tokens.begin(), c.dp_tokens.end(), int64_t{0});
  at::Tensor x = at::randn({T, kHidden});
  if (!c.silent_experts.empty()) x.select(1, 0).fill_(3.0f);
  return {x.to(c.dtype), at::randn({T, kHidden}).to(c.dtype)};
}

// Which tokens of the global batch count (MoEForwardArgs.valid_tokens); undefined without padding.
at::Tensor ValidTokens(const Case& c) {
  if (c.pad_every == 0) return at::Tensor();
  const int64_t T = std::accumulate(c.dp_tokens.begin(), c.dp_tokens.end(), int64_t{0});
  return at::arange(T, at::kLong).remainder(c.pad_every) != c.pad_every - 1;
}
at::Tensor Part(const at::Tensor& valid, int64_t off, int64_t n) {
  return valid.defined() ? valid.narrow(0, off, n).contiguous() : at::Tensor();
}
// Rows of t that are real tokens (all of them without padding).
at::Tensor RealRows(const at::Tensor& t, const at::Tensor& valid) {
  return valid.defined() ? t.index_select(0, valid.nonzero().squeeze(1)) : t;
}

// The single-process layer, on each DP block in turn (a data-parallel replica's micro-batch,
// over which capacity is counted: the TP ranks that share a block count it together).
// Its own losses are off: the load-balancing loss and z-loss are added from the gate's
// formulas over what one process would see, each DP block (or the whole global batch for the
// global variant) at once: the layout must not change them.
Reference RunReference(const Case& c, const std::vector<std::vector<int64_t>>& shards) {
  Reference ref;
  const Inputs in = MakeInputs(c);
  ref.x = in.x;
  ref.R = in.R;
  MoEConfig cfg = Config(c);
  const at::Tensor valid = ValidTokens(c);
  if (!c.training) {  // (training: the layer's own losses, of the one block, with its noise)
    cfg.router.aux_loss = gate::AuxLoss::kNone;
    cfg.router.z_loss_coeff = 0;
  }
  auto layer = MoELayer::Create(cfg, kSeed);
  EXPECT_TRUE(layer.ok()) << layer.status();
  Silence(*layer, c.silent_experts);
  at::Tensor x = ref.x.clone().requires_grad_(true);
  std::vector<at::Tensor> outs;
  at::Tensor loss = at::zeros({});
  const int k = c.top_k;
  const double coeff = cfg.router.aux_loss_coeff;
  const gate::ScoreFunction score = cfg.router.topk.score;
  const at::Tensor W = layer->router().weight();
  auto aux_scores = [&](const at::Tensor& logits) {
    absl::StatusOr<gate::AuxLossInputs> a = gate::AuxLossScores(logits, k, score);
    EXPECT_TRUE(a.ok()) << a.status();
    return *a;
  };
  // The job's loss: the task loss summed over every token, plus each DP block's own losses
  // averaged over the blocks (as the optimizer averages replicas), the global one once.
  const double blocks = static_cast<double>(shards.size());
  int64_t off = 0;
  for (const auto& block : shards) {
    const int64_t block_off = off;
    {
      const int64_t n = std::accumulate(block.begin(), block.end(), int64_t{0});
      auto out = layer->Forward(x.narrow(0, off, n), {.training = c.training,
                                                      .num_sequences = c.seq_len > 0 ? n / c.seq_len : 1,
                                                      .sequence_order = c.sequence_order,
                                                      .valid_tokens = Part(valid, off, n)});
      EXPECT_TRUE(out.ok()) << out.status();
      outs.push_back(out->output);
      loss = loss + (out->output * ref.R.narrow(0, off, n)).sum();
      if (c.training) {
        loss = loss + out->aux_loss + out->z_loss;
        ref.aux += out->aux_loss_value;
        ref.z += out->z_loss_value;
      }
      ref.dropped += out->dropped;
      ref.tokens_per_expert = ref.tokens_per_expert.defined() ? ref.tokens_per_expert + out->tokens_per_expert
                                                              : out->tokens_per_expert;
      off += n;
    }
    if (c.training) continue;
    // The losses of the block's real tokens.
    const at::Tensor xb = RealRows(x.narrow(0, block_off, off - block_off), Part(valid, block_off, off - block_off));
    const int64_t Tb = xb.size(0);
    const at::Tensor logits = at::mm(xb.to(at::kFloat), W.t());
    at::Tensor aux;
    if (AuxOf(c) == gate::AuxLoss::kBatch) {
      const gate::AuxLossInputs a = aux_scores(logits);
      aux = gate::LoadBalancingLoss(a.scores, a.tokens_per_expert, Tb, k, coeff);
    } else if (AuxOf(c) == gate::AuxLoss::kSequence) {
      const gate::AuxLossInputs a = aux_scores(logits);
      absl::StatusOr<at::Tensor> l =
          gate::SequenceLoadBalancingLoss(a.scores, a.routing_map, Tb / c.seq_len, k, coeff, c.sequence_order);
      EXPECT_TRUE(l.ok()) << l.status();
      aux = *l;
    }
    if (aux.defined()) {
      loss = loss + aux / blocks;
      ref.aux += aux.item<double>() / blocks;
    }
    if (c.z_loss > 0) {
      const at::Tensor z = gate::ZLoss(logits, c.z_loss);
      loss = loss + z / blocks;
      ref.z += z.item<double>() / blocks;
    }
  }
  if (AuxOf(c) == gate::AuxLoss::kGlobal && !c.training) {
    const at::Tensor xr = RealRows(x, valid);
    const gate::AuxLossInputs a = aux_scores(at::mm(xr.to(at::kFloat), W.t()));
    const at::Tensor aux = gate::LoadBalancingLoss(a.scores, a.tokens_per_expert, xr.size(0), k, coeff);
    loss = loss + aux;
    ref.aux += aux.item<double>();
  }
  loss.backward();
  ref.out = at::cat(outs).detach();
  ref.x_grad = x.grad();
  ref.router_grad = layer->router().weight().grad().clone();
  if (c.training) ref.noise_grad = layer->router().noise_weight().grad().clone();
  ref.fc1_grad = layer->routed_experts().fc1().grad().clone();
  ref.fc2_grad = layer->routed_experts().fc2().grad().clone();
  if (auto* s = layer->shared_experts()) {
    ref.shared_fc1_grad = s->fc1().grad().clone();
    ref.shared_fc2_grad = s->fc2().grad().clone();
  }
  if (c.shared_gate) ref.shared_gate_grad = layer->shared_expert_gate().grad().clone();
  return ref;
}

// RunRanks names the rank of a failure.
absl::Status Check(const std::string& what, const at::Tensor& got, const at::Tensor& want, double tolerance) {
  if (got.sizes() != want.sizes()) {
    return absl::InternalError(absl::StrFormat("%s has shape %s, want %s", what,
                                               c10::str(got.sizes()), c10::str(want.sizes())));
  }
  const double e = RelErr(got, want);
  if (!(e <= tolerance)) {
    return absl::InternalError(absl::StrFormat("%s differs, relative error %g", what, e));
  }
  return absl::OkStatus();
}

// Per expert as well as whole: an expert with few tokens (or none, whose gradient must then
// be exactly 0) would hide behind the busiest one's scale. Row i of dim 0 is expert first + i.
absl::Status CheckEach(const std::string& what, const at::Tensor& got, const at::Tensor& want, int first,
                       double tolerance) {
  SY_RETURN_IF_ERROR(Check(what, got, want, tolerance));
  for (int64_t i = 0; i < want.size(0); ++i) {
    SY_RETURN_IF_ERROR(Check(absl::StrFormat("%s of expert %d", what, first + i), got[i], want[i], tolerance));
  }
  return absl::OkStatus();
}

void RunCase(const Case& c) {
  SCOPED_TRACE(c.name);
  auto layout = groups::Layout::Create(c.layout);
  ASSERT_TRUE(layout.ok()) << layout.status();
  ASSERT_EQ(static_cast<int>(c.dp_tokens.size()), layout->dp());
  const int slices = layout->tp();
  std::vector<std::vector<int64_t>> shards;  // what each rank routes, by DP block
  for (int64_t n : c.dp_tokens) shards.push_back(dispatch::EvenSplit(n, slices));
  if (c.training) {
    ASSERT_EQ(c.dp_tokens.size(), 1u) << "training cases: one DP block (replicas draw their own noise)";
  }
  const Reference ref = RunReference(c, shards);
  // The cases test what they say: drops happen, the silent expert gets nothing.
  if (c.capacity_factor > 0 && !c.expert_choice) {
    EXPECT_GT(ref.dropped, 0);
  }
  for (int e : c.silent_experts) {
    EXPECT_EQ(ref.tokens_per_expert[e].item<int64_t>(), 0) << "expert " << e;
  }
  const double tol = c.tolerance;

  auto run_rank = [&](Communicator& comm) -> absl::Status {
    const int rank = comm.rank();
    const groups::DenseCoord dc = comm.layout().Dense(rank);
    const int d = dc.dp;
    int64_t off = std::accumulate(c.dp_tokens.begin(), c.dp_tokens.begin() + d, int64_t{0});
    int64_t n = c.dp_tokens[d];
    const int64_t sequences = c.seq_len > 0 ? n / c.seq_len : 1;  // in the DP block
    const std::vector<int64_t> chunks = dispatch::EvenSplit(n, comm.layout().cp());  // CP ranks' chunks, in order
    off += std::accumulate(chunks.begin(), chunks.begin() + dc.cp, int64_t{0});
    n = chunks[dc.cp];
    if (c.sequence_parallel) {  // this TP rank's share of its chunk
      const std::vector<int64_t> shares = dispatch::EvenSplit(n, comm.layout().tp());
      off += std::accumulate(shares.begin(), shares.begin() + dc.tp, int64_t{0});
      n = shares[dc.tp];
    }
    auto layer = MoELayer::Create(Config(c), kSeed, &comm);
    if (!layer.ok()) return layer.status();
    Silence(*layer, c.silent_experts);
    at::Tensor x = ref.x.narrow(0, off, n).clone().requires_grad_(true);
    auto out = layer->Forward(x, {.training = c.training,
                                  .num_sequences = sequences,
                                  .sequence_order = c.sequence_order,
                                  .valid_tokens = Part(ValidTokens(c), off, n)});
    if (!out.ok()) return out.status();
    // The optimizer's average over the DP x CP replicas, applied to the losses the layer
    // weights for it (the task loss here is summed, not averaged, over the tokens).
    const double replicas = comm.layout().dp() * comm.layout().cp();
    ((out->output * ref.R.narrow(0, off, n)).sum() + (out->aux_loss + out->z_loss) / replicas).backward();
    // Each rank routes its own tokens (its TP slice of them): counts and drops add up, and so
    // do the losses (each rank's share). Summed over the world (ranks may be processes).
    at::Tensor totals = at::zeros({4 + c.num_experts}, at::kDouble);
    totals[0] = out->aux_loss_value / replicas;
    totals[1] = out->z_loss_value / replicas;
    totals[2] = static_cast<double>(out->dropped);
    totals[3] = out->tokens_per_expert.sum().item<int64_t>() == 0 ? 1.0 : 0.0;
    totals.narrow(0, 4, c.num_experts).copy_(out->tokens_per_expert);
    SY_RETURN_IF_ERROR(comm.World().AllReduce(totals).Wait());
    // Every gradient reduced as DESIGN.md's table says for its tag (moe::SumGradient: the
    // sum; the optimizer's divisor is the same for every layout's reference), so a wrong tag
    // fails here. Every rank takes part in every sum before any comparison can return early
    // (a rank that returned would leave the others waiting in the next sum until the timeout).
    experts::GroupedExperts& ex = layer->routed_experts();
    std::map<std::string, at::Tensor> reduced;
    for (const TaggedParam& p : layer->Parameters()) {
      at::Tensor g = p.tensor.grad().clone();
      SY_RETURN_IF_ERROR(SumGradient(comm, p.tag, g));
      reduced[p.tag.name.substr(p.tag.name.find('.') + 1)] = g;
    }
    const at::Tensor router_grad = reduced["router.weight"];
    const at::Tensor noise_grad = c.training ? reduced["router.noise_weight"] : at::Tensor();
    const at::Tensor shared_fc1_grad = reduced["shared_experts.fc1"], shared_fc2_grad = reduced["shared_experts.fc2"];
    const at::Tensor fc1_grad = reduced["experts.fc1"], fc2_grad = reduced["experts.fc2"];
    SY_RETURN_IF_ERROR(Check("output", out->output, ref.out.narrow(0, off, n), tol));
    SY_RETURN_IF_ERROR(Check("input gradient", x.grad(), ref.x_grad.narrow(0, off, n), tol));
    // Router row e belongs to expert e.
    SY_RETURN_IF_ERROR(CheckEach("router gradient", router_grad, ref.router_grad, 0, tol));
    if (c.training) SY_RETURN_IF_ERROR(CheckEach("noise weight gradient", noise_grad, ref.noise_grad, 0, tol));
    if (c.shared_experts > 0) {
      SY_RETURN_IF_ERROR(Check("shared fc1 gradient", shared_fc1_grad, ref.shared_fc1_grad, tol));
      SY_RETURN_IF_ERROR(Check("shared fc2 gradient", shared_fc2_grad, ref.shared_fc2_grad, tol));
    }
    if (c.shared_gate) {
      SY_RETURN_IF_ERROR(
          Check("shared expert gate gradient", reduced["shared_experts.gate_weight"], ref.shared_gate_grad, tol));
    }
    SY_RETURN_IF_ERROR(CheckEach("fc1 gradient", fc1_grad, ex.LocalShard(ref.fc1_grad, true), ex.first_expert(), tol));
    SY_RETURN_IF_ERROR(
        CheckEach("fc2 gradient", fc2_grad, ex.LocalShard(ref.fc2_grad, false), ex.first_expert(), tol));
    auto near = [](double got, double want) { return std::abs(got - want) <= 1e-6 * std::abs(want); };
    SY_RETURN_IF_ERROR(Expect(near(totals[0].item<double>(), ref.aux),
                              absl::StrFormat("aux loss summed over ranks %.9g, want %.9g", totals[0].item<double>(), ref.aux)));
    SY_RETURN_IF_ERROR(Expect(near(totals[1].item<double>(), ref.z),
                              absl::StrFormat("z-loss summed over ranks %.9g, want %.9g", totals[1].item<double>(), ref.z)));
    SY_RETURN_IF_ERROR(Expect(totals[2].item<double>() == static_cast<double>(ref.dropped),
                              absl::StrFormat("dropped copies summed over ranks %g, want %d", totals[2].item<double>(),
                                              ref.dropped)));
    SY_RETURN_IF_ERROR(Expect(totals[3].item<double>() == c.ranks_without_tokens,
                              absl::StrFormat("%g ranks routed no token, want %d", totals[3].item<double>(),
                                              c.ranks_without_tokens)));
    const at::Tensor routed = totals.narrow(0, 4, c.num_experts);
    return Expect(at::equal(routed, ref.tokens_per_expert.to(at::kDouble)),
                  c10::str("routed copies per expert summed over ranks: ", routed, " want ", ref.tokens_per_expert));
  };
  const absl::Status s = c.processes ? groups::testing::RunRanksInProcesses({.layout = c.layout}, run_rank)
                                     : groups::testing::RunRanks({.layout = c.layout}, run_rank);
  EXPECT_TRUE(s.ok()) << s;
}

using experts::Activation;
using gate::DropPolicy;

TEST(MoELayerEquivalenceTest, OneRank) {
  RunCase({.name = "one rank", .layout = {.world_size = 1}, .dp_tokens = {24}});
}

TEST(MoELayerEquivalenceTest, DataParallelOnly) {
  RunCase({.name = "DP=2, EP=1", .layout = {.world_size = 2}, .dp_tokens = {12, 12}});
}

TEST(MoELayerEquivalenceTest, ExpertParallel2) {
  RunCase({.name = "EP=2, a shared expert",
           .layout = {.world_size = 2, .ep = 2},
           .shared_experts = 1,
           .dp_tokens = {16, 11}});
}

TEST(MoELayerEquivalenceTest, ExpertParallel2TopK1) {
  RunCase({.name = "EP=2, k=1 dropless", .layout = {.world_size = 2, .ep = 2}, .top_k = 1, .dp_tokens = {13, 15}});
}

// Llama 4's expert(w · x): the weight's gradient comes back through the rows' exchange, and
// under ETP each F slice's share of it is summed.
TEST(MoELayerEquivalenceTest, WeightsOnTheExpertsInput) {
  RunCase({.name = "DP=4 x EP=2, k=1, weights on the input, capacity 1.0",
           .layout = {.world_size = 4, .ep = 2},
           .top_k = 1,
           .capacity_factor = 1.0,
           .probs_on_input = true,
           .dp_tokens = {13, 15, 9, 11}});
  RunCase({.name = "ETP=2 x EP=2, k=1, weights on the input, a gated shared expert",
           .layout = {.world_size = 4, .tp = 2, .ep = 2, .etp = 2},
           .top_k = 1,
           .shared_experts = 1,
           .shared_gate = true,
           .probs_on_input = true,
           .dp_tokens = {14, 17}});
}

// Padding tokens (MoEForwardArgs.valid_tokens) are not there for routing, capacity, losses
// and counts, under every kind of block: DP x EP, TP slices (every TP rank masks the same
// tokens), sequence parallel x CP shares, and expert choice.
TEST(MoELayerEquivalenceTest, PaddingTokens) {
  RunCase({.name = "DP=4 x EP=2, every 3rd token padding, capacity 1.0, batch aux loss and z-loss",
           .layout = {.world_size = 4, .ep = 2},
           .capacity_factor = 1.0,
           .pad_every = 3,
           .dp_tokens = {13, 15, 9, 11},
           .aux = gate::AuxLoss::kBatch,
           .z_loss = 0.01});
  RunCase({.name = "TP=2 slicing x EP=2, every 4th token padding, global aux loss, a shared expert",
           .layout = {.world_size = 4, .tp = 2, .ep = 2, .etp = 1},
           .shared_experts = 1,
           .pad_every = 4,
           .dp_tokens = {14, 17}});
  RunCase({.name = "TP=2 sequence parallel x CP=2, every 5th token padding, capacity 1.25",
           .layout = {.world_size = 4, .tp = 2, .cp = 2, .etp = 1},
           .capacity_factor = 1.25,
           .pad_every = 5,
           .dp_tokens = {23},
           .aux = gate::AuxLoss::kBatch,
           .z_loss = 0.01,
           .sequence_parallel = true});
  RunCase({.name = "TP=2 slicing, expert choice, every 3rd token padding",
           .layout = {.world_size = 2, .tp = 2, .etp = 1},
           .capacity_factor = 1.0,
           .pad_every = 3,
           .dp_tokens = {20},
           .expert_choice = true});
}

TEST(MoELayerEquivalenceTest, ExpertParallel2RankWhoseExpertsGetNothing) {
  // Experts 4-7 live on EP rank 1: it receives no row, runs empty GEMMs and sends nothing back.
  RunCase({.name = "EP=2, experts 4-7 (all of EP rank 1's) get nothing",
           .layout = {.world_size = 2, .ep = 2},
           .dp_tokens = {10, 9},
           .silent_experts = {4, 5, 6, 7}});
}

TEST(MoELayerEquivalenceTest, ExpertParallel4TopK8) {
  // 16 experts, so k = 8 leaves uneven counts (and all-to-all splits) per expert.
  RunCase({.name = "EP=4, k=8 of 16 experts",
           .layout = {.world_size = 4, .ep = 4},
           .num_experts = 16,
           .top_k = 8,
           .dp_tokens = {8, 9, 7, 8}});
}

TEST(MoELayerEquivalenceTest, EveryTokenToEveryExpert) {
  RunCase({.name = "EP=4, k=8 of 8 experts", .layout = {.world_size = 4, .ep = 4}, .top_k = 8, .dp_tokens = {5, 6, 4, 5}});
}

TEST(MoELayerEquivalenceTest, DataParallel2xExpertParallel2TopK1WithDrops) {
  RunCase({.name = "DP=2 x EP=2, k=1, capacity 1.0 by score",
           .layout = {.world_size = 4, .ep = 2},
           .top_k = 1,
           .capacity_factor = 1.0,
           .dp_tokens = {16, 16, 16, 16}});
}

TEST(MoELayerEquivalenceTest, TensorParallel2WithSlicing) {
  // 9 tokens per block over 2 TP slices: 5 and 4; GELU experts.
  RunCase({.name = "TP=2 slicing, a shared expert",
           .layout = {.world_size = 2, .tp = 2, .etp = 1},
           .activation = Activation::kGelu,
           .shared_experts = 1,
           .dp_tokens = {9}});
}

TEST(MoELayerEquivalenceTest, TensorParallel2SliceWithoutTokens) {
  // One token over 2 TP slices: TP rank 1 routes nothing but still gathers the output.
  RunCase({.name = "TP=2 slicing, one token",
           .layout = {.world_size = 2, .tp = 2, .etp = 1},
           .shared_experts = 1,
           .dp_tokens = {1},
           .ranks_without_tokens = 1});
}

// Each TP slice's losses are its share of the block's: with TP = 2 the batch and sequence
// aux losses and the z-loss (and their router gradients) are those of TP = 1, not twice them.
TEST(MoELayerEquivalenceTest, TensorParallel2SlicesShareTheBlockLosses) {
  RunCase({.name = "TP=2 slicing, batch aux loss and z-loss",
           .layout = {.world_size = 2, .tp = 2, .etp = 1},
           .dp_tokens = {13},
           .aux = gate::AuxLoss::kBatch,
           .z_loss = 0.01});
  // 3 sequences of 6 over slices of 9 and 9 tokens: sequence 1 is split between them.
  RunCase({.name = "TP=2 x DP=2 slicing, per-sequence aux loss and z-loss",
           .layout = {.world_size = 4, .tp = 2, .etp = 1},
           .dp_tokens = {18, 12},
           .aux = gate::AuxLoss::kSequence,
           .z_loss = 0.01,
           .seq_len = 6});
}

TEST(MoELayerEquivalenceTest, SequenceParallelTensorParallel2xExpertParallel2) {
  // Each TP rank holds its own share of the block (7 + 7 and 6 + 5 tokens).
  RunCase({.name = "TP=2 sequence parallel x EP=2, batch aux loss and z-loss, capacity 1.0",
           .layout = {.world_size = 4, .tp = 2, .ep = 2, .etp = 1},
           .capacity_factor = 1.0,
           .dp_tokens = {14, 11},
           .aux = gate::AuxLoss::kBatch,
           .z_loss = 0.01,
           .sequence_parallel = true});
  RunCase({.name = "TP=2 sequence parallel, per-sequence aux loss, a sequence split between the ranks",
           .layout = {.world_size = 2, .tp = 2, .etp = 1},
           .dp_tokens = {15},
           .aux = gate::AuxLoss::kSequence,
           .seq_len = 5,
           .sequence_parallel = true});
  // Megatron-Core's layout under CP: 3 sequences of 8 tokens position by position, each CP
  // rank 4 positions (12 tokens) and each TP rank a share of them (6 and 6); then 6
  // sequences of 6 sliced, each CP rank 3 positions (18 tokens), each TP slice 9.
  RunCase({.name = "CP=2 x TP=2 sequence parallel, per-sequence aux loss, [seq, batch] tokens",
           .layout = {.world_size = 4, .tp = 2, .cp = 2, .etp = 1},
           .dp_tokens = {24},
           .aux = gate::AuxLoss::kSequence,
           .z_loss = 0.01,
           .seq_len = 8,
           .sequence_order = gate::SequenceOrder::kInterleaved,
           .sequence_parallel = true});
  RunCase({.name = "CP=2 x TP=2 slicing, per-sequence aux loss, [seq, batch] tokens, capacity 1.0",
           .layout = {.world_size = 4, .tp = 2, .cp = 2, .etp = 1},
           .capacity_factor = 1.0,
           .dp_tokens = {36},
           .aux = gate::AuxLoss::kSequence,
           .seq_len = 6,
           .sequence_order = gate::SequenceOrder::kInterleaved});
  // Megatron-Core's layout: 3 sequences of 5 tokens position by position, each TP rank a
  // [seq / tp, batch] share (8 and 7 tokens) holding part of every sequence.
  RunCase({.name = "TP=2 sequence parallel x EP=2, per-sequence aux loss, [seq, batch] tokens",
           .layout = {.world_size = 4, .tp = 2, .ep = 2, .etp = 1},
           .dp_tokens = {15, 20},
           .aux = gate::AuxLoss::kSequence,
           .seq_len = 5,
           .sequence_order = gate::SequenceOrder::kInterleaved,
           .sequence_parallel = true});
}

TEST(MoELayerEquivalenceTest, SequenceParallelGlobalAuxLossWithAnEmptyShare) {
  // 3 tokens in block 0 over 2 TP ranks (2 and 1), 1 token in block 1 (1 and 0).
  RunCase({.name = "TP=2 sequence parallel x DP=2, global aux loss and z-loss, a rank without tokens",
           .layout = {.world_size = 4, .tp = 2},
           .dp_tokens = {3, 1},
           .ranks_without_tokens = 1,
           .z_loss = 0.01,
           .sequence_parallel = true});
}

// Training with input jitter and noisy gating: the TP ranks draw their block's noise and
// keep their rows, so TP = 2 routes as one process does (the noise weight's gradient too).
TEST(MoELayerEquivalenceTest, TensorParallel2TrainingWithJitterAndNoise) {
  RunCase({.name = "TP=2 slicing, training: jitter, noisy gating, batch aux loss and z-loss",
           .layout = {.world_size = 2, .tp = 2, .etp = 1},
           .dp_tokens = {13},
           .aux = gate::AuxLoss::kBatch,
           .z_loss = 0.01,
           .training = true});
  RunCase({.name = "TP=2 sequence parallel, EP=2 over the same two ranks, training: jitter, noisy gating",
           .layout = {.world_size = 2, .tp = 2, .ep = 2, .etp = 1},
           .dp_tokens = {11},
           .sequence_parallel = true,
           .training = true});
}

// Context parallelism: each CP rank holds its chunk of the replica's tokens (CP rank 0 the
// first ones); a block is the TP x CP ranks' tokens, over which capacity and the losses are
// counted, as one process counts them over the replica's micro-batch.
TEST(MoELayerEquivalenceTest, ContextParallel) {
  RunCase({.name = "CP=2, capacity 1.0 (drops), batch aux loss and z-loss, chunks of 8 and 7",
           .layout = {.world_size = 2, .cp = 2},
           .capacity_factor = 1.0,
           .dp_tokens = {15},
           .aux = gate::AuxLoss::kBatch,
           .z_loss = 0.01});
  RunCase({.name = "CP=2 x EP=2 x DP=2, dropless, global aux loss, a shared expert",
           .layout = {.world_size = 4, .cp = 2, .ep = 2},
           .shared_experts = 1,
           .dp_tokens = {14, 11}});
  RunCase({.name = "TP=2 slicing x CP=2, capacity 0.5, z-loss, a slice without tokens (chunks of 2 and 1)",
           .layout = {.world_size = 4, .tp = 2, .cp = 2, .etp = 1},
           .capacity_factor = 0.5,
           .dp_tokens = {3},
           .ranks_without_tokens = 1,
           .aux = gate::AuxLoss::kBatch,
           .z_loss = 0.01});
  RunCase({.name = "TP=2 slicing x CP=2 x EP=2, capacity 1.0, padded",
           .layout = {.world_size = 4, .tp = 2, .cp = 2, .ep = 2, .etp = 1},
           .capacity_factor = 1.0,
           .pad_to_capacity = true,
           .dp_tokens = {19},
           .aux = gate::AuxLoss::kBatch});
  RunCase({.name = "TP=2 sequence parallel x CP=2 x DP=2, ETP=2 x EP=2, capacity 1.0, z-loss",
           .layout = {.world_size = 8, .tp = 2, .cp = 2, .ep = 2},
           .capacity_factor = 1.0,
           .dp_tokens = {17, 12},
           .aux = gate::AuxLoss::kBatch,
           .z_loss = 0.01,
           .sequence_parallel = true});
  RunCase({.name = "CP=2, training: jitter, noisy gating, batch aux loss",
           .layout = {.world_size = 2, .cp = 2},
           .dp_tokens = {13},
           .aux = gate::AuxLoss::kBatch,
           .training = true});
  RunCase({.name = "expert choice, CP=2 x EP=2, capacity 1.0, z-loss",
           .layout = {.world_size = 2, .cp = 2, .ep = 2},
           .capacity_factor = 1.0,
           .dp_tokens = {12},
           .z_loss = 0.01,
           .expert_choice = true});
  RunCase({.name = "TP=2 sequence parallel x CP=2, global aux loss, a CP chunk without tokens (1 token: 1 + 0, 0 + 0)",
           .layout = {.world_size = 4, .tp = 2, .cp = 2, .etp = 1},
           .dp_tokens = {1},
           .ranks_without_tokens = 3,
           .sequence_parallel = true});
  // An order string with cp before tp: the tp_cp group's members are TP-major, the block's
  // parts still CP-major (the noise rows of one process's order).
  RunCase({.name = "order cp-tp-ep-dp-pp: TP=2 sequence parallel x CP=2, training: jitter, noisy gating, capacity 1.0",
           .layout = {.world_size = 4, .tp = 2, .cp = 2, .etp = 1, .order = "cp-tp-ep-dp-pp"},
           .capacity_factor = 1.0,
           .dp_tokens = {15},
           .aux = gate::AuxLoss::kBatch,
           .z_loss = 0.01,
           .sequence_parallel = true,
           .training = true});
  RunCase({.name = "order cp-tp-ep-dp-pp: TP=2 slicing x CP=2 x EP=2, capacity 0.75",
           .layout = {.world_size = 4, .tp = 2, .cp = 2, .ep = 2, .etp = 1, .order = "cp-tp-ep-dp-pp"},
           .capacity_factor = 0.75,
           .dp_tokens = {13},
           .aux = gate::AuxLoss::kBatch});
  RunCase({.name = "CP=2 x EP=2, bf16, capacity 1.0",
           .layout = {.world_size = 2, .cp = 2, .ep = 2},
           .capacity_factor = 1.0,
           .dp_tokens = {14},
           .dtype = at::kBFloat16,
           .tolerance = 2e-2,
           .aux = gate::AuxLoss::kBatch});
}

// Ranks as processes over a TCP store, one rank per process as the launcher runs them (no
// state shared between ranks but what travels over Gloo).
TEST(MoELayerEquivalenceTest, RanksAsProcesses) {
  RunCase({.name = "processes: DP=4 as EP=2 x EDP=2, capacity 1.0, a shared expert, a rank without tokens",
           .layout = {.world_size = 4, .ep = 2},
           .capacity_factor = 1.0,
           .shared_experts = 1,
           .dp_tokens = {14, 11, 0, 9},
           .ranks_without_tokens = 1,
           .processes = true});
  RunCase({.name = "processes: TP=2 sequence parallel x CP=2 x EP=2, ETP=2, capacity 1.0, z-loss",
           .layout = {.world_size = 4, .tp = 2, .cp = 2, .ep = 2, .etp = 2},
           .capacity_factor = 1.0,
           .dp_tokens = {17},
           .aux = gate::AuxLoss::kBatch,
           .z_loss = 0.01,
           .sequence_parallel = true,
           .processes = true});
}

// Softmax over all experts before top-k (the job spec's default): the aux loss reads the
// routing's own scores and choice (one softmax for both, its gradient from both); the
// reference computes them apart (gate::AuxLossScores).
TEST(MoELayerEquivalenceTest, SoftmaxBeforeTopK) {
  RunCase({.name = "pre-softmax, EP=2, batch aux loss and z-loss, capacity 1.0",
           .layout = {.world_size = 2, .ep = 2},
           .capacity_factor = 1.0,
           .dp_tokens = {14, 11},
           .aux = gate::AuxLoss::kBatch,
           .z_loss = 0.01,
           .pre_softmax = true});
  RunCase({.name = "pre-softmax, TP=2 sequence parallel, per-sequence aux loss",
           .layout = {.world_size = 2, .tp = 2, .etp = 1},
           .dp_tokens = {15},
           .aux = gate::AuxLoss::kSequence,
           .seq_len = 5,
           .sequence_parallel = true,
           .pre_softmax = true});
  RunCase({.name = "pre-softmax, DP=4 as EP=2 x EDP=2, global aux loss, dropless",
           .layout = {.world_size = 4, .ep = 2},
           .dp_tokens = {9, 12, 7, 10},
           .pre_softmax = true});
  RunCase({.name = "pre-softmax, TP=2 slicing, training: jitter, noisy gating, batch aux loss",
           .layout = {.world_size = 2, .tp = 2, .etp = 1},
           .dp_tokens = {13},
           .aux = gate::AuxLoss::kBatch,
           .training = true,
           .pre_softmax = true});
}

TEST(MoELayerEquivalenceTest, DataParallel2xExpertParallel2SequenceAuxAndZLoss) {
  RunCase({.name = "DP=2 x EP=2, per-sequence aux loss and z-loss",
           .layout = {.world_size = 4, .ep = 2},
           .dp_tokens = {8, 12, 4, 8},
           .aux = gate::AuxLoss::kSequence,
           .z_loss = 0.01,
           .seq_len = 4});
}

TEST(MoELayerEquivalenceTest, TensorParallel2xExpertParallel2Dropless) {
  // DP block 0 is empty: both of its TP slices route nothing.
  RunCase({.name = "TP=2 x EP=2 dropless, one DP block without tokens",
           .layout = {.world_size = 4, .tp = 2, .ep = 2, .etp = 1},
           .dp_tokens = {0, 7},
           .ranks_without_tokens = 2});
}

TEST(MoELayerEquivalenceTest, TensorParallel2xExpertParallel2PaddedCapacityByPosition) {
  RunCase({.name = "TP=2 x EP=2, capacity 0.75 by position, padded [E, C, H] blocks",
           .layout = {.world_size = 4, .tp = 2, .ep = 2, .etp = 1},
           .capacity_factor = 0.75,
           .drop_policy = DropPolicy::kByPosition,
           .pad_to_capacity = true,
           .dp_tokens = {20, 18}});
}

TEST(MoELayerEquivalenceTest, ExpertTensorParallel2xExpertParallel2SwigluShared) {
  RunCase({.name = "ETP=2 x EP=2, SwiGLU + 2 shared experts",
           .layout = {.world_size = 4, .tp = 2, .ep = 2, .etp = 2},
           .shared_experts = 2,
           .dp_tokens = {14, 17}});
  // The gate's weight is replicated across TP and fed each rank's tokens: summed over TP.
  RunCase({.name = "ETP=2 x EP=2 slicing, a gated shared expert",
           .layout = {.world_size = 4, .tp = 2, .ep = 2, .etp = 2},
           .shared_experts = 1,
           .shared_gate = true,
           .dp_tokens = {14, 17}});
  RunCase({.name = "TP=2 sequence parallel x EP=2, a gated shared expert, capacity 1.0",
           .layout = {.world_size = 4, .tp = 2, .ep = 2, .etp = 1},
           .capacity_factor = 1.0,
           .shared_experts = 1,
           .shared_gate = true,
           .dp_tokens = {14, 17},
           .sequence_parallel = true});
}

TEST(MoELayerEquivalenceTest, ExpertTensorParallelWithoutGating) {
  // GELU and ReLU split fc1 by columns alone (no gate/up halves).
  RunCase({.name = "ETP=2 x EP=2, GELU, k=1, a shared expert",
           .layout = {.world_size = 4, .tp = 2, .ep = 2, .etp = 2},
           .top_k = 1,
           .activation = Activation::kGelu,
           .shared_experts = 1,
           .dp_tokens = {11, 10}});
  RunCase({.name = "ETP=2 x EP=2, ReLU, capacity 1.0",
           .layout = {.world_size = 4, .tp = 2, .ep = 2, .etp = 2},
           .capacity_factor = 1.0,
           .activation = Activation::kRelu,
           .dp_tokens = {12, 14}});
}

TEST(MoELayerEquivalenceTest, ExpertTensorParallelWithExpertDataParallel) {
  // 8 ranks: ETP 2 x EP 2 x EDP 2 (TP 2 x DP 4 on the dense grid), capacity, shared expert.
  RunCase({.name = "ETP=2 x EP=2 x EDP=2 on 8 ranks, capacity 1.0",
           .layout = {.world_size = 8, .tp = 2, .ep = 2, .etp = 2},
           .capacity_factor = 1.0,
           .shared_experts = 1,
           .dp_tokens = {9, 12, 0, 7},
           .ranks_without_tokens = 2});
  // ETP above TP: TP 1, so every rank routes its own DP block; ETP 2 x EP 2 over 4 of them.
  RunCase({.name = "ETP=2 x EP=2 with TP=1 (DP=4)",
           .layout = {.world_size = 4, .tp = 1, .ep = 2, .etp = 2},
           .dp_tokens = {6, 5, 8, 3}});
}

// Expert choice: every expert picks its capacity from the DP block's tokens, also when the
// TP ranks route slices or shares of it.
TEST(MoELayerEquivalenceTest, ExpertChoiceUnderLayouts) {
  RunCase({.name = "expert choice, DP=2 x EP=2, capacity 1.0",
           .layout = {.world_size = 4, .ep = 2},
           .capacity_factor = 1.0,
           .dp_tokens = {10, 7, 0, 12},
           .ranks_without_tokens = 1,
           .expert_choice = true});
  RunCase({.name = "expert choice, TP=2 slicing x EP=2, capacity 1.5, z-loss",
           .layout = {.world_size = 4, .tp = 2, .ep = 2, .etp = 1},
           .capacity_factor = 1.5,
           .dp_tokens = {13, 9},
           .z_loss = 0.01,
           .expert_choice = true});
  RunCase({.name = "expert choice, TP=2 sequence parallel, capacity 2.0, shared expert",
           .layout = {.world_size = 2, .tp = 2, .etp = 1},
           .capacity_factor = 2.0,
           .shared_experts = 1,
           .dp_tokens = {11},
           .sequence_parallel = true,
           .expert_choice = true});
}

TEST(MoELayerEquivalenceTest, SilentExpertAndRankWithoutTokens) {
  RunCase({.name = "EP=2 x DP=2, expert 5 gets nothing, rank 0 has no tokens, ReLU",
           .layout = {.world_size = 4, .ep = 2},
           .activation = Activation::kRelu,
           .dp_tokens = {0, 10, 12, 9},
           .silent_experts = {5},
           .ranks_without_tokens = 1});
}

TEST(MoELayerEquivalenceTest, RankWithoutTokensUnderCapacity) {
  RunCase({.name = "DP=2 x EP=2, capacity 1.25, rank 2 has no tokens (its aux loss is 0)",
           .layout = {.world_size = 4, .ep = 2},
           .capacity_factor = 1.25,
           .dp_tokens = {11, 13, 0, 12},
           .ranks_without_tokens = 1});
}

TEST(MoELayerEquivalenceTest, TopK8WithCapacityUnderEtpAndEp) {
  RunCase({.name = "ETP=2 x EP=2, k=8 of 16 experts, capacity 0.5, a shared expert",
           .layout = {.world_size = 4, .tp = 2, .ep = 2, .etp = 2},
           .num_experts = 16,
           .top_k = 8,
           .capacity_factor = 0.5,
           .shared_experts = 1,
           .dp_tokens = {12, 12}});
}

// bf16 and fp16 experts under EP and ETP against the single-rank layer of the same dtype: the router is fp32 on the
// same bf16 inputs, so routing agrees; expert GEMMs over differently sized blocks round
// differently, hence the tolerance (a doubled or missing gradient is off by 100 %).
TEST(MoELayerEquivalenceTest, Bf16AndFp16UnderExpertAndExpertTensorParallel) {
  RunCase({.name = "EP=2, bf16",
           .layout = {.world_size = 2, .ep = 2},
           .shared_experts = 1,
           .dp_tokens = {16, 11},
           .dtype = at::kBFloat16,
           .tolerance = 2e-2});
  RunCase({.name = "ETP=2 x EP=2, bf16, capacity 1.0",
           .layout = {.world_size = 4, .tp = 2, .ep = 2, .etp = 2},
           .capacity_factor = 1.0,
           .dp_tokens = {14, 17},
           .dtype = at::kBFloat16,
           .tolerance = 2e-2});
  // fp16 (the spec's FP16 precision): 3 more mantissa bits than bf16 (observed 7.3e-4).
  RunCase({.name = "EP=2, fp16",
           .layout = {.world_size = 2, .ep = 2},
           .shared_experts = 1,
           .dp_tokens = {16, 11},
           .dtype = at::kHalf,
           .tolerance = 4e-3});
  RunCase({.name = "ETP=2 x EP=2, fp16, capacity 1.0",
           .layout = {.world_size = 4, .tp = 2, .ep = 2, .etp = 2},
           .capacity_factor = 1.0,
           .dp_tokens = {14, 17},
           .dtype = at::kHalf,
           .tolerance = 4e-3});
}

// The single-process layer against the mixture written with plain ATen ops and autograd:
// y = Σ_e probs[:, e] ⊙ mlp_e(x) over every expert (probs are 0 where a token did not go)
// plus the shared expert, on the layer's own weights and routing function; output and the
// gradients of x and every parameter, with capacity drops and without, k = 1, 2, 4 and 8; on
// 3000 tokens also with 2 and 3 intra-op threads, so that routing, plan, permutation and
// sums run in several parallel chunks (Debian's LibTorch starts a test with one thread).
TEST(MoELayerTest, MatchesPlainOpsMixture) {
  const int threads = at::get_num_threads();
  for (auto [k, cf, T, n] : {std::tuple<int, double, int64_t, int>{2, 0.0, 40, 1}, {1, 0.0, 40, 1},
                             {8, 0.0, 40, 1}, {2, 1.0, 40, 1}, {2, 0.0, 3000, 2}, {4, 1.0, 3000, 3}}) {
    SCOPED_TRACE(absl::StrFormat("k = %d, capacity factor %g, %d tokens, %d threads", k, cf, T, n));
    at::set_num_threads(n);
    Case c{.top_k = k, .capacity_factor = cf, .shared_experts = 1};
    const MoEConfig cfg = Config(c);
    auto layer = MoELayer::Create(cfg, kSeed);
    ASSERT_TRUE(layer.ok()) << layer.status();
    at::manual_seed(5);
    const at::Tensor x0 = at::randn({T, kHidden}), R = at::randn({T, kHidden});
    at::Tensor x = x0.clone().requires_grad_(true);
    auto out = layer->Forward(x, {.training = true});
    ASSERT_TRUE(out.ok()) << out.status();
    ((out->output * R).sum() + out->aux_loss).backward();

    auto leaf = [](const at::Tensor& t) { return t.detach().clone().requires_grad_(true); };
    at::Tensor xr = leaf(x0), wr = leaf(layer->router().weight());
    at::Tensor fc1 = leaf(layer->routed_experts().fc1()), fc2 = leaf(layer->routed_experts().fc2());
    at::Tensor sfc1 = leaf(layer->shared_experts()->fc1()), sfc2 = leaf(layer->shared_experts()->fc2());
    auto mlp = [](const at::Tensor& h, const at::Tensor& w1, const at::Tensor& w2) {
      const at::Tensor a = at::mm(h, w1);
      const int64_t f = a.size(1) / 2;
      return at::mm(at::silu(a.narrow(1, 0, f)) * a.narrow(1, f, f), w2);
    };
    const at::Tensor logits = at::mm(xr, wr.t());
    absl::StatusOr<gate::Routing> r = gate::TopKRoute(logits, cfg.router.topk);
    ASSERT_TRUE(r.ok()) << r.status();
    at::Tensor y = mlp(xr, sfc1[0], sfc2[0]);
    for (int e = 0; e < kExperts; ++e) y = y + r->probs.narrow(1, e, 1) * mlp(xr, fc1[e], fc2[e]);
    absl::StatusOr<gate::AuxLossInputs> in = gate::AuxLossScores(logits, k, cfg.router.topk.score);
    ASSERT_TRUE(in.ok());
    const at::Tensor aux = gate::LoadBalancingLoss(in->scores, in->tokens_per_expert, T, k, cfg.router.aux_loss_coeff);
    ((y * R).sum() + aux).backward();

    EXPECT_GT(out->dropped, cf > 0 && k > 1 ? 0 : -1);
    EXPECT_LT(RelErr(out->output, y.detach()), 1e-5);
    EXPECT_NEAR(out->aux_loss_value, aux.item<double>(), 1e-7);
    EXPECT_LT(RelErr(x.grad(), xr.grad()), 1e-5);
    EXPECT_LT(RelErr(layer->router().weight().grad(), wr.grad()), 1e-5);
    EXPECT_LT(RelErr(layer->routed_experts().fc1().grad(), fc1.grad()), 1e-5);
    EXPECT_LT(RelErr(layer->routed_experts().fc2().grad(), fc2.grad()), 1e-5);
    EXPECT_LT(RelErr(layer->shared_experts()->fc1().grad(), sfc1.grad()), 1e-5);
    EXPECT_LT(RelErr(layer->shared_experts()->fc2().grad(), sfc2.grad()), 1e-5);
  }
  at::set_num_threads(threads);
}

// Every field of every parameter's tag, and its local shape, against what the layout says
// (computed here from the layout's coordinates, not read back from the layer).
TEST(MoELayerTest, TagsEveryParameter) {
  MoEConfig c = Config({.shared_experts = 1, .shared_gate = true});
  c.name = "layers.3.mlp";
  c.router.noisy_gating = true;
  const int64_t H = kHidden, F = kFfn, Fs = kFfn;  // one shared expert of F
  for (const groups::LayoutSpec& spec :
       {groups::LayoutSpec{.world_size = 2}, groups::LayoutSpec{.world_size = 4, .ep = 4},
        groups::LayoutSpec{.world_size = 4, .tp = 2, .ep = 2, .etp = 1},
        groups::LayoutSpec{.world_size = 4, .tp = 2, .ep = 2, .etp = 2}}) {
    SCOPED_TRACE(absl::StrFormat("world %d, tp %d, ep %d, etp %d", spec.world_size, spec.tp, spec.ep, spec.etp));
    absl::Status s = groups::testing::RunRanks({.layout = spec}, [&](Communicator& comm) -> absl::Status {
      auto layer = MoELayer::Create(c, kSeed, &comm);
      if (!layer.ok()) return layer.status();
      const groups::Layout& l = comm.layout();
      const groups::ExpertCoord e = l.Expert(comm.rank());
      const int local = kExperts / l.ep();
      const int64_t fl = F / l.etp();
      const ParamDomain replicated = l.tp() > 1 ? ParamDomain::kDenseTpReplicated : ParamDomain::kDense;
      const ParamTag dense{.domain = replicated};
      const ParamTag expert{.domain = ParamDomain::kExpert,
                            .expert_group = "layers.3.mlp",
                            .first_global_expert = local * e.ep,
                            .num_local_experts = local,
                            .ep_size = l.ep(),
                            .etp_size = l.etp()};
      const std::vector<std::tuple<std::string, ParamTag, std::vector<int64_t>>> want = {
          {"router.weight", dense, {kExperts, H}},
          {"router.noise_weight", dense, {kExperts, H}},
          {"experts.fc1", expert, {local, H, 2 * fl}},  // SwiGLU: gate and up slices
          {"experts.fc2", expert, {local, fl, H}},
          {"shared_experts.fc1", dense, {1, H, 2 * Fs}},
          {"shared_experts.fc2", dense, {1, Fs, H}},
          {"shared_experts.gate_weight", dense, {1, H}}};
      const std::vector<TaggedParam> params = layer->Parameters();
      EXPECT_EQ(params.size(), want.size());
      for (size_t i = 0; i < std::min(params.size(), want.size()); ++i) {
        const auto& [name, tag, shape] = want[i];
        const ParamTag& got = params[i].tag;
        SCOPED_TRACE(name);
        EXPECT_EQ(got.name, "layers.3.mlp." + name);
        EXPECT_EQ(got.domain, tag.domain);
        EXPECT_EQ(got.expert_group, tag.expert_group);
        EXPECT_EQ(got.first_global_expert, tag.first_global_expert);
        EXPECT_EQ(got.num_local_experts, tag.num_local_experts);
        EXPECT_EQ(got.ep_size, tag.ep_size);
        EXPECT_EQ(got.etp_size, tag.etp_size);
        EXPECT_EQ(params[i].tensor.sizes().vec(), shape);
        EXPECT_TRUE(params[i].tensor.requires_grad());
      }
      // The tags share the layer's tensors (the optimizer steps these).
      EXPECT_TRUE(params[0].tensor.is_same(layer->router().weight()));
      EXPECT_TRUE(params[2].tensor.is_same(layer->routed_experts().fc1()));
      return absl::OkStatus();
    });
    EXPECT_TRUE(s.ok()) << s;
  }
  // One process: everything dense, the experts all local.
  auto one = MoELayer::Create(c, kSeed);
  ASSERT_TRUE(one.ok()) << one.status();
  for (const TaggedParam& p : one->Parameters()) {
    EXPECT_EQ(p.tag.domain == ParamDomain::kExpert, p.tag.name.find(".experts.") != std::string::npos) << p.tag.name;
    if (p.tag.domain == ParamDomain::kExpert) {
      EXPECT_EQ(p.tag.first_global_expert, 0);
      EXPECT_EQ(p.tag.num_local_experts, kExperts);
      EXPECT_EQ(p.tag.ep_size, 1);
    } else {
      EXPECT_EQ(p.tag.domain, ParamDomain::kDense) << p.tag.name;
    }
  }
}

// A token mask is the layer without the masked tokens: the real tokens' outputs, gradients,
// losses, counts and drops are those of the layer run on them alone (bit for bit), and the
// masked rows' outputs and gradients are 0.
TEST(MoELayerTest, MaskedTokensAreNotThere) {
  for (const Case& c : {Case{.capacity_factor = 1.0, .shared_experts = 1, .aux = gate::AuxLoss::kBatch, .z_loss = 0.01},
                        Case{.aux = gate::AuxLoss::kGlobal},
                        Case{.capacity_factor = 0.75, .expert_choice = true}}) {
    at::manual_seed(8);
    const at::Tensor x0 = at::randn({30, kHidden}), R = at::randn({30, kHidden});
    const at::Tensor valid = at::rand({30}) > 0.4;
    const at::Tensor keep = valid.nonzero().squeeze(1);
    std::vector<at::Tensor> grads[2];
    MoEOutput outs[2];
    for (int masked = 0; masked < 2; ++masked) {
      auto layer = MoELayer::Create(Config(c), kSeed);
      ASSERT_TRUE(layer.ok()) << layer.status();
      at::Tensor x = (masked ? x0 : x0.index_select(0, keep)).clone().requires_grad_(true);
      auto out = layer->Forward(x, {.training = true, .valid_tokens = masked ? valid : at::Tensor()});
      ASSERT_TRUE(out.ok()) << out.status();
      const at::Tensor r = masked ? R : R.index_select(0, keep);
      ((out->output * r).sum() + out->aux_loss + out->z_loss).backward();
      if (masked) {
        EXPECT_TRUE(out->output.index_select(0, (~valid).nonzero().squeeze(1)).eq(0).all().item<bool>());
        EXPECT_TRUE(x.grad().index_select(0, (~valid).nonzero().squeeze(1)).eq(0).all().item<bool>());
        out->output = out->output.index_select(0, keep);
        grads[1].push_back(x.grad().index_select(0, keep));
      } else {
        grads[0].push_back(x.grad());
      }
      for (const TaggedParam& p : layer->Parameters()) grads[masked].push_back(p.tensor.grad());
      outs[masked] = *out;
    }
    EXPECT_TRUE(outs[1].output.equal(outs[0].output));
    ASSERT_EQ(grads[0].size(), grads[1].size());
    for (size_t i = 0; i < grads[0].size(); ++i) EXPECT_TRUE(grads[1][i].equal(grads[0][i])) << "gradient " << i;
    EXPECT_EQ(outs[1].aux_loss_value, outs[0].aux_loss_value);
    EXPECT_EQ(outs[1].z_loss_value, outs[0].z_loss_value);
    EXPECT_TRUE(outs[1].tokens_per_expert.equal(outs[0].tokens_per_expert));
    EXPECT_EQ(outs[1].dropped, outs[0].dropped);
    if (c.capacity_factor > 0 && !c.expert_choice) {
      EXPECT_GT(outs[1].dropped, 0);
    }
  }
  // Bad masks, and the per-sequence loss, whose sequences a mask would cut.
  auto layer = MoELayer::Create(Config({}), kSeed);
  ASSERT_TRUE(layer.ok());
  const at::Tensor x = at::randn({6, kHidden});
  for (const at::Tensor& m : {at::ones({6}, at::kInt), at::ones({6, 1}, at::kBool), at::ones({7}, at::kBool)}) {
    EXPECT_THAT(std::string(layer->Forward(x, {.valid_tokens = m}).status().message()),
                HasSubstr("valid_tokens must be a [6] bool CPU tensor, one entry per token"));
  }
  auto seq = MoELayer::Create(Config({.aux = gate::AuxLoss::kSequence}), kSeed);
  ASSERT_TRUE(seq.ok());
  EXPECT_THAT(std::string(seq->Forward(x, {.training = true, .valid_tokens = at::ones({6}, at::kBool)}).status().message()),
              HasSubstr("valid_tokens with the per-sequence aux loss is not supported"));
}

// Padding [E, C, H] blocks changes the layout in memory, not the numbers.
TEST(MoELayerTest, PaddingToCapacityChangesNoNumber) {
  std::vector<at::Tensor> results[2];
  for (bool pad : {false, true}) {
    auto layer = MoELayer::Create(Config({.capacity_factor = 0.75, .pad_to_capacity = pad}), kSeed);
    ASSERT_TRUE(layer.ok()) << layer.status();
    at::manual_seed(3);
    at::Tensor x = at::randn({40, kHidden}).requires_grad_(true);
    const at::Tensor R = at::randn({40, kHidden});
    auto out = layer->Forward(x, {});
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_GT(out->dropped, 0);
    ((out->output * R).sum() + out->aux_loss).backward();
    results[pad] = {out->output.detach(), x.grad(), layer->router().weight().grad(), layer->routed_experts().fc1().grad(),
                    layer->routed_experts().fc2().grad()};
  }
  for (size_t i = 0; i < results[0].size(); ++i) {
    EXPECT_LT(RelErr(results[1][i], results[0][i]), 1e-6) << "tensor " << i;
  }
}

// Bad input on one rank stops every rank of the stage at once with a clear error, instead
// of leaving the others in their next collective until the timeout (5 s here: a hang would
// show as a timeout message, not these).
TEST(MoELayerTest, BadInputOnOneRankStopsEveryRankAtOnce) {
  auto run = [](const groups::LayoutSpec& layout, const MoEConfig& cfg,
                std::function<absl::Status(MoELayer&, int)> fn) {
    std::mutex mu;
    std::vector<std::string> errors(layout.world_size);
    absl::Status s = groups::testing::RunRanks({.layout = layout, .collective_timeout = std::chrono::seconds(5)},
                                               [&](Communicator& comm) -> absl::Status {
      auto layer = MoELayer::Create(cfg, kSeed, &comm);
      if (!layer.ok()) return layer.status();
      const absl::Status st = fn(*layer, comm.rank());
      std::lock_guard<std::mutex> l(mu);
      errors[comm.rank()] = st.ok() ? "ok" : std::string(st.message());
      return absl::OkStatus();
    });
    EXPECT_TRUE(s.ok()) << s;
    return errors;
  };
  at::manual_seed(2);
  const at::Tensor good = at::randn({6, kHidden});
  at::Tensor nan = good.clone();
  nan[0][3] = NAN;
  MoEConfig sp = Config({});
  sp.sequence_parallel = true;
  // Sequence parallel: rank 0's share holds a NaN, then rank 1's has the wrong width.
  std::vector<std::string> e = run({.world_size = 2, .tp = 2}, sp, [&](MoELayer& l, int rank) {
    return l.Forward(rank == 0 ? nan : good, {}).status();
  });
  EXPECT_THAT(e[0], HasSubstr("hidden states hold NaN or inf"));
  EXPECT_THAT(e[1], HasSubstr("another rank stopped before routing"));
  e = run({.world_size = 2, .tp = 2}, sp, [&](MoELayer& l, int rank) {
    return l.Forward(rank == 1 ? at::randn({6, kHidden + 1}) : good, {}).status();
  });
  EXPECT_THAT(e[0], HasSubstr("had bad hidden states"));
  EXPECT_THAT(e[1], HasSubstr("hidden states must be [tokens, 8]"));
  // Finite hidden states whose logits overflow, on rank 0's share only: the router's block
  // check stops both.
  at::Tensor huge = good.clone();
  huge[1].fill_(3e38f);
  e = run({.world_size = 2, .tp = 2}, sp, [&](MoELayer& l, int rank) -> absl::Status {
    if (rank == 0 && at::isfinite(at::mm(huge, l.router().weight().detach().t())).all().item<bool>()) {
      return absl::InternalError("the test's logits do not overflow");
    }
    return l.Forward(rank == 0 ? huge : good, {}).status();
  });
  EXPECT_THAT(e[0], HasSubstr("logits contain NaN or inf on finite hidden states"));
  EXPECT_THAT(e[1], HasSubstr("another rank stopped before routing"));
  // A bad token mask on one sequence-parallel rank: both stop.
  e = run({.world_size = 2, .tp = 2}, sp, [&](MoELayer& l, int rank) {
    return l.Forward(good, {.valid_tokens = rank == 1 ? at::ones({5}, at::kBool) : at::ones({6}, at::kBool)}).status();
  });
  EXPECT_THAT(e[0], HasSubstr("had bad hidden states"));
  EXPECT_THAT(e[1], HasSubstr("valid_tokens must be a [6] bool CPU tensor, one entry per token; got Bool [5]"));
  // Slicing: the NaN token is in rank 0's slice only.
  e = run({.world_size = 2, .tp = 2}, Config({}), [&](MoELayer& l, int) { return l.Forward(nan, {}).status(); });
  EXPECT_THAT(e[0], HasSubstr("hidden states hold NaN or inf"));
  EXPECT_THAT(e[1], HasSubstr("another rank stopped before routing"));
  // Beyond the TP group: the EP peers (and the global aux loss's DP sum) would wait for the
  // rank that stopped. A NaN on one of 4 EP ranks, a wrong width on one, and a NaN in one TP
  // share of sequence parallel x EP: every rank stops, each with its own error or the pointer to the other's.
  for (gate::AuxLoss aux : {gate::AuxLoss::kBatch, gate::AuxLoss::kGlobal}) {
    MoEConfig c = Config({});
    c.router.aux_loss = aux;
    e = run({.world_size = 4, .ep = 4}, c, [&](MoELayer& l, int rank) {
      return l.Forward(rank == 2 ? nan : good, {}).status();
    });
    for (int r : {0, 1, 3}) EXPECT_THAT(e[r], HasSubstr("another rank stopped before routing")) << r;
    EXPECT_THAT(e[2], HasSubstr("hidden states hold NaN or inf"));
    e = run({.world_size = 4, .ep = 2}, c, [&](MoELayer& l, int rank) {  // EP 2 x EDP 2
      return l.Forward(rank == 3 ? at::randn({6, kHidden + 1}) : good, {}).status();
    });
    for (int r : {0, 1, 2}) EXPECT_THAT(e[r], HasSubstr("another rank stopped before routing")) << r;
    EXPECT_THAT(e[3], HasSubstr("hidden states must be [tokens, 8]"));
  }
  e = run({.world_size = 4, .tp = 2, .ep = 2}, sp, [&](MoELayer& l, int rank) {
    return l.Forward(rank == 1 ? nan : good, {}).status();
  });
  EXPECT_THAT(e[1], HasSubstr("hidden states hold NaN or inf"));
  for (int r : {0, 2, 3}) EXPECT_THAT(e[r], HasSubstr("another rank stopped before routing")) << r;
  // Under CP with slicing: a wrong width in one CP chunk (both its TP ranks hold it; the
  // other chunk's ranks learn in the exchange of the parts' sizes), and a NaN in one TP
  // slice of a chunk (the other three learn in the router).
  e = run({.world_size = 4, .tp = 2, .cp = 2, .etp = 1}, Config({}), [&](MoELayer& l, int rank) {
    return l.Forward(rank >= 2 ? at::randn({6, kHidden + 1}) : good, {}).status();
  });
  for (int r : {0, 1}) EXPECT_THAT(e[r], HasSubstr("had bad hidden states or valid_tokens (see its error)")) << r;  // tp_cp = world
  for (int r : {2, 3}) EXPECT_THAT(e[r], HasSubstr("hidden states must be [tokens, 8]")) << r;
  e = run({.world_size = 4, .tp = 2, .cp = 2, .etp = 1}, Config({}), [&](MoELayer& l, int rank) {
    return l.Forward(rank >= 2 ? nan : good, {}).status();
  });
  EXPECT_THAT(e[2], HasSubstr("hidden states hold NaN or inf"));  // the NaN token is in TP rank 0's slice
  for (int r : {0, 1, 3}) EXPECT_THAT(e[r], HasSubstr("another rank stopped before routing")) << r;
  // Token masks. Under TP slicing both TP ranks must give the same one: a mask on one rank
  // only, or masks of the same count that differ, stop both.
  const at::Tensor mask = at::tensor(std::vector<int64_t>{1, 1, 0, 1, 1, 1}).to(at::kBool);
  const at::Tensor other = at::tensor(std::vector<int64_t>{1, 1, 1, 0, 1, 1}).to(at::kBool);
  for (bool none : {true, false}) {
    e = run({.world_size = 2, .tp = 2}, Config({}), [&](MoELayer& l, int rank) {
      return l.Forward(good, {.valid_tokens = rank == 1 ? mask : none ? at::Tensor() : other}).status();
    });
    for (int r : {0, 1}) EXPECT_THAT(e[r], HasSubstr("hold the same tokens but gave different token counts or valid_tokens")) << r;
  }
  // Masks that keep as many tokens at positions of equal sum and equal sum of squares
  // ({0, 4, 5} and {1, 2, 6}): told apart all the same.
  const at::Tensor seven = at::randn({7, kHidden});
  e = run({.world_size = 2, .tp = 2}, Config({}), [&](MoELayer& l, int rank) {
    const std::vector<int64_t> keep = rank == 0 ? std::vector<int64_t>{1, 0, 0, 0, 1, 1, 0}
                                                : std::vector<int64_t>{0, 1, 1, 0, 0, 0, 1};
    return l.Forward(seven, {.valid_tokens = at::tensor(keep).to(at::kBool)}).status();
  });
  for (int r : {0, 1}) EXPECT_THAT(e[r], HasSubstr("gave different token counts or valid_tokens")) << r;
  // Different token counts without masks (the TP ranks must hold the same tokens).
  e = run({.world_size = 2, .tp = 2}, Config({}), [&](MoELayer& l, int rank) {
    return l.Forward(rank == 0 ? good : seven, {}).status();
  });
  for (int r : {0, 1}) EXPECT_THAT(e[r], HasSubstr("gave different token counts or valid_tokens")) << r;
  e = run({.world_size = 2, .tp = 2}, Config({}), [&](MoELayer& l, int) {
    return l.Forward(good, {.valid_tokens = mask}).status();
  });
  for (int r : {0, 1}) EXPECT_EQ(e[r], "ok") << r;
  // A bad mask in one CP chunk (both of its TP ranks), and on one rank of DP = 2 x EP = 2.
  e = run({.world_size = 4, .tp = 2, .cp = 2, .etp = 1}, Config({}), [&](MoELayer& l, int rank) {
    return l.Forward(good, {.valid_tokens = rank >= 2 ? at::ones({5}, at::kBool) : mask}).status();
  });
  for (int r : {0, 1}) EXPECT_THAT(e[r], HasSubstr("had bad hidden states or valid_tokens (see its error)")) << r;
  for (int r : {2, 3}) EXPECT_THAT(e[r], HasSubstr("valid_tokens must be a [6] bool CPU tensor")) << r;
  e = run({.world_size = 4, .ep = 2}, Config({}), [&](MoELayer& l, int rank) {
    return l.Forward(good, {.valid_tokens = rank == 3 ? at::ones({6}, at::kFloat) : mask}).status();
  });
  for (int r : {0, 1, 2}) EXPECT_THAT(e[r], HasSubstr("another rank stopped before routing")) << r;
  EXPECT_THAT(e[3], HasSubstr("valid_tokens must be a [6] bool CPU tensor, one entry per token; got Float"));
  // Sequences that do not divide the tokens (the per-sequence aux loss) on one EP rank.
  e = run({.world_size = 2, .ep = 2}, Config({.aux = gate::AuxLoss::kSequence}), [&](MoELayer& l, int rank) {
    return l.Forward(good, {.num_sequences = rank == 0 ? 4 : 2}).status();
  });
  EXPECT_THAT(e[0], HasSubstr("num_sequences = 4 must be >= 1 and divide the 6 tokens of the block"));
  EXPECT_THAT(e[1], HasSubstr("another rank stopped before routing"));
  // And the same layers go on after it: the failed step left no collective half done.
  e = run({.world_size = 4, .ep = 4}, Config({}), [&](MoELayer& l, int rank) -> absl::Status {
    if (l.Forward(rank == 0 ? nan : good, {}).ok()) return absl::InternalError("the NaN step went through");
    return l.Forward(good, {}).status();
  });
  for (int r = 0; r < 4; ++r) EXPECT_EQ(e[r], "ok") << r;
  // Bias counts: a negative count on one rank, which the other's would cancel in the sum.
  MoEConfig biased = Config({});
  biased.router.expert_bias = true;
  e = run({.world_size = 2}, biased, [&](MoELayer& l, int rank) {
    at::Tensor counts = at::full({kExperts}, 2.0);
    if (rank == 0) counts[0] = -2.0;
    const absl::Status st = l.UpdateExpertBias(counts);
    EXPECT_TRUE(l.router().expert_bias().equal(at::zeros({kExperts})));
    return st;
  });
  EXPECT_THAT(e[0], HasSubstr("tokens_per_expert must be finite counts >= 0"));
  EXPECT_THAT(e[1], HasSubstr("another rank of"));
}

// The global aux loss over two micro-batches of one step under DP = 2 x EP = 2: each
// micro-batch's loss (summed over the replicas' weighted shares) and the router's gradient
// after both are one process's on the global micro-batches, whose second loss averages the
// counts of both.
TEST(MoELayerTest, GlobalAuxLossOverMicroBatchesAsInOneProcess) {
  MoEConfig cfg = Config({.aux = gate::AuxLoss::kGlobal});
  at::manual_seed(21);
  const at::Tensor X[2] = {at::randn({20, kHidden}), at::randn({16, kHidden})};
  const at::Tensor R[2] = {at::randn({20, kHidden}), at::randn({16, kHidden})};
  auto one = MoELayer::Create(cfg, kSeed);
  ASSERT_TRUE(one.ok());
  double want_aux[2];
  for (int mb = 0; mb < 2; ++mb) {
    auto out = one->Forward(X[mb], {.training = true, .micro_batch = mb});
    ASSERT_TRUE(out.ok()) << out.status();
    ((out->output * R[mb]).sum() + out->aux_loss).backward();
    want_aux[mb] = out->aux_loss_value;
  }
  const at::Tensor want_grad = one->router().weight().grad();
  const absl::Status s = groups::testing::RunRanks({.layout = {.world_size = 4, .ep = 2}}, [&](Communicator& comm) -> absl::Status {
    auto layer = MoELayer::Create(cfg, kSeed, &comm);
    if (!layer.ok()) return layer.status();
    const int d = comm.layout().Dense(comm.rank()).dp, replicas = comm.layout().dp();
    for (int mb = 0; mb < 2; ++mb) {
      const std::vector<int64_t> shards = dispatch::EvenSplit(X[mb].size(0), replicas);
      const int64_t off = std::accumulate(shards.begin(), shards.begin() + d, int64_t{0});
      auto out = layer->Forward(X[mb].narrow(0, off, shards[d]), {.training = true, .micro_batch = mb});
      if (!out.ok()) return out.status();
      ((out->output * R[mb].narrow(0, off, shards[d])).sum() + out->aux_loss / replicas).backward();
      at::Tensor aux = at::full({1}, out->aux_loss_value / replicas, at::kDouble);
      SY_RETURN_IF_ERROR(comm.World().AllReduce(aux).Wait());
      SY_RETURN_IF_ERROR(Expect(std::abs(aux.item<double>() - want_aux[mb]) <= 1e-6 * want_aux[mb],
                                absl::StrFormat("micro-batch %d: aux loss %.9g, one process %.9g", mb,
                                                aux.item<double>(), want_aux[mb])));
    }
    at::Tensor g = layer->router().weight().grad().clone();
    SY_RETURN_IF_ERROR(SumGradient(comm, layer->Parameters()[0].tag, g));
    return Check("router gradient after both micro-batches", g, want_grad, 1e-5);
  });
  EXPECT_TRUE(s.ok()) << s;
  // The second micro-batch's loss is not the one of its counts alone.
  auto fresh = MoELayer::Create(cfg, kSeed);
  ASSERT_TRUE(fresh.ok());
  auto alone = fresh->Forward(X[1], {.training = true});
  ASSERT_TRUE(alone.ok());
  EXPECT_GT(std::abs(want_aux[1] - alone->aux_loss_value), 1e-6 * want_aux[1]);
}

// Data-parallel replicas draw their own jitter and noise: the same tokens on two replicas
// are routed with different noise (one seed for all of them made every replica's noise the
// same), while replica 0 draws what one process draws.
TEST(MoELayerTest, DataParallelReplicasDrawTheirOwnNoise) {
  MoEConfig c = Config({});
  c.router.jitter_eps = 0.1f;
  c.router.noisy_gating = true;
  at::manual_seed(4);
  const at::Tensor x = at::randn({16, kHidden});
  auto one = MoELayer::Create(c, kSeed);
  ASSERT_TRUE(one.ok());
  auto single = one->Forward(x, {.training = true});
  ASSERT_TRUE(single.ok()) << single.status();
  std::mutex mu;
  std::vector<at::Tensor> outs(2);
  absl::Status s = groups::testing::RunRanks({.layout = {.world_size = 2}}, [&](Communicator& comm) -> absl::Status {
    auto layer = MoELayer::Create(c, kSeed, &comm);
    if (!layer.ok()) return layer.status();
    SY_ASSIGN_OR_RETURN(MoEOutput out, layer->Forward(x, {.training = true}));
    std::lock_guard<std::mutex> l(mu);
    outs[comm.rank()] = out.output.detach();
    return absl::OkStatus();
  });
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_TRUE(at::equal(outs[0], single->output.detach()));
  EXPECT_GT(RelErr(outs[1], outs[0]), 1e-3);
}

// Aux-loss-free balancing under a layout: every rank moves its bias by the counts summed
// over the stage (DP blocks and TP slices), exactly as one process moves it by the whole
// batch's counts, and then routes alike.
TEST(MoELayerTest, ExpertBiasMovesAsInOneProcess) {
  MoEConfig c = Config({});
  c.router.expert_bias = true;
  c.router.topk.pre_softmax = true;
  c.router.bias_update_rate = 0.05;
  at::manual_seed(6);
  const at::Tensor x = at::randn({20, kHidden});  // 2 DP blocks of 10, each over 2 TP slices
  auto one = MoELayer::Create(c, kSeed);
  ASSERT_TRUE(one.ok());
  at::Tensor counts = at::zeros({kExperts}, at::kLong);
  for (int b = 0; b < 2; ++b) {
    auto out = one->Forward(x.narrow(0, 10 * b, 10), {});
    ASSERT_TRUE(out.ok()) << out.status();
    counts += out->tokens_per_expert;
  }
  ASSERT_TRUE(one->UpdateExpertBias(counts).ok());
  const at::Tensor want = one->router().expert_bias().clone();
  ASSERT_GT(want.abs().sum().item<float>(), 0);
  auto after = one->Forward(x.narrow(0, 0, 10), {});
  ASSERT_TRUE(after.ok());
  absl::Status s = groups::testing::RunRanks({.layout = {.world_size = 4, .tp = 2, .etp = 1}},
                                             [&](Communicator& comm) -> absl::Status {
    auto layer = MoELayer::Create(c, kSeed, &comm);
    if (!layer.ok()) return layer.status();
    const int b = comm.layout().Dense(comm.rank()).dp;
    SY_ASSIGN_OR_RETURN(MoEOutput out, layer->Forward(x.narrow(0, 10 * b, 10), {}));
    SY_RETURN_IF_ERROR(layer->UpdateExpertBias(out.tokens_per_expert));
    SY_RETURN_IF_ERROR(Expect(at::equal(layer->router().expert_bias(), want), "bias differs from one process's"));
    SY_ASSIGN_OR_RETURN(MoEOutput next, layer->Forward(x.narrow(0, 0, 10), {}));
    return b == 0 ? Check("output after the update", next.output, after->output, 1e-6) : absl::OkStatus();
  });
  EXPECT_TRUE(s.ok()) << s;
}

TEST(MoELayerTest, LayoutThatDoesNotFitIsAClearError) {
  MoEConfig c = Config({});
  c.router.num_experts = 6;
  absl::Status s = groups::testing::RunRanks({.layout = {.world_size = 4, .ep = 4}},
                                             [&](Communicator& comm) -> absl::Status {
    auto layer = MoELayer::Create(c, kSeed, &comm);
    EXPECT_FALSE(layer.ok());
    EXPECT_THAT(std::string(layer.status().message()), HasSubstr("parallel.ep = 4 does not divide num_experts = 6"));
    return absl::OkStatus();
  });
  EXPECT_TRUE(s.ok()) << s;
  // Under CP a block is not the tokens in their order: what depends on that order is refused.
  // The per-sequence loss needs tokens position by position, each CP chunk whole positions:
  // every rank of the stage stops together otherwise.
  s = groups::testing::RunRanks({.layout = {.world_size = 2, .cp = 2}}, [&](Communicator& comm) -> absl::Status {
    auto layer = MoELayer::Create(Config({.aux = gate::AuxLoss::kSequence}), kSeed, &comm);
    EXPECT_TRUE(layer.ok()) << layer.status();
    const at::Tensor x = at::randn({6, kHidden});
    EXPECT_THAT(std::string(layer->Forward(x, {.num_sequences = 3}).status().message()),
                HasSubstr("the per-sequence aux loss under context parallelism (parallel.cp = 2) needs the tokens "
                          "position by position"));
    // 3 sequences in 12 tokens, 7 on CP rank 0 (the first chunk that is not whole positions).
    EXPECT_THAT(std::string(layer->Forward(comm.rank() == 0 ? at::randn({7, kHidden}) : x.narrow(0, 0, 5),
                                           {.num_sequences = 3, .sequence_order = gate::SequenceOrder::kInterleaved})
                                .status()
                                .message()),
                HasSubstr("each CP rank must hold whole positions of the 3 sequences (the per-sequence aux loss): CP "
                          "rank 0 holds 7 tokens"));
    EXPECT_TRUE(layer->Forward(x, {.num_sequences = 3, .sequence_order = gate::SequenceOrder::kInterleaved}).ok());
    // Ranks that disagree on the order: the one that refuses stops the other in the router.
    const absl::Status mixed =
        layer->Forward(x, {.num_sequences = 3,
                           .sequence_order = comm.rank() == 0 ? gate::SequenceOrder::kWhole
                                                              : gate::SequenceOrder::kInterleaved})
            .status();
    EXPECT_THAT(std::string(mixed.message()), HasSubstr(comm.rank() == 0 ? "needs the tokens position by position"
                                                                         : "another rank stopped before routing"));
    layer = MoELayer::Create(Config({.capacity_factor = 1.0, .drop_policy = gate::DropPolicy::kByPosition}), kSeed, &comm);
    EXPECT_THAT(std::string(layer.status().message()),
                HasSubstr("dropping by position with context parallelism (parallel.cp = 2) is not supported"));
    EXPECT_TRUE(MoELayer::Create(Config({.capacity_factor = 1.0}), kSeed, &comm).ok());
    return absl::OkStatus();
  });
  EXPECT_TRUE(s.ok()) << s;
  c = Config({});
  c.ffn_hidden_size = 13;
  s = groups::testing::RunRanks({.layout = {.world_size = 4, .tp = 2, .ep = 2, .etp = 2}},
                                [&](Communicator& comm) -> absl::Status {
    auto layer = MoELayer::Create(c, kSeed, &comm);
    EXPECT_FALSE(layer.ok());
    EXPECT_THAT(std::string(layer.status().message()), HasSubstr("parallel.etp = 2 does not divide ffn_hidden_size = 13"));
    return absl::OkStatus();
  });
  EXPECT_TRUE(s.ok()) << s;
  auto one = MoELayer::Create(Config({}), kSeed);
  ASSERT_TRUE(one.ok());
  auto message = [](const auto& status_or) {
    return status_or.ok() ? std::string("accepted") : std::string(status_or.status().message());
  };
  EXPECT_THAT(message(one->Forward(at::randn({4, kHidden + 1}), {})), HasSubstr("hidden states must be [tokens, 8]"));
  // Integer tokens would be truncated on the way out; another device cannot be read here.
  EXPECT_THAT(message(one->Forward(at::ones({4, kHidden}, at::kLong), {})),
              HasSubstr("must be a floating-point CPU tensor (the layer computes on the CPU); got Long on cpu"));
  EXPECT_THAT(message(one->Forward(at::empty({4, kHidden}, at::TensorOptions().device(at::kMeta)), {})),
              HasSubstr("got Float on meta"));
  // Settings that cannot mean anything.
  MoEConfig bad = Config({});
  bad.shared_ffn_hidden_size = 16;
  EXPECT_THAT(message(MoELayer::Create(bad, kSeed)), HasSubstr("shared_ffn_hidden_size = 16 needs num_shared_experts > 0"));
  bad = Config({.shared_experts = 1});
  bad.shared_ffn_hidden_size = -4;
  EXPECT_THAT(message(MoELayer::Create(bad, kSeed)), HasSubstr("shared_ffn_hidden_size = -4"));
  bad = Config({});
  bad.apply_probs_on_input = true;
  EXPECT_THAT(message(MoELayer::Create(bad, kSeed)),
              HasSubstr("apply_probs_on_input needs token-choice routing with top_k = 1 (got token choice, top_k = 2)"));
  bad = Config({});
  bad.shared_expert_gate = true;
  EXPECT_THAT(message(MoELayer::Create(bad, kSeed)), HasSubstr("shared_expert_gate needs num_shared_experts > 0"));
  bad = Config({});
  bad.init_std = NAN;
  EXPECT_THAT(message(MoELayer::Create(bad, kSeed)), HasSubstr("experts: init_std = nan must be finite"));
  // Bias updates take [E] counts: anything else is an error, before any communication.
  bad = Config({});
  bad.router.expert_bias = true;
  auto biased = MoELayer::Create(bad, kSeed);
  ASSERT_TRUE(biased.ok()) << biased.status();
  for (const at::Tensor& counts : {at::Tensor(), at::ones({kExperts, 1}), at::ones({kExperts + 1})}) {
    const absl::Status s = biased->UpdateExpertBias(counts);
    EXPECT_THAT(std::string(s.message()), HasSubstr("tokens_per_expert must be a CPU tensor of shape [8]"));
  }
  EXPECT_THAT(std::string(biased->UpdateExpertBias(at::full({kExperts}, NAN)).message()), HasSubstr("finite counts"));
  EXPECT_TRUE(biased->router().expert_bias().equal(at::zeros({kExperts})));
}

}  // namespace
}  // namespace switchyard::moe
