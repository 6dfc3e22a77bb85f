// Two things timed in alternating pairs inside one Google Benchmark: on a machine whose speed
// drifts by tens of percent over seconds (this project's shared 2-core hosts), separate runs
// of two benchmarks compare different conditions, while the two halves of a pair see nearly
// the same ones.
#ifndef SWITCHYARD_COMMON_PAIRED_BENCHMARK_H_
#define SWITCHYARD_COMMON_PAIRED_BENCHMARK_H_

#include <algorithm>
#include <chrono>
#include <vector>

#include "benchmark/benchmark.h"

namespace switchyard::common {

template <typename F>
double SecondsOf(F&& f) {
  const auto start = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// step ÷ base: each iteration runs both, in alternating order, after one warm-up pair. Sets
// the iteration time to step's (register with UseManualTime()) and the counters base_ms and ms
// (medians), ratio (the median of the per-pair step ÷ base ratios: the figure to quote) and
// best_ratio (step's best time ÷ base's best). base(state) and step(state) return false after
// skipping the benchmark with an error; then TimePairs returns false too.
template <typename Base, typename Step>
bool TimePairs(benchmark::State& state, Base& base, Step& step) {
  bool ok = base(state) && step(state);  // warm-up pair, not counted
  std::vector<double> base_s, step_s, ratio;
  for (auto _ : state) {
    if (!ok) return false;
    double b = 0, s = 0;
    if (base_s.size() % 2 == 0) {
      b = SecondsOf([&] { ok = base(state); });
      s = SecondsOf([&] { ok = ok && step(state); });
    } else {
      s = SecondsOf([&] { ok = step(state); });
      b = SecondsOf([&] { ok = ok && base(state); });
    }
    base_s.push_back(b), step_s.push_back(s), ratio.push_back(s / b);
    state.SetIterationTime(s);
  }
  if (!ok) return false;
  if (ratio.empty()) return true;
  state.counters["base_ms"] = 1e3 * Median(base_s);
  state.counters["ms"] = 1e3 * Median(step_s);
  state.counters["ratio"] = Median(ratio);
  // Each side at its least disturbed: memory-bound passes slow down more than GEMMs when
  // neighbours on the host load memory, which moves the median ratio.
  state.counters["best_ratio"] =
      *std::min_element(step_s.begin(), step_s.end()) / *std::min_element(base_s.begin(), base_s.end());
  return true;
}

}  // namespace switchyard::common

#endif  // SWITCHYARD_COMMON_PAIRED_BENCHMARK_H_
