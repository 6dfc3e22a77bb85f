#include "moe/gate/router.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "moe/gate/testing/fixtures.h"

namespace switchyard::gate {
namespace {

using ::testing::HasSubstr;
using testing::BoolOption;
using testing::DoubleOption;
using testing::FindCase;
using testing::FixtureCase;
using testing::IntOption;
using testing::MaxRelErr;

// moe/gate/testdata/megatron_router.txt is made by Megatron-Core's own code
// (tests/oracles/make_router_fixtures.py).
std::vector<FixtureCase> LoadCases() { return testing::LoadFixtures("moe/gate/testdata/megatron_router.txt"); }

TopKOptions RoutingOptions(const FixtureCase& c) {
  TopKOptions o;
  o.top_k = IntOption(c, "topk", 1);
  o.pre_softmax = BoolOption(c, "use_pre_softmax");
  o.score = c.options.count("score_function") && c.options.at("score_function") == "sigmoid"
                ? ScoreFunction::kSigmoid : ScoreFunction::kSoftmax;
  o.num_groups = IntOption(c, "num_groups", 0);
  o.group_topk = IntOption(c, "group_topk", 0);
  o.scaling_factor = static_cast<float>(DoubleOption(c, "scaling_factor", 1.0));
  return o;
}

TEST(Router, MatchesMegatronCoreRouting) {
  std::vector<FixtureCase> cases = LoadCases();
  int checked = 0;
  for (const FixtureCase& c : cases) {
    if (c.options.at("kind") != "routing") continue;
    SCOPED_TRACE(c.name);
    at::Tensor logits = c.tensors.at("logits").clone().requires_grad_(true);
    at::Tensor bias = c.tensors.count("expert_bias") ? c.tensors.at("expert_bias") : at::Tensor();
    absl::StatusOr<Routing> r = TopKRoute(logits, RoutingOptions(c), bias);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_TRUE(r->routing_map.equal(c.tensors.at("routing_map").to(at::kBool)));
    EXPECT_LE(MaxRelErr(r->probs, c.tensors.at("probs")), 1e-6);
    (r->probs * c.tensors.at("grad_weights")).sum().backward();
    // Gradients go through softmax/sigmoid and a normalisation: a few ulps more.
    EXPECT_LE(MaxRelErr(logits.grad(), c.tensors.at("grad_logits")), 1e-5);
    EXPECT_TRUE(r->tokens_per_expert.equal(c.tensors.at("routing_map").sum(0).to(at::kLong)));
    ++checked;
  }
  EXPECT_GE(checked, 10);
}

TEST(Router, MatchesMegatronCoreTokenDropping) {
  std::vector<FixtureCase> cases = LoadCases();
  int checked = 0;
  for (const FixtureCase& c : cases) {
    if (c.options.at("kind") != "dropping") continue;
    SCOPED_TRACE(c.name);
    const FixtureCase& src = FindCase(cases, c.options.at("from"));
    TopKOptions o = RoutingOptions(src);
    o.capacity_factor = DoubleOption(c, "capacity_factor", 0);
    o.drop_policy = c.options.at("drop_policy") == "position" ? DropPolicy::kByPosition : DropPolicy::kByScore;
    o.pad_to_capacity = BoolOption(c, "pad_to_capacity");
    absl::StatusOr<Routing> r = TopKRoute(src.tensors.at("logits"), o);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->capacity, IntOption(c, "capacity", -2));
    at::Tensor want_map = c.tensors.at("routing_map").to(at::kBool);
    at::Tensor want_probs = c.tensors.at("probs");
    const at::Tensor routed = src.tensors.at("routing_map").to(at::kBool);
    if (o.drop_policy == DropPolicy::kByPosition) {
      // Megatron-Core picks the kept tokens with torch.topk over a 0/1 map, so on the CPU it
      // keeps an arbitrary subset of equal entries, not the earliest tokens. Here the
      // reference is the definition itself, from the same routing: the first `capacity`
      // routed tokens of each expert. Megatron-Core must keep as many per expert.
      const int64_t cap = IntOption(c, "capacity", 0);
      EXPECT_TRUE(want_map.sum(0).equal(routed.cumsum(0).le(cap).logical_and(routed).sum(0)));
      want_map = routed.logical_and(routed.cumsum(0).le(cap));
      want_probs = src.tensors.at("probs") * want_map;
    }
    EXPECT_LE(MaxRelErr(r->probs, want_probs), 1e-6);
    // Routed slots kept must agree exactly; padding slots (weight 0, not routed) are chosen
    // by torch.topk's tie order in Megatron-Core and by token index here, so only their
    // number per expert is compared.
    EXPECT_TRUE(r->routing_map.logical_and(routed).equal(want_map.logical_and(routed)));
    EXPECT_TRUE(r->routing_map.sum(0).equal(want_map.sum(0)));
    EXPECT_TRUE(r->dropped.equal(routed.logical_and(want_map.logical_not())));
    ++checked;
  }
  EXPECT_GE(checked, 4);
}

TEST(Router, MatchesMegatronCoreLosses) {
  std::vector<FixtureCase> cases = LoadCases();
  int checked = 0;
  for (const FixtureCase& c : cases) {
    if (c.options.at("kind") != "losses") continue;
    SCOPED_TRACE(c.name);
    const int k = IntOption(c, "topk", 1);
    const ScoreFunction score = c.options.at("score_function") == "sigmoid" ? ScoreFunction::kSigmoid
                                                                            : ScoreFunction::kSoftmax;
    at::Tensor logits = c.tensors.at("logits").clone().requires_grad_(true);
    absl::StatusOr<AuxLossInputs> in = AuxLossScores(logits, k, score);
    ASSERT_TRUE(in.ok()) << in.status();
    EXPECT_TRUE(in->tokens_per_expert.equal(c.tensors.at("tokens_per_expert").to(at::kLong)));
    at::Tensor aux = LoadBalancingLoss(in->scores, in->tokens_per_expert, logits.size(0), k,
                                       DoubleOption(c, "aux_loss_coeff", 0));
    EXPECT_LE(MaxRelErr(aux, c.tensors.at("aux_loss")), 1e-6);
    aux.backward();
    EXPECT_LE(MaxRelErr(logits.grad(), c.tensors.at("aux_grad_logits")), 1e-5);
    at::Tensor zin = c.tensors.at("logits").clone().requires_grad_(true);
    at::Tensor z = ZLoss(zin, DoubleOption(c, "z_loss_coeff", 0));
    EXPECT_LE(MaxRelErr(z, c.tensors.at("z_loss")), 1e-6);
    z.backward();
    EXPECT_LE(MaxRelErr(zin.grad(), c.tensors.at("z_grad_logits")), 1e-5);
    ++checked;
  }
  EXPECT_EQ(checked, 2);
}

TEST(Router, MatchesMegatronCoreSequenceLossAndBiasUpdate) {
  std::vector<FixtureCase> cases = LoadCases();
  int seq = 0, bias = 0;
  for (const FixtureCase& c : cases) {
    const std::string& kind = c.options.at("kind");
    SCOPED_TRACE(c.name);
    if (kind == "seq_losses") {
      const int64_t S = IntOption(c, "seq_length", 0), B = IntOption(c, "batch", 0);
      const int k = IntOption(c, "topk", 1);
      const ScoreFunction score = c.options.at("score_function") == "sigmoid"
                                      ? ScoreFunction::kSigmoid : ScoreFunction::kSoftmax;
      // The fixture's tokens are in [seq, batch] order; ours are [batch, seq].
      const at::Tensor seq_major = c.tensors.at("logits");
      const int64_t E = seq_major.size(1);
      at::Tensor logits = seq_major.view({S, B, E}).transpose(0, 1).reshape({B * S, E}).clone().requires_grad_(true);
      absl::StatusOr<AuxLossInputs> in = AuxLossScores(logits, k, score);
      ASSERT_TRUE(in.ok()) << in.status();
      absl::StatusOr<at::Tensor> loss = SequenceLoadBalancingLoss(in->scores, in->routing_map, B, k,
                                                                  DoubleOption(c, "aux_loss_coeff", 0));
      ASSERT_TRUE(loss.ok()) << loss.status();
      EXPECT_LE(MaxRelErr(*loss, c.tensors.at("seq_aux_loss")), 1e-6);
      loss->backward();
      const at::Tensor grad = logits.grad().view({B, S, E}).transpose(0, 1).reshape({S * B, E});
      EXPECT_LE(MaxRelErr(grad, c.tensors.at("seq_aux_grad_logits")), 1e-5);
      // The same tokens in the fixture's own [seq, batch] order.
      at::Tensor interleaved = seq_major.clone().requires_grad_(true);
      absl::StatusOr<AuxLossInputs> in2 = AuxLossScores(interleaved, k, score);
      ASSERT_TRUE(in2.ok()) << in2.status();
      absl::StatusOr<at::Tensor> loss2 = SequenceLoadBalancingLoss(
          in2->scores, in2->routing_map, B, k, DoubleOption(c, "aux_loss_coeff", 0), SequenceOrder::kInterleaved);
      ASSERT_TRUE(loss2.ok()) << loss2.status();
      EXPECT_LE(MaxRelErr(*loss2, c.tensors.at("seq_aux_loss")), 1e-6);
      loss2->backward();
      EXPECT_LE(MaxRelErr(interleaved.grad(), c.tensors.at("seq_aux_grad_logits")), 1e-5);
      ++seq;
    } else if (kind == "bias_update") {
      const at::Tensor updated = UpdateExpertBias(c.tensors.at("expert_bias"), c.tensors.at("tokens_per_expert"),
                                                  DoubleOption(c, "rate", 0));
      EXPECT_LE(MaxRelErr(updated, c.tensors.at("updated_bias")), 1e-6);
      ++bias;
    }
  }
  EXPECT_EQ(seq, 2);
  EXPECT_EQ(bias, 2);
  // Counts 2, 4, 6 (mean 4): the under-loaded expert moves up, the average one stays.
  const at::Tensor b = UpdateExpertBias(at::zeros({3}), at::tensor({2, 4, 6}), 0.5);
  EXPECT_TRUE(b.equal(at::tensor({0.5f, 0.0f, -0.5f})));
  // Counts past 2^24 (a large stage's step) are compared exactly: in fp32 both would be 2^24.
  const int64_t big = int64_t{1} << 24;
  const at::Tensor bb = UpdateExpertBias(at::zeros({2}), at::tensor({big, big + 1}, at::kLong), 0.5);
  EXPECT_TRUE(bb.equal(at::tensor({0.5f, -0.5f}))) << bb;
  // One sequence: the sequence loss is the batch loss.
  at::manual_seed(11);  // LibTorch seeds its default generator differently in every process
  at::Tensor logits = at::randn({12, 4}, at::TensorOptions().dtype(at::kFloat));
  absl::StatusOr<AuxLossInputs> in = AuxLossScores(logits, 2, ScoreFunction::kSoftmax);
  ASSERT_TRUE(in.ok());
  absl::StatusOr<at::Tensor> one = SequenceLoadBalancingLoss(in->scores, in->routing_map, 1, 2, 0.1);
  ASSERT_TRUE(one.ok());
  EXPECT_NEAR(one->item<float>(), LoadBalancingLoss(in->scores, in->tokens_per_expert, 12, 2, 0.1).item<float>(), 1e-7);
  EXPECT_FALSE(SequenceLoadBalancingLoss(in->scores, in->routing_map, 5, 2, 0.1).ok());
}

// Expert choice against a plain loop: for each expert, sort its column by score (ties by
// token index) and take the first `capacity` tokens.
TEST(Router, ExpertChoiceMatchesPlainLoop) {
  at::manual_seed(7);
  // The last two: capacities 60 and 240 (past the top-k's rounds, into its partial sort), on
  // integer logits full of ties.
  for (auto [T, E, cf] : {std::tuple<int64_t, int64_t, double>{16, 4, 1.0}, {10, 8, 2.0}, {5, 4, 8.0},
                          {240, 4, 1.0}, {240, 2, 2.0}}) {
    at::Tensor logits = (T > 16 ? at::randint(0, 3, {T, E}).to(at::kFloat) : at::randn({T, E})).requires_grad_(true);
    absl::StatusOr<Routing> r = ExpertChoiceRoute(logits, cf);
    ASSERT_TRUE(r.ok()) << r.status();
    const int64_t cap = std::min<int64_t>(T, static_cast<int64_t>(std::ceil(T * cf / E)));
    EXPECT_EQ(r->capacity, cap);
    const at::Tensor s = at::softmax(logits.detach(), -1);
    at::Tensor want_map = at::zeros({T, E}, at::kBool);
    for (int64_t e = 0; e < E; ++e) {
      std::vector<int64_t> order(T);
      for (int64_t t = 0; t < T; ++t) order[t] = t;
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        return s[a][e].item<float>() > s[b][e].item<float>();
      });
      for (int64_t c = 0; c < cap; ++c) want_map[order[c]][e] = true;
    }
    EXPECT_TRUE(r->routing_map.equal(want_map));
    EXPECT_TRUE(r->probs.detach().equal(s * want_map));
    EXPECT_TRUE(r->tokens_per_expert.equal(at::full({E}, cap, at::kLong)));
    // Gradients reach the logits through the chosen scores.
    r->probs.sum().backward();
    at::Tensor ref_logits = logits.detach().clone().requires_grad_(true);
    (at::softmax(ref_logits, -1) * want_map).sum().backward();
    EXPECT_TRUE(at::allclose(logits.grad(), ref_logits.grad(), 1e-6, 1e-7));
  }
  EXPECT_FALSE(ExpertChoiceRoute(at::zeros({4, 2}), 0).ok());
  EXPECT_THAT(std::string(ExpertChoiceRoute(at::zeros({4, 2}), -1).status().message()),
              HasSubstr("expert-choice routing needs capacity_factor > 0"));
}

