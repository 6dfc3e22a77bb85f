// A pool of N rank threads for benchmarks, each with its own Communicator over an in-memory
// store, that run a function together on request and report the wall time from the release
// to the last rank finishing. Threads are created once and reused, so a benchmark loop times
// the collective, not thread start-up.
//
//   RankPool& pool = Pool({.world_size = 4, .ep = 4});
//   double seconds = pool.Run([&](int rank, Communicator& comm) { ... });
#ifndef DIST_GROUPS_TESTING_RANK_POOL_H_
#define DIST_GROUPS_TESTING_RANK_POOL_H_

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "dist/groups/comm.h"
#include "dist/groups/layout.h"

namespace switchyard::groups::testing {

class RankPool {
 public:
  // Each rank thread runs with `intra_op_threads` LibTorch threads.
  explicit RankPool(const LayoutSpec& spec, int intra_op_threads = 1);
  ~RankPool();
  int size() const { return n_; }

  // Runs fn on every rank at once; returns seconds from the release to the last finish.
  double Run(const std::function<void(int, Communicator&)>& fn);

 private:
  void Loop(int r);

  int n_;
  int intra_op_threads_;
  std::vector<std::unique_ptr<Communicator>> comms_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  int64_t generation_ = 0;
  int done_ = 0;
  bool stop_ = false;
  const std::function<void(int, Communicator&)>* fn_ = nullptr;
};

// One pool per layout (by world size, tp, ep, etp), created on first use, kept for the process.
RankPool& Pool(const LayoutSpec& spec, int intra_op_threads = 1);

}  // namespace switchyard::groups::testing

#endif  // DIST_GROUPS_TESTING_RANK_POOL_H_
