#include "moe/dispatch/permute.h"

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace switchyard::dispatch {
namespace {

using ::testing::HasSubstr;

double MaxRel(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor x = a.to(at::kDouble), y = b.to(at::kDouble);
  return ((x - y).abs() / (y.abs() + 1e-6)).max().item<double>();
}

// A random routing map: each token picks k distinct experts; `empty_expert` gets none and
// `empty_token` (if >= 0) is dropped everywhere.
at::Tensor RandomMap(int64_t T, int64_t E, int k, int empty_expert, int64_t empty_token, uint64_t seed) {
  at::manual_seed(seed);
  at::Tensor scores = at::rand({T, E});
  if (empty_expert >= 0) scores.select(1, empty_expert).fill_(-1);
  at::Tensor idx = std::get<1>(scores.topk(k, 1));
  at::Tensor map = at::zeros({T, E}, at::kBool).scatter_(1, idx, true);
  if (empty_token >= 0) map[empty_token].fill_(false);
  return map;
}

// The obvious reference with plain ATen ops and their autograd: for each expert in order,
// the tokens it got, in token order; combine by index_add of weighted rows.
struct Reference {
  at::Tensor rows, out;
};
Reference Naive(const at::Tensor& x, const at::Tensor& map, const at::Tensor& probs,
                const std::function<at::Tensor(const at::Tensor&)>& expert_fn) {
  std::vector<at::Tensor> tok, flat;
  const int64_t E = map.size(1);
  for (int64_t e = 0; e < E; ++e) {
    at::Tensor t = map.select(1, e).nonzero().reshape({-1});
    tok.push_back(t);
    flat.push_back(t * E + e);
  }
  const at::Tensor tokens = at::cat(tok), flat_idx = at::cat(flat);
  Reference r;
  r.rows = x.index_select(0, tokens);
  const at::Tensor w = probs.reshape({-1}).index_select(0, flat_idx).unsqueeze(1);
  r.out = at::zeros_like(x).index_add(0, tokens, expert_fn(r.rows) * w);
  return r;
}

TEST(PermuteTest, DroplessMatchesNaiveForwardAndBackward) {
  // H = 5: rows of 20 bytes; H = 48: whole 64-byte lines (streamed only in large outputs,
  // LargeRowsMatchTheGather).
  for (auto [k, H] : {std::pair<int, int64_t>{1, 5}, {2, 5}, {8, 5}, {2, 48}, {8, 48}}) {
    SCOPED_TRACE(::testing::Message() << "H = " << H);
    const int64_t T = 37, E = 8;
    const at::Tensor map = RandomMap(T, E, k, /*empty_expert=*/k < 8 ? 3 : -1, /*empty_token=*/4, 100 + k);
    at::manual_seed(7);
    const at::Tensor x0 = at::randn({T, H}), p0 = at::rand({T, E}) * map, R = at::randn({T, H});
    const at::Tensor scale = at::randn({H});  // a row-wise "expert" so gradients are not trivial
    auto expert = [&](const at::Tensor& rows) { return rows * rows * scale; };

    at::Tensor xr = x0.clone().requires_grad_(true), pr = p0.clone().requires_grad_(true);
    Reference ref = Naive(xr, map, pr, expert);
    (ref.out * R).sum().backward();

    auto plan = MakePlan(map);
    ASSERT_TRUE(plan.ok()) << plan.status();
    // The weighted unpermute, then the weights applied to the rows first (RowWeights, as the
    // experts do in MoELayer) and the plain sum.
    for (bool weights_first : {false, true}) {
      SCOPED_TRACE(weights_first ? "RowWeights + unweighted Unpermute" : "weighted Unpermute");
      at::Tensor x = x0.clone().requires_grad_(true), p = p0.clone().requires_grad_(true);
      at::Tensor rows = Permute(x, *plan);
      ASSERT_TRUE(at::equal(rows, ref.rows)) << "k=" << k;
      at::Tensor out = weights_first ? Unpermute(expert(rows) * RowWeights(p, *plan).unsqueeze(1), *plan)
                                     : Unpermute(expert(rows), p, *plan);
      EXPECT_LT(MaxRel(out, ref.out), 1e-6) << "k=" << k;
      (out * R).sum().backward();
      EXPECT_LT(MaxRel(x.grad(), xr.grad()), 1e-6) << "k=" << k;
      EXPECT_LT(MaxRel(p.grad(), pr.grad()), 4e-6) << "k=" << k;  // dots of H fp32 products
      EXPECT_EQ(out[4].abs().sum().item<double>(), 0.0);
      EXPECT_EQ(x.grad()[4].abs().sum().item<double>(), 0.0);
    }
    // Counts per expert, the empty expert and the dropped token.
    const at::Tensor counts = map.sum(0);
    for (int64_t e = 0; e < E; ++e) EXPECT_EQ(plan->rows_per_expert[e], counts[e].item<int64_t>());
    if (k < 8) {
      EXPECT_EQ(plan->rows_per_expert[3], 0);
    }
  }
}

// Row tensors larger than the last-level cache are written with streaming stores: the same
// rows, forward (Permute) and backward (the unweighted Unpermute's), bit for bit.
TEST(PermuteTest, LargeRowsMatchTheGather) {
  const int64_t T = 2048, E = 16, H = 1024;  // 8192 fp32 rows of 4 KiB: 32 MiB
  const at::Tensor map = RandomMap(T, E, 4, /*empty_expert=*/5, /*empty_token=*/9, 21);
  auto plan = MakePlan(map);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->num_rows(), 4 * (T - 1));
  at::manual_seed(8);
  const at::Tensor x = at::randn({T, H}).requires_grad_(true);
  const at::Tensor rows = Permute(x, *plan);
  EXPECT_TRUE(at::equal(rows, x.detach().index_select(0, plan->row_token)));
  const at::Tensor r = rows.detach().requires_grad_(true);
  const at::Tensor g = at::randn({T, H});
  Unpermute(r, *plan).backward(g);
  EXPECT_TRUE(at::equal(r.grad(), g.index_select(0, plan->row_token)));
  // The sums over several parallel chunks of tokens, on 1, 2 and 3 threads (the tests above
  // fit in one chunk): every row of
  // token t is a copy of x[t], so its weighted sum is x[t] · Σ_e p[t, e] over its experts, and
  // the plain sum x[t] times its number of copies (0 for the token routed nowhere).
  const at::Tensor p = at::rand({T, E}) * map;
  const at::Tensor xd = x.detach().to(at::kDouble);
  const at::Tensor want_w = xd * p.to(at::kDouble).sum(1, /*keepdim=*/true);
  const at::Tensor want_plain = xd * map.to(at::kDouble).sum(1, /*keepdim=*/true);
  const int threads = at::get_num_threads();
  for (int n : {1, 2, 3}) {
    at::set_num_threads(n);
    EXPECT_TRUE(at::allclose(Unpermute(rows.detach(), p, *plan).to(at::kDouble), want_w, 1e-6, 1e-6)) << n;
    EXPECT_TRUE(at::allclose(Unpermute(rows.detach(), *plan).to(at::kDouble), want_plain, 1e-6, 1e-6)) << n;
  }
  at::set_num_threads(threads);
}

TEST(PermuteTest, CapacityLayoutHasZeroSlots) {
  for (const int64_t H : {3, 16}) {  // 12-byte rows; whole 64-byte lines
    SCOPED_TRACE(::testing::Message() << "H = " << H);
    // 12 tokens over the 3 experts in use, 3 slots each: some expert must drop.
    const int64_t T = 12, E = 4, C = 3;
    const at::Tensor map = RandomMap(T, E, 1, /*empty_expert=*/2, -1, 5);
    // Drop to capacity: keep each expert's first C tokens.
    at::Tensor kept = map.clone();
    for (int64_t e = 0; e < E; ++e) {
      int64_t seen = 0;
      for (int64_t t = 0; t < T; ++t) {
        if (kept[t][e].item<bool>() && ++seen > C) kept[t][e] = false;
      }
    }
    ASSERT_TRUE((map & ~kept).any().item<bool>()) << "nothing dropped";
    auto plan = MakePlan(kept, C);
    ASSERT_TRUE(plan.ok()) << plan.status();
    ASSERT_EQ(plan->num_rows(), E * C);
    const at::Tensor x = at::randn({T, H}).requires_grad_(true);
    const at::Tensor rows = Permute(x, *plan).view({E, C, H});
    for (int64_t e = 0; e < E; ++e) {
      const at::Tensor tok = kept.select(1, e).nonzero().reshape({-1});
      const int64_t n = tok.numel();
      EXPECT_TRUE(at::equal(rows[e].narrow(0, 0, n), x.index_select(0, tok))) << e;
      EXPECT_EQ(rows[e].narrow(0, n, C - n).abs().sum().item<double>(), 0.0) << e;
    }
    // Combine with weight 1: every kept token comes back, dropped ones are zero.
    const at::Tensor probs = kept.to(at::kFloat);
    const at::Tensor out = Unpermute(rows.reshape({E * C, H}), probs, *plan);
    const at::Tensor any = kept.any(1).unsqueeze(1);
    EXPECT_TRUE(at::allclose(out, x * any));
    out.sum().backward();
    EXPECT_TRUE(at::equal(x.grad(), any.to(at::kFloat).expand({T, H})));
    // Unweighted: the same sums, each token's gradient copied to its rows; RowWeights is 0 in the
    // empty slots and each filled slot's weight elsewhere.
    const at::Tensor x2 = x.detach().clone().requires_grad_(true);
    const at::Tensor rows2 = Permute(x2, *plan);
    const at::Tensor out2 = Unpermute(rows2, *plan);
    EXPECT_TRUE(at::equal(out2, out.detach()));
    out2.sum().backward();
    EXPECT_TRUE(at::equal(x2.grad(), x.grad()));
    const at::Tensor w = RowWeights(probs * 0.5, *plan).view({E, C});
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = kept.select(1, e).sum().item<int64_t>();
      EXPECT_TRUE(at::equal(w[e].narrow(0, 0, n), at::full({n}, 0.5f))) << e;
      EXPECT_EQ(w[e].narrow(0, n, C - n).abs().sum().item<double>(), 0.0) << e;
    }
    // The routing weights' gradient: ⟨x[t], g[t]⟩ where (t, e) kept its slot, 0 where dropped.
    const at::Tensor p = (at::rand({T, E}) * kept).requires_grad_(true);
    const at::Tensor g = at::randn({T, H});
    Unpermute(rows.detach().reshape({E * C, H}), p, *plan).backward(g);
    const at::Tensor dot = (x.detach() * g).sum(1, /*keepdim=*/true);
    EXPECT_TRUE(at::allclose(p.grad(), dot * kept, 1e-5, 1e-6)) << p.grad() << dot * kept;
  }

  const int64_t E = 4, C = 5;
  at::Tensor over = at::zeros({C + 1, E}, at::kBool);
  over.select(1, 0).fill_(true);
  auto bad = MakePlan(over, C);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("more than the capacity 5"));
}