// Capacity against its definition, a plain loop: each expert's column of all T slots sorted
// stably, descending, by (routed, key), the key being the weight (kByScore: the routing
// weight after normalisation and scaling, or with kKept the raw score; an unrouted slot
// counts as weight 0, so routed slots of weight exactly 0 tie with it by token index), 1
// (kByPosition) or k − choice rank (kByChoiceThenPosition); the first `capacity` are kept.
// Integer logits give many equal weights, and rows of -1e4 routed weights that are exactly 0.
TEST(Router, CapacityMatchesAStableSortOfEveryColumn) {
  at::manual_seed(21);
  int checked = 0;
  for (auto [T, E, k] : {std::tuple<int64_t, int64_t, int>{40, 4, 1}, {64, 8, 2}, {97, 16, 4}, {50, 6, 6}}) {
    at::Tensor logits = at::randint(0, 3, {T, E}).to(at::kFloat);
    // The last quarter's tokens have one live expert, so weight 0 on their other choices;
    // being late, those slots rank after earlier unrouted ones.
    logits.narrow(0, T - T / 4, T / 4).narrow(1, 1, E - 1).fill_(-1e4);
    for (DropPolicy policy : {DropPolicy::kByScore, DropPolicy::kByPosition, DropPolicy::kByChoiceThenPosition}) {
      // Softmax scores as they are; with kKept; normalised over the top k and scaled (weights
      // unlike the raw scores); sigmoid scores normalised, with a min capacity.
      for (int variant : {0, 1, 2, 3}) {
        for (double cf : {0.3, 1.0, 1.7}) {
          for (bool pad : {false, true}) {
            SCOPED_TRACE(::testing::Message() << T << "x" << E << " k " << k << " policy " << static_cast<int>(policy)
                                              << " variant " << variant << " cf " << cf << " pad " << pad);
            TopKOptions o{.top_k = k, .pre_softmax = true};
            if (variant == 1) o.weight_norm = WeightNorm::kKept;
            if (variant == 2) o.weight_norm = WeightNorm::kTopK, o.scaling_factor = 2.5f;
            if (variant == 3) o.score = ScoreFunction::kSigmoid, o.min_capacity = 5;
            absl::StatusOr<Routing> free = TopKRoute(logits, o);  // dropless: the weights before capacity
            o.capacity_factor = cf;
            o.drop_policy = policy;
            o.pad_to_capacity = pad;
            absl::StatusOr<Routing> r = TopKRoute(logits, o);
            ASSERT_TRUE(free.ok() && r.ok());
            const at::Tensor raw = at::softmax(logits, -1);
            const at::Tensor idx = free->topk_indices, w = free->topk_weights.detach();
            const int64_t cap = std::min<int64_t>(
                T, std::max<int64_t>(static_cast<int64_t>(std::ceil(static_cast<double>(T) * k / E * cf)), o.min_capacity));
            ASSERT_EQ(r->capacity, cap);
            at::Tensor want = at::zeros({T, E}, at::kBool);
            for (int64_t e = 0; e < E; ++e) {
              std::vector<std::pair<double, int64_t>> key(T);  // (key, token)
              for (int64_t t = 0; t < T; ++t) {
                double kv = 0;
                for (int c = 0; c < k; ++c) {
                  if (idx[t][c].item<int64_t>() != e) continue;
                  kv = policy == DropPolicy::kByPosition              ? 1.0
                       : policy == DropPolicy::kByChoiceThenPosition ? static_cast<double>(k - c)
                       : variant == 1                                 ? raw[t][e].item<float>()
                                                                      : w[t][c].item<float>();
                }
                key[t] = {kv, t};
              }
              std::stable_sort(key.begin(), key.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
              for (int64_t i = 0; i < cap; ++i) want[key[i].second][e] = true;
            }
            const at::Tensor routed = free->routing_map;
            EXPECT_TRUE(r->routing_map.equal(pad ? want : want.logical_and(routed)));
            EXPECT_TRUE(r->dropped.equal(routed.logical_and(want.logical_not())));
            checked += r->dropped.any().item<bool>();
          }
        }
      }
    }
  }
  EXPECT_GE(checked, 150);  // most cases drop something
}

TEST(Router, EdgeCases) {
  // Logits on another device (meta here; CUDA on a GPU machine) are refused, not read.
  const at::Tensor meta = at::empty({4, 4}, at::TensorOptions().device(at::kMeta));
  for (const absl::Status& s : {TopKRoute(meta, {.top_k = 2}).status(), ExpertChoiceRoute(meta, 1.0).status(),
                                AuxLossScores(meta, 2, ScoreFunction::kSoftmax).status()}) {
    EXPECT_THAT(std::string(s.message()), HasSubstr("CPU tensor"));
  }
  // Zero tokens.
  absl::StatusOr<Routing> r = TopKRoute(at::zeros({0, 4}), {.top_k = 2});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->probs.size(0), 0);
  EXPECT_EQ(r->tokens_per_expert.sum().item<int64_t>(), 0);
  // ... and their load-balancing loss is 0, not 0/0 (a rank that routed nothing).
  const at::Tensor no_scores = at::zeros({0, 4}).requires_grad_(true);
  const at::Tensor lb = LoadBalancingLoss(no_scores, at::zeros({4}, at::kLong), 0, 2, 0.01);
  EXPECT_EQ(lb.item<float>(), 0.0f);
  lb.backward();
  EXPECT_EQ(no_scores.grad().numel(), 0);
  // Exact ties: the lower expert index wins (torch.topk on the CPU keeps index order for
  // equal values), every time.
  at::Tensor tied = at::zeros({3, 4});
  for (int i = 0; i < 3; ++i) {
    r = TopKRoute(tied, {.top_k = 2, .pre_softmax = true});
    ASSERT_TRUE(r.ok());
    EXPECT_TRUE(r->routing_map.equal(at::tensor({1, 1, 0, 0}).to(at::kBool).repeat({3, 1})));
    EXPECT_TRUE(r->probs.select(1, 0).equal(at::full({3}, 0.25f)));
  }
  // A tie straddling the k-th place, next to rows without one: still the lower index.
  at::Tensor mixed = at::tensor({3.0f, 1.0f, 1.0f, 1.0f, 0.0f, 2.0f, 1.0f, 3.0f}).view({2, 4});
  r = TopKRoute(mixed, {.top_k = 2});
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->topk_indices.equal(at::tensor({0, 1, 3, 1}, at::kLong).view({2, 2})));
  // Ties inside the top k: ordered by index.
  r = TopKRoute(at::tensor({1.0f, 5.0f, 5.0f, 0.0f}).view({1, 4}), {.top_k = 3});
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->topk_indices.equal(at::tensor({1, 2, 0}, at::kLong).view({1, 3})));
  // Many ties (integer scores 0..3, or 0..40), and distinct scores: the same choice and order
  // as a full stable sort, for rows that fit in registers (E ≤ 64) and longer ones (rounds
  // over the packed keys in memory; E = 65, 100, 300 end in a partial vector).
  at::manual_seed(3);
  for (int64_t E : {16, 64, 65, 100, 256, 300}) {
    for (int variant : {0, 1, 2}) {
      const at::Tensor scores = variant == 2 ? at::randn({300, E})
                                             : at::randint(0, variant == 0 ? 4 : 41, {300, E}).to(at::kFloat);
      const at::Tensor want_all = std::get<1>(at::sort(scores, /*stable=*/true, 1, /*descending=*/true));
      for (int k : {1, 2, 3, 8, 9, 16, 17, 32}) {
        if (k > E) continue;
        r = TopKRoute(scores, {.top_k = k});
        ASSERT_TRUE(r.ok());
        EXPECT_TRUE(r->topk_indices.equal(want_all.narrow(1, 0, k))) << "E = " << E << ", variant " << variant << ", k = " << k;
      }
    }
  }
  // Capacity ties by score and by position keep the earliest tokens.
  r = TopKRoute(at::zeros({6, 2}), {.top_k = 1, .pre_softmax = true, .capacity_factor = 1.0});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->capacity, 3);
  EXPECT_TRUE(r->routing_map.select(1, 0).equal(at::tensor({1, 1, 1, 0, 0, 0}).to(at::kBool)));
  EXPECT_EQ(r->dropped.sum().item<int64_t>(), 3);
  // A capacity past the token count is the token count: a factor too large for int64 once
  // converted drops nothing (it used to give capacity 0 and drop every token), also padded.
  for (bool pad : {false, true}) {
    r = TopKRoute(at::randn({64, 16}), {.top_k = 2, .capacity_factor = 1e17, .pad_to_capacity = pad});
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->capacity, 64);
    EXPECT_EQ(r->dropped.sum().item<int64_t>(), 0);
    EXPECT_EQ(r->routing_map.sum().item<int64_t>(), pad ? 64 * 16 : 128);
  }
  EXPECT_EQ(ExpertCapacity(64, 2, 16, 1.0), 8);
  EXPECT_EQ(ExpertCapacity(64, 2, 16, 1e300), 64);
  // Bad input is an error naming the problem, never silent routing.
  auto err = [](absl::StatusOr<Routing> s) { return s.ok() ? std::string("accepted") : std::string(s.status().message()); };
  at::Tensor nan = at::zeros({2, 4});
  nan[1][2] = NAN;
  EXPECT_THAT(err(TopKRoute(nan, {.top_k = 1})), HasSubstr("NaN or inf"));
  at::Tensor inf = at::zeros({2, 4});
  inf[0][0] = INFINITY;
  EXPECT_THAT(err(TopKRoute(inf, {.top_k = 1})), HasSubstr("NaN or inf"));
  // In the vectorised body of the check too, and -inf; a bf16 tensor takes ATen's check.
  for (auto [t, e, v] : {std::tuple<int, int, float>{299, 63, -INFINITY}, {150, 17, NAN}, {0, 40, INFINITY}}) {
    at::Tensor big = at::randn({300, 64});
    big[t][e] = v;
    EXPECT_THAT(err(TopKRoute(big, {.top_k = 2})), HasSubstr("NaN or inf")) << t << " " << e;
    EXPECT_THAT(err(TopKRoute(big.to(at::kBFloat16), {.top_k = 2})), HasSubstr("NaN or inf")) << t << " " << e;
    EXPECT_FALSE(AuxLossScores(big, 2, ScoreFunction::kSoftmax).ok());
  }
  EXPECT_TRUE(TopKRoute(at::randn({300, 64}) * 1e30, {.top_k = 2}).ok());
  EXPECT_THAT(err(TopKRoute(at::zeros({2, 4}), {.top_k = 5})), HasSubstr("top_k = 5 must be between 1 and the number of experts 4"));
  EXPECT_THAT(err(TopKRoute(at::zeros({2, 4}), {.top_k = 0})), HasSubstr("top_k = 0"));
  EXPECT_THAT(err(TopKRoute(at::zeros({2, 4}), {.top_k = 1, .capacity_factor = -1})), HasSubstr("capacity_factor = -1 must be >= 0"));
  EXPECT_THAT(err(TopKRoute(at::zeros({2, 6}), {.top_k = 2, .num_groups = 4, .group_topk = 2})), HasSubstr("num_groups = 4 must divide the 6 experts"));
  EXPECT_THAT(err(TopKRoute(at::zeros({2, 8}), {.top_k = 1, .num_groups = 4, .group_topk = 2})), HasSubstr("top_k = 1 must be between group_topk = 2"));
  EXPECT_THAT(err(TopKRoute(at::zeros({2, 4}), {.top_k = 1, .pad_to_capacity = true})), HasSubstr("pad_to_capacity needs capacity_factor > 0"));
  EXPECT_THAT(err(TopKRoute(at::zeros({2, 4}), {.top_k = 1}, at::zeros({3}))), HasSubstr("expert_bias must have shape [4]"));
}

