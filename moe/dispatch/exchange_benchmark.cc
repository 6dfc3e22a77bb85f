// The EP dispatcher (counts exchange, all_to_all_v, regroup by local expert; then the
// reverse) beside a raw all_to_all_v of the same rows both ways, 2 and 4 ranks as threads
// over Gloo on loopback, 1 intra-op thread per rank.
// Each rank routes T = 4096 tokens of H = 512 fp32 to k = 2 of E = 16 experts (uniform
// random, seeded per rank), so it sends 8192 rows (16 MiB) each way.
//
//   tools/bazel run -c opt //moe/dispatch:exchange_benchmark
#include <mutex>
#include <numeric>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include "benchmark/benchmark.h"
#include "common/heap.h"
#include "dist/groups/comm.h"
#include "dist/groups/testing/rank_pool.h"
#include "moe/dispatch/exchange.h"
#include "moe/dispatch/permute.h"

namespace switchyard::dispatch {
namespace {

constexpr int64_t kTokens = 4096, kHidden = 512;
constexpr int kExperts = 16, kTopK = 2;

struct RankData {
  at::Tensor rows;  // permuted by global expert
  std::vector<int64_t> rows_per_expert;
};

RankData Make(int rank) {
  at::Generator gen = at::detail::createCPUGenerator(100 + rank);
  const at::Tensor idx = std::get<1>(at::rand({kTokens, kExperts}, gen).topk(kTopK, 1));
  const at::Tensor map = at::zeros({kTokens, kExperts}, at::kBool).scatter_(1, idx, true);
  absl::StatusOr<PermutePlan> plan = MakePlan(map);
  if (!plan.ok()) std::abort();
  at::NoGradGuard no_grad;
  return {Permute(at::randn({kTokens, kHidden}, gen), *plan), plan->rows_per_expert};
}

void Run(benchmark::State& state, bool raw) {
  const int n = static_cast<int>(state.range(0));
  common::RetainFreedMemory();  // as the workers do
  groups::testing::RankPool& pool = groups::testing::Pool({.world_size = n, .ep = n});
  std::vector<RankData> data(n);
  for (int r = 0; r < n; ++r) data[r] = Make(r);
  std::vector<DispatchState> st(n);
  bool ok = true;
  // The raw exchange needs the same send/recv counts: take them from one dispatch, whose
  // round trip must give back every rank's rows (checked once, outside the timing).
  std::mutex mu;
  pool.Run([&](int r, groups::Communicator& comm) {
    at::NoGradGuard no_grad;
    ExpertGroups eg{.ep = &comm.Get(groups::GroupKind::kEp), .num_experts = kExperts};
    absl::StatusOr<at::Tensor> local = DispatchToExperts(data[r].rows, data[r].rows_per_expert, eg, &st[r]);
    absl::StatusOr<at::Tensor> back = local.ok() ? CombineFromExperts(*local, st[r], eg) : local;
    std::lock_guard<std::mutex> l(mu);
    ok = ok && back.ok() && at::equal(*back, data[r].rows);
  });
  if (!ok) {
    state.SkipWithError("dispatch + combine did not give back the rows");
    return;
  }
  for (auto _ : state) {
    const double seconds = pool.Run([&](int r, groups::Communicator& comm) {
      at::NoGradGuard no_grad;
      groups::Group& ep = comm.Get(groups::GroupKind::kEp);
      if (raw) {
        at::Tensor there = at::empty({std::accumulate(st[r].recv_counts.begin(), st[r].recv_counts.end(), int64_t{0}), kHidden});
        ep.AllToAllV(data[r].rows, there, st[r].send_counts, st[r].recv_counts).Wait().IgnoreError();
        at::Tensor back = at::empty_like(data[r].rows);
        ep.AllToAllV(there, back, st[r].recv_counts, st[r].send_counts).Wait().IgnoreError();
      } else {
        ExpertGroups eg{.ep = &ep, .num_experts = kExperts};
        DispatchState s;
        absl::StatusOr<at::Tensor> local = DispatchToExperts(data[r].rows, data[r].rows_per_expert, eg, &s);
        absl::StatusOr<at::Tensor> back = CombineFromExperts(*local, s, eg);
        if (!back.ok()) std::abort();
      }
    });
    state.SetIterationTime(seconds);
  }
  state.SetBytesProcessed(state.iterations() * 2 * kTokens * kTopK * kHidden * 4);
}

void BM_EpDispatchCombine(benchmark::State& state) { Run(state, false); }
void BM_RawAllToAll(benchmark::State& state) { Run(state, true); }

BENCHMARK(BM_EpDispatchCombine)->ArgName("ranks")->Arg(2)->Arg(4)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_RawAllToAll)->ArgName("ranks")->Arg(2)->Arg(4)->UseManualTime()->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace switchyard::dispatch
