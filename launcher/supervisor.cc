#include "launcher/supervisor.h"

#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "dist/groups/store.h"

extern char** environ;

namespace switchyard::launcher {
namespace {

volatile sig_atomic_t g_signal = 0;
void OnSignal(int sig) { g_signal = sig; }

// Keys of the launchers' own store. Per restart: the first failure anywhere (claimed with a
// counter so the root cause is never overwritten by the failures it causes) and the nodes
// done. Once for the job: a node was interrupted, so no node restarts.
std::string AbortKey(int restart) { return absl::StrFormat("sy/launcher/restart%d/abort", restart); }
std::string AbortClaimKey(int restart) { return absl::StrFormat("sy/launcher/restart%d/abort_claims", restart); }
std::string DoneKey(int restart) { return absl::StrFormat("sy/launcher/restart%d/nodes_done", restart); }
constexpr char kStopKey[] = "sy/launcher/stop";
// How long workers get between SIGTERM and SIGKILL.
constexpr auto kTermGrace = std::chrono::seconds(2);

struct Child {
  int rank = 0;
  pid_t pid = -1;  // also its process group
  bool running = false;
  int status = 0;
};

std::string SignalName(int sig) {
  const char* abbrev = sigabbrev_np(sig);
  return absl::StrCat("SIG", abbrev ? abbrev : "?");
}

std::string Describe(int status) {
  if (WIFEXITED(status)) return absl::StrFormat("exited with code %d", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    return absl::StrFormat("was killed by signal %d (%s)", WTERMSIG(status), SignalName(WTERMSIG(status)));
  }
  return absl::StrFormat("stopped with status %d", status);
}

bool Succeeded(int status) { return WIFEXITED(status) && WEXITSTATUS(status) == 0; }

// The worker's environment: ours, with the torchrun-style variables replaced.
std::vector<std::string> WorkerEnvironment(const ResolvedJob& job, int rank, int local_rank,
                                           int port, int threads, int restart) {
  const Launch& l = job.job.launch();
  const char* ours[] = {"RANK=", "WORLD_SIZE=", "LOCAL_RANK=", "LOCAL_WORLD_SIZE=",
                        "GROUP_RANK=", "MASTER_ADDR=", "MASTER_PORT=",
                        "SWITCHYARD_LAUNCHER_PID=", "TORCHELASTIC_USE_AGENT_STORE=",
                        "SWITCHYARD_RESTART=", "TORCHELASTIC_RESTART_COUNT="};
  std::vector<std::string> env;
  bool has_omp = false;
  for (char** e = environ; *e != nullptr; ++e) {
    std::string v(*e);
    bool replaced = false;
    for (const char* p : ours) replaced |= v.rfind(p, 0) == 0;
    has_omp |= v.rfind("OMP_NUM_THREADS=", 0) == 0;
    if (!replaced) env.push_back(v);
  }
  env.push_back(absl::StrFormat("RANK=%d", rank));
  env.push_back(absl::StrFormat("WORLD_SIZE=%d", job.world_size));
  env.push_back(absl::StrFormat("LOCAL_RANK=%d", local_rank));
  env.push_back(absl::StrFormat("LOCAL_WORLD_SIZE=%d", l.nproc_per_node()));
  env.push_back(absl::StrFormat("GROUP_RANK=%d", l.node_rank()));
  env.push_back("MASTER_ADDR=" + l.master_addr());
  env.push_back(absl::StrFormat("MASTER_PORT=%d", port));
  env.push_back(absl::StrFormat("SWITCHYARD_LAUNCHER_PID=%d", getpid()));
  env.push_back(absl::StrFormat("SWITCHYARD_RESTART=%d", restart));
  // OpenMP pools must not oversubscribe the cores shared by the local ranks.
  if (!has_omp) env.push_back(absl::StrFormat("OMP_NUM_THREADS=%d", threads));
  return env;
}

// Starts `args` (args[0] is only what ps shows) by executing this very binary.
pid_t Spawn(const std::vector<std::string>& args, const std::vector<std::string>& env) {
  // Everything the child needs is built before fork(): the store's threads may hold locks.
  std::vector<char*> argv, envp;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  for (const std::string& e : env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);
  const pid_t parent = getpid();
  pid_t pid = fork();
  if (pid == 0) {
    // Own process group: a terminal's Ctrl-C reaches the launcher, which stops the workers
    // in order. PDEATHSIG: if the launcher itself is killed, its workers die with it.
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(1);
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    signal(SIGHUP, SIG_DFL);
    // /proc/self/exe: still this binary even if a rebuild has replaced the file since.
    execve("/proc/self/exe", argv.data(), envp.data());
    const char msg[] = "[launcher] exec of the worker binary failed\n";
    (void)!write(2, msg, sizeof(msg) - 1);
    _exit(127);
  }
  // Also here: a signal to the group right after fork must not miss the child.
  if (pid > 0) setpgid(pid, pid);
  return pid;
}

// Reaps what has exited; true when nothing is left running. A pid waitpid no longer knows
// (it cannot happen unless someone else reaped it) counts as failed.
bool Reap(std::vector<Child>& children) {
  bool any = false;
  for (Child& c : children) {
    if (!c.running) continue;
    const pid_t r = waitpid(c.pid, &c.status, WNOHANG);
    if (r == c.pid || (r < 0 && errno == ECHILD)) {
      c.running = false;
      if (r < 0) c.status = W_EXITCODE(255, 0);
    } else {
      any = true;
    }
  }
  return !any;
}

bool ReapUntil(std::vector<Child>& children, std::chrono::steady_clock::time_point until) {
  while (!Reap(children)) {
    if (std::chrono::steady_clock::now() >= until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
}

// Stops every worker and everything a worker started (its whole process group, even when
// the worker itself has already exited): SIGTERM, then SIGKILL after a grace period.
void StopAll(std::vector<Child>& children) {
  for (const Child& c : children)
    if (c.pid > 0) kill(-c.pid, SIGTERM);
  ReapUntil(children, std::chrono::steady_clock::now() + kTermGrace);
  for (const Child& c : children)
    if (c.pid > 0) kill(-c.pid, SIGKILL);
  ReapUntil(children, std::chrono::steady_clock::now() + std::chrono::seconds(10));
}

enum class Outcome {
  kSuccess,      // every node's workers finished
  kFailed,       // a worker failed here or on another node: restart, or give up
  kFatal,        // restarting cannot help: the store is gone, or another node was interrupted
  kInterrupted,  // this launcher got SIGINT, SIGTERM or SIGHUP
};

struct Attempt {
  Outcome outcome = Outcome::kSuccess;
  std::string why;
};

// Starts this node's workers for one attempt and supervises them until all succeed, one
// fails (here or on another node), or the launcher is interrupted. Leaves no process behind.
Attempt RunAttempt(const ResolvedJob& job, groups::Store& store, int port, int threads,
                   int restart, const std::string& exe, const std::string& spec_path) {
  const Launch& l = job.job.launch();
  const int node = l.node_rank(), nproc = l.nproc_per_node(), nnodes = l.nnodes();
  std::vector<Child> children(nproc);

  // Tells the other nodes, before the slow stop; only the first failure of an attempt is
  // recorded, the ones it causes elsewhere are not.
  auto publish = [&](const std::string& why) {
    if (nnodes == 1) return;
    absl::StatusOr<int64_t> claim = store.Add(AbortClaimKey(restart), 1);
    if (claim.ok() && *claim == 1) (void)store.Set(AbortKey(restart), absl::StrFormat("node %d: %s", node, why));
  };
  auto end = [&](Outcome o, std::string why) -> Attempt {
    StopAll(children);
    return {o, std::move(why)};
  };
  auto interrupted = [&]() -> Attempt {
    const std::string why = absl::StrFormat("interrupted by %s", SignalName(g_signal));
    if (nnodes > 1) (void)store.Set(kStopKey, absl::StrFormat("node %d was %s", node, why));
    publish(why);
    return end(Outcome::kInterrupted, why);
  };
  // Another node's failure, if one was recorded for this attempt.
  auto remote = [&]() -> std::optional<Attempt> {
    absl::StatusOr<bool> aborted = store.Check(AbortKey(restart));
    if (!aborted.ok()) {
      return Attempt{Outcome::kFatal, "lost the rendezvous store (node 0's launcher is gone?): " +
                                          std::string(aborted.status().message())};
    }
    if (!*aborted) return std::nullopt;
    absl::StatusOr<std::string> why = store.Get(AbortKey(restart));
    absl::StatusOr<bool> stop = store.Check(kStopKey);
    return Attempt{stop.ok() && *stop ? Outcome::kFatal : Outcome::kFailed,
                   "another node failed: " + (why.ok() ? *why : std::string("(no reason given)"))};
  };

  for (int i = 0; i < nproc; ++i) {
    Child& c = children[i];
    c.rank = node * nproc + i;
    c.pid = Spawn({exe, "--spec=" + spec_path}, WorkerEnvironment(job, c.rank, i, port, threads, restart));
    if (c.pid < 0) {
      const int err = errno;
      const std::string why = absl::StrFormat("fork failed for rank %d: %s", c.rank, strerror(err));
      publish(why);
      return end(Outcome::kFailed, why);
    }
    c.running = true;
    std::printf("[launcher] rank %d: pid %d\n", c.rank, c.pid);
  }
  std::fflush(stdout);

  auto last_check = std::chrono::steady_clock::now();
  for (;;) {
    // A signal first: under scancel or systemd the workers get it too, and their deaths
    // are not failures to restart from.
    if (g_signal != 0) return interrupted();
    const bool all_done = Reap(children);
    for (const Child& c : children) {
      if (!c.running && !Succeeded(c.status)) {
        if (g_signal != 0) return interrupted();
        const std::string why = absl::StrFormat("rank %d (pid %d, node %d) %s", c.rank, c.pid,
                                                node, Describe(c.status));
        publish(why);
        return end(Outcome::kFailed, why);
      }
    }
    if (all_done) break;
    if (nnodes > 1 && std::chrono::steady_clock::now() - last_check > std::chrono::milliseconds(250)) {
      last_check = std::chrono::steady_clock::now();
      if (std::optional<Attempt> r = remote()) return end(r->outcome, r->why);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  // Whatever the workers left running (their process groups) goes too.
  for (const Child& c : children) kill(-c.pid, SIGKILL);
  if (nnodes == 1) return {Outcome::kSuccess, ""};

  // This node is done; the attempt is done when every node is, or fails if one does.
  // Node 0 hosts the store and must outlive the others' last look at it.
  if (!store.Add(DoneKey(restart), 1).ok()) return {Outcome::kSuccess, ""};
  for (;;) {
    if (g_signal != 0) return interrupted();
    absl::StatusOr<int64_t> done = store.Add(DoneKey(restart), 0);
    // This node's workers all succeeded: a vanished store means node 0 saw everyone done.
    if (!done.ok() || *done >= nnodes) return {Outcome::kSuccess, ""};
    if (std::optional<Attempt> r = remote()) {
      return r->outcome == Outcome::kFatal && r->why.rfind("lost", 0) == 0 ? Attempt{Outcome::kSuccess, ""} : *r;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

}  // namespace

int RunLauncher(const ResolvedJob& job, const std::string& exe, const std::string& spec_path) {
  const Launch& l = job.job.launch();
  const int node = l.node_rank(), nproc = l.nproc_per_node(), nnodes = l.nnodes();
  absl::StatusOr<std::shared_ptr<groups::Store>> store = groups::Store::ConnectTcp(
      {.host = l.master_addr(), .port = l.master_port(), .is_server = node == 0,
       .timeout = std::chrono::seconds(l.rendezvous_timeout_s())});
  if (!store.ok()) {
    std::fprintf(stderr, "[launcher] error: launch.master_port: %s\n",
                 std::string(store.status().message()).c_str());
    return 1;
  }
  const int port = (*store)->port();

  struct sigaction sa = {};
  sa.sa_handler = OnSignal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGHUP, &sa, nullptr);
  // Inherited SIG_IGN for SIGCHLD would make the kernel reap workers before waitpid sees them.
  signal(SIGCHLD, SIG_DFL);

  const int threads = l.threads_per_rank() > 0
                          ? l.threads_per_rank()
                          : std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / nproc);
  std::printf("[launcher] node %d of %d: starting ranks %d-%d of %d (rendezvous %s:%d, %d "
              "intra-op thread%s per rank)\n",
              node, nnodes, node * nproc, node * nproc + nproc - 1, job.world_size,
              l.master_addr().c_str(), port, threads, threads == 1 ? "" : "s");
  for (int restart = 0;; ++restart) {
    Attempt a = RunAttempt(job, **store, port, threads, restart, exe, spec_path);
    if (a.outcome == Outcome::kSuccess) {
      std::printf("[launcher] node %d: all %d workers finished\n", node, nproc);
      return 0;
    }
    if (a.outcome == Outcome::kInterrupted || g_signal != 0) {
      std::fprintf(stderr, "[launcher] error: %s; stopped all workers\n", a.why.c_str());
      return 128 + (g_signal != 0 ? g_signal : SIGINT);
    }
    if (a.outcome == Outcome::kFatal || restart >= l.max_restarts()) {
      std::string gave_up;
      if (a.outcome == Outcome::kFailed && l.max_restarts() > 0) {
        gave_up = absl::StrFormat(" (gave up after %d restart%s, launch.max_restarts)", restart,
                                  restart == 1 ? "" : "s");
      }
      std::fprintf(stderr, "[launcher] error: %s; stopped all workers%s\n", a.why.c_str(), gave_up.c_str());
      return 1;
    }
    std::fprintf(stderr, "[launcher] %s; stopped all workers; restarting them (restart %d of %d)\n",
                 a.why.c_str(), restart + 1, l.max_restarts());
  }
}

}  // namespace switchyard::launcher