// A block routed in parts (a TP group's slices) with the block's capacity: each part's kept
// slots, weights and drops are the whole block's rows, for every drop policy. `gather` stands
// in for the all-gather: a first round records what each part hands it (call i of a part is
// the i-th tensor), the second hands back the parts' rows joined in block order.
TEST(Router, PartsOfABlockShareItsCapacity) {
  at::manual_seed(12);
  const int64_t T = 30, E = 6;
  // Distinct scores; and integer ones full of ties, with weight exactly 0 on the choices of
  // tokens whose one live expert is expert 0 (in the second and last parts).
  at::Tensor ties = at::randint(0, 3, {T, E}).to(at::kFloat);
  ties.narrow(0, 12, 4).narrow(1, 1, E - 1).fill_(-1e4);
  ties.narrow(0, 26, 4).narrow(1, 1, E - 1).fill_(-1e4);
  const std::vector<std::pair<int64_t, int64_t>> parts = {{0, 11}, {11, 0}, {11, 12}, {23, 7}};
  for (int kind : {0, 1}) {
    for (DropPolicy policy : {DropPolicy::kByScore, DropPolicy::kByPosition, DropPolicy::kByChoiceThenPosition}) {
      const at::Tensor logits = kind == 0 ? at::randn({T, E}) * 2 : ties;
      for (int variant : {0, 1, 2}) {  // plain; padded; kept-weight normalisation with a min capacity
        const bool pad = variant == 1;
        SCOPED_TRACE(::testing::Message() << "logits " << kind << ", policy " << static_cast<int>(policy) << ", variant " << variant);
        TopKOptions o{.top_k = 2, .capacity_factor = 0.8, .drop_policy = policy, .pad_to_capacity = pad};
        if (variant == 2) {
          o.weight_norm = WeightNorm::kKept;
          o.capacity_factor = 0.3;
          o.min_capacity = 7;
        }
        absl::StatusOr<Routing> whole = TopKRoute(logits, o);
        TopKOptions dropless = o;
        dropless.capacity_factor = 0, dropless.min_capacity = 0, dropless.pad_to_capacity = false;
        absl::StatusOr<Routing> free = TopKRoute(logits, dropless);
        ASSERT_TRUE(whole.ok() && free.ok()) << whole.status();
        ASSERT_GT(whole->dropped.sum().item<int64_t>(), 0);
        std::vector<std::vector<at::Tensor>> recorded(2);
        size_t call = 0;  // gathers a part: the choices, then (ranking by score) their keys
        const size_t gathers = policy == DropPolicy::kByScore ? 2 : 1;
        BlockOfTokens block{.block_tokens = T};
        for (bool second : {false, true}) {
          block.gather = [&](const at::Tensor& t) {
            const size_t i = call++ % gathers;
            if (!second) {
              recorded[i].push_back(t.clone());
              return at::cat({t, at::zeros({T - t.size(0), t.size(1)}, t.options())});  // any rows, right shape
            }
            return at::cat(recorded[i]);
          };
          for (auto [off, n] : parts) {
            block.offset = off;
            absl::StatusOr<Routing> r = TopKRoute(logits.narrow(0, off, n), o, at::Tensor(), &block);
            ASSERT_TRUE(r.ok()) << r.status();
            if (!second) continue;
            EXPECT_EQ(r->capacity, whole->capacity);
            // The part routes unpadded: its map is the block's routed and kept slots.
            EXPECT_TRUE(r->routing_map.equal(whole->routing_map.logical_and(free->routing_map).narrow(0, off, n))) << off;
            EXPECT_TRUE(r->dropped.equal(whole->dropped.narrow(0, off, n))) << off;
            EXPECT_TRUE(at::allclose(r->probs, whole->probs.narrow(0, off, n))) << off;
          }
        }
      }
    }
  }
}

