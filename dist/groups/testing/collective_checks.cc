#include "dist/groups/testing/collective_checks.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "absl/strings/str_format.h"
#include "common/status_macros.h"

namespace switchyard::groups::testing {

static absl::Status Expect(bool ok, const std::string& what) {
  return ok ? absl::OkStatus() : absl::InternalError(what);
}

// Sum, max and average of (rank + 1) over this rank's group of every kind, checked against
// the member lists the layout gives (computed here, not by the collective).
absl::Status CheckEveryGroupKind(Communicator& comm, at::Device dev) {
  auto opts = [dev](at::ScalarType t) { return at::TensorOptions().dtype(t).device(dev); };
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
    at::Tensor t = at::full({3}, me + 1.0, opts(at::kDouble));
    t[1] = 10.0 * (me + 1);
    SY_RETURN_IF_ERROR(g.AllReduce(t, ReduceOp::kSum).Wait());
    SY_RETURN_IF_ERROR(Expect(t[0].item<double>() == sum && t[1].item<double>() == 10 * sum,
                              absl::StrFormat("%s sum %f != %f", g.name(), t[0].item<double>(), sum)));
    at::Tensor m = at::full({2}, me + 1.0, opts(at::kFloat));
    SY_RETURN_IF_ERROR(g.AllReduce(m, ReduceOp::kMax).Wait());
    SY_RETURN_IF_ERROR(Expect(m[1].item<float>() == max, g.name() + " max"));
    at::Tensor a = at::full({1}, me + 1.0, opts(at::kDouble));
    SY_RETURN_IF_ERROR(g.AllReduce(a, ReduceOp::kAvg).Wait());
    SY_RETURN_IF_ERROR(Expect(std::abs(a.item<double>() - sum / members.size()) < 1e-12, g.name() + " avg"));
  }
  return absl::OkStatus();
}

// Collectives with nothing in them (an MoE rank or TP slice without tokens, every member at
// once): each must finish at once with nothing written. Gloo divides by the element count in
// some of them, so the facade must not hand them over. Then an all_to_all_v where member 0
// neither sends nor receives while the others exchange a row with each other.
static absl::Status CheckEmptyCollectives(Group& g, const std::vector<int>& members, int me, at::Device dev) {
  const at::TensorOptions f32 = at::TensorOptions().dtype(at::kFloat).device(dev);
  const int n = static_cast<int>(members.size());
  const int pos = g.rank();
  at::Tensor none = at::empty({0, 3}, f32), none_n = at::empty({0, 3}, f32);
  SY_RETURN_IF_ERROR(g.AllReduce(none, ReduceOp::kSum).Wait());
  SY_RETURN_IF_ERROR(g.AllReduce(none, ReduceOp::kAvg).Wait());
  SY_RETURN_IF_ERROR(g.Broadcast(none, 0).Wait());
  SY_RETURN_IF_ERROR(g.AllGather(none, none_n).Wait());
  SY_RETURN_IF_ERROR(g.AllGatherV(none, none_n, std::vector<int64_t>(n, 0)).Wait());
  at::Tensor rs_out = at::empty({0, 3}, f32);
  SY_RETURN_IF_ERROR(g.ReduceScatter(none, rs_out, ReduceOp::kSum).Wait());
  at::Tensor a_out = at::empty({0, 3}, f32);
  SY_RETURN_IF_ERROR(g.AllToAllV(none, a_out, std::vector<int64_t>(n, 0), std::vector<int64_t>(n, 0)).Wait());
  if (n > 1) {
    at::Tensor got = at::empty({0, 3}, f32);
    Work sw = g.Send(none, (pos + 1) % n, 5);
    Work rw = g.Recv(got, (pos + n - 1) % n, 5);
    SY_RETURN_IF_ERROR(sw.Wait());
    SY_RETURN_IF_ERROR(rw.Wait());
  }
  // Member 0 idle: the others send one row to every other non-zero member.
  std::vector<int64_t> counts(n, 0);
  for (int j = 1; j < n; ++j) counts[j] = (pos != 0 && j != pos) ? 1 : 0;
  const int64_t rows = pos == 0 ? 0 : std::max(0, n - 2);
  at::Tensor in = at::empty({rows, 3}, f32);
  int64_t row = 0;
  for (int j = 1; j < n; ++j) {
    if (counts[j] == 0) continue;
    in[row][0] = me; in[row][1] = members[j]; in[row][2] = 0;
    ++row;
  }
  at::Tensor out = at::full({rows, 3}, -1.0f, f32);
  SY_RETURN_IF_ERROR(g.AllToAllV(in, out, counts, counts).Wait());
  row = 0;
  for (int j = 1; j < n; ++j) {
    if (counts[j] == 0) continue;
    SY_RETURN_IF_ERROR(Expect(out[row][0].item<float>() == members[j] && out[row][1].item<float>() == me,
                              g.name() + ": all_to_all_v with an idle member"));
    ++row;
  }
  return absl::OkStatus();
}

