#include "moe/dispatch/exchange.h"

#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "dist/groups/comm.h"
#include "dist/groups/testing/multi_rank.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace switchyard::dispatch {
namespace {

using groups::Communicator;
using groups::GroupKind;

constexpr int64_t kWidth = 3;

absl::Status Expect(bool ok, const std::string& what) { return ok ? absl::OkStatus() : absl::InternalError(what); }

// Rank r's rows: row i is filled with 100·r + i, so a row that lands in the wrong place shows.
at::Tensor Rows(int rank, int64_t n) {
  return (at::arange(n, at::kDouble).unsqueeze(1) + 100.0 * rank).expand({n, kWidth}).contiguous();
}
// The upstream gradient member j applies to what it holds after an exchange: its own seed.
at::Tensor Grad(int rank, int64_t n) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1000 + rank);
  return at::randn({n, kWidth}, gen, at::TensorOptions().dtype(at::kDouble));
}

// An empty leaf may get no gradient at all: that is a zero one.
at::Tensor GradOf(const at::Tensor& t) { return t.grad().defined() ? t.grad() : at::zeros_like(t); }

int64_t Sum(const std::vector<int64_t>& v) {
  int64_t s = 0;
  for (int64_t x : v) s += x;
  return s;
}

// count(i, j): rows member i sends member j; zero for some pairs and for all of member 3's.
int64_t Count(int i, int j) { return i == 3 ? 0 : (i + 2 * j) % 3; }

// The three differentiable collectives on 4 ranks, forward and backward against the answer
// built by hand from every member's rows and gradients (computed here on every rank).
TEST(ExchangeTest, CollectivesAndTheirBackwardPasses) {
  const absl::Status s = groups::testing::RunRanks({.layout = {.world_size = 4}}, [](Communicator& comm) -> absl::Status {
    groups::Group& g = comm.World();
    const int me = g.rank(), n = g.size();
    // all_to_all_v: forward gathers what each member sends me; backward sends my gradient
    // of those rows back to their owners.
    std::vector<int64_t> send(n), recv(n);
    for (int j = 0; j < n; ++j) {
      send[j] = Count(me, j);
      recv[j] = Count(j, me);
    }
    at::Tensor x = Rows(me, Sum(send)).requires_grad_(true);
    at::Tensor y = AllToAllVRows(x, g, send, recv);
    std::vector<at::Tensor> want;
    for (int i = 0; i < n; ++i) {
      int64_t start = 0;
      for (int j = 0; j < me; ++j) start += Count(i, j);
      want.push_back(Rows(i, start + Count(i, me)).narrow(0, start, Count(i, me)));
    }
    SY_RETURN_IF_ERROR(Expect(at::equal(y, at::cat(want)), "all_to_all_v forward"));
    (y * Grad(me, y.size(0))).sum().backward();
    std::vector<at::Tensor> back;
    for (int j = 0; j < n; ++j) {  // rows I sent j: j's gradient of its block from me
      int64_t start = 0;
      for (int i = 0; i < me; ++i) start += Count(i, j);
      int64_t total = 0;
      for (int i = 0; i < n; ++i) total += Count(i, j);
      back.push_back(Grad(j, total).narrow(0, start, Count(me, j)));
    }
    SY_RETURN_IF_ERROR(Expect(at::equal(GradOf(x), at::cat(back)), "all_to_all_v backward"));

    // all_gather_v (member i gives i % 3 rows; member 0 none): backward sums every member's
    // gradient of my block.
    std::vector<int64_t> counts(n);
    for (int i = 0; i < n; ++i) counts[i] = i % 3;
    at::Tensor a = Rows(me, counts[me]).requires_grad_(true);
    at::Tensor gathered = AllGatherVRows(a, g, counts);
    want.clear();
    for (int i = 0; i < n; ++i) want.push_back(Rows(i, counts[i]));
    SY_RETURN_IF_ERROR(Expect(at::equal(gathered, at::cat(want)), "all_gather_v forward"));
    (gathered * Grad(me, Sum(counts))).sum().backward();
    int64_t start = 0;
    for (int i = 0; i < me; ++i) start += counts[i];
    at::Tensor sum = at::zeros({counts[me], kWidth}, at::kDouble);
    for (int j = 0; j < n; ++j) sum += Grad(j, Sum(counts)).narrow(0, start, counts[me]);
    SY_RETURN_IF_ERROR(Expect(at::allclose(GradOf(a), sum, 1e-12, 1e-12), "all_gather_v backward"));

    // reduce_scatter_v: the members' block `me` summed; backward all-gathers the gradients.
    at::Tensor r = (Rows(me, Sum(counts)) * (me + 1)).requires_grad_(true);
    at::Tensor mine = ReduceScatterVRows(r, g, counts);
    at::Tensor expect = at::zeros({counts[me], kWidth}, at::kDouble);
    for (int i = 0; i < n; ++i) expect += (Rows(i, Sum(counts)) * (i + 1)).narrow(0, start, counts[me]);
    SY_RETURN_IF_ERROR(Expect(at::allclose(mine, expect, 1e-12, 1e-12), "reduce_scatter_v forward"));
    (mine * Grad(me, counts[me])).sum().backward();
    want.clear();
    for (int i = 0; i < n; ++i) want.push_back(Grad(i, counts[i]));
    SY_RETURN_IF_ERROR(Expect(at::equal(GradOf(r), at::cat(want)), "reduce_scatter_v backward"));

    // Counts of the wrong length are an error naming the group.
    try {
      AllGatherVRows(a, g, {1, 2});
      return absl::InternalError("wrong counts accepted");
    } catch (const c10::Error& e) {
      SY_RETURN_IF_ERROR(Expect(std::string(e.what_without_backtrace()).find("needs 4 counts") != std::string::npos,
                                e.what_without_backtrace()));
    }
    return absl::OkStatus();
  });
  EXPECT_TRUE(s.ok()) << s;
}

