#include "launcher/worker.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
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
#include "moe/dispatch/exchange.h"
#include "moe/moe_layer.h"

namespace switchyard::launcher {
namespace {

struct Fault {
  std::string kind;  // "", "exit", "hang", "sleep", "orphan", "nan", "skew", "inf"
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
  } else if ((parts[0] == "nan" || parts[0] == "skew" || parts[0] == "inf") && parts.size() == 2 &&
             absl::SimpleAtoi(parts[1], &f.rank)) {
    f.kind = parts[0];
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
// same tokens), kLayerCheckSteps times, and checks that every rank's output, input gradient
// and parameter gradients are finite. Then, when the single-process layer is small enough to
// build on every rank (kReferenceBytes), one more step without noise and with the task loss
// only must match it: the output rows, the input gradient, and every parameter gradient
// summed as DESIGN.md says for its tag (moe::SumGradient; experts as this rank's shard). The
// ranks agree on the verdict; rank 0 prints the slowest rank's median step and the largest
// relative error. (moe_layer_test proves the layouts equivalent, aux losses included; this
// checks the job's own layer, in the job's processes.)
constexpr int kLayerCheckSteps = 4;  // the first warms up
constexpr int64_t kLayerCheckTokens = 4096;
constexpr int64_t kReferenceBytes = int64_t{512} << 20;  // the single-process reference's rough need

absl::Status RunMoELayerCheck(const ResolvedJob& job, const WorkerEnv& env, const Fault& fault,
                              groups::Communicator& comm) {
  const int l = job.moe_layers.front();
  SY_ASSIGN_OR_RETURN(const moe::MoEConfig config, MoELayerConfig(job.job, l));
  SY_ASSIGN_OR_RETURN(moe::MoELayer layer,
                      moe::MoELayer::Create(config, static_cast<uint64_t>(job.job.train().seed()) + l, &comm));
  if ((fault.kind == "skew" || fault.kind == "inf") && fault.rank == env.rank) {
    std::fprintf(stderr, "[rank %d] SWITCHYARD_FAULT: this rank's first expert weights are %s\n", env.rank,
                 fault.kind == "skew" ? "off by 1e-2" : "inf");
    layer.routed_experts().fc1().detach()[0].add_(fault.kind == "skew" ? 1e-2 : INFINITY);  // (outside autograd)
  }
  const groups::Layout& L = job.layout;
  const groups::DenseCoord d = L.Dense(env.rank);
  auto part = [](int64_t n, int parts, int i) { return dispatch::EvenSplit(n, parts)[i]; };  // as the layer splits
  const int64_t seq_len = job.job.model().seq_len();
  const int64_t sequences = std::clamp<int64_t>(kLayerCheckTokens / seq_len, 1, job.micro_batch_size);
  const int64_t chunk = part(sequences * seq_len, L.cp(), d.cp);
  const bool sp = config.sequence_parallel;
  const int64_t tokens = sp ? part(chunk, L.tp(), d.tp) : chunk;
  const int64_t H = config.router.hidden_size;
  // Hidden states and the output's upstream gradient of one part: replica dp, CP rank cp, and
  // under SP TP rank tp (else the TP ranks share the tokens): the same wherever the layout
  // gives the same tokens, and rebuilt by every rank for the reference.
  auto make_part = [&](int dp, int cp, int tp, int64_t n) {
    const uint64_t seed = static_cast<uint64_t>(job.job.data().seed()) * 1000003u +
                          ((static_cast<uint64_t>(d.pp) * L.dp() + dp) * L.cp() + cp) * L.tp() + (sp ? tp : 0);
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    at::Tensor x = at::randn({n, H}, gen).to(config.dtype);
    return std::pair<at::Tensor, at::Tensor>{x, at::randn({n, H}, gen)};
  };
  auto [x0, upstream] = make_part(d.dp, d.cp, d.tp, tokens);
  if (fault.kind == "nan" && fault.rank == env.rank && tokens > 0) {
    std::fprintf(stderr, "[rank %d] SWITCHYARD_FAULT: a NaN in the MoE layer check's hidden states\n", env.rank);
    x0[0][0] = NAN;
  }
  // One forward + backward from fresh gradients: training (noise, the aux losses too) or the
  // task loss alone. Sets `x` to this step's input leaf. (A c10::Error becomes the check's
  // error in CheckMoELayer.)
  at::Tensor x;
  auto step = [&](bool training) -> absl::StatusOr<moe::MoEOutput> {
    for (moe::TaggedParam& p : layer.Parameters()) p.tensor.mutable_grad().reset();
    x = x0.clone().requires_grad_(true);
    SY_ASSIGN_OR_RETURN(moe::MoEOutput out, layer.Forward(x, {.training = training, .num_sequences = sequences}));
    at::Tensor loss = (out.output.to(at::kFloat) * upstream).sum();
    (training ? loss + out.aux_loss + out.z_loss : loss).backward();
    return out;
  };
  std::vector<double> ms;
  at::Tensor output;
  for (int i = 0; i < kLayerCheckSteps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    SY_ASSIGN_OR_RETURN(const moe::MoEOutput out, step(/*training=*/true));
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    output = out.output.detach();
  }
  const at::Tensor grad_x = x.grad();
  auto finite = [](const at::Tensor& t) { return !t.defined() || at::isfinite(t).all().item<bool>(); };
  absl::Status mine;
  if (!finite(output) || !finite(grad_x)) {
    mine = absl::InternalError("the output or its input's gradient holds NaN or inf on synthetic hidden states");
  }
  for (moe::TaggedParam& p : layer.Parameters()) {
    if (mine.ok() && !finite(p.tensor.grad())) {
      mine = absl::InternalError(absl::StrFormat("%s: NaN or inf in its gradient", p.tag.name));
    }
  }
  // The ranks agree on the finite checks before the reference step, whose collectives a rank
  // that stopped here would never join.
  const int W = env.world_size;
  at::Tensor failed_finite = at::full({1}, mine.ok() ? 0.0 : 1.0, at::kDouble);
  SY_RETURN_IF_ERROR(comm.World().AllReduce(failed_finite).Wait());
  SY_RETURN_IF_ERROR(mine);
  if (const double failed = failed_finite.item<double>(); failed > 0) {
    return absl::InternalError(absl::StrFormat("%g other rank(s) found NaN or inf (see their errors)", failed));
  }
  // Against the single-process layer from the same seed, when it is small enough to build on
  // every rank: one more step without noise, the task loss only (the aux losses' layout rules
  // are moe_layer_test's), on every replica's tokens of this stage. The estimate: the full
  // layer's weights and gradients (fp32 at most), and per token of the stage its routed rows
  // and a dozen [T, H] tensors, twice over for the backward's transients.
  const int64_t F = config.ffn_hidden_size, E = config.router.num_experts, k = config.router.topk.top_k;
  const int64_t F1 = config.activation == experts::Activation::kSwiglu ? 2 * F : F;
  const int64_t shared_f = config.num_shared_experts > 0
                               ? (config.shared_ffn_hidden_size > 0 ? config.shared_ffn_hidden_size
                                                                    : F * config.num_shared_experts)
                               : 0;
  const int64_t full_params = E * H * (F1 + F) + E * H + H * shared_f * (F1 / F + 1);
  const int64_t global_tokens = int64_t{L.dp()} * sequences * seq_len;
  const int64_t reference_bytes =
      2 * (full_params * 8 + global_tokens * (k * (2 * H + F1 + F) + 12 * H + 2 * shared_f + 4 * E) * 4);
  const bool reference = reference_bytes <= kReferenceBytes;
  const double tol = config.dtype == at::kFloat ? 1e-4 : config.dtype == at::kHalf ? 1e-2 : 4e-2;
  double worst = 0;
  if (reference) {
    // This rank's step and its gradients summed over their replicas (collectives: every rank).
    SY_ASSIGN_OR_RETURN(const moe::MoEOutput out, step(/*training=*/false));
    std::map<std::string, at::Tensor> grads;  // by name after the layer's
    for (moe::TaggedParam& p : layer.Parameters()) {
      // (Without noise the noise weight gets no gradient: zeros, on every rank alike.)
      at::Tensor g = p.tensor.grad().defined() ? p.tensor.grad().clone() : at::zeros_like(p.tensor.detach());
      SY_RETURN_IF_ERROR(moe::SumGradient(comm, p.tag, g));
      grads[p.tag.name.substr(config.name.size() + 1)] = g;
    }
    // The stage's routed copies per expert, to tell a routing difference from a wrong number.
    at::Tensor routed = out.tokens_per_expert.to(at::kDouble).contiguous();
    if (comm.Has(groups::GroupKind::kGate)) {
      SY_RETURN_IF_ERROR(comm.Get(groups::GroupKind::kGate).AllReduce(routed).Wait());
    }
    // The single-process layer on each replica's block (its CP chunks, each in its TP shares,
    // CP-major: one process's order); no collectives from here on, so failures go to `mine`.
    auto one_process = [&]() -> absl::Status {
      SY_ASSIGN_OR_RETURN(moe::MoELayer one,
                          moe::MoELayer::Create(config, static_cast<uint64_t>(job.job.train().seed()) + l));
      at::Tensor want_out, block_x, want_routed = at::zeros({E}, at::kDouble);
      int64_t first_row = 0;  // this rank's rows in its replica's block
      at::Tensor loss = at::zeros({});
      for (int r = 0; r < L.dp(); ++r) {
        std::vector<at::Tensor> bx, bu;
        int64_t row = 0, first = 0, rows = 0;
        for (int c = 0; c < L.cp(); ++c) {
          const int64_t n_chunk = part(sequences * seq_len, L.cp(), c);
          for (int t = 0; t < (sp ? L.tp() : 1); ++t) {
            const int64_t n = sp ? part(n_chunk, L.tp(), t) : n_chunk;
            auto [px, pu] = make_part(r, c, t, n);
            if (r == d.dp && c == d.cp && (!sp || t == d.tp)) first = row, rows = n;
            bx.push_back(px), bu.push_back(pu);
            row += n;
          }
        }
        const at::Tensor xb = at::cat(bx).requires_grad_(true);
        SY_ASSIGN_OR_RETURN(moe::MoEOutput o, one.Forward(xb, {.training = false, .num_sequences = sequences}));
        loss = loss + (o.output.to(at::kFloat) * at::cat(bu)).sum();
        want_routed += o.tokens_per_expert.to(at::kDouble);
        if (r == d.dp) want_out = o.output.detach().narrow(0, first, rows), block_x = xb, first_row = first;
      }
      loss.backward();
      const std::string routing =
          at::equal(routed, want_routed)
              ? ""
              : "; the routing differs too (routed copies per expert over the stage " + c10::str(routed) +
                    ", one process " + c10::str(want_routed) +
                    "): a layout error, or a near-tie flipped by logits that depend on the other tokens in the "
                    "product on this CPU (//moe/gate:router_module_test LogitsOfAPartAreTheBlocksRows checks "
                    "that they do not)";
      auto compare = [&](const std::string& what, const at::Tensor& got, const at::Tensor& want) -> absl::Status {
        if (got.sizes() != want.sizes()) {
          return absl::InternalError(absl::StrFormat("%s has shape %s, the single-process layer's %s", what,
                                                     c10::str(got.sizes()), c10::str(want.sizes())));
        }
        const at::Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
        const double e = ((g - w).abs().max() / (w.abs().max() + 1e-30)).item<double>();
        worst = std::max(worst, e);
        if (!(e <= tol)) {
          return absl::InternalError(absl::StrFormat("%s differs from the single-process layer's: relative error %g "
                                                     "(tolerance %g)%s", what, e, tol, routing));
        }
        return absl::OkStatus();
      };
      // Expert tensors expert by expert too: a lightly loaded expert would hide behind the
      // busiest one's scale.
      auto compare_experts = [&](const std::string& what, const at::Tensor& got, const at::Tensor& want) {
        SY_RETURN_IF_ERROR(compare(what, got, want));
        const int first = layer.routed_experts().first_expert();
        for (int64_t i = 0; i < want.size(0); ++i) {
          SY_RETURN_IF_ERROR(compare(absl::StrFormat("%s of expert %d", what, first + i), got[i], want[i]));
        }
        return absl::OkStatus();
      };
      SY_RETURN_IF_ERROR(compare("output", out.output, want_out));
      SY_RETURN_IF_ERROR(compare("input gradient", x.grad(), block_x.grad().narrow(0, first_row, tokens)));
      SY_RETURN_IF_ERROR(compare_experts("router gradient", grads["router.weight"], one.router().weight().grad()));
      const experts::GroupedExperts& ex = layer.routed_experts();
      SY_RETURN_IF_ERROR(compare_experts("fc1 gradient", grads["experts.fc1"],
                                         ex.LocalShard(one.routed_experts().fc1().grad(), true)));
      SY_RETURN_IF_ERROR(compare_experts("fc2 gradient", grads["experts.fc2"],
                                         ex.LocalShard(one.routed_experts().fc2().grad(), false)));
      if (one.shared_experts() != nullptr) {
        SY_RETURN_IF_ERROR(compare("shared fc1 gradient", grads["shared_experts.fc1"], one.shared_experts()->fc1().grad()));
        SY_RETURN_IF_ERROR(compare("shared fc2 gradient", grads["shared_experts.fc2"], one.shared_experts()->fc2().grad()));
      }
      if (one.shared_expert_gate().defined()) {
        SY_RETURN_IF_ERROR(compare("shared expert gate gradient", grads["shared_experts.gate_weight"],
                                   one.shared_expert_gate().grad()));
      }
      return absl::OkStatus();
    };
    try {
      mine = one_process();
    } catch (const c10::Error& e) {
      mine = absl::InternalError(absl::StrCat("the single-process reference: ", e.what_without_backtrace()));
    }
  }
  std::vector<double> timed(ms.begin() + 1, ms.end());
  std::sort(timed.begin(), timed.end());
  // Each rank's median and its largest relative error in slots of their own, and the failures
  // in the last: one sum over the world.
  at::Tensor sums = at::zeros({2 * W + 1}, at::kDouble);
  sums[env.rank] = timed[timed.size() / 2];
  sums[W + env.rank] = worst;
  sums[2 * W] = mine.ok() ? 0.0 : 1.0;
  SY_RETURN_IF_ERROR(comm.World().AllReduce(sums).Wait());
  SY_RETURN_IF_ERROR(mine);
  if (const double failed = sums[2 * W].item<double>(); failed > 0) {
    return absl::InternalError(absl::StrFormat("%g other rank(s) failed the check (see their errors)", failed));
  }
  if (env.rank == 0) {
    const double slowest = sums.narrow(0, 0, W).max().item<double>();
    const std::string against =
        reference ? absl::StrFormat("; output, input and parameter gradients match the single-process layer's "
                                    "(largest relative error %.2g, tolerance %.0e)",
                                    sums.narrow(0, W, W).max().item<double>(), tol)
                  : absl::StrFormat("; no single-process reference (estimated ~%d MiB on every rank, over the %d MiB "
                                    "allowed)",
                                    reference_bytes >> 20, kReferenceBytes >> 20);
    absl::PrintF(
        "[rank 0] MoE layer check passed: %s (%d experts, top-%d, ffn %d, %s) under ep %d × etp %d, "
        "%d forward+backward steps of %d tokens on rank 0, median %.1f ms on the slowest rank; outputs and "
        "gradients finite on every rank%s\n",
        config.name, config.router.num_experts, config.router.topk.top_k, config.ffn_hidden_size,
        config.dtype == at::kBFloat16 ? "bf16" : config.dtype == at::kHalf ? "fp16" : "fp32", L.ep(), L.etp(),
        kLayerCheckSteps - 1, tokens, slowest, against);
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
  absl::Status s;
  try {
    s = RunMoELayerCheck(job, env, fault, comm);
  } catch (const c10::Error& e) {  // (the layer's own errors come back as a status)
    s = absl::InternalError(e.what_without_backtrace());
  }
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