// Expert choice in parts of a block: each part's choices and weights are the whole block's
// rows, its counts add up to the block's; a part outside the block is an error.
TEST(Router, ExpertChoicePartsOfABlock) {
  at::manual_seed(13);
  const int64_t T = 25, E = 5;
  const at::Tensor logits = at::randn({T, E}) * 2;
  absl::StatusOr<Routing> whole = ExpertChoiceRoute(logits, 1.2);
  ASSERT_TRUE(whole.ok()) << whole.status();
  const std::vector<std::pair<int64_t, int64_t>> parts = {{0, 9}, {9, 0}, {9, 16}};
  std::vector<at::Tensor> recorded;
  BlockOfTokens block{.block_tokens = T};
  at::Tensor counts = at::zeros({E}, at::kLong);
  for (bool second : {false, true}) {
    block.gather = [&](const at::Tensor& t) {
      if (second) return at::cat(recorded);
      recorded.push_back(t.clone());
      return at::cat({t, at::zeros({T - t.size(0), t.size(1)}, t.options())});  // any rows, right shape
    };
    for (auto [off, n] : parts) {
      block.offset = off;
      absl::StatusOr<Routing> r = ExpertChoiceRoute(logits.narrow(0, off, n), 1.2, &block);
      ASSERT_TRUE(r.ok()) << r.status();
      if (!second) continue;
      EXPECT_EQ(r->capacity, whole->capacity);
      EXPECT_TRUE(r->routing_map.equal(whole->routing_map.narrow(0, off, n))) << off;
      EXPECT_TRUE(at::allclose(r->probs, whole->probs.narrow(0, off, n))) << off;
      counts += r->tokens_per_expert;
    }
  }
  EXPECT_TRUE(counts.equal(whole->tokens_per_expert));
  block.offset = 20;
  absl::StatusOr<Routing> outside = ExpertChoiceRoute(logits.narrow(0, 0, 9), 1.2, &block);
  ASSERT_FALSE(outside.ok());
  EXPECT_THAT(std::string(outside.status().message()), HasSubstr("tokens [20, 29) of a block of 25"));
}

