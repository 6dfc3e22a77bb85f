#include "moe/dispatch/exchange.h"

#include <numeric>
#include <string>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace switchyard::dispatch {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

int64_t Sum(const std::vector<int64_t>& v) { return std::accumulate(v.begin(), v.end(), int64_t{0}); }

void WaitOrThrow(groups::Work w) {
  const absl::Status s = w.Wait();
  TORCH_CHECK(s.ok(), std::string(s.message()));
}

at::Tensor Rows(const at::Tensor& like, int64_t n) {
  std::vector<int64_t> shape = like.sizes().vec();
  shape[0] = n;
  return at::empty(shape, like.options());
}

at::Tensor DoAllToAll(const at::Tensor& x, groups::Group& g, const std::vector<int64_t>& send,
                      const std::vector<int64_t>& recv) {
  const at::Tensor in = x.contiguous();
  at::Tensor out = Rows(in, Sum(recv));
  WaitOrThrow(g.AllToAllV(in, out, send, recv));
  return out;
}

at::Tensor DoAllGatherV(const at::Tensor& x, groups::Group& g, const std::vector<int64_t>& counts) {
  const at::Tensor in = x.contiguous();
  at::Tensor out = Rows(in, Sum(counts));
  WaitOrThrow(g.AllGatherV(in, out, counts));
  return out;
}

int64_t BlockStart(const std::vector<int64_t>& counts, int i) {
  return std::accumulate(counts.begin(), counts.begin() + i, int64_t{0});
}

at::Tensor OwnBlock(const at::Tensor& x, groups::Group& g, const std::vector<int64_t>& counts) {
  return x.narrow(0, BlockStart(counts, g.rank()), counts[g.rank()]).contiguous();
}

at::Tensor DoReduceScatterV(const at::Tensor& x, groups::Group& g, const std::vector<int64_t>& counts) {
  // Sums in fp32 (or double); c10d's Gloo has no reduce-scatter-v: all-reduce, keep own rows.
  at::Tensor acc = x.scalar_type() == at::kDouble ? x.clone() : x.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
  acc = acc.contiguous();
  WaitOrThrow(g.AllReduce(acc, groups::ReduceOp::kSum));
  return OwnBlock(acc, g, counts).to(x.scalar_type());
}

groups::Group& GroupOf(AutogradContext* ctx) {
  return *reinterpret_cast<groups::Group*>(ctx->saved_data["group"].toInt());
}
void SaveGroup(AutogradContext* ctx, groups::Group& g) {
  ctx->saved_data["group"] = reinterpret_cast<int64_t>(&g);
}

