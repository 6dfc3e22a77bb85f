// The launcher side: hosts (node 0) or joins the rendezvous store, starts one worker process
// per local rank and supervises them. If a worker dies, every worker of the job — on every
// node — is stopped within seconds and the launcher exits non-zero naming the rank.
#ifndef LAUNCHER_SUPERVISOR_H_
#define LAUNCHER_SUPERVISOR_H_

#include <string>

#include "launcher/spec.h"

namespace switchyard::launcher {

// `exe` is the binary the workers run (this one), `spec_path` an absolute path. Returns the
// exit code: 0 when every worker of every node succeeded, 130 after Ctrl-C, else 1.
int RunLauncher(const ResolvedJob& job, const std::string& exe, const std::string& spec_path);

}  // namespace switchyard::launcher

#endif  // LAUNCHER_SUPERVISOR_H_