// The bias moves the choice, never the weights; bf16 logits are routed in fp32.
TEST(Router, ExpertBiasAndPrecision) {
  at::Tensor logits = at::tensor({2.0f, 1.0f, 0.0f, -1.0f}).repeat({2, 1});
  absl::StatusOr<Routing> plain = TopKRoute(logits, {.top_k = 1, .pre_softmax = true});
  absl::StatusOr<Routing> biased = TopKRoute(logits, {.top_k = 1, .pre_softmax = true},
                                             at::tensor({0.0f, 0.0f, 0.0f, 1.0f}));
  ASSERT_TRUE(plain.ok() && biased.ok());
  EXPECT_EQ(plain->routing_map[0][0].item<bool>(), true);
  EXPECT_EQ(biased->routing_map[0][3].item<bool>(), true);  // 0.032 + 1 beats 0.64
  const double softmax_3 = std::exp(-1.0) / (std::exp(2.0) + std::exp(1.0) + 1 + std::exp(-1.0));
  EXPECT_NEAR(biased->probs[0][3].item<float>(), softmax_3, 1e-7);
  absl::StatusOr<Routing> bf16 = TopKRoute(logits.to(at::kBFloat16), {.top_k = 2});
  ASSERT_TRUE(bf16.ok());
  EXPECT_EQ(bf16->probs.scalar_type(), at::kFloat);
}

}  // namespace
}  // namespace switchyard::gate