// Dispatch under ETP = 2 x EP = 2 (4 ranks): every row reaches each F slice of its expert,
// in segments labelled with the right local expert; combine returns the rows in the order
// dispatch took them, the ETP step summing the slices' outputs; an EP rank can send nothing.
TEST(ExchangeTest, DispatchReachesEveryExpertSliceAndCombineReturns) {
  const absl::Status s = groups::testing::RunRanks(
      {.layout = {.world_size = 4, .tp = 2, .ep = 2, .etp = 2}}, [](Communicator& comm) -> absl::Status {
        constexpr int kExperts = 4;
        const ExpertGroups eg{.ep = &comm.Get(GroupKind::kEp), .etp = &comm.Get(GroupKind::kEtp),
                              .num_experts = kExperts};
        const int rank = comm.rank();
        // Rank r holds rows_per_expert[e] = (r + e) % 3 rows for expert e (rank 3: none), each
        // row holding its global expert, its rank and its index.
        std::vector<int64_t> rows_per_expert(kExperts);
        std::vector<at::Tensor> blocks;
        for (int e = 0; e < kExperts; ++e) {
          rows_per_expert[e] = rank == 3 ? 0 : (rank + e) % 3;
          at::Tensor b = at::empty({rows_per_expert[e], kWidth}, at::kDouble);
          b.select(1, 0).fill_(e);
          b.select(1, 1).fill_(rank);
          b.select(1, 2).copy_(at::arange(rows_per_expert[e], at::kDouble));
          blocks.push_back(b);
        }
        const at::Tensor permuted = at::cat(blocks).requires_grad_(true);
        DispatchState st;
        SY_ASSIGN_OR_RETURN(at::Tensor rows, DispatchToExperts(permuted, rows_per_expert, eg, &st));
        SY_RETURN_IF_ERROR(Expect(Sum(st.rows_per_segment) == rows.size(0), "segments cover the rows"));
        const int first = comm.layout().Expert(rank).ep * (kExperts / 2);
        int64_t at_row = 0;
        for (size_t k = 0; k < st.rows_per_segment.size(); ++k) {
          const at::Tensor seg = rows.narrow(0, at_row, st.rows_per_segment[k]);
          SY_RETURN_IF_ERROR(Expect((seg.select(1, 0) == first + st.segment_expert[k]).all().item<bool>(),
                                    absl::StrFormat("segment %d holds rows of another expert", k)));
          at_row += st.rows_per_segment[k];
        }
        // Every row of my experts, from every rank of the stage, exactly once per ETP slice.
        int64_t want = 0;
        for (int r = 0; r < 3; ++r)
          for (int e = first; e < first + kExperts / 2; ++e) want += (r + e) % 3;
        SY_RETURN_IF_ERROR(Expect(rows.size(0) == want, absl::StrFormat("%d rows reached me, want %d", rows.size(0), want)));
        // Identity experts: the ETP sum of the two slices' outputs is twice each row.
        SY_ASSIGN_OR_RETURN(at::Tensor back, CombineFromExperts(rows * 1.0, st, eg));
        SY_RETURN_IF_ERROR(Expect(at::equal(back, permuted.detach() * 2), "combine returns the rows, summed over ETP"));
        back.sum().backward();
        SY_RETURN_IF_ERROR(Expect(at::equal(GradOf(permuted), at::full_like(permuted, 2.0)), "the round trip's gradient"));
        return absl::OkStatus();
      });
  EXPECT_TRUE(s.ok()) << s;
}

}  // namespace
}  // namespace switchyard::dispatch