// The plan's index tensors against loops that build them one token at a time, for maps that
// span several of MakePlan's parallel blocks of tokens, on 1, 2 and 3 threads, dropless and
// with capacity slots (some tokens dropped).
TEST(PermuteTest, PlanOverManyTokensMatchesASerialBuild) {
  const int threads = at::get_num_threads();
  for (auto [T, E, k, capacity] : {std::tuple<int64_t, int64_t, int, int64_t>{5000, 64, 8, -1},
                                   {3073, 13, 3, -1}, {2500, 16, 2, 330}}) {
    SCOPED_TRACE(::testing::Message() << "T = " << T << ", E = " << E << ", C = " << capacity);
    at::Tensor map = RandomMap(T, E, k, /*empty_expert=*/2, /*empty_token=*/1500, 31);
    if (capacity >= 0) {
      // Keep each expert's first `capacity` tokens, as dropping by position would.
      map = map.logical_and(map.to(at::kLong).cumsum(0) <= capacity);
    }
    const at::Tensor m = map.contiguous();
    const bool* mp = m.data_ptr<bool>();
    std::vector<int64_t> row_token, row_prob, start(E + 1, 0);
    std::vector<std::vector<int64_t>> rows_of(T);
    for (int64_t e = 0; e < E; ++e) {
      int64_t n = 0;
      for (int64_t t = 0; t < T; ++t) {
        if (!mp[t * E + e]) continue;
        rows_of[t].push_back(start[e] + n++);
        row_token.push_back(t), row_prob.push_back(t * E + e);
      }
      for (; capacity >= 0 && n < capacity; ++n) row_token.push_back(-1), row_prob.push_back(0);
      start[e + 1] = start[e] + n;
    }
    std::vector<int64_t> offsets = {0}, token_rows;
    for (int64_t t = 0; t < T; ++t) {
      token_rows.insert(token_rows.end(), rows_of[t].begin(), rows_of[t].end());
      offsets.push_back(static_cast<int64_t>(token_rows.size()));
    }
    auto equal = [](const at::Tensor& got, const std::vector<int64_t>& want) {
      return got.numel() == static_cast<int64_t>(want.size()) &&
             std::equal(want.begin(), want.end(), got.data_ptr<int64_t>());
    };
    for (int n : {1, 2, 3}) {
      at::set_num_threads(n);
      auto plan = MakePlan(map, capacity);
      ASSERT_TRUE(plan.ok()) << plan.status();
      EXPECT_TRUE(equal(plan->row_token, row_token)) << n << " threads";
      EXPECT_TRUE(equal(plan->row_prob_index, row_prob)) << n << " threads";
      EXPECT_TRUE(equal(plan->token_offsets, offsets)) << n << " threads";
      EXPECT_TRUE(equal(plan->token_rows, token_rows)) << n << " threads";
      for (int64_t e = 0; e < E; ++e) EXPECT_EQ(plan->rows_per_expert[e], start[e + 1] - start[e]) << e;
    }
  }
  at::set_num_threads(threads);
}

