// switchyard launcher: runs a job spec on this machine's ranks, or as one worker in place
// when started by torchrun, Slurm's srun or mpirun.
//
//   launcher --spec=job.pbtxt            start launch.nproc_per_node workers and supervise them
//   launcher --spec=job.pbtxt --dry_run  print the resolved layout and exit
//
// Exit codes: 0 success; 1 a worker or the rendezvous failed; 2 bad flags or spec;
// 130 interrupted.
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "absl/strings/str_join.h"
#include "launcher/spec.h"
#include "launcher/supervisor.h"
#include "launcher/worker.h"
#include "launcher/worker_env.h"

namespace {

constexpr char kUsage[] =
    "usage: launcher --spec=FILE [--dry_run]\n"
    "  --spec=FILE  job spec in protobuf text format (launcher/job.proto)\n"
    "  --dry_run    validate, print every rank's coordinates and groups, and exit\n"
    "Started by torchrun (RANK, WORLD_SIZE, ...), srun (SLURM_PROCID, ...) or mpirun\n"
    "(OMPI_COMM_WORLD_*), it runs as that one worker.\n";

int Usage(const std::string& error) {
  std::fprintf(stderr, "error: %s\n%s", error.c_str(), kUsage);
  return 2;
}

std::string Absolute(const std::string& path) {
  std::filesystem::path p(path);
  return p.is_absolute() ? path : (std::filesystem::current_path() / p).lexically_normal().string();
}

}  // namespace

int main(int argc, char** argv) {
  using namespace switchyard::launcher;
  // `bazel run` starts binaries in their runfiles folder: go back to where the user was, so
  // relative paths (the spec, data files, checkpoints) mean what they meant there.
  if (const char* cwd = std::getenv("BUILD_WORKING_DIRECTORY"); cwd && *cwd && chdir(cwd) != 0) {
    std::fprintf(stderr, "error: cannot enter BUILD_WORKING_DIRECTORY \"%s\"\n", cwd);
    return 2;
  }
  std::string spec;
  bool dry_run = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--spec=", 0) == 0) {
      spec = a.substr(7);
    } else if (a == "--spec" && i + 1 < argc) {
      spec = argv[++i];
    } else if (a == "--dry_run" || a == "--dry-run") {
      dry_run = true;
    } else if (a == "--help" || a == "-h") {
      std::printf("%s", kUsage);
      return 0;
    } else {
      return Usage("unknown argument \"" + a + "\"");
    }
  }
  if (spec.empty()) return Usage("--spec is required");
  spec = Absolute(spec);

  absl::StatusOr<std::optional<WorkerEnv>> env = DetectWorkerEnv(std::getenv);
  if (!env.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(env.status().message()).c_str());
    return 2;
  }
  if (env->has_value() && !dry_run) return RunWorker(spec, **env);

  absl::StatusOr<ResolvedJob> job = LoadJob(spec, env->has_value() ? (*env)->world_size : 0);
  if (!job.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(job.status().message()).c_str());
    return 2;
  }
  if (dry_run) {
    const switchyard::Job& j = job->job;
    std::printf("job \"%s\": %d ranks = %d node(s) × %d; micro-batch %d × %d accumulation "
                "step(s) per rank; MoE layers [%s] of %d\n",
                j.name().c_str(), job->world_size, j.launch().nnodes(), j.launch().nproc_per_node(),
                job->micro_batch_size, job->grad_accumulation_steps,
                absl::StrJoin(job->moe_layers, ",").c_str(), j.model().num_layers());
    std::printf("%s", job->layout.Describe().c_str());
    return 0;
  }
  char exe[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n <= 0) {
    std::perror("error: cannot find this binary (/proc/self/exe)");
    return 1;
  }
  exe[n] = '\0';
  return RunLauncher(*job, exe, spec);
}
