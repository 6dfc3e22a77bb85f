// All-reduce, all-gather and all-to-all over Gloo on loopback, 2 and 4 ranks as threads of
// this process, 4 KiB to 64 MiB, beside a memcpy of the same bytes (this machine's limit).
//
//   tools/bazel run -c opt //dist/groups:collectives_benchmark
//
// Columns follow nccl-tests: size is the per-rank buffer (all-gather: the gathered output);
// algbw = size / time; busbw = algbw × 2(n−1)/n for all-reduce, × (n−1)/n for all-gather
// and all-to-all. Time per op is the wall time from releasing all ranks to the last one
// finishing; BM_Dispatch times that release-and-join alone (the floor at small sizes).
// "correct" is 1 when the result was checked right on every rank.
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "benchmark/benchmark.h"
#include "dist/groups/comm.h"
#include "dist/groups/testing/rank_pool.h"

namespace switchyard::groups {
namespace {

using testing::Pool;
using testing::RankPool;

enum class Op { kAllReduce, kAllGather, kAllToAll };

void RunCollective(benchmark::State& state, Op op) {
  const int n = static_cast<int>(state.range(0));
  const int64_t bytes = state.range(1);  // per-rank buffer (all-gather: gathered output)
  const int64_t elems = bytes / 4;
  RankPool& pool = Pool({.world_size = n});
  // Per-rank buffers, filled so each rank can check its result.
  std::vector<at::Tensor> in(n), out(n);
  for (int r = 0; r < n; ++r) {
    if (op == Op::kAllGather) {
      in[r] = at::full({elems / n}, static_cast<float>(r + 1));
      out[r] = at::empty({elems / n * n});
    } else {
      in[r] = at::full({elems}, static_cast<float>(r + 1));
      out[r] = at::empty({elems});
    }
  }
  std::atomic<int> wrong{0};
  auto once = [&](int r, Communicator& c) {
    Group& g = c.World();
    absl::Status s;
    if (op == Op::kAllReduce) {
      s = g.AllReduce(in[r]).Wait();
    } else if (op == Op::kAllGather) {
      s = g.AllGather(in[r], out[r]).Wait();
    } else {
      std::vector<int64_t> counts(n, elems / n);
      s = g.AllToAllV(in[r].narrow(0, 0, elems / n * n), out[r], counts, counts).Wait();
    }
    if (!s.ok()) wrong.fetch_add(1);
  };
  double total = 0;
  int64_t ops = 0;
  for (auto _ : state) {
    const double t = pool.Run(once);
    state.SetIterationTime(t);
    total += t;
    ++ops;
    if (op == Op::kAllReduce) {
      state.PauseTiming();
      for (int r = 0; r < n; ++r) in[r].fill_(static_cast<float>(r + 1));  // undo the sums
      state.ResumeTiming();
    }
  }
  // Check one more op's result on every rank.
  pool.Run(once);
  bool correct = wrong.load() == 0;
  for (int r = 0; r < n && correct; ++r) {
    if (op == Op::kAllReduce) {
      correct = in[r][elems - 1].item<float>() == n * (n + 1) / 2.0f;
    } else if (op == Op::kAllGather) {
      for (int q = 0; q < n; ++q) correct &= out[r][(q + 1) * (elems / n) - 1].item<float>() == q + 1;
    } else {
      for (int q = 0; q < n; ++q) correct &= out[r][q * (elems / n)].item<float>() == q + 1;
    }
  }
  const double algbw = bytes * ops / total / 1e9;
  const double factor = op == Op::kAllReduce ? 2.0 * (n - 1) / n : double(n - 1) / n;
  state.counters["ranks"] = n;
  state.counters["algbw_GBps"] = algbw;
  state.counters["busbw_GBps"] = algbw * factor;
  state.counters["correct"] = correct ? 1 : 0;
  state.SetBytesProcessed(bytes * state.iterations());
}

void BM_AllReduce(benchmark::State& s) { RunCollective(s, Op::kAllReduce); }
void BM_AllGather(benchmark::State& s) { RunCollective(s, Op::kAllGather); }
void BM_AllToAll(benchmark::State& s) { RunCollective(s, Op::kAllToAll); }

void BM_Dispatch(benchmark::State& state) {
  RankPool& pool = Pool({.world_size = static_cast<int>(state.range(0))});
  for (auto _ : state) state.SetIterationTime(pool.Run([](int, Communicator&) {}));
}

void BM_Memcpy(benchmark::State& state) {
  const int64_t bytes = state.range(0);
  std::vector<char> a(bytes, 1), b(bytes);
  for (auto _ : state) {
    std::memcpy(b.data(), a.data(), bytes);
    benchmark::DoNotOptimize(b.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(bytes * state.iterations());
}

void Sizes(benchmark::internal::Benchmark* b) {
  for (int n : {2, 4})
    for (int64_t bytes = 4 << 10; bytes <= 64 << 20; bytes *= 4) b->Args({n, bytes});
}

BENCHMARK(BM_AllReduce)->Apply(Sizes)->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);
BENCHMARK(BM_AllGather)->Apply(Sizes)->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);
BENCHMARK(BM_AllToAll)->Apply(Sizes)->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.2);
BENCHMARK(BM_Dispatch)->Arg(2)->Arg(4)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Memcpy)->RangeMultiplier(4)->Range(4 << 10, 64 << 20)->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace switchyard::groups