TEST(PermuteTest, ZeroTokensAndZeroExperts) {
  const at::Tensor map = at::zeros({0, 4}, at::kBool);
  auto plan = MakePlan(map);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->num_rows(), 0);
  const at::Tensor x = at::randn({0, 6}).requires_grad_(true);
  const at::Tensor out = Unpermute(Permute(x, *plan), at::zeros({0, 4}), *plan);
  EXPECT_EQ(out.size(0), 0);
  EXPECT_EQ(out.size(1), 6);
  out.sum().backward();
  EXPECT_EQ(x.grad().numel(), 0);
  EXPECT_FALSE(MakePlan(at::zeros({3, 4}, at::kFloat)).ok());
  EXPECT_THROW(Permute(at::randn({5, 6}), *plan), c10::Error);
  // Tensors on another device (meta here; CUDA on a GPU machine) are refused, not read.
  const auto on_cpu = MakePlan(at::zeros({3, 4}, at::kBool));
  ASSERT_TRUE(on_cpu.ok());
  const auto elsewhere = MakePlan(at::zeros({3, 4}, at::TensorOptions().dtype(at::kBool).device(at::kMeta)));
  ASSERT_FALSE(elsewhere.ok());
  EXPECT_THAT(std::string(elsewhere.status().message()), HasSubstr("CPU tensor"));
  const at::TensorOptions meta = at::TensorOptions().device(at::kMeta);
  EXPECT_THROW(Permute(at::empty({3, 6}, meta), *on_cpu), c10::Error);
  EXPECT_THROW(Unpermute(at::empty({0, 6}, meta), *on_cpu), c10::Error);
  EXPECT_THROW(RowWeights(at::empty({3, 4}, meta), *on_cpu), c10::Error);
}

