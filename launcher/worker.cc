#include "launcher/worker.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/heap.h"
#include "common/status_macros.h"
#include "dist/groups/comm.h"
#include "dist/groups/store.h"
#include "launcher/model_config.h"
#include "moe/moe_layer.h"

namespace switchyard::launcher {
namespace {

struct Fault {
  std::string kind;  // "", "exit", "hang", "sleep", "orphan", "nan"
  int rank = -1;
  int value = 0;
  int restart = -1;  // -1: every restart
};

Fault ParseFault() {
  Fault f;
  const char* v = std::getenv("SWITCHYARD_FAULT");
  if (v == nullptr || *v == '\0') return f;
  std::vector<std::string> parts = absl::StrSplit(v, ':');
  if (parts[0] == "exit" && (parts.size() == 3 || parts.size() == 4) &&
      absl::SimpleAtoi(parts[1], &f.rank) && absl::SimpleAtoi(parts[2], &f.value) &&
      (parts.size() == 3 || absl::SimpleAtoi(parts[3], &f.restart))) {
    f.kind = "exit";
  } else if (parts[0] == "orphan" && parts.size() == 2 && absl::SimpleAtoi(parts[1], &f.rank)) {
    f.kind = "orphan";
  } else if (parts[0] == "hang" && parts.size() == 2 && absl::SimpleAtoi(parts[1], &f.rank)) {
    f.kind = "hang";
  } else if (parts[0] == "sleep" && parts.size() == 2 && absl::SimpleAtoi(parts[1], &f.value)) {
    f.kind = "sleep";
  } else if (parts[0] == "nan" && parts.size() == 2 && absl::SimpleAtoi(parts[1], &f.rank)) {
    f.kind = "nan";
  } else {
    std::fprintf(stderr, "warning: SWITCHYARD_FAULT=\"%s\" is not understood; ignored\n", v);
  }
  return f;
}

bool IsLoopback(const std::string& addr) {
  return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
}

// Every rank runs the job's first MoE layer, built from the spec's model section under this
// rank's layout, forward and backward on seeded synthetic hidden states (whole sequences of a
// replica's micro-batch, at most kLayerCheckTokens tokens unless one sequence is longer: each
// CP rank its chunk; with sequence parallelism each TP rank its share, else the TP ranks the
// same tokens), kLayerCheckSteps times. Checks that every rank's output, input gradient and
// parameter gradients are finite (the ranks agree on the verdict); rank 0 prints the slowest
// rank's median step. That every layout gives the single-process answer is what
// moe_layer_test proves; this shows that the job's own layer runs in the job.
constexpr int kLayerCheckSteps = 4;  // the first warms up
constexpr int64_t kLayerCheckTokens = 4096;

absl::Status RunMoELayerCheck(const ResolvedJob& job, const WorkerEnv& env, const Fault& fault,
                              groups::Communicator& comm) {
  const int l = job.moe_layers.front();
  SY_ASSIGN_OR_RETURN(const moe::MoEConfig config, MoELayerConfig(job.job, l));
  SY_ASSIGN_OR_RETURN(moe::MoELayer layer,
                      moe::MoELayer::Create(config, static_cast<uint64_t>(job.job.train().seed()) + l, &comm));
  const groups::Layout& L = job.layout;
  const groups::DenseCoord d = L.Dense(env.rank);
  auto part = [](int64_t n, int parts, int i) { return n / parts + (i < n % parts ? 1 : 0); };
  const int64_t seq_len = job.job.model().seq_len();
  const int64_t sequences = std::clamp<int64_t>(kLayerCheckTokens / seq_len, 1, job.micro_batch_size);
  const int64_t chunk = part(sequences * seq_len, L.cp(), d.cp);
  const bool sp = config.sequence_parallel;
  const int64_t tokens = sp ? part(chunk, L.tp(), d.tp) : chunk;
  // The same tokens wherever the layout gives the same ones (the TP ranks without SP).
  const uint64_t data_seed = static_cast<uint64_t>(job.job.data().seed()) * 1000003u +
                             ((static_cast<uint64_t>(d.pp) * L.dp() + d.dp) * L.cp() + d.cp) * L.tp() +
                             (sp ? d.tp : 0);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(data_seed);
  const int64_t H = config.router.hidden_size;
  const at::Tensor x0 = at::randn({tokens, H}, gen).to(config.dtype);
  const at::Tensor upstream = at::randn({tokens, H}, gen);
  if (fault.kind == "nan" && fault.rank == env.rank && tokens > 0) {
    std::fprintf(stderr, "[rank %d] SWITCHYARD_FAULT: a NaN in the MoE layer check's hidden states\n", env.rank);
    x0[0][0] = NAN;
  }
  std::vector<double> ms;
  at::Tensor output, grad_x;
  for (int step = 0; step < kLayerCheckSteps; ++step) {
    for (moe::TaggedParam& p : layer.Parameters()) p.tensor.mutable_grad().reset();
    const at::Tensor x = x0.clone().requires_grad_(true);
    const auto t0 = std::chrono::steady_clock::now();
    SY_ASSIGN_OR_RETURN(moe::MoEOutput out, layer.Forward(x, {.training = true, .num_sequences = sequences}));
    try {
      ((out.output.to(at::kFloat) * upstream).sum() + out.aux_loss + out.z_loss).backward();
    } catch (const c10::Error& e) {
      return absl::InternalError(absl::StrCat(config.name, " backward: ", e.what_without_backtrace()));
    }
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    output = out.output.detach();
    grad_x = x.grad();
  }
  auto finite = [](const at::Tensor& t) { return !t.defined() || at::isfinite(t).all().item<bool>(); };
  absl::Status mine;
  if (!finite(output) || !finite(grad_x)) {
    mine = absl::InternalError(absl::StrFormat("%s: the output or its input's gradient holds NaN or inf on synthetic "
                                               "hidden states", config.name));
  }
  for (moe::TaggedParam& p : layer.Parameters()) {
    if (mine.ok() && !finite(p.tensor.grad())) {
      mine = absl::InternalError(absl::StrFormat("%s: NaN or inf in its gradient", p.tag.name));
    }
  }
  std::vector<double> timed(ms.begin() + 1, ms.end());
  std::sort(timed.begin(), timed.end());
  // Each rank's median in its own slot, and the failures in the last: one sum over the world.
  at::Tensor sums = at::zeros({env.world_size + 1}, at::kDouble);
  sums[env.rank] = timed[timed.size() / 2];
  sums[env.world_size] = mine.ok() ? 0.0 : 1.0;
  SY_RETURN_IF_ERROR(comm.World().AllReduce(sums).Wait());
  SY_RETURN_IF_ERROR(mine);
  if (const double failed = sums[env.world_size].item<double>(); failed > 0) {
    return absl::InternalError(absl::StrFormat("%s: %g other rank(s) found NaN or inf (see their errors)",
                                               config.name, failed));
  }
  if (env.rank == 0) {
    const double slowest = sums.narrow(0, 0, env.world_size).max().item<double>();
    absl::PrintF(
        "[rank 0] MoE layer check passed: %s (%d experts, top-%d, ffn %d, %s) under ep %d × etp %d, "
        "%d forward+backward steps of %d tokens on rank 0, median %.1f ms on the slowest rank; outputs and "
        "gradients finite on every rank\n",
        config.name, config.router.num_experts, config.router.topk.top_k, config.ffn_hidden_size,
        config.dtype == at::kBFloat16 ? "bf16" : config.dtype == at::kHalf ? "fp16" : "fp32", L.ep(), L.etp(),
        kLayerCheckSteps - 1, tokens, slowest);
    std::fflush(stdout);
  }
  return absl::OkStatus();
}

absl::Status CheckMoELayer(const ResolvedJob& job, const WorkerEnv& env, const Fault& fault,
                           groups::Communicator& comm) {
  if (job.moe_layers.empty()) {
    if (env.rank == 0) absl::PrintF("[rank 0] MoE layer check: the model has no MoE layer\n");
    return absl::OkStatus();
  }
  if (job.job.launch().backend() == Launch::NCCL) {
    if (env.rank == 0) {
      absl::PrintF("[rank 0] MoE layer check skipped: the layer runs on the CPU, this job's groups use NCCL\n");
    }
    return absl::OkStatus();
  }
  const absl::Status s = RunMoELayerCheck(job, env, fault, comm);
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrFormat("MoE layer check of layers.%d.mlp failed: %s", job.moe_layers.front(),
                                                s.message()));
}

// Builds every group, then checks: a world barrier, a world all-reduce of rank + 1, and an
// all-reduce of 1 on this rank's group of every kind (each must come back as the group size).
// `comm` is the caller's, so that a failing worker can exit without destroying it.
absl::Status CheckCluster(const ResolvedJob& job, const WorkerEnv& env, const Fault& fault,
                          std::unique_ptr<groups::Communicator>& comm) {
  const Launch& launch = job.job.launch();
  const std::string addr = env.master_addr.empty() ? launch.master_addr() : env.master_addr;
  const int port = env.master_port >= 0 ? env.master_port : launch.master_port();
  const auto rendezvous_timeout = std::chrono::seconds(launch.rendezvous_timeout_s());
  const auto collective_timeout = std::chrono::seconds(launch.collective_timeout_s());
  const auto t0 = std::chrono::steady_clock::now();
  // Port 0 means "any free port", which only works when the process that picks it can tell
  // the others: our launcher can, an outer one (srun, mpirun, by-hand torchrun) cannot.
  if (port == 0 && !env.agent_store && env.world_size > 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "launch.master_port (or MASTER_PORT) is 0, but ranks started by %s cannot learn a "
        "port picked at random: set MASTER_PORT or launch.master_port", env.source));
  }

  SY_ASSIGN_OR_RETURN(std::shared_ptr<groups::Store> store,
                      groups::Store::ConnectTcp({.host = addr, .port = port,
                                                 .is_server = !env.agent_store && env.rank == 0,
                                                 .timeout = rendezvous_timeout}));
  // Each restart rendezvouses under its own prefix: never the keys of a dead generation.
  store = store->WithPrefix(absl::StrFormat("restart%d/", env.restart));
  groups::CommOptions co;
  co.timeout = collective_timeout;
  co.setup_timeout = rendezvous_timeout;  // ranks may still be starting
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname) {
    co.interface = ifname;
  } else {
    co.hostname = IsLoopback(addr) ? "127.0.0.1" : "";
  }
  const bool nccl = launch.backend() == Launch::NCCL;
  if (nccl) {
    co.backend = groups::Backend::kNccl;
    co.device = env.local_rank;  // one GPU per local rank
  }
  SY_ASSIGN_OR_RETURN(comm, groups::Communicator::Create(store, env.rank, job.layout, co));
  const auto t_groups = std::chrono::steady_clock::now();

  if (fault.kind == "hang" && fault.rank == env.rank) {
    std::fprintf(stderr, "[rank %d] SWITCHYARD_FAULT: hanging before the first collective\n", env.rank);
    std::this_thread::sleep_for(std::chrono::hours(1));
  }
  SY_RETURN_IF_ERROR(comm->World().Barrier().Wait());
  at::Tensor x = at::full({1}, static_cast<double>(env.rank + 1), at::kDouble);
  SY_RETURN_IF_ERROR(comm->World().AllReduce(x).Wait());
  const double w = env.world_size;
  const double expected = w * (w + 1) / 2;
  if (x.item<double>() != expected) {
    return absl::InternalError(absl::StrFormat(
        "world all-reduce of rank+1 gave %g, expected %g", x.item<double>(), expected));
  }
  int kinds = 0;
  for (groups::GroupKind kind : groups::kAllGroupKinds) {
    if (!comm->Has(kind)) continue;
    groups::Group& g = comm->Get(kind);
    // Over NCCL when the job uses it: that is the path its tensors will take.
    at::Tensor one = at::ones({1}, at::TensorOptions().dtype(at::kDouble).device(
                                      nccl ? at::Device(at::kCUDA, co.device) : at::Device(at::kCPU)));
    SY_RETURN_IF_ERROR(g.AllReduce(one).Wait());
    if (one.item<double>() != g.size()) {
      return absl::InternalError(absl::StrFormat("%s: all-reduce of 1 gave %g, expected %d",
                                                 g.name(), one.item<double>(), g.size()));
    }
    ++kinds;
  }
  SY_RETURN_IF_ERROR(comm->World().Barrier().Wait());
  const auto t1 = std::chrono::steady_clock::now();
  if (env.rank == 0) {
    const groups::Layout& l = job.layout;
    absl::PrintF(
        "[rank 0] job \"%s\": %d ranks (%s), tp %d × cp %d × dp %d × pp %d; experts etp %d × "
        "ep %d × edp %d\n"
        "[rank 0] cluster check passed%s: rendezvous at %s:%d and %d groups in %.0f ms; world "
        "barrier and all-reduce (sum of rank+1 = %g, expected %g) and an all-reduce on each "
        "of %d group kinds in %.1f ms\n",
        job.job.name(), env.world_size,
        env.source == "switchyard" ? std::string("started by the Switchyard launcher")
                                   : "started by " + env.source,
        l.tp(), l.cp(), l.dp(), l.pp(), l.etp(), l.ep(), l.edp(),
        env.restart > 0 ? absl::StrFormat(" (after %d restart%s)", env.restart, env.restart > 1 ? "s" : "") : "",
        addr, store->port(), kinds,
        std::chrono::duration<double, std::milli>(t_groups - t0).count(), x.item<double>(),
        expected, kinds, std::chrono::duration<double, std::milli>(t1 - t_groups).count());
    std::fflush(stdout);
  }
  SY_RETURN_IF_ERROR(CheckMoELayer(job, env, fault, *comm));
  if (env.rank == 0) {
    absl::PrintF("[rank 0] training is not implemented yet: this job checks the cluster and its MoE layer only\n");
    std::fflush(stdout);
  }
  // Rank 0 may host the store: keep it up until every rank is done with it.
  if (!env.agent_store) {
    SY_RETURN_IF_ERROR(comm->World().Barrier().Wait());
  }
  return absl::OkStatus();
}

}  // namespace