namespace switchyard::gate {
namespace {

// The top-k (by rounds up to k = 32, by a partial sort beyond) against a stable descending
// sort, on scores full of exact ties, -0.0 among them (equal to 0.0, so tied by index).
TEST(Router, TopKWithTiesEqualsStableSort) {
  at::manual_seed(5);
  // On 2 threads too: Debian's LibTorch starts tests with one, and the rows split into
  // parallel chunks only with more.
  const int threads = at::get_num_threads();
  for (int n : {1, 2}) {
    at::set_num_threads(n);
    // E = 7, 9, 15, 17, 63 and 64: rows that end inside or at the end of the in-register
    // kernel's 8- and 16-lane groups; 65 and 256 take the other path.
    for (int64_t E : {1, 3, 7, 8, 9, 15, 17, 63, 64, 65, 256}) {
      for (int64_t k : {int64_t{1}, int64_t{2}, int64_t{3}, std::min<int64_t>(8, E), std::min<int64_t>(32, E),
                        std::min<int64_t>(33, E), E}) {
        if (k > E) continue;
        // Values -2, -1, ±0 and 1: ties everywhere, and rows with negative keys throughout.
        at::Tensor logits = at::randint(-2, 3, {257, E}).to(at::kFloat);
        logits = logits.masked_fill(logits == 2, -0.0);
        absl::StatusOr<Routing> r = TopKRoute(logits, {.top_k = static_cast<int>(k)});
        ASSERT_TRUE(r.ok()) << r.status();
        const at::Tensor want =
            std::get<1>(at::sort(logits, /*stable=*/true, /*dim=*/1, /*descending=*/true)).narrow(1, 0, k);
        EXPECT_TRUE(r->topk_indices.equal(want)) << "E=" << E << " k=" << k << " threads " << n;
      }
    }
  }
  at::set_num_threads(threads);
}

// The softmax scores and the choice before dropping are handed on exactly when they are the
// aux loss's inputs (AuxLossScores): softmax before top-k, no groups, no bias.
TEST(Router, HandsOnTheAuxLossInputsWhenTheyAreThem) {
  at::manual_seed(41);
  const at::Tensor logits = at::randn({48, 8});
  const TopKOptions capped{.top_k = 2, .pre_softmax = true, .capacity_factor = 0.75};
  absl::StatusOr<Routing> r = TopKRoute(logits, capped);
  ASSERT_TRUE(r.ok()) << r.status();
  absl::StatusOr<AuxLossInputs> a = AuxLossScores(logits, 2, ScoreFunction::kSoftmax);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(r->softmax_scores.defined() && r->chosen.defined());
  EXPECT_TRUE(at::equal(r->softmax_scores, a->scores));
  EXPECT_TRUE(at::equal(r->chosen, a->routing_map));
  EXPECT_TRUE(at::equal(r->tokens_per_expert, a->tokens_per_expert));
  EXPECT_GT(r->dropped.sum().item<int64_t>(), 0);  // chosen is before dropping
  EXPECT_TRUE(at::equal(r->chosen, r->routing_map.logical_or(r->dropped)));
  for (const TopKOptions& o : {TopKOptions{.top_k = 2, .pre_softmax = false},
                               TopKOptions{.top_k = 2, .score = ScoreFunction::kSigmoid},
                               TopKOptions{.top_k = 2, .pre_softmax = true, .num_groups = 4, .group_topk = 2}}) {
    absl::StatusOr<Routing> other = TopKRoute(logits, o);
    ASSERT_TRUE(other.ok()) << other.status();
    EXPECT_FALSE(other->softmax_scores.defined());
  }
  absl::StatusOr<Routing> biased = TopKRoute(logits, {.top_k = 2, .pre_softmax = true}, at::randn({8}));
  ASSERT_TRUE(biased.ok()) << biased.status();
  EXPECT_FALSE(biased->softmax_scores.defined());
}

}  // namespace
}  // namespace switchyard::gate
