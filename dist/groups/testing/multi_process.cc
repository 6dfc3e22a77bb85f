#include "dist/groups/testing/multi_process.h"

#include <signal.h>
#include <spawn.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <fcntl.h>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"

extern char** environ;

namespace switchyard::groups::testing {
namespace {

constexpr char kRankVar[] = "SY_MULTIPROC_RANK";
constexpr char kPortVar[] = "SY_MULTIPROC_PORT";
constexpr char kCallVar[] = "SY_MULTIPROC_CALL";

int EnvInt(const char* name) {
  const char* v = std::getenv(name);
  int out = -1;
  return v != nullptr && absl::SimpleAtoi(v, &out) ? out : -1;
}

// The last few lines of a file, for failure messages.
std::string Tail(const std::string& path, int lines) {
  std::ifstream in(path);
  std::vector<std::string> all;
  for (std::string l; std::getline(in, l);) all.push_back(l);
  const size_t from = all.size() > static_cast<size_t>(lines) ? all.size() - lines : 0;
  return absl::StrJoin(all.begin() + from, all.end(), " | ");
}

// Ends a child with its status: 0, or 1 with the error on stderr.
[[noreturn]] void ExitWith(const absl::Status& s) {
  if (!s.ok()) std::fprintf(stderr, "%s\n", s.ToString().c_str());
  std::fflush(stderr);
  std::_Exit(s.ok() ? 0 : 1);
}

// Child side: run this rank and exit, never returning to the test.
[[noreturn]] void RunChild(const RunOptions& options, const Layout& layout, int rank,
                           const std::function<absl::Status(Communicator&)>& fn) {
  // Exits with the communicator alive: destroying a group whose collective hung would wait
  // for its stuck thread.
  absl::StatusOr<std::shared_ptr<Store>> store = Store::ConnectTcp(
      {.host = "127.0.0.1", .port = EnvInt(kPortVar), .is_server = false,
       .timeout = options.collective_timeout});
  if (!store.ok()) ExitWith(store.status());
  CommOptions co;
  co.timeout = options.collective_timeout;
  absl::StatusOr<std::unique_ptr<Communicator>> comm = Communicator::Create(*store, rank, layout, co);
  if (!comm.ok()) ExitWith(comm.status());
  ExitWith(fn(**comm));
}

// Counts the calls within one run of one test (a new test, or a --gtest_repeat round,
// starts again at 0). In a child, also fails the run if the call it was started for never
// came, which would otherwise pass silently.
class CallCounter : public ::testing::EmptyTestEventListener {
 public:
  static CallCounter& Get() {
    static CallCounter* counter = [] {
      auto* c = new CallCounter;
      ::testing::UnitTest::GetInstance()->listeners().Append(c);  // gtest owns it
      return c;
    }();
    return *counter;
  }
  int Next() { return calls_++; }
  void OnTestStart(const ::testing::TestInfo&) override { calls_ = 0; }
  void OnTestEnd(const ::testing::TestInfo&) override {
    if (EnvInt(kRankVar) >= 0) {
      std::fprintf(stderr, "multi-process child: call %d of this test never came (%d calls)\n",
                   EnvInt(kCallVar), calls_);
      std::_Exit(3);
    }
  }

