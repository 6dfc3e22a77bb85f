#include "launcher/supervisor.h"

#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"
#include "dist/groups/store.h"

extern char** environ;

namespace switchyard::launcher {
namespace {

volatile sig_atomic_t g_signal = 0;
void OnSignal(int sig) { g_signal = sig; }

constexpr char kAbortKey[] = "sy/launcher/abort";
constexpr char kNodesDoneKey[] = "sy/launcher/nodes_done";
// How long workers get between SIGTERM and SIGKILL.
constexpr auto kTermGrace = std::chrono::seconds(2);

struct Child {
  int rank = 0;
  pid_t pid = -1;
  bool running = false;
  int status = 0;
};

std::string Describe(int status) {
  if (WIFEXITED(status)) return absl::StrFormat("exited with code %d", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    const char* abbrev = sigabbrev_np(sig);
    return absl::StrFormat("was killed by signal %d (SIG%s)", sig, abbrev ? abbrev : "?");
  }
  return absl::StrFormat("stopped with status %d", status);
}

bool Succeeded(int status) { return WIFEXITED(status) && WEXITSTATUS(status) == 0; }

// The worker's environment: ours, with the torchrun-style variables replaced.
std::vector<std::string> WorkerEnvironment(const ResolvedJob& job, int rank, int local_rank,
                                           int port, int threads) {
  const Launch& l = job.job.launch();
  const char* ours[] = {"RANK=", "WORLD_SIZE=", "LOCAL_RANK=", "LOCAL_WORLD_SIZE=",
                        "GROUP_RANK=", "MASTER_ADDR=", "MASTER_PORT=",
                        "SWITCHYARD_LAUNCHER_PID=", "TORCHELASTIC_USE_AGENT_STORE="};
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
  // OpenMP pools must not oversubscribe the cores shared by the local ranks.
  if (!has_omp) env.push_back(absl::StrFormat("OMP_NUM_THREADS=%d", threads));
  return env;
}

pid_t Spawn(const std::string& exe, const std::vector<std::string>& args,
            const std::vector<std::string>& env) {
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
    execve(exe.c_str(), argv.data(), envp.data());
    const char msg[] = "[launcher] exec of the worker binary failed\n";
    (void)!write(2, msg, sizeof(msg) - 1);
    _exit(127);
  }
  return pid;
}

// Returns true when every child is reaped.
bool ReapAll(std::vector<Child>& children, std::chrono::steady_clock::time_point until) {
  for (;;) {
    bool any = false;
    for (Child& c : children) {
      if (!c.running) continue;
      int status = 0;
      pid_t r = waitpid(c.pid, &status, WNOHANG);
      if (r == c.pid) {
        c.running = false;
        c.status = status;
      } else {
        any = true;
      }
    }
    if (!any) return true;
    if (std::chrono::steady_clock::now() >= until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

void StopAll(std::vector<Child>& children) {
  for (const Child& c : children)
    if (c.running) kill(-c.pid, SIGTERM);
  if (ReapAll(children, std::chrono::steady_clock::now() + kTermGrace)) return;
  for (const Child& c : children)
    if (c.running) kill(-c.pid, SIGKILL);
  ReapAll(children, std::chrono::steady_clock::now() + std::chrono::seconds(10));
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

  const int threads = l.threads_per_rank() > 0
                          ? l.threads_per_rank()
                          : std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / nproc);
  std::printf("[launcher] node %d of %d: starting ranks %d-%d of %d (rendezvous %s:%d, %d "
              "intra-op thread%s per rank)\n",
              node, nnodes, node * nproc, node * nproc + nproc - 1, job.world_size,
              l.master_addr().c_str(), port, threads, threads == 1 ? "" : "s");
  std::vector<Child> children(nproc);
  for (int i = 0; i < nproc; ++i) {
    Child& c = children[i];
    c.rank = node * nproc + i;
    c.pid = Spawn(exe, {exe, "--spec=" + spec_path},
                  WorkerEnvironment(job, c.rank, i, port, threads));
    if (c.pid < 0) {
      std::fprintf(stderr, "[launcher] error: fork failed for rank %d: %s\n", c.rank, strerror(errno));
      StopAll(children);
      return 1;
    }
    c.running = true;
    std::printf("[launcher] rank %d: pid %d\n", c.rank, c.pid);
  }
  std::fflush(stdout);

  std::string failure;  // empty while all is well
  int exit_code = 0;
  auto last_check = std::chrono::steady_clock::now();
  for (;;) {
    int running = 0;
    for (Child& c : children) {
      if (!c.running) continue;
      int status = 0;
      if (waitpid(c.pid, &status, WNOHANG) == c.pid) {
        c.running = false;
        c.status = status;
        if (!Succeeded(status) && failure.empty()) {
          failure = absl::StrFormat("rank %d (pid %d, node %d) %s", c.rank, c.pid, node, Describe(status));
        }
      } else {
        ++running;
      }
    }
    if (!failure.empty()) break;
    if (running == 0) break;
    if (g_signal != 0) {
      failure = absl::StrFormat("interrupted by SIG%s", sigabbrev_np(g_signal));
      exit_code = 130;
      break;
    }
    if (nnodes > 1 && std::chrono::steady_clock::now() - last_check > std::chrono::milliseconds(250)) {
      last_check = std::chrono::steady_clock::now();
      absl::StatusOr<bool> aborted = (*store)->Check(kAbortKey);
      if (!aborted.ok()) {
        failure = "lost the rendezvous store (node 0's launcher is gone?): " +
                  std::string(aborted.status().message());
        break;
      }
      if (*aborted) {
        absl::StatusOr<std::string> why = (*store)->Get(kAbortKey);
        failure = "another node failed: " + (why.ok() ? *why : std::string("(no reason given)"));
        break;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }

  if (!failure.empty()) {
    StopAll(children);
    // Tell the other nodes (best effort: the store may be what failed).
    if (nnodes > 1 && failure.rfind("another node", 0) != 0) {
      (void)(*store)->Set(kAbortKey, absl::StrFormat("node %d: %s", node, failure));
    }
    std::fprintf(stderr, "[launcher] error: %s; stopped all workers\n", failure.c_str());
    return exit_code != 0 ? exit_code : 1;
  }
  if (nnodes > 1) {
    // Node 0 hosts the store: it stays until every node is done, or one fails.
    absl::StatusOr<int64_t> done = (*store)->Add(kNodesDoneKey, 1);
    if (node == 0 && done.ok()) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(l.rendezvous_timeout_s());
      while (std::chrono::steady_clock::now() < until && g_signal == 0) {
        absl::StatusOr<int64_t> n = (*store)->Add(kNodesDoneKey, 0);
        if (!n.ok() || *n >= nnodes) break;
        absl::StatusOr<bool> aborted = (*store)->Check(kAbortKey);
        if (aborted.ok() && *aborted) {
          absl::StatusOr<std::string> why = (*store)->Get(kAbortKey);
          std::fprintf(stderr, "[launcher] error: another node failed: %s\n",
                       why.ok() ? why->c_str() : "(no reason given)");
          return 1;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    }
  }
  std::printf("[launcher] node %d: all %d workers finished\n", node, nproc);
  return 0;
}

}  // namespace switchyard::launcher
