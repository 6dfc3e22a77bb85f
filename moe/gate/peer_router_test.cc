// Our router against DeepSpeed 0.19.8's gating functions and torchtitan 0.3.0's
// TokenChoiceTopKRouter and expert-bias update, as their own code computes them on seeded
// fp32 inputs (moe/gate/testdata/{deepspeed,torchtitan}_router.txt, written by
// tests/oracles/make_peer_router_fixtures.py). Values must agree to 1e-6 relative error;
// gradients, which go through a softmax or sigmoid and a normalisation summed in another
// order, to 1e-5 (DeepSpeed's: see kDeepSpeedGradTol).
#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "moe/gate/router.h"
#include "moe/gate/testing/fixtures.h"

namespace switchyard::gate {
namespace {

using ::testing::HasSubstr;
using testing::BoolOption;
using testing::DoubleOption;
using testing::FixtureCase;
using testing::IntOption;
using testing::LoadFixtures;
using testing::MaxRelErr;
using testing::Option;

constexpr double kValueTol = 1e-6;
constexpr double kGradTol = 1e-5;
// DeepSpeed's logit gradients add l_aux's gradient to the combine weights' and then go
// through the softmax's backward, s·(g − Σ g·s): the small entries (1e-4 to 1e-5) are what
// is left of terms up to 0.5 cancelling, and carry the rounding of those terms (at most
// 3e-8 here, one ulp of the largest entry, for LibTorch 1.13 against torch 2.11). Elementwise
// that is up to 3e-5 relative, so the bound is 1e-4 elementwise, and 1e-6 of the largest
// entry, as for values, over the whole tensor.
constexpr double kDeepSpeedGradTol = 1e-4;

// max |a − b| / max |b|: the error against the tensor's scale.
double MaxErrOverScale(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>() / b.abs().max().item<double>();
}

// The options that make TopKRoute route as DeepSpeed's top1gating (use_rts=False),
// top2gating (top2_2nd_expert_sampling=False) or topkgating.
TopKOptions DeepSpeedOptions(const FixtureCase& c) {
  const std::string gate = Option(c, "gate");
  TopKOptions o;
  o.top_k = IntOption(c, "k", 1);
  // gates = softmax over every expert; weights are gates. (top2gating picks the second
  // expert by the logits, we by their softmax: the same unless two different logits round
  // to one softmax value.)
  o.pre_softmax = true;
  // top1gating keeps the bare gate; the others renormalise over what the token kept.
  if (gate != "top1") o.weight_norm = WeightNorm::kKept;
  if (gate == "top2") {
    o.drop_policy = DropPolicy::kByChoiceThenPosition;
  } else {
    o.drop_policy = Option(c, "drop_policy", "position") == "probs" ? DropPolicy::kByScore
                                                                    : DropPolicy::kByPosition;
  }
  o.capacity_factor = BoolOption(c, "drop_tokens") ? DoubleOption(c, "capacity_factor", -1) : 0;
  o.min_capacity = IntOption(c, "min_capacity", -1);
  return o;
}

// Where DeepSpeed puts each kept (token, expert) in the expert's capacity buffer, -1 where
// none: the kept tokens in token order; for top2gating every first choice before the
// second choices.
at::Tensor Slots(const at::Tensor& kept, const at::Tensor& topk_indices, bool by_choice) {
  const int64_t T = kept.size(0), E = kept.size(1), k = topk_indices.size(1);
  at::Tensor rank = at::full({T, E}, k, at::kLong);
  rank.scatter_(1, topk_indices, at::arange(k, at::kLong).expand_as(topk_indices));
  at::Tensor slot = at::full({T, E}, -1, at::kLong);
  for (int64_t e = 0; e < E; ++e) {
    std::vector<std::pair<int64_t, int64_t>> order;  // (choice rank or 0, token)
    for (int64_t t = 0; t < T; ++t) {
      if (kept[t][e].item<bool>()) order.emplace_back(by_choice ? rank[t][e].item<int64_t>() : 0, t);
    }
    std::sort(order.begin(), order.end());
    for (size_t i = 0; i < order.size(); ++i) slot[order[i].second][e] = static_cast<int64_t>(i);
  }
  return slot;
}

TEST(PeerRouter, MatchesDeepSpeedGating) {
  const std::vector<FixtureCase> cases = LoadFixtures("moe/gate/testdata/deepspeed_router.txt");
  int checked = 0, dropping = 0;
  for (const FixtureCase& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string gate = Option(c, "gate");
    const TopKOptions o = DeepSpeedOptions(c);
    at::Tensor logits = c.tensors.at("logits").clone().requires_grad_(true);
    const int64_t T = logits.size(0), E = logits.size(1);
    absl::StatusOr<Routing> r = TopKRoute(logits, o);
    ASSERT_TRUE(r.ok()) << r.status();

    // Capacity: ceil(T / E · capacity_factor · k), at least min_capacity; without
    // dropping, DeepSpeed sizes the buffer to the busiest expert. (DeepSpeed takes the ceil
    // in fp32, we in double: the fixtures' capacity factors are binary fractions, where
    // both are exact.)
    const int64_t capacity = IntOption(c, "capacity", -2);
    if (BoolOption(c, "drop_tokens")) {
      EXPECT_EQ(r->capacity, capacity);
    } else {
      EXPECT_EQ(r->capacity, -1);
      EXPECT_EQ(r->tokens_per_expert.max().item<int64_t>(), capacity);
    }
    EXPECT_TRUE(r->tokens_per_expert.equal(c.tensors.at("exp_counts").to(at::kLong)));

    // l_aux = E · Σᵢ meanₜ(gatesᵢ) · countᵢ / (k·T), the counts before dropping; top2gating
    // counts first choices only, with k = 1.
    absl::StatusOr<AuxLossInputs> in = AuxLossScores(logits, o.top_k, ScoreFunction::kSoftmax);
    ASSERT_TRUE(in.ok()) << in.status();
    const at::Tensor counts = gate == "top2" ? at::bincount(r->topk_indices.select(1, 0), {}, E)
                                             : r->tokens_per_expert;
    const at::Tensor l_aux = LoadBalancingLoss(in->scores, counts, T, gate == "top2" ? 1 : o.top_k, 1.0);
    EXPECT_LE(MaxRelErr(l_aux, c.tensors.at("l_aux")), kValueTol);

    const at::Tensor want_slot = c.tensors.at("slot").to(at::kLong);
    const at::Tensor want_kept = want_slot.ge(0);
    at::Tensor probs = r->probs;
    if (gate == "top1" && r->dropped.any().item<bool>()) {
      // top1gating without random token selection keeps torch.topk(mask, capacity, dim=0)
      // of a 0/1 mask: among equal entries torch.topk's choice, which on the CPU is not
      // the earliest tokens nor any order we can state. That is the one thing not matched:
      // we keep the earliest. DeepSpeed must keep as many tokens per expert, and with its
      // choice of tokens our weights, slots and gradients must be its.
      const at::Tensor routed = r->routing_map.logical_or(r->dropped);
      EXPECT_TRUE(r->routing_map.equal(routed.logical_and(routed.cumsum(0).le(r->capacity))));
      EXPECT_TRUE(want_kept.sum(0).equal(r->routing_map.sum(0)));
      EXPECT_FALSE(want_kept.logical_and(routed.logical_not()).any().item<bool>());
      probs = at::zeros_like(logits).scatter(1, r->topk_indices, r->topk_weights) * want_kept;
      ++dropping;
    } else {
      EXPECT_TRUE(r->routing_map.equal(want_kept));
      dropping += r->dropped.any().item<bool>();
    }
    EXPECT_LE(MaxRelErr(probs, c.tensors.at("combine_weights")), kValueTol);
    EXPECT_TRUE(Slots(want_kept, r->topk_indices, gate == "top2").equal(want_slot));

    ((probs * c.tensors.at("grad_weights")).sum() + l_aux).backward();
    EXPECT_LE(MaxRelErr(logits.grad(), c.tensors.at("grad_logits")), kDeepSpeedGradTol);
    EXPECT_LE(MaxErrOverScale(logits.grad(), c.tensors.at("grad_logits")), kValueTol);
    ++checked;
  }
  EXPECT_EQ(checked, 11);
  EXPECT_EQ(dropping, 8);  // every case that asks DeepSpeed to drop tokens really drops some
}

// Each of DeepSpeed's differences from our defaults, seen on its own fixture: with the
// default drop policy or weight normalisation the numbers are not DeepSpeed's.
TEST(PeerRouter, DeepSpeedNeedsTheNewOptions) {
  const std::vector<FixtureCase> cases = LoadFixtures("moe/gate/testdata/deepspeed_router.txt");
  const FixtureCase& top2 = testing::FindCase(cases, "top2_cf1");
  TopKOptions o = DeepSpeedOptions(top2);
  o.drop_policy = DropPolicy::kByPosition;
  absl::StatusOr<Routing> r = TopKRoute(top2.tensors.at("logits"), o);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->routing_map.equal(top2.tensors.at("slot").ge(0)));
  o = DeepSpeedOptions(top2);
  o.weight_norm = WeightNorm::kTopK;  // normalised before dropping: a lone kept slot stays < 1
  r = TopKRoute(top2.tensors.at("logits"), o);
  ASSERT_TRUE(r.ok());
  EXPECT_GT(MaxRelErr(r->probs, top2.tensors.at("combine_weights")), 1e-2);
  const FixtureCase& min_cap = testing::FindCase(cases, "top4_probs_cf0_5_min5");
  o = DeepSpeedOptions(min_cap);
  o.min_capacity = 0;
  r = TopKRoute(min_cap.tensors.at("logits"), o);
  ASSERT_TRUE(r.ok());
  EXPECT_LT(r->capacity, IntOption(min_cap, "capacity", 0));
}

// The options that make TopKRoute route as torchtitan's TokenChoiceTopKRouter.
TopKOptions TorchtitanOptions(const FixtureCase& c) {
  TopKOptions o;
  o.top_k = IntOption(c, "top_k", -1);
  o.score = Option(c, "score_func") == "sigmoid" ? ScoreFunction::kSigmoid : ScoreFunction::kSoftmax;
  o.pre_softmax = true;  // softmax over every expert, then the top k
  o.num_groups = IntOption(c, "num_expert_groups", 0);
  o.group_topk = IntOption(c, "num_limited_groups", 0);
  if (o.num_groups > 0) o.group_score_topk = 2;  // a group scores by its best two experts
  o.weight_norm = BoolOption(c, "route_norm") ? WeightNorm::kTopK : WeightNorm::kNone;
  o.scaling_factor = static_cast<float>(DoubleOption(c, "route_scale", 1.0));
  return o;
}

TEST(PeerRouter, MatchesTorchtitanRouter) {
  const std::vector<FixtureCase> cases = LoadFixtures("moe/gate/testdata/torchtitan_router.txt");
  int checked = 0;
  for (const FixtureCase& c : cases) {
    if (Option(c, "kind") != "torchtitan") continue;
    SCOPED_TRACE(c.name);
    at::Tensor x = c.tensors.at("x").clone().requires_grad_(true);
    at::Tensor w = c.tensors.at("gate_weight").clone().requires_grad_(true);
    at::Tensor logits = at::linear(x, w);
    logits.retain_grad();
    // x and the weight are multiples of 1/512 in [-1, 1], so every partial sum is exact.
    EXPECT_TRUE(logits.detach().equal(c.tensors.at("logits")));
    const at::Tensor bias = c.tensors.count("expert_bias") ? c.tensors.at("expert_bias") : at::Tensor();
    absl::StatusOr<Routing> r = TopKRoute(logits, TorchtitanOptions(c), bias);
    ASSERT_TRUE(r.ok()) << r.status();
    // torchtitan's top k come unsorted (torch.topk(sorted=False)); compare as [T, E].
    const at::Tensor ids = c.tensors.at("ids").to(at::kLong);
    const at::Tensor want_map = at::zeros_like(r->routing_map).scatter_(1, ids, true);
    EXPECT_TRUE(r->routing_map.equal(want_map));
    const at::Tensor want_probs = at::zeros_like(r->probs).scatter(1, ids, c.tensors.at("top_scores"));
    EXPECT_LE(MaxRelErr(r->probs, want_probs), kValueTol);
    (r->probs * c.tensors.at("grad_weights")).sum().backward();
    EXPECT_LE(MaxRelErr(logits.grad(), c.tensors.at("grad_logits")), kGradTol);
    EXPECT_LE(MaxRelErr(x.grad(), c.tensors.at("grad_x")), kGradTol);
    EXPECT_LE(MaxRelErr(w.grad(), c.tensors.at("grad_gate_weight")), kGradTol);
    ++checked;
  }
  EXPECT_EQ(checked, 6);
}

// With our defaults, each of the options above changes torchtitan's numbers.
TEST(PeerRouter, TorchtitanNeedsTheNewOptions) {
  const std::vector<FixtureCase> cases = LoadFixtures("moe/gate/testdata/torchtitan_router.txt");
  auto route = [](const FixtureCase& c, const TopKOptions& o) {
    const at::Tensor bias = c.tensors.count("expert_bias") ? c.tensors.at("expert_bias") : at::Tensor();
    absl::StatusOr<Routing> r = TopKRoute(c.tensors.at("logits"), o, bias);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? r->probs : at::Tensor();
  };
  auto want = [](const FixtureCase& c) {
    return at::zeros({c.tensors.at("logits").size(0), c.tensors.at("logits").size(1)})
        .scatter(1, c.tensors.at("ids").to(at::kLong), c.tensors.at("top_scores"));
  };
  for (const char* name : {"softmax_k3_norm_scaled_groups_bias", "sigmoid_k6_norm_scaled_groups_bias"}) {
    SCOPED_TRACE(name);
    const FixtureCase& c = testing::FindCase(cases, name);
    TopKOptions o = TorchtitanOptions(c);
    EXPECT_LE(MaxRelErr(route(c, o), want(c)), kValueTol);
    o.group_score_topk = 0;  // Megatron-Core's top_k / group_topk experts per group score
    EXPECT_FALSE(route(c, o).ne(0).equal(want(c).ne(0)));
  }
  const FixtureCase& unnormalised = testing::FindCase(cases, "sigmoid_k2_bias");
  TopKOptions o = TorchtitanOptions(unnormalised);
  o.weight_norm = WeightNorm::kSigmoidTopK;
  EXPECT_GT(MaxRelErr(route(unnormalised, o), want(unnormalised)), 1e-2);
  const FixtureCase& normalised = testing::FindCase(cases, "softmax_k3_norm_scaled_groups_bias");
  o = TorchtitanOptions(normalised);
  o.weight_norm = WeightNorm::kSigmoidTopK;
  EXPECT_GT(MaxRelErr(route(normalised, o), want(normalised)), 1e-2);
}

TEST(PeerRouter, MatchesTorchtitanBiasUpdate) {
  const std::vector<FixtureCase> cases = LoadFixtures("moe/gate/testdata/torchtitan_router.txt");
  int checked = 0;
  for (const FixtureCase& c : cases) {
    if (Option(c, "kind") != "bias_update") continue;
    SCOPED_TRACE(c.name);
    const at::Tensor& bias = c.tensors.at("expert_bias");
    const at::Tensor& counts = c.tensors.at("tokens_per_expert");
    const double rate = DoubleOption(c, "rate", 0);
    const at::Tensor want = c.tensors.at("updated_bias");
    EXPECT_LE(MaxRelErr(UpdateExpertBias(bias, counts, rate, /*center=*/true), want), kValueTol);
    // Not centred (Megatron-Core's rule) the step is off by its mean, which is not 0 here.
    EXPECT_GT(MaxRelErr(UpdateExpertBias(bias, counts, rate), want), 1e-2);
    ++checked;
  }
  EXPECT_EQ(checked, 2);
  // Counts 2, 4, 4, 6: steps +1, 0, 0, -1 have mean 0 already; 2, 2, 6 (steps +1, +1, -1, mean
  // 1/3) do not.
  EXPECT_TRUE(UpdateExpertBias(at::zeros({4}), at::tensor({2, 4, 4, 6}), 0.5, true)
                  .equal(at::tensor({0.5f, 0.0f, 0.0f, -0.5f})));
  const at::Tensor b = UpdateExpertBias(at::zeros({3}), at::tensor({2, 2, 6}), 0.75, true);
  EXPECT_TRUE(at::allclose(b, at::tensor({0.5f, 0.5f, -1.0f})));
  EXPECT_NEAR(b.sum().item<float>(), 0.0f, 1e-7);
}

TEST(PeerRouter, NewOptionsAreChecked) {
  auto err = [](absl::StatusOr<Routing> s) { return s.ok() ? std::string("accepted") : std::string(s.status().message()); };
  EXPECT_THAT(err(TopKRoute(at::zeros({2, 8}), {.top_k = 2, .num_groups = 4, .group_topk = 2, .group_score_topk = 3})),
              HasSubstr("group_score_topk = 3 must be between 0 and the 2 experts of a group"));
  EXPECT_THAT(err(TopKRoute(at::zeros({2, 8}), {.top_k = 2, .group_score_topk = 2})), HasSubstr("num_groups = 0"));
  EXPECT_THAT(err(TopKRoute(at::zeros({2, 8}), {.top_k = 2, .capacity_factor = 1, .min_capacity = -1})),
              HasSubstr("min_capacity = -1 must be >= 0"));
  // A token whose every slot is dropped gets weights 0, not NaN (the sum is clamped).
  absl::StatusOr<Routing> r = TopKRoute(at::zeros({4, 2}), {.top_k = 2, .pre_softmax = true,
                                                           .weight_norm = WeightNorm::kKept,
                                                           .capacity_factor = 0.5});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->capacity, 2);
  EXPECT_TRUE(r->probs.equal(at::tensor({0.5f, 0.5f, 0.5f, 0.5f, 0.0f, 0.0f, 0.0f, 0.0f}).view({4, 2})));
}

}  // namespace
}  // namespace switchyard::gate
