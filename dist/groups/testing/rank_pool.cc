#include "dist/groups/testing/rank_pool.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <tuple>

#include <ATen/Parallel.h>

#include "dist/groups/store.h"

namespace switchyard::groups::testing {

RankPool::RankPool(const LayoutSpec& spec, int intra_op_threads)
    : n_(spec.world_size), intra_op_threads_(intra_op_threads) {
  absl::StatusOr<Layout> layout = Layout::Create(spec);
  if (!layout.ok()) {
    std::fprintf(stderr, "RankPool: %s\n", std::string(layout.status().message()).c_str());
    std::abort();
  }
  std::shared_ptr<Store> store = Store::InMemory(std::chrono::seconds(120));
  comms_.resize(n_);
  std::vector<std::thread> init;
  for (int r = 0; r < n_; ++r) {
    init.emplace_back([&, r] {
      auto c = Communicator::Create(store, r, *layout, {.timeout = std::chrono::seconds(120)});
      if (!c.ok()) {
        std::fprintf(stderr, "RankPool: rank %d: %s\n", r, std::string(c.status().message()).c_str());
        std::abort();
      }
      comms_[r] = *std::move(c);
    });
  }
  for (auto& t : init) t.join();
  for (int r = 0; r < n_; ++r) threads_.emplace_back([this, r] { Loop(r); });
}

RankPool::~RankPool() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
    ++generation_;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

double RankPool::Run(const std::function<void(int, Communicator&)>& fn) {
  std::unique_lock<std::mutex> l(mu_);
  fn_ = &fn;
  done_ = 0;
  const auto t0 = std::chrono::steady_clock::now();
  ++generation_;
  cv_.notify_all();
  done_cv_.wait(l, [&] { return done_ == n_; });
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void RankPool::Loop(int r) {
  at::set_num_threads(intra_op_threads_);
  int64_t seen = 0;
  for (;;) {
    const std::function<void(int, Communicator&)>* fn;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return generation_ != seen; });
      seen = generation_;
      if (stop_) return;
      fn = fn_;
    }
    (*fn)(r, *comms_[r]);
    {
      std::lock_guard<std::mutex> l(mu_);
      ++done_;
    }
    done_cv_.notify_all();
  }
}

RankPool& Pool(const LayoutSpec& spec, int intra_op_threads) {
  static std::map<std::tuple<int, int, int, int, int>, std::unique_ptr<RankPool>> pools;
  auto& p = pools[{spec.world_size, spec.tp, spec.ep, spec.etp, intra_op_threads}];
  if (!p) p = std::make_unique<RankPool>(spec, intra_op_threads);
  return *p;
}

}  // namespace switchyard::groups::testing