int RunWorker(const std::string& spec_path, const WorkerEnv& env) {
  absl::StatusOr<ResolvedJob> job = LoadJob(spec_path, env.world_size);
  if (!job.ok()) {
    std::fprintf(stderr, "[rank %d] error: %s\n", env.rank, std::string(job.status().message()).c_str());
    return 2;
  }
  const Launch& launch = job->job.launch();
  int threads = launch.threads_per_rank();
  if (threads == 0) {
    const unsigned cores = std::thread::hardware_concurrency();
    threads = std::max(1, static_cast<int>(cores) / std::max(1, env.local_world_size));
  }
  at::set_num_threads(threads);
  // Training reallocates the same large buffers every step: keep them mapped (common/heap.h).
  common::RetainFreedMemory();

  const Fault fault = ParseFault();
  std::unique_ptr<groups::Communicator> comm;
  absl::Status s = CheckCluster(*job, env, fault, comm);
  if (!s.ok()) {
    std::fprintf(stderr, "[rank %d] error: %s\n", env.rank, std::string(s.message()).c_str());
    std::fflush(stderr);
    std::fflush(stdout);
    // Not through destructors: a process group whose collective hung would join its stuck
    // thread for up to the whole setup timeout before this rank could exit.
    std::_Exit(1);
  }
  if (fault.kind == "sleep") std::this_thread::sleep_for(std::chrono::seconds(fault.value));
  if (fault.kind == "orphan" && fault.rank == env.rank) {
    // A helper process (as a data loader would be) left running by a worker that then fails.
    const pid_t helper = fork();
    if (helper == 0) {
      execl("/bin/sleep", "sleep", "300", static_cast<char*>(nullptr));
      std::_Exit(127);
    }
    std::fprintf(stderr, "[rank %d] SWITCHYARD_FAULT: started helper pid %d, exiting with code 7\n",
                 env.rank, helper);
    std::fflush(stderr);
    std::_Exit(7);
  }
  if (fault.kind == "exit" && fault.rank == env.rank &&
      (fault.restart < 0 || fault.restart == env.restart)) {
    std::fprintf(stderr, "[rank %d] SWITCHYARD_FAULT: exiting with code %d\n", env.rank, fault.value);
    return fault.value;
  }
  return 0;
}

}  // namespace switchyard::launcher
