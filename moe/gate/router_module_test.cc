#include "moe/gate/router_module.h"

#include <functional>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/CPUGeneratorImpl.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace switchyard::gate {
namespace {

using ::testing::HasSubstr;

at::Tensor Hidden(int64_t T, int64_t H, uint64_t seed) {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::empty({T, H}).normal_(0, 1, g);
}

TEST(RouterModule, EvalForwardIsTopKRouteOfTheLogits) {
  absl::StatusOr<Router> r = Router::Create({.hidden_size = 16, .num_experts = 8,
                                             .topk = {.top_k = 2}, .jitter_eps = 0.1f,
                                             .noisy_gating = true, .z_loss_coeff = 1e-3}, 5);
  ASSERT_TRUE(r.ok()) << r.status();
  const at::Tensor h = Hidden(32, 16, 1);
  absl::StatusOr<RouterOutput> out = r->Forward(h, {.training = false});  // no jitter, no noise
  ASSERT_TRUE(out.ok()) << out.status();
  const at::Tensor logits = at::matmul(h, r->weight().detach().t());
  EXPECT_TRUE(at::allclose(out->logits, logits));
  absl::StatusOr<Routing> direct = TopKRoute(logits, {.top_k = 2});
  ASSERT_TRUE(direct.ok());
  EXPECT_TRUE(out->routing.routing_map.equal(direct->routing_map));
  EXPECT_TRUE(at::allclose(out->routing.probs, direct->probs));
  absl::StatusOr<AuxLossInputs> in = AuxLossScores(logits, 2, ScoreFunction::kSoftmax);
  ASSERT_TRUE(in.ok());
  EXPECT_NEAR(out->aux_loss_value, LoadBalancingLoss(in->scores, in->tokens_per_expert, 32, 2, 0.01).item<double>(), 1e-7);
  EXPECT_NEAR(out->z_loss_value, ZLoss(logits, 1e-3).item<double>(), 1e-9);
  // Both losses reach the gate weight.
  (out->aux_loss + out->z_loss).backward();
  EXPECT_GT(r->weight().grad().abs().sum().item<float>(), 0);
}

TEST(RouterModule, JitterAndNoiseAreSeededAndTrainingOnly) {
  RouterConfig c{.hidden_size = 16, .num_experts = 8, .topk = {.top_k = 2}, .jitter_eps = 0.2f,
                 .noisy_gating = true};
  const at::Tensor h = Hidden(64, 16, 2);
  auto run = [&](uint64_t seed) {
    absl::StatusOr<Router> r = Router::Create(c, seed);
    EXPECT_TRUE(r.ok());
    absl::StatusOr<RouterOutput> out = r->Forward(h, {.training = true});
    EXPECT_TRUE(out.ok());
    return out->routing.probs.detach();
  };
  EXPECT_TRUE(run(11).equal(run(11)));   // reproducible from the seed
  EXPECT_FALSE(run(11).equal(run(12)));  // and it does depend on it
  // Jitter itself: each factor within [1 − eps, 1 + eps], and not all equal to 1.
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(3);
  const at::Tensor ones = at::ones({1000});
  const at::Tensor j = ApplyJitter(ones, 0.1f, g);
  EXPECT_GE(j.min().item<float>(), 0.9f);
  EXPECT_LE(j.max().item<float>(), 1.1f);
  EXPECT_GT(j.std().item<float>(), 0.03f);  // uniform on [0.9, 1.1]: std 0.0577
}

TEST(RouterModule, SequenceAndGlobalAuxLoss) {
  RouterConfig c{.hidden_size = 8, .num_experts = 4, .topk = {.top_k = 1}, .aux_loss = AuxLoss::kSequence};
  absl::StatusOr<Router> r = Router::Create(c, 1);
  ASSERT_TRUE(r.ok());
  const at::Tensor h = Hidden(24, 8, 3);
  absl::StatusOr<RouterOutput> seq = r->Forward(h, {.num_sequences = 3});
  ASSERT_TRUE(seq.ok()) << seq.status();
  absl::StatusOr<AuxLossInputs> in = AuxLossScores(seq->logits, 1, ScoreFunction::kSoftmax);
  ASSERT_TRUE(in.ok());
  EXPECT_NEAR(seq->aux_loss_value, SequenceLoadBalancingLoss(in->scores, in->routing_map, 3, 1, 0.01)->item<double>(), 1e-8);
  EXPECT_FALSE(r->Forward(h, {.num_sequences = 5}).ok());

  // Global: counts and token totals summed over the DP group (here: two identical ranks).
  c.aux_loss = AuxLoss::kGlobal;
  absl::StatusOr<Router> g = Router::Create(c, 1);
  ASSERT_TRUE(g.ok());
  EXPECT_THAT(std::string(g->Forward(h, {}).status().message()), HasSubstr("sum_over_dp"));
  absl::StatusOr<RouterOutput> glob = g->Forward(h, {.sum_over_dp = [](const at::Tensor& t) { return t * 2; }});
  ASSERT_TRUE(glob.ok()) << glob.status();
  EXPECT_NEAR(glob->aux_loss_value,
              LoadBalancingLoss(in->scores, in->tokens_per_expert * 2, 48, 1, 0.01).item<double>(), 1e-8);
  // Weighted by the data-parallel replicas the optimizer averages over.
  absl::StatusOr<RouterOutput> two = g->Forward(h, {.sum_over_dp = [](const at::Tensor& t) { return t * 2; },
                                                    .dp_replicas = 2});
  ASSERT_TRUE(two.ok()) << two.status();
  EXPECT_NEAR(two->aux_loss_value, 2 * glob->aux_loss_value, 1e-9);
  // Micro-batches of one training step: the counts are averaged over the step so far (each
  // summed over DP), the token total is the micro-batch's; micro-batch 0 starts a new step,
  // and the last one may come again (a failed or recomputed forward), replacing its counts.
  const auto dp2 = [](const at::Tensor& t) { return t * 2; };
  const at::Tensor h1 = Hidden(16, 8, 5);
  absl::StatusOr<RouterOutput> m0 = g->Forward(h, {.training = true, .sum_over_dp = dp2, .micro_batch = 0});
  absl::StatusOr<RouterOutput> m1 = g->Forward(h1, {.training = true, .sum_over_dp = dp2, .micro_batch = 1});
  ASSERT_TRUE(m0.ok() && m1.ok()) << m1.status();
  absl::StatusOr<AuxLossInputs> in1 = AuxLossScores(m1->logits, 1, ScoreFunction::kSoftmax);
  ASSERT_TRUE(in1.ok());
  const at::Tensor mean = (in->tokens_per_expert * 2 + in1->tokens_per_expert * 2).to(at::kDouble) / 2;
  const double want1 = LoadBalancingLoss(in1->scores, mean.to(at::kFloat), 32, 1, 0.01).item<double>();
  const double alone1 = LoadBalancingLoss(in1->scores, in1->tokens_per_expert * 2, 32, 1, 0.01).item<double>();
  EXPECT_NEAR(m1->aux_loss_value, want1, 1e-8);
  EXPECT_GT(std::abs(want1 - alone1), 1e-4);  // the average is not micro-batch 1's counts
  EXPECT_NEAR(m0->aux_loss_value, glob->aux_loss_value, 1e-12);
  absl::StatusOr<RouterOutput> again = g->Forward(h1, {.training = true, .sum_over_dp = dp2, .micro_batch = 1});
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_NEAR(again->aux_loss_value, want1, 1e-8);
  EXPECT_THAT(std::string(g->Forward(h1, {.training = true, .sum_over_dp = dp2, .micro_batch = 3}).status().message()),
              HasSubstr("micro_batch = 3 does not follow the step's 2 micro-batch(es) so far"));
  EXPECT_THAT(std::string(g->Forward(h1, {.training = true, .sum_over_dp = dp2, .micro_batch = -1}).status().message()),
              HasSubstr("micro_batch = -1"));
  // Another rank that numbers this micro-batch 3: every rank finds out in the sum.
  const auto other_numbering = [](const at::Tensor& t) {
    at::Tensor u = t.clone();
    const int64_t n = t.size(0);
    if (n > 4) u[n - 3] = 3.0, u[n - 2] = 9.0;  // (1, micro_batch, micro_batch², tokens) at the end
    return t + u;
  };
  EXPECT_THAT(std::string(g->Forward(h1, {.training = true, .sum_over_dp = other_numbering, .micro_batch = 2})
                              .status()
                              .message()),
              HasSubstr("the ranks that sum the global aux loss gave different micro_batch values (this one 2)"));
  // Outside training each call counts alone and leaves the step as it was.
  absl::StatusOr<RouterOutput> eval = g->Forward(h1, {.sum_over_dp = dp2, .micro_batch = 0});
  ASSERT_TRUE(eval.ok());
  EXPECT_NEAR(eval->aux_loss_value, alone1, 1e-8);
  absl::StatusOr<RouterOutput> m2 = g->Forward(h1, {.training = true, .sum_over_dp = dp2, .micro_batch = 2});
  ASSERT_TRUE(m2.ok()) << m2.status();
  absl::StatusOr<RouterOutput> next = g->Forward(h1, {.training = true, .sum_over_dp = dp2, .micro_batch = 0});  // a new step
  ASSERT_TRUE(next.ok());
  EXPECT_NEAR(next->aux_loss_value,
              LoadBalancingLoss(in1->scores, in1->tokens_per_expert * 2, 32, 1, 0.01).item<double>(), 1e-8);
}

// A block of 24 tokens (3 sequences of 8) routed in three uneven parts, as a TP group's
// routers do: each part's aux loss (batch and per sequence) and z-loss are its share of the
// block's, so the parts' losses and gate gradients add up to those of one router given the
// whole block. sum_over_block stands in for the group's all-reduce: a first round records
// what each part hands it, the second hands back the parts' sum, checked against the block's
// own counts.
TEST(RouterModule, PartsOfABlockAddUpToTheBlock) {
  const int64_t T = 24, N = 3, E = 4;
  const at::Tensor h = Hidden(T, 8, 4);
  for (auto [aux, order] : {std::pair{AuxLoss::kBatch, SequenceOrder::kWhole},
                            std::pair{AuxLoss::kSequence, SequenceOrder::kWhole},
                            std::pair{AuxLoss::kSequence, SequenceOrder::kInterleaved}}) {
    SCOPED_TRACE(aux == AuxLoss::kBatch                ? "batch"
                 : order == SequenceOrder::kWhole ? "sequence, whole sequences"
                                                  : "sequence, interleaved");
    RouterConfig c{.hidden_size = 8, .num_experts = E, .topk = {.top_k = 2}, .aux_loss = aux,
                   .aux_loss_coeff = 0.1, .z_loss_coeff = 0.01, .init_std = 0.5f};
    absl::StatusOr<Router> whole = Router::Create(c, 7), parts = Router::Create(c, 7);
    ASSERT_TRUE(whole.ok() && parts.ok());
    absl::StatusOr<RouterOutput> w = whole->Forward(h, {.num_sequences = N, .sequence_order = order});
    ASSERT_TRUE(w.ok()) << w.status();
    (w->aux_loss + w->z_loss).backward();
    absl::StatusOr<AuxLossInputs> in = AuxLossScores(w->logits, 2, ScoreFunction::kSoftmax);
    ASSERT_TRUE(in.ok());
    const at::Tensor map = in->routing_map.to(at::kFloat);
    const at::Tensor want = aux == AuxLoss::kBatch           ? map.sum(0)
                            : order == SequenceOrder::kWhole ? map.view({N, T / N, E}).sum(1)
                                                             : map.view({T / N, N, E}).sum(0);
    // (The one-element tensor is the block's NaN flag: 0 everywhere here.)
    at::Tensor summed;
    const std::function<at::Tensor(const at::Tensor&)> record = [&](const at::Tensor& t) {
      if (t.numel() == 1) return t;
      summed = summed.defined() ? summed + t : t.clone();
      return t;
    };
    const std::function<at::Tensor(const at::Tensor&)> sum_over_block = [&](const at::Tensor& t) {
      if (t.numel() == 1) return t;
      EXPECT_EQ(t.sizes(), summed.sizes());
      return summed;
    };
    double aux_sum = 0, z = 0;
    for (bool second : {false, true}) {
      for (auto [off, n] : {std::pair<int64_t, int64_t>{0, 10}, {10, 7}, {17, 0}, {17, 7}}) {
        absl::StatusOr<RouterOutput> p = parts->Forward(
            h.narrow(0, off, n), {.num_sequences = N, .sequence_order = order, .block_tokens = T,
                                  .block_offset = off, .sum_over_block = second ? sum_over_block : record});
        ASSERT_TRUE(p.ok()) << p.status();
        if (!second) continue;
        (p->aux_loss + p->z_loss).backward();
        aux_sum += p->aux_loss_value;
        z += p->z_loss_value;
      }
      if (!second) {
        EXPECT_TRUE(summed.equal(want)) << "the parts' counts add up to the block's";
      }
    }
    EXPECT_NEAR(aux_sum, w->aux_loss_value, 1e-6 * w->aux_loss_value);
    EXPECT_NEAR(z, w->z_loss_value, 1e-6 * w->z_loss_value);
    EXPECT_TRUE(at::allclose(parts->weight().grad(), whole->weight().grad(), 1e-5, 1e-7));
    // A part outside the block, or no way to sum over it: a clear error.
    EXPECT_THAT(std::string(parts->Forward(h.narrow(0, 0, 10), {.num_sequences = N, .block_tokens = T,
                                                                 .block_offset = 20, .sum_over_block = record})
                                .status()
                                .message()),
                HasSubstr("tokens [20, 30) inside the block of 24"));
    EXPECT_FALSE(parts->Forward(h, {.num_sequences = N, .block_tokens = T}).ok());
  }
  // No tokens at all: every loss is 0, not 0/0.
  RouterConfig c{.hidden_size = 8, .num_experts = E, .topk = {.top_k = 2}, .aux_loss = AuxLoss::kSequence,
                 .z_loss_coeff = 0.01};
  absl::StatusOr<Router> r = Router::Create(c, 7);
  ASSERT_TRUE(r.ok());
  absl::StatusOr<RouterOutput> empty = r->Forward(at::zeros({0, 8}), {.num_sequences = 2});
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_EQ(empty->aux_loss_value, 0.0);
  EXPECT_EQ(empty->z_loss_value, 0.0);
}

// In training, a part of a block draws the block's jitter and noise from its stream and
// keeps its rows: the parts route as one router of the whole block with the same stream;
// other streams draw other noise, stream 0 what a plain router draws.
TEST(RouterModule, PartsOfABlockDrawTheBlocksNoise) {
  const int64_t T = 20;
  const at::Tensor h = Hidden(T, 8, 9);
  const RouterConfig c{.hidden_size = 8, .num_experts = 4, .topk = {.top_k = 2}, .jitter_eps = 0.2f,
                       .noisy_gating = true, .aux_loss = AuxLoss::kNone};
  auto probs = [&](uint64_t stream, int64_t off, int64_t n, bool part) {
    absl::StatusOr<Router> r = Router::Create(c, 3, stream);
    EXPECT_TRUE(r.ok());
    ForwardArgs a{.training = true};
    if (part) {
      a.block_tokens = T;
      a.block_offset = off;
      a.sum_over_block = [](const at::Tensor& t) { return t; };  // the NaN flag: this part's
    }
    absl::StatusOr<RouterOutput> out = r->Forward(h.narrow(0, off, n), a);
    EXPECT_TRUE(out.ok()) << out.status();
    return out->routing.probs.detach();
  };
  for (uint64_t stream : {0, 3}) {
    const at::Tensor whole = probs(stream, 0, T, false);
    for (auto [off, n] : {std::pair<int64_t, int64_t>{0, 8}, {8, 0}, {8, 12}}) {
      EXPECT_TRUE(probs(stream, off, n, true).equal(whole.narrow(0, off, n))) << "stream " << stream << ", rows " << off;
    }
  }
  EXPECT_FALSE(probs(3, 0, T, false).equal(probs(0, 0, T, false)));
  EXPECT_FALSE(probs(4, 0, T, false).equal(probs(3, 0, T, false)));
}

TEST(RouterModule, ExpertBiasSteersTheChoiceAfterUpdates) {
  RouterConfig c{.hidden_size = 8, .num_experts = 4, .topk = {.top_k = 1, .pre_softmax = true},
                 .expert_bias = true, .bias_update_rate = 0.5};
  absl::StatusOr<Router> r = Router::Create(c, 4);
  ASSERT_TRUE(r.ok());
  const at::Tensor h = Hidden(40, 8, 5);
  absl::StatusOr<RouterOutput> before = r->Forward(h, {});
  ASSERT_TRUE(before.ok());
  const at::Tensor counts = before->routing.tokens_per_expert;
  ASSERT_TRUE(r->UpdateBias(counts).ok());
  const at::Tensor n = counts.to(at::kFloat);
  EXPECT_TRUE(r->expert_bias().equal(at::sign(n.mean() - n) * 0.5));
  // Bad counts are an error and leave the bias alone (a [4, 1] tensor would broadcast it to [4, 4]).
  const at::Tensor kept = r->expert_bias().clone();
  for (const at::Tensor& bad : {at::Tensor(), at::ones({4, 1}), at::ones({5}), at::full({4}, NAN), at::full({4}, -1.0)}) {
    const absl::Status s = r->UpdateBias(bad);
    EXPECT_FALSE(s.ok());
    EXPECT_THAT(std::string(s.message()), HasSubstr("tokens_per_expert must be"));
  }
  EXPECT_TRUE(r->expert_bias().equal(kept));
  absl::StatusOr<RouterOutput> after = r->Forward(h, {});
  ASSERT_TRUE(after.ok());
  // The most loaded expert gets fewer tokens once its bias went down; weights stay unbiased.
  const int64_t busiest = counts.argmax().item<int64_t>();
  EXPECT_LT(after->routing.tokens_per_expert[busiest].item<int64_t>(), counts[busiest].item<int64_t>());
  const at::Tensor s = at::softmax(after->logits, -1);
  EXPECT_TRUE(at::allclose(after->routing.probs.detach(), s * after->routing.routing_map));
}

// RouterLogits (fp32 oneDNN matmul primitives on the CPU) against fp64 products: the
// logits and both gradients, for fp32 and bf16 hidden states, at router-like and odd sizes,
// and for zero tokens.
TEST(RouterModule, LogitsAndTheirGradientsMatchFp64) {
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
    for (auto [T, H, E] : {std::tuple<int64_t, int64_t, int64_t>{512, 256, 64}, {37, 24, 5}, {0, 16, 4}}) {
      SCOPED_TRACE(testing::Message() << at::toString(dt) << " T=" << T << " H=" << H << " E=" << E);
      const at::Tensor x = Hidden(T, H, 8).to(dt).requires_grad_(true);
      const at::Tensor w = (Hidden(E, H, 9) * 0.1).requires_grad_(true);
      const at::Tensor g = Hidden(T, E, 10);
      const at::Tensor logits = RouterLogits(x, w);
      ASSERT_EQ(logits.scalar_type(), at::kFloat);
      ASSERT_EQ(logits.sizes(), (std::vector<int64_t>{T, E}));
      logits.backward(g);
      ASSERT_EQ(x.grad().scalar_type(), dt);
      const at::Tensor xd = x.detach().to(at::kDouble), wd = w.detach().to(at::kDouble), gd = g.to(at::kDouble);
      auto rel = [](const at::Tensor& got, const at::Tensor& want) {
        return want.numel() == 0 ? 0.0
                                 : (got.to(at::kDouble) - want).abs().max().item<double>() /
                                       std::max(want.abs().max().item<double>(), 1e-30);
      };
      EXPECT_LT(rel(logits.detach(), xd.mm(wd.t())), 5e-6);  // fp32 rounding, not bf16 (~4e-3)
      EXPECT_LT(rel(w.grad(), gd.t().mm(xd)), 5e-6);
      // The input gradient is rounded once, to x's dtype.
      EXPECT_LT(rel(x.grad(), gd.mm(wd)), dt == at::kFloat ? 5e-6 : 4e-3);
      if (T > 0) {
        EXPECT_GT(w.grad().abs().max().item<double>(), 0);
      }
    }
  }
  // Only the weight needs a gradient (the router's usual case in inference-free tests).
  const at::Tensor w = Hidden(4, 8, 11).requires_grad_(true);
  RouterLogits(Hidden(6, 8, 12), w).sum().backward();
  EXPECT_TRUE(at::allclose(w.grad(), Hidden(6, 8, 12).sum(0).expand({4, 8}), 1e-5, 1e-6));
}

