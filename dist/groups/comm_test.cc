#include "dist/groups/comm.h"

#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "dist/groups/testing/multi_rank.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace switchyard::groups {
namespace {

using testing::RunOptions;
using testing::RunRanks;
using ::testing::HasSubstr;

absl::Status Expect(bool ok, const std::string& what) {
  return ok ? absl::OkStatus() : absl::InternalError(what);
}

// Sum, max and average of (rank + 1) over this rank's group of every kind, checked against
// the member lists the layout gives (computed here, not by the collective).
absl::Status CheckEveryGroupKind(Communicator& comm) {
  const int me = comm.rank();
  for (GroupKind kind : kAllGroupKinds) {
    if (!comm.Has(kind)) {
      SY_RETURN_IF_ERROR(Expect(comm.layout().GroupOf(kind, me).empty(), "missing group"));
      continue;
    }
    Group& g = comm.Get(kind);
    const std::vector<int>& members = comm.layout().GroupOf(kind, me);
    SY_RETURN_IF_ERROR(Expect(g.ranks() == members, absl::StrFormat("%s members", GroupKindName(kind))));
    double sum = 0, max = 0;
    for (int r : members) {
      sum += r + 1;
      max = std::max<double>(max, r + 1);
    }
    at::Tensor t = at::full({3}, me + 1.0, at::kDouble);
    t[1] = 10.0 * (me + 1);
    SY_RETURN_IF_ERROR(g.AllReduce(t, ReduceOp::kSum).Wait());
    SY_RETURN_IF_ERROR(Expect(t[0].item<double>() == sum && t[1].item<double>() == 10 * sum,
                              absl::StrFormat("%s sum %f != %f", g.name(), t[0].item<double>(), sum)));
    at::Tensor m = at::full({2}, me + 1.0, at::kFloat);
    SY_RETURN_IF_ERROR(g.AllReduce(m, ReduceOp::kMax).Wait());
    SY_RETURN_IF_ERROR(Expect(m[1].item<float>() == max, g.name() + " max"));
    at::Tensor a = at::full({1}, me + 1.0, at::kDouble);
    SY_RETURN_IF_ERROR(g.AllReduce(a, ReduceOp::kAvg).Wait());
    SY_RETURN_IF_ERROR(Expect(std::abs(a.item<double>() - sum / members.size()) < 1e-12, g.name() + " avg"));
  }
  return absl::OkStatus();
}

TEST(Comm, AllReduceOnEveryGroupKind4Ranks) {
  absl::Status s = RunRanks({.layout = {.world_size = 4, .tp = 2, .ep = 2}}, CheckEveryGroupKind);
  EXPECT_TRUE(s.ok()) << s;
}

TEST(Comm, AllReduceOnEveryGroupKind8Ranks) {
  absl::Status s = RunRanks({.layout = {.world_size = 8, .tp = 2, .pp = 2, .ep = 2, .etp = 1}},
                            CheckEveryGroupKind);
  EXPECT_TRUE(s.ok()) << s;
  s = RunRanks({.layout = {.world_size = 8, .ep = 4}}, CheckEveryGroupKind);
  EXPECT_TRUE(s.ok()) << s;
}

// Rank r sends (r + j) % 3 rows to member j (zero-length splits included); every row says
// where it came from, where it goes and its index, so the receiver can check each one.
TEST(Comm, AllToAllVUnevenAndEmptySplits) {
  for (int world : {4, 8}) {
    absl::Status s = RunRanks({.layout = {.world_size = world}}, [world](Communicator& comm) -> absl::Status {
      Group& g = comm.World();
      const int me = g.rank();
      auto count = [](int src, int dst) { return static_cast<int64_t>((src + dst) % 3); };
      std::vector<int64_t> send(world), recv(world);
      int64_t send_total = 0, recv_total = 0;
      for (int j = 0; j < world; ++j) {
        send[j] = count(me, j);
        recv[j] = count(j, me);
        send_total += send[j];
        recv_total += recv[j];
      }
      at::Tensor in = at::empty({send_total, 3}, at::kFloat);
      int64_t row = 0;
      for (int j = 0; j < world; ++j)
        for (int64_t i = 0; i < send[j]; ++i, ++row) {
          in[row][0] = me; in[row][1] = j; in[row][2] = i;
        }
      at::Tensor out = at::full({recv_total, 3}, -1.0f);
      SY_RETURN_IF_ERROR(g.AllToAllV(in, out, send, recv).Wait());
      row = 0;
      for (int j = 0; j < world; ++j)
        for (int64_t i = 0; i < recv[j]; ++i, ++row) {
          SY_RETURN_IF_ERROR(Expect(out[row][0].item<float>() == j && out[row][1].item<float>() == me &&
                                        out[row][2].item<float>() == i,
                                    absl::StrFormat("row %d from %d", row, j)));
        }
      return absl::OkStatus();
    });
    EXPECT_TRUE(s.ok()) << s;
  }
}

TEST(Comm, GatherScatterBroadcastSendRecv) {
  absl::Status s = RunRanks({.layout = {.world_size = 4, .ep = 2}}, [](Communicator& comm) -> absl::Status {
    Group& g = comm.World();
    const int me = g.rank(), n = g.size();
    // all_gather: 2 rows each.
    at::Tensor in = at::full({2, 2}, static_cast<float>(me));
    at::Tensor out = at::empty({2 * n, 2});
    SY_RETURN_IF_ERROR(g.AllGather(in, out).Wait());
    for (int r = 0; r < n; ++r)
      SY_RETURN_IF_ERROR(Expect(out[2 * r + 1][1].item<float>() == r, "all_gather"));
    // all_gather_v: member i gives i rows (member 0 gives none).
    std::vector<int64_t> counts;
    int64_t total = 0;
    for (int r = 0; r < n; ++r) { counts.push_back(r); total += r; }
    at::Tensor vin = at::full({me, 2}, static_cast<float>(me));
    at::Tensor vout = at::full({total, 2}, -1.0f);
    SY_RETURN_IF_ERROR(g.AllGatherV(vin, vout, counts).Wait());
    int64_t row = 0;
    for (int r = 0; r < n; ++r)
      for (int i = 0; i < r; ++i, ++row)
        SY_RETURN_IF_ERROR(Expect(vout[row][0].item<float>() == r, "all_gather_v"));
    // reduce_scatter: input row block b holds (me + 1) × (b + 1).
    at::Tensor rs_in = at::empty({n, 3});
    for (int b = 0; b < n; ++b) rs_in[b].fill_((me + 1.0) * (b + 1));
    at::Tensor rs_out = at::empty({1, 3});
    SY_RETURN_IF_ERROR(g.ReduceScatter(rs_in, rs_out).Wait());
    const double expect = (me + 1.0) * n * (n + 1) / 2;
    SY_RETURN_IF_ERROR(Expect(rs_out[0][2].item<float>() == expect, "reduce_scatter"));
    // broadcast from member 2 of the EP group.
    Group& ep = comm.Get(GroupKind::kEp);
    at::Tensor b = at::full({4}, static_cast<float>(me));
    SY_RETURN_IF_ERROR(ep.Broadcast(b, 1).Wait());
    SY_RETURN_IF_ERROR(Expect(b[3].item<float>() == ep.ranks()[1], "broadcast"));
    // send/recv in a ring over the world.
    at::Tensor msg = at::full({5}, static_cast<float>(me * 7));
    at::Tensor got = at::empty({5});
    Work sw = g.Send(msg, (me + 1) % n, 3);
    Work rw = g.Recv(got, (me + n - 1) % n, 3);
    SY_RETURN_IF_ERROR(sw.Wait());
    SY_RETURN_IF_ERROR(rw.Wait());
    SY_RETURN_IF_ERROR(Expect(got[4].item<float>() == ((me + n - 1) % n) * 7, "send/recv"));
    SY_RETURN_IF_ERROR(g.Barrier().Wait());
    // Bad arguments are errors naming the group, not crashes.
    at::Tensor wrong = at::empty({3, 2});
    absl::Status bad = g.AllGather(in, wrong).Wait();
    SY_RETURN_IF_ERROR(Expect(!bad.ok() && bad.message().find("group world") != std::string::npos,
                              "bad all_gather accepted"));
    return absl::OkStatus();
  });
  EXPECT_TRUE(s.ok()) << s;
}

TEST(Comm, RankThatNeverJoinsTimesOutWithClearError) {
  absl::Status s = RunRanks({.layout = {.world_size = 3},
                             .collective_timeout = std::chrono::seconds(2),
                             .deadline = std::chrono::seconds(60),
                             .absent_ranks = {2}},
                            [](Communicator& comm) { return comm.World().Barrier().Wait(); });
  ASSERT_FALSE(s.ok());
  const std::string m(s.message());
  EXPECT_THAT(m, HasSubstr("rank 0: "));
  EXPECT_THAT(m, HasSubstr("rank 1: "));
  EXPECT_THAT(m, HasSubstr("group world"));
  EXPECT_THAT(m, ::testing::Not(HasSubstr("rank 2: ")));
}

}  // namespace
}  // namespace switchyard::groups
