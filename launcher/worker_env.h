// How this process was started: by Switchyard's own launcher, by torchrun, by Slurm's srun
// or by mpirun. In every case but a plain command line, it runs as one worker in place.
#ifndef LAUNCHER_WORKER_ENV_H_
#define LAUNCHER_WORKER_ENV_H_

#include <functional>
#include <optional>
#include <string>

#include "absl/status/statusor.h"

namespace switchyard::launcher {

struct WorkerEnv {
  std::string source;  // "switchyard", "torchrun", "slurm" or "mpirun"
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;
  std::string master_addr;  // empty: take the spec's launch.master_addr
  int master_port = -1;     // -1: take the spec's launch.master_port
  // Whether an agent (our launcher, torchrun) already hosts the rendezvous store; otherwise
  // rank 0 hosts it.
  bool agent_store = false;
  // How many times the job was restarted before this start (SWITCHYARD_RESTART, or
  // torchrun's TORCHELASTIC_RESTART_COUNT); each restart rendezvouses under its own prefix.
  int restart = 0;
};

using GetEnv = std::function<const char*(const char*)>;

// std::nullopt when no launcher variables are set (this process is the launcher). Malformed
// variables (RANK=abc, RANK >= WORLD_SIZE) are errors naming the variable.
absl::StatusOr<std::optional<WorkerEnv>> DetectWorkerEnv(const GetEnv& getenv);

}  // namespace switchyard::launcher

#endif  // LAUNCHER_WORKER_ENV_H_