// A token's logits do not depend on which other tokens share the product: a TP slice, an SP
// share or a CP chunk of a block gets its rows of the whole block's logits bit for bit, on 1
// and 2 threads. So no layout can flip a near-tie in the top-k choice or a capacity cut
// (the launcher's check compares a layout with one process at the spec's init std 0.02,
// where near-ties do occur); were this to fail on some CPU, that check could report a
// routing difference there that no layout error caused.
TEST(RouterModule, LogitsOfAPartAreTheBlocksRows) {
  const int threads = at::get_num_threads();
  for (int n : {1, 2}) {
    at::set_num_threads(n);
    for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
      for (auto [H, E] : {std::pair<int64_t, int64_t>{512, 64}, {1024, 8}, {96, 256}}) {
        SCOPED_TRACE(testing::Message() << at::toString(dt) << " H=" << H << " E=" << E << ", " << n << " threads");
        const at::Tensor x = Hidden(2048, H, 13).to(dt), w = Hidden(E, H, 14) * 0.02;
        const at::Tensor whole = RouterLogits(x, w);
        for (auto [off, len] : {std::pair<int64_t, int64_t>{0, 1024}, {1024, 1024}, {1, 1023}, {5, 7}, {2047, 1}, {100, 683}}) {
          EXPECT_TRUE(RouterLogits(x.narrow(0, off, len).contiguous(), w).equal(whole.narrow(0, off, len)))
              << "rows " << off << " to " << off + len;
        }
      }
    }
  }
  at::set_num_threads(threads);
}