TEST(PermuteTest, Bf16RowsAccumulateInFp32) {
  const int64_t T = 64, E = 8, H = 16;
  const at::Tensor map = RandomMap(T, E, 8, -1, -1, 11);
  auto plan = MakePlan(map);
  ASSERT_TRUE(plan.ok());
  const at::Tensor x = at::randn({T, H}).to(at::kBFloat16);
  const at::Tensor probs = at::softmax(at::randn({T, E}), 1);
  const at::Tensor out = Unpermute(Permute(x, *plan), probs, *plan);
  EXPECT_EQ(out.scalar_type(), at::kBFloat16);
  // Σ_e p[t,e] · x[t] = x[t] · Σ_e p = x[t] up to one bf16 rounding of the result.
  EXPECT_LT((out.to(at::kFloat) - x.to(at::kFloat)).abs().max().item<float>(),
            x.to(at::kFloat).abs().max().item<float>() * 8e-3);
}

// Same bits, or NaN in both.
bool SameBf16(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor nan = a.isnan();
  return at::equal(nan, b.isnan()) &&
         at::equal(a.view(at::kShort).masked_select(~nan), b.view(at::kShort).masked_select(~nan));
}

// The bf16 kernels round fp32 to bf16 themselves: bit for bit what LibTorch's conversion
// gives, for ties (to even), ±inf and overflow, and NaN where it gives NaN (its vectorised and
// scalar conversions disagree on NaN's bits: 0xFFFF and 0x7FC0), forward (k = 1: out = bf16(w·x)) and backward
// (grad_rows = bf16(w·g)); the probability gradient is an fp32 dot product.
TEST(PermuteTest, Bf16RoundingMatchesC10BitForBit) {
  const int64_t T = 48, E = 4, H = 37;  // H not a multiple of the 8-lane loop
  const at::Tensor map = RandomMap(T, E, 1, -1, -1, 5);
  auto plan = MakePlan(map);
  ASSERT_TRUE(plan.ok());
  at::manual_seed(6);
  const at::Tensor tok = plan->row_token;
  at::Tensor x = at::randn({T, H}) * 3;  // per token; rows are their permuted copies
  x.index_put_({0, 0}, 1.0f);
  x.index_put_({1, 1}, 1.0078125f);  // 1 + 2^-7
  x.index_put_({2, 2}, std::numeric_limits<float>::quiet_NaN());
  x.index_put_({3, 3}, std::numeric_limits<float>::infinity());
  x.index_put_({4, 4}, -std::numeric_limits<float>::infinity());
  x.index_put_({5, 5}, 3.3e38f);  // w·x overflows bf16's range and rounds to inf
  const at::Tensor rows0 = x.to(at::kBFloat16).index_select(0, tok);
  // Weights 1 + 2^-8 make w·1 an exact tie and w·(1 + 2^-7) just above one.
  at::Tensor probs = at::rand({T, E}) + 0.5;
  probs.narrow(0, 0, 8).fill_(1.00390625f);
  const at::Tensor w = probs.reshape({-1}).index_select(0, plan->row_prob_index);  // per permuted row
  const at::Tensor rows = rows0.clone().requires_grad_(true), p = probs.clone().requires_grad_(true);
  const at::Tensor out = Unpermute(rows, p, *plan);
  at::Tensor want = at::empty({T, H}, at::kBFloat16);
  want.index_copy_(0, tok, (w.unsqueeze(1) * rows0.to(at::kFloat)).to(at::kBFloat16));
  EXPECT_TRUE(SameBf16(out, want));
  EXPECT_EQ(out[0][0].item<float>(), 1.0f);  // the tie went to even

  at::Tensor g = (at::randn({T, H}) * 2).to(at::kBFloat16);
  g.index_put_({6, 6}, std::numeric_limits<float>::quiet_NaN());
  g.index_put_({7, 7}, 1.0f);
  out.backward(g);
  const at::Tensor gt = g.index_select(0, tok).to(at::kFloat);
  const at::Tensor want_rows = (w.unsqueeze(1) * gt).to(at::kBFloat16);
  EXPECT_TRUE(SameBf16(rows.grad(), want_rows));
  // d out[t] / d p[t, e] = <g[t], rows[r]>: finite rows only (NaN and inf spread by design).
  const at::Tensor dots = (gt * rows0.to(at::kFloat)).sum(1);
  const at::Tensor got = p.grad().reshape({-1}).index_select(0, plan->row_prob_index);
  const at::Tensor finite = dots.isfinite();
  EXPECT_LT(MaxRel(got.masked_select(finite), dots.masked_select(finite)), 1e-5);
}

}  // namespace
}  // namespace switchyard::dispatch