// bfloat16 through every collective (Gloo in LibTorch 1.13 has no bf16 of its own): moved
// rows keep their bits; sums are those of the members' values, rounded once.
static absl::Status CheckBf16Collectives(Group& g, const std::vector<int>& members, int me, at::Device dev) {
  const at::TensorOptions bf16 = at::TensorOptions().dtype(at::kBFloat16).device(dev);
  const int n = static_cast<int>(members.size());
  const int pos = g.rank();
  auto value = [](int rank) { return rank + 1.0f / 3; };  // not exact in bf16: bits must survive
  at::Tensor t = at::full({4}, value(me), bf16);
  SY_RETURN_IF_ERROR(g.AllReduce(t, ReduceOp::kSum).Wait());
  double sum = 0;
  for (int r : members) sum += at::full({1}, value(r), bf16).item<double>();
  SY_RETURN_IF_ERROR(Expect(at::equal(t, at::full({4}, sum, bf16)), g.name() + ": bf16 all_reduce"));
  at::Tensor rs_in = at::full({2 * n, 3}, value(me), bf16), rs_out = at::empty({2, 3}, bf16);
  SY_RETURN_IF_ERROR(g.ReduceScatter(rs_in, rs_out, ReduceOp::kSum).Wait());
  SY_RETURN_IF_ERROR(Expect(at::equal(rs_out, at::full({2, 3}, sum, bf16)), g.name() + ": bf16 reduce_scatter"));
  // all_gather_v: member i gives i % 2 + 1 rows of its value.
  std::vector<int64_t> counts(n);
  int64_t total = 0;
  for (int i = 0; i < n; ++i) total += counts[i] = i % 2 + 1;
  at::Tensor vout = at::empty({total, 3}, bf16);
  SY_RETURN_IF_ERROR(g.AllGatherV(at::full({counts[pos], 3}, value(me), bf16), vout, counts).Wait());
  std::vector<at::Tensor> want;
  for (int i = 0; i < n; ++i) want.push_back(at::full({counts[i], 3}, value(members[i]), bf16));
  SY_RETURN_IF_ERROR(Expect(at::equal(vout, at::cat(want)), g.name() + ": bf16 all_gather_v"));
  // all_to_all_v: one row to every member, of the sender's value.
  at::Tensor a_out = at::empty({n, 3}, bf16);
  const std::vector<int64_t> ones(n, 1);
  SY_RETURN_IF_ERROR(g.AllToAllV(at::full({n, 3}, value(me), bf16), a_out, ones, ones).Wait());
  for (int i = 0; i < n; ++i) want[i] = at::full({1, 3}, value(members[i]), bf16);
  SY_RETURN_IF_ERROR(Expect(at::equal(a_out, at::cat(want)), g.name() + ": bf16 all_to_all_v"));
  at::Tensor b = at::full({5}, value(me), bf16);
  SY_RETURN_IF_ERROR(g.Broadcast(b, 0).Wait());
  SY_RETURN_IF_ERROR(Expect(at::equal(b, at::full({5}, value(members[0]), bf16)), g.name() + ": bf16 broadcast"));
  if (n > 1) {
    at::Tensor got = at::empty({2}, bf16);
    Work sw = g.Send(at::full({2}, value(me), bf16), (pos + 1) % n, 4);
    Work rw = g.Recv(got, (pos + n - 1) % n, 4);
    SY_RETURN_IF_ERROR(sw.Wait());
    SY_RETURN_IF_ERROR(rw.Wait());
    SY_RETURN_IF_ERROR(Expect(at::equal(got, at::full({2}, value(members[(pos + n - 1) % n]), bf16)),
                              g.name() + ": bf16 send/recv"));
  }
  return absl::OkStatus();
}