struct AllToAllFn : torch::autograd::Function<AllToAllFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, groups::Group* g,
                            const std::vector<int64_t>& send, const std::vector<int64_t>& recv) {
    SaveGroup(ctx, *g);
    ctx->saved_data["send"] = send;
    ctx->saved_data["recv"] = recv;
    return DoAllToAll(x, *g, send, recv);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {DoAllToAll(grads[0], GroupOf(ctx), ctx->saved_data["recv"].toIntVector(),
                       ctx->saved_data["send"].toIntVector()),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Gathered rows read by every member: the backward sums the members' gradients of this
// rank's block (`replicated_consumer` false), or, when the consumer is replicated and each
// member's gradient is already the whole one, just takes this rank's block.
struct GatherFn : torch::autograd::Function<GatherFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, groups::Group* g,
                            const std::vector<int64_t>& counts, bool replicated_consumer) {
    SaveGroup(ctx, *g);
    ctx->saved_data["counts"] = counts;
    ctx->saved_data["replicated"] = replicated_consumer;
    return DoAllGatherV(x, *g, counts);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    groups::Group& g = GroupOf(ctx);
    const std::vector<int64_t> counts = ctx->saved_data["counts"].toIntVector();
    at::Tensor gx = ctx->saved_data["replicated"].toBool() ? OwnBlock(grads[0], g, counts)
                                                           : DoReduceScatterV(grads[0], g, counts);
    return {gx, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// This rank's block of a tensor every member holds: the partial sums of the F slices
// (`sum` true), or replicated tokens (`sum` false). Backward: all-gather the gradient.
struct ScatterFn : torch::autograd::Function<ScatterFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, groups::Group* g,
                            const std::vector<int64_t>& counts, bool sum) {
    SaveGroup(ctx, *g);
    ctx->saved_data["counts"] = counts;
    return sum ? DoReduceScatterV(x, *g, counts) : OwnBlock(x, *g, counts);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {DoAllGatherV(grads[0], GroupOf(ctx), ctx->saved_data["counts"].toIntVector()),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

void CheckCounts(groups::Group& g, const std::vector<int64_t>& counts, const char* op) {
  TORCH_CHECK(static_cast<int>(counts.size()) == g.size(), g.name(), ": ", op, " needs ", g.size(),
              " counts, got ", counts.size());
}

template <typename F>
absl::StatusOr<at::Tensor> Guard(const char* what, F&& f) {
  try {
    return f();
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat(what, ": ", e.what_without_backtrace()));
  }
}

bool Active(groups::Group* g) { return g != nullptr && g->size() > 1; }

// Rows (or per-row values) in `permuted` order to the experts' order, by the exchanges that
// DispatchToExperts counted: all_to_all_v over EP, then all_gather_v over ETP.
at::Tensor ToExperts(const at::Tensor& x, const DispatchState& st, const ExpertGroups& groups) {
  at::Tensor y = x;
  if (Active(groups.ep)) y = AllToAllVRows(y, *groups.ep, st.send_counts, st.recv_counts);
  if (Active(groups.etp)) y = AllGatherVRows(y, *groups.etp, st.etp_counts);
  return y;
}

}  // namespace

std::vector<int64_t> EvenSplit(int64_t n, int parts) {
  TORCH_CHECK(parts >= 1 && n >= 0, "EvenSplit: ", n, " rows into ", parts, " parts (need rows >= 0, parts >= 1)");
  std::vector<int64_t> out(parts, n / parts);
  for (int i = 0; i < n % parts; ++i) ++out[i];
  return out;
}

at::Tensor AllToAllVRows(const at::Tensor& x, groups::Group& g, const std::vector<int64_t>& send,
                         const std::vector<int64_t>& recv) {
  CheckCounts(g, send, "all_to_all_v");
  CheckCounts(g, recv, "all_to_all_v");
  return AllToAllFn::apply(x, &g, send, recv);
}

at::Tensor AllGatherVRows(const at::Tensor& x, groups::Group& g, const std::vector<int64_t>& counts) {
  CheckCounts(g, counts, "all_gather_v");
  return GatherFn::apply(x, &g, counts, false);
}

at::Tensor ReduceScatterVRows(const at::Tensor& x, groups::Group& g, const std::vector<int64_t>& counts) {
  CheckCounts(g, counts, "reduce_scatter_v");
  TORCH_CHECK(x.size(0) == Sum(counts), g.name(), ": reduce_scatter_v input has ", x.size(0),
              " rows, counts add up to ", Sum(counts));
  return ScatterFn::apply(x, &g, counts, true);
}

absl::StatusOr<at::Tensor> SliceTokens(const at::Tensor& x, groups::Group& g,
                                       const std::vector<int64_t>& counts) {
  return Guard("slice tokens", [&] {
    CheckCounts(g, counts, "slice");
    TORCH_CHECK(x.size(0) == Sum(counts), g.name(), ": slicing ", x.size(0), " tokens by counts adding up to ", Sum(counts));
    return ScatterFn::apply(x, &g, counts, false);
  });
}

absl::StatusOr<at::Tensor> GatherTokens(const at::Tensor& y, groups::Group& g,
                                        const std::vector<int64_t>& counts) {
  return Guard("gather tokens", [&] {
    CheckCounts(g, counts, "gather");
    return GatherFn::apply(y, &g, counts, true);
  });
}

absl::StatusOr<at::Tensor> DispatchToExperts(const at::Tensor& permuted,
                                             const std::vector<int64_t>& rows_per_expert,
                                             const ExpertGroups& groups, DispatchState* st) {
  const int E = groups.num_experts;
  const int ep = Active(groups.ep) ? groups.ep->size() : 1;
  if (static_cast<int>(rows_per_expert.size()) != E || E % ep != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "dispatch: %d row counts for %d experts over %d EP ranks", rows_per_expert.size(), E, ep));
  }
  if (!permuted.defined() || permuted.dim() != 2 || permuted.size(0) != Sum(rows_per_expert)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "dispatch: permuted rows must be [%d, hidden]", Sum(rows_per_expert)));
  }
  const int local = E / ep;
  const int me = ep > 1 ? groups.ep->rank() : 0;
  return Guard("dispatch", [&] {
    // counts[i][e]: rows EP member i sends to global expert e.
    at::Tensor counts = at::tensor(rows_per_expert, at::kLong).reshape({1, E});
    if (ep > 1) {
      at::Tensor all = at::empty({ep, E}, at::kLong);
      WaitOrThrow(groups.ep->AllGather(counts, all));
      counts = all;
    }
    const int64_t* c = counts.data_ptr<int64_t>();
    st->send_counts.assign(ep, 0);
    st->recv_counts.assign(ep, 0);
    // mine[i][l]: rows from EP member i for local expert l.
    std::vector<int64_t> mine(ep * local);
    for (int i = 0; i < ep; ++i) {
      for (int l = 0; l < local; ++l) {
        st->send_counts[i] += c[me * E + i * local + l];
        st->recv_counts[i] += c[i * E + me * local + l];
        mine[i * local + l] = c[i * E + me * local + l];
      }
    }
    const int etp = Active(groups.etp) ? groups.etp->size() : 1;
    at::Tensor blocks = at::tensor(mine, at::kLong).reshape({1, ep * local});  // [etp member][source × local]
    if (etp > 1) {
      at::Tensor all = at::empty({etp, ep * local}, at::kLong);
      WaitOrThrow(groups.etp->AllGather(blocks.contiguous(), all));
      blocks = all;
    }
    const int64_t* b = blocks.data_ptr<int64_t>();
    st->etp_counts.assign(etp, 0);
    for (int m = 0; m < etp; ++m) {
      for (int j = 0; j < ep * local; ++j) st->etp_counts[m] += b[m * ep * local + j];
    }
    at::Tensor x = ToExperts(permuted, *st, groups);

    // The rows stay in (member, source, local expert) blocks: the grouped GEMM takes each
    // block as a segment of its expert, so nothing is copied to regroup them.
    st->rows_per_segment.clear();
    st->segment_expert.clear();
    for (int j = 0; j < etp * ep * local; ++j) {
      st->rows_per_segment.push_back(b[j]);  // empty blocks too: the GEMM skips them
      st->segment_expert.push_back(j % local);
    }
    return x;
  });
}

absl::StatusOr<at::Tensor> DispatchRowWeights(const at::Tensor& weights, const DispatchState& st,
                                              const ExpertGroups& groups) {
  if (!weights.defined() || weights.dim() != 1 || weights.size(0) != Sum(st.send_counts)) {
    return absl::InvalidArgumentError(absl::StrFormat("dispatch: row weights must be [%d], one per permuted row",
                                                      Sum(st.send_counts)));
  }
  return Guard("dispatch row weights", [&] { return ToExperts(weights, st, groups); });
}

absl::StatusOr<at::Tensor> CombineFromExperts(const at::Tensor& expert_out, const DispatchState& st,
                                              const ExpertGroups& groups) {
  return Guard("combine", [&] {
    at::Tensor y = expert_out;
    if (Active(groups.etp)) y = ReduceScatterVRows(y, *groups.etp, st.etp_counts);
    if (Active(groups.ep)) y = AllToAllVRows(y, *groups.ep, st.recv_counts, st.send_counts);
    return y;
  });
}

}  // namespace switchyard::dispatch
