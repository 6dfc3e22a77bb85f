// One rank of a job: joins the rendezvous, builds every process group of the layout and
// checks them, then runs the job's first MoE layer forward and backward on synthetic tokens
// and, where it fits, against the single-process layer. (Training is a later step; until then
// the job checks the cluster and that layer only.)
#ifndef LAUNCHER_WORKER_H_
#define LAUNCHER_WORKER_H_

#include <string>

#include "launcher/spec.h"
#include "launcher/worker_env.h"

namespace switchyard::launcher {

// Runs this process as rank env.rank. Returns the process exit code: 0 on success, 2 for a
// bad spec, 1 for any other failure (with a message on stderr naming the rank).
//
// Tests inject faults with SWITCHYARD_FAULT: "exit:RANK:CODE[:RESTART]" (that rank exits
// with CODE after the check; only in that restart when given), "hang:RANK" (that rank stops
// before the first collective), "sleep:SECONDS" (every rank waits that long after the check),
// "orphan:RANK" (that rank starts a helper process, then exits with code 7), "nan:RANK" (that
// rank puts a NaN in the MoE layer check's hidden states), "skew:RANK" / "inf:RANK" (that
// rank's first expert weights differ from the single-process layer's by 1e-2 / are inf).
int RunWorker(const std::string& spec_path, const WorkerEnv& env);

}  // namespace switchyard::launcher

#endif  // LAUNCHER_WORKER_H_
