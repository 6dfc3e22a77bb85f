#include "dist/groups/testing/multi_rank.h"

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace switchyard::groups::testing {

absl::Status RunRanks(const RunOptions& options, std::function<absl::Status(Communicator&)> fn) {
  absl::StatusOr<Layout> layout = Layout::Create(options.layout);
  if (!layout.ok()) return layout.status();
  const int n = layout->world_size();
  // LibTorch 2.x's c10d flight recorder (on by default) inserts into a map before it takes
  // its lock (FlightRecorder::recordWithResetEnabled, seen in 2.11): ranks as threads enqueue
  // collectives at once and corrupt it (a segfault in std::_Rb_tree_insert_and_rebalance).
  // Off for ranks as threads unless asked for; one rank per process, as the launcher runs
  // them, never enqueues from two threads. (It must be set before the first group.)
  setenv("TORCH_FR_BUFFER_SIZE", "0", /*overwrite=*/0);
  std::shared_ptr<Store> store = Store::InMemory(options.collective_timeout);
  std::vector<absl::Status> results(n);
  std::mutex mu;
  std::condition_variable cv;
  int done = 0;
  std::vector<bool> finished(n, false);
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    const bool absent = std::count(options.absent_ranks.begin(), options.absent_ranks.end(), r) > 0;
    threads.emplace_back([&, r, absent] {
      absl::Status s;
      if (!absent) {
        CommOptions co;
        co.timeout = options.collective_timeout;
        co.backend = options.backend;
        if (options.backend == Backend::kNccl) co.device = r;  // one GPU per rank
        absl::StatusOr<std::unique_ptr<Communicator>> comm = Communicator::Create(store, r, *layout, co);
        // A function that throws (a c10::Error from a collective whose peer already left)
        // is that rank's failure, reported like a returned one, not std::terminate.
        try {
          s = comm.ok() ? fn(**comm) : comm.status();
        } catch (const std::exception& e) {
          s = absl::InternalError(absl::StrCat("threw: ", e.what()));
        }
      }
      std::lock_guard<std::mutex> lock(mu);
      results[r] = s;
      finished[r] = true;
      ++done;
      cv.notify_all();
    });
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    if (!cv.wait_for(lock, options.deadline, [&] { return done == n; })) {
      std::vector<int> stuck;
      for (int r = 0; r < n; ++r)
        if (!finished[r]) stuck.push_back(r);
      std::fprintf(stderr, "RunRanks: ranks [%s] still running after the %lld ms deadline\n",
                   absl::StrJoin(stuck, ",").c_str(),
                   static_cast<long long>(options.deadline.count()));
      std::fflush(stderr);
      std::_Exit(3);
    }
  }
  for (std::thread& t : threads) t.join();
  std::vector<std::string> failures;
  for (int r = 0; r < n; ++r) {
    if (!results[r].ok()) failures.push_back(absl::StrFormat("rank %d: %s", r, results[r].ToString()));
  }
  if (failures.empty()) return absl::OkStatus();
  return absl::InternalError(absl::StrJoin(failures, "\n"));
}

}  // namespace switchyard::groups::testing
