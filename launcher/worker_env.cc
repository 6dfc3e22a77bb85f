#include "launcher/worker_env.h"

#include <string>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"

namespace switchyard::launcher {
namespace {

absl::StatusOr<int> IntVar(const GetEnv& getenv, const char* name, int fallback = -1) {
  const char* v = getenv(name);
  if (v == nullptr || *v == '\0') {
    if (fallback >= 0) return fallback;
    return absl::InvalidArgumentError(absl::StrFormat("environment: %s is not set", name));
  }
  int out;
  if (!absl::SimpleAtoi(v, &out) || out < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("environment: %s=\"%s\" is not a non-negative integer", name, v));
  }
  return out;
}

// Slurm's per-node task counts look like "4", "4(x2)" or "4(x2),3"; take the first count.
int SlurmTasksOnFirstNode(const char* v) {
  if (v == nullptr) return 1;
  std::string s(v);
  s = s.substr(0, s.find_first_of("(,"));
  int n = 1;
  return absl::SimpleAtoi(s, &n) && n > 0 ? n : 1;
}

absl::Status CheckRanks(const WorkerEnv& e, const char* rank_var, const char* size_var) {
  if (e.world_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("environment: %s=%d must be at least 1", size_var, e.world_size));
  }
  if (e.rank >= e.world_size) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "environment: %s=%d is not below %s=%d", rank_var, e.rank, size_var, e.world_size));
  }
  if (e.local_rank >= e.local_world_size) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "environment: local rank %d is not below the local world size %d", e.local_rank,
        e.local_world_size));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::optional<WorkerEnv>> DetectWorkerEnv(const GetEnv& getenv) {
  auto has = [&](const char* n) { return getenv(n) != nullptr && *getenv(n) != '\0'; };
  WorkerEnv e;
  if (has("RANK") && has("WORLD_SIZE")) {
    e.source = has("SWITCHYARD_LAUNCHER_PID") ? "switchyard" : "torchrun";
    SY_ASSIGN_OR_RETURN(e.rank, IntVar(getenv, "RANK"));
    SY_ASSIGN_OR_RETURN(e.world_size, IntVar(getenv, "WORLD_SIZE"));
    SY_ASSIGN_OR_RETURN(e.local_rank, IntVar(getenv, "LOCAL_RANK", e.rank));
    SY_ASSIGN_OR_RETURN(e.local_world_size, IntVar(getenv, "LOCAL_WORLD_SIZE", e.world_size));
    const char* agent = getenv("TORCHELASTIC_USE_AGENT_STORE");
    e.agent_store = e.source == "switchyard" || (agent != nullptr && std::string(agent) == "True");
    SY_RETURN_IF_ERROR(CheckRanks(e, "RANK", "WORLD_SIZE"));
  } else if (has("SLURM_PROCID") && has("SLURM_NTASKS") && has("SLURM_STEP_ID")) {
    // Only inside an srun step: a batch script also has SLURM_PROCID but is one process.
    e.source = "slurm";
    SY_ASSIGN_OR_RETURN(e.rank, IntVar(getenv, "SLURM_PROCID"));
    SY_ASSIGN_OR_RETURN(e.world_size, IntVar(getenv, "SLURM_NTASKS"));
    SY_ASSIGN_OR_RETURN(e.local_rank, IntVar(getenv, "SLURM_LOCALID", 0));
    e.local_world_size = SlurmTasksOnFirstNode(getenv("SLURM_STEP_TASKS_PER_NODE"));
    if (e.local_rank >= e.local_world_size) e.local_world_size = e.local_rank + 1;
    SY_RETURN_IF_ERROR(CheckRanks(e, "SLURM_PROCID", "SLURM_NTASKS"));
  } else if (has("OMPI_COMM_WORLD_RANK") && has("OMPI_COMM_WORLD_SIZE")) {
    e.source = "mpirun";
    SY_ASSIGN_OR_RETURN(e.rank, IntVar(getenv, "OMPI_COMM_WORLD_RANK"));
    SY_ASSIGN_OR_RETURN(e.world_size, IntVar(getenv, "OMPI_COMM_WORLD_SIZE"));
    SY_ASSIGN_OR_RETURN(e.local_rank, IntVar(getenv, "OMPI_COMM_WORLD_LOCAL_RANK", 0));
    SY_ASSIGN_OR_RETURN(e.local_world_size, IntVar(getenv, "OMPI_COMM_WORLD_LOCAL_SIZE", 1));
    SY_RETURN_IF_ERROR(CheckRanks(e, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"));
  } else {
    return std::optional<WorkerEnv>();
  }
  if (has("SWITCHYARD_RESTART")) {
    SY_ASSIGN_OR_RETURN(e.restart, IntVar(getenv, "SWITCHYARD_RESTART"));
  } else if (has("TORCHELASTIC_RESTART_COUNT")) {
    SY_ASSIGN_OR_RETURN(e.restart, IntVar(getenv, "TORCHELASTIC_RESTART_COUNT"));
  }
  if (has("MASTER_ADDR")) e.master_addr = getenv("MASTER_ADDR");
  if (has("MASTER_PORT")) {
    SY_ASSIGN_OR_RETURN(e.master_port, IntVar(getenv, "MASTER_PORT"));
    if (e.master_port > 65535) {
      return absl::InvalidArgumentError(
          absl::StrFormat("environment: MASTER_PORT=%d is not a TCP port", e.master_port));
    }
  }
  return std::optional<WorkerEnv>(e);
}

}  // namespace switchyard::launcher