TEST(RouterModule, ExpertChoiceAndBadInput) {
  absl::StatusOr<Router> r = Router::Create({.hidden_size = 8, .num_experts = 4,
                                             .type = RoutingType::kExpertChoice,
                                             .topk = {.capacity_factor = 1.0}}, 1);
  ASSERT_TRUE(r.ok());
  absl::StatusOr<RouterOutput> out = r->Forward(Hidden(16, 8, 6), {});
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_TRUE(out->routing.tokens_per_expert.equal(at::full({4}, 4, at::kLong)));
  EXPECT_THAT(std::string(r->Forward(Hidden(16, 7, 6), {}).status().message()), HasSubstr("[tokens, 8]"));
  EXPECT_FALSE(Router::Create({.hidden_size = 0, .num_experts = 4}, 1).ok());
  EXPECT_FALSE(Router::Create({.hidden_size = 8, .num_experts = 4, .jitter_eps = 1.5f}, 1).ok());
  // NaN and inf settings are refused by name (NaN fails every comparison, so a plain `< 0`
  // check let them through: a NaN loss coefficient switched its loss off).
  for (auto [field, c] : {std::pair<const char*, RouterConfig>{"aux_loss_coeff = nan", {.aux_loss_coeff = NAN}},
                          {"z_loss_coeff = inf", {.z_loss_coeff = INFINITY}},
                          {"bias_update_rate = nan", {.bias_update_rate = NAN}},
                          {"init_std = -1", {.init_std = -1.0f}}}) {
    c.hidden_size = 8;
    c.num_experts = 4;
    EXPECT_THAT(std::string(Router::Create(c, 1).status().message()), HasSubstr(field));
  }
  // NaN hidden states become NaN logits: refused, not routed.
  at::Tensor bad = Hidden(4, 8, 7);
  bad[2][3] = NAN;
  absl::StatusOr<Router> tc = Router::Create({.hidden_size = 8, .num_experts = 4, .topk = {.top_k = 1}}, 1);
  EXPECT_THAT(std::string(tc->Forward(bad, {}).status().message()), HasSubstr("NaN or inf"));
  // With all_finite, the routers that meet later agree once, after the logits: each states
  // its own verdict, and stops if any other's was bad.
  std::vector<bool> said;
  ForwardArgs a{.all_finite = [&](bool ok) {
    said.push_back(ok);
    return false;  // another rank's was bad
  }};
  EXPECT_THAT(std::string(tc->Forward(Hidden(4, 8, 7), a).status().message()),
              HasSubstr("another rank stopped before routing"));
  EXPECT_THAT(std::string(tc->Forward(bad, a).status().message()), HasSubstr("hidden states hold NaN or inf"));
  at::Tensor huge = Hidden(4, 8, 7);
  huge[1].fill_(3e38f);  // x 100-ish weights: the logits overflow
  absl::StatusOr<Router> wide =
      Router::Create({.hidden_size = 8, .num_experts = 4, .topk = {.top_k = 1}, .init_std = 100.0f}, 1);
  EXPECT_THAT(std::string(wide->Forward(huge, a).status().message()),
              HasSubstr("logits contain NaN or inf on finite hidden states"));
  EXPECT_EQ(said, (std::vector<bool>{true, false, false}));
  a.all_finite = [&](bool ok) { return ok; };
  EXPECT_TRUE(tc->Forward(Hidden(4, 8, 7), a).ok());
}

}  // namespace
}  // namespace switchyard::gate