 private:
  int calls_ = 0;
};

// Registered before any test starts, so OnTestStart/OnTestEnd see every test.
[[maybe_unused]] const bool kCounterRegistered = (CallCounter::Get(), true);

}  // namespace

absl::Status RunRanksInProcesses(const RunOptions& options,
                                 std::function<absl::Status(Communicator&)> fn) {
  // Which call of this test this is: a child runs only the call it was started for.
  const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
  if (info == nullptr) return absl::FailedPreconditionError("RunRanksInProcesses needs a running test");
  const std::string test = std::string(info->test_suite_name()) + "." + info->name();
  const int this_call = CallCounter::Get().Next();

  absl::StatusOr<Layout> layout = Layout::Create(options.layout);
  if (!layout.ok()) return layout.status();
  const int n = layout->world_size();

  if (const int rank = EnvInt(kRankVar); rank >= 0) {
    if (EnvInt(kCallVar) != this_call) return absl::OkStatus();  // another call's child
    RunChild(options, *layout, rank, fn);
  }

  absl::StatusOr<std::shared_ptr<Store>> store = Store::ConnectTcp(
      {.host = "127.0.0.1", .port = 0, .is_server = true, .timeout = options.collective_timeout});
  if (!store.ok()) return store.status();
  char exe[PATH_MAX];
  const ssize_t len = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (len <= 0) return absl::InternalError("cannot read /proc/self/exe");
  exe[len] = '\0';
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string dir = tmp && *tmp ? tmp : "/tmp";

  // The child's environment: ours, without GoogleTest/Bazel outputs the parent owns.
  std::vector<std::string> base_env;
  for (char** e = environ; *e; ++e) {
    std::string v(*e);
    bool drop = false;
    for (const char* p : {"XML_OUTPUT_FILE=", "GTEST_OUTPUT=", "TEST_PREMATURE_EXIT_FILE=",
                          "TEST_TOTAL_SHARDS=", "TEST_SHARD_INDEX=", "GTEST_TOTAL_SHARDS=",
                          "GTEST_SHARD_INDEX=", "TEST_SHARD_STATUS_FILE=", kRankVar, kPortVar, kCallVar}) {
      drop |= v.rfind(p, 0) == 0;
    }
    if (!drop) base_env.push_back(v);
  }
  const std::string filter = "--gtest_filter=" + test;
  struct Child {
    pid_t pid = -1;
    int status = 0;
    bool running = false;
    std::string log;
  };
  std::vector<Child> kids(n);
  for (int r = 0; r < n; ++r) {
    if (std::count(options.absent_ranks.begin(), options.absent_ranks.end(), r)) continue;
    std::vector<std::string> env = base_env;
    env.push_back(absl::StrFormat("%s=%d", kRankVar, r));
    env.push_back(absl::StrFormat("%s=%d", kPortVar, (*store)->port()));
    env.push_back(absl::StrFormat("%s=%d", kCallVar, this_call));
    std::vector<char*> envp, argv{exe, const_cast<char*>(filter.c_str()), nullptr};
    for (std::string& e : env) envp.push_back(e.data());
    envp.push_back(nullptr);
    kids[r].log = absl::StrFormat("%s/multiproc_%d_%d_rank%d.log", dir, getpid(), this_call, r);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 2, kids[r].log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    const int err = posix_spawn(&kids[r].pid, exe, &fa, nullptr, argv.data(), envp.data());
    posix_spawn_file_actions_destroy(&fa);
    if (err != 0) {
      for (Child& k : kids) {
        if (!k.running) continue;
        kill(k.pid, SIGKILL);
        waitpid(k.pid, nullptr, 0);
      }
      return absl::InternalError(absl::StrFormat("cannot start rank %d: %s", r, strerror(err)));
    }
    kids[r].running = true;
  }

  const auto deadline = std::chrono::steady_clock::now() + options.deadline;
  for (;;) {
    int running = 0;
    for (Child& k : kids) {
      if (!k.running) continue;
      if (waitpid(k.pid, &k.status, WNOHANG) == k.pid) {
        k.running = false;
      } else {
        ++running;
      }
    }
    if (running == 0) break;
    if (std::chrono::steady_clock::now() > deadline) {
      std::vector<int> stuck;
      for (int r = 0; r < n; ++r) {
        if (!kids[r].running) continue;
        stuck.push_back(r);
        kill(kids[r].pid, SIGKILL);
        waitpid(kids[r].pid, nullptr, 0);
      }
      return absl::DeadlineExceededError(absl::StrFormat(
          "ranks [%s] still running after %d ms; killed", absl::StrJoin(stuck, ","),
          static_cast<int>(options.deadline.count())));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::vector<std::string> failures;
  for (int r = 0; r < n; ++r) {
    if (kids[r].pid < 0) continue;
    const int st = kids[r].status;
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0) continue;
    std::string how = WIFEXITED(st)
                          ? absl::StrFormat("exited with code %d", WEXITSTATUS(st))
                          : absl::StrFormat("killed by signal %d (SIG%s)", WTERMSIG(st),
                                            sigabbrev_np(WTERMSIG(st)) ? sigabbrev_np(WTERMSIG(st)) : "?");
    failures.push_back(absl::StrFormat("rank %d: %s: %s", r, how, Tail(kids[r].log, 3)));
  }
  if (failures.empty()) return absl::OkStatus();
  return absl::InternalError(absl::StrJoin(failures, "\n"));
}

}  // namespace switchyard::groups::testing