// Every collective on one group, with expectations computed from the member list alone.
// Values encode (global rank, position) so a misplaced row is caught, not just a wrong sum.
absl::Status CheckAllCollectives(Group& g, const std::vector<int>& members, int me, at::Device dev) {
  auto opts = [dev](at::ScalarType t) { return at::TensorOptions().dtype(t).device(dev); };
  const at::TensorOptions f32 = opts(at::kFloat);
  const int n = static_cast<int>(members.size());
  const int pos = g.rank();
  auto at_pos = [&](int i) { return static_cast<float>(members[i]); };
  SY_RETURN_IF_ERROR(Expect(members[pos] == me, g.name() + ": rank() is not my place"));
  // all_gather: 2 rows each, row value = 100·global rank + row.
  at::Tensor in = at::empty({2, 3}, f32);
  for (int row = 0; row < 2; ++row) in[row].fill_(100.0f * me + row);
  at::Tensor out = at::full({2 * n, 3}, -1.0f, f32);
  SY_RETURN_IF_ERROR(g.AllGather(in, out).Wait());
  for (int i = 0; i < n; ++i)
    for (int row = 0; row < 2; ++row)
      SY_RETURN_IF_ERROR(Expect(out[2 * i + row][2].item<float>() == 100.0f * members[i] + row,
                                g.name() + ": all_gather"));
  // all_gather_v: member i gives (members[i] % 3) rows (some give none).
  std::vector<int64_t> counts(n);
  int64_t total = 0;
  for (int i = 0; i < n; ++i) total += counts[i] = members[i] % 3;
  at::Tensor vin = at::full({counts[pos], 2}, at_pos(pos), f32);
  at::Tensor vout = at::full({total, 2}, -1.0f, f32);
  SY_RETURN_IF_ERROR(g.AllGatherV(vin, vout, counts).Wait());
  int64_t row = 0;
  for (int i = 0; i < n; ++i)
    for (int64_t k = 0; k < counts[i]; ++k, ++row)
      SY_RETURN_IF_ERROR(Expect(vout[row][1].item<float>() == at_pos(i), g.name() + ": all_gather_v"));
  // reduce_scatter: block b of member i holds (global rank + 1) × (b + 1); sum and max.
  at::Tensor rs_in = at::empty({3 * n, 2}, f32);
  for (int b = 0; b < n; ++b) rs_in.narrow(0, 3 * b, 3).fill_((me + 1.0f) * (b + 1));
  at::Tensor rs_out = at::empty({3, 2}, f32);
  SY_RETURN_IF_ERROR(g.ReduceScatter(rs_in, rs_out, ReduceOp::kSum).Wait());
  float sum = 0, max = 0;
  for (int r : members) {
    sum += (r + 1.0f) * (pos + 1);
    max = std::max(max, (r + 1.0f) * (pos + 1));
  }
  SY_RETURN_IF_ERROR(Expect(rs_out[2][1].item<float>() == sum, g.name() + ": reduce_scatter sum"));
  SY_RETURN_IF_ERROR(g.ReduceScatter(rs_in, rs_out, ReduceOp::kMax).Wait());
  SY_RETURN_IF_ERROR(Expect(rs_out[0][0].item<float>() == max, g.name() + ": reduce_scatter max"));
  // all_to_all_v: member i sends (i + j) % 3 rows to member j (zero-length splits included);
  // each row says where it came from, where it goes and its index.
  auto count = [](int src, int dst) { return static_cast<int64_t>((src + dst) % 3); };
  std::vector<int64_t> send(n), recv(n);
  int64_t send_total = 0, recv_total = 0;
  for (int j = 0; j < n; ++j) {
    send_total += send[j] = count(pos, j);
    recv_total += recv[j] = count(j, pos);
  }
  at::Tensor a_in = at::empty({send_total, 3}, f32);
  row = 0;
  for (int j = 0; j < n; ++j)
    for (int64_t k = 0; k < send[j]; ++k, ++row) {
      a_in[row][0] = me; a_in[row][1] = members[j]; a_in[row][2] = k;
    }
  at::Tensor a_out = at::full({recv_total, 3}, -1.0f, f32);
  SY_RETURN_IF_ERROR(g.AllToAllV(a_in, a_out, send, recv).Wait());
  row = 0;
  for (int j = 0; j < n; ++j)
    for (int64_t k = 0; k < recv[j]; ++k, ++row)
      SY_RETURN_IF_ERROR(Expect(a_out[row][0].item<float>() == members[j] &&
                                    a_out[row][1].item<float>() == me && a_out[row][2].item<float>() == k,
                                g.name() + ": all_to_all_v"));
  SY_RETURN_IF_ERROR(CheckEmptyCollectives(g, members, me, dev));
  SY_RETURN_IF_ERROR(CheckBf16Collectives(g, members, me, dev));
  // broadcast from the last member.
  at::Tensor b = at::full({4}, static_cast<float>(me), f32);
  SY_RETURN_IF_ERROR(g.Broadcast(b, n - 1).Wait());
  SY_RETURN_IF_ERROR(Expect(b[3].item<float>() == at_pos(n - 1), g.name() + ": broadcast"));
  // send/recv around the ring of members.
  if (n > 1) {
    at::Tensor msg = at::full({5}, 7.0f * me, f32), got = at::empty({5}, f32);
    Work sw = g.Send(msg, (pos + 1) % n, 3);
    Work rw = g.Recv(got, (pos + n - 1) % n, 3);
    SY_RETURN_IF_ERROR(sw.Wait());
    SY_RETURN_IF_ERROR(rw.Wait());
    SY_RETURN_IF_ERROR(Expect(got[4].item<float>() == 7.0f * at_pos((pos + n - 1) % n), g.name() + ": send/recv"));
  }
  return g.Barrier().Wait();
}

absl::Status CheckAllCollectivesOnEveryKind(Communicator& comm, at::Device dev) {
  SY_RETURN_IF_ERROR(CheckEveryGroupKind(comm, dev));  // all-reduce sum, max, avg
  std::vector<int> everyone(comm.world_size());
  for (int r = 0; r < comm.world_size(); ++r) everyone[r] = r;
  SY_RETURN_IF_ERROR(CheckAllCollectives(comm.World(), everyone, comm.rank(), dev));
  for (GroupKind kind : kAllGroupKinds) {
    if (!comm.Has(kind)) continue;
    SY_RETURN_IF_ERROR(CheckAllCollectives(comm.Get(kind), comm.layout().GroupOf(kind, comm.rank()), comm.rank(), dev));
  }
  return absl::OkStatus();
}

}  // namespace switchyard::groups::testing
