#include "dist/groups/comm.h"

#include <algorithm>
#include <exception>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/version.h>
#if defined(SY_TORCH_NCCL)
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "dist/groups/store_impl.h"

// LibTorch 1.13 (Debian) and 2.x differ in c10d's class hierarchy (ProcessGroupGloo and
// ProcessGroupNCCL derive from ProcessGroup in 1.13, from Backend in 2.x) but not in the
// calls used here. NCCL is used only with a CUDA LibTorch, which here means 2.x.
static_assert(TORCH_VERSION_MAJOR >= 2 || (TORCH_VERSION_MAJOR == 1 && TORCH_VERSION_MINOR >= 13),
              "Switchyard needs LibTorch 1.13 or newer");

namespace switchyard::groups {
namespace {

#if TORCH_VERSION_MAJOR >= 2
using C10dBackend = c10d::Backend;
#else
using C10dBackend = c10d::ProcessGroup;
#endif


// Gloo in LibTorch 1.13 knows no bfloat16 ("Invalid scalar type"). Moving data needs no
// arithmetic: a CPU bf16 tensor travels as 16-bit words (kHalf has the same size), a view of
// the same storage. Reductions run on an fp32 copy instead (see AllReduce). NCCL has bf16.
bool GlooBf16(const at::Tensor& t) { return t.defined() && t.scalar_type() == at::kBFloat16 && !t.is_cuda(); }
at::Tensor Words(const at::Tensor& t) { return GlooBf16(t) ? t.view(at::kHalf) : t; }

c10d::ReduceOp ToC10d(ReduceOp op) {
  switch (op) {
    case ReduceOp::kMax: return c10d::ReduceOp::MAX;
    case ReduceOp::kMin: return c10d::ReduceOp::MIN;
    case ReduceOp::kSum:
    case ReduceOp::kAvg: return c10d::ReduceOp::SUM;
  }
  return c10d::ReduceOp::SUM;
}

absl::Status Failure(const std::string& where, const char* op, const std::string& why) {
  const bool timeout = absl::StrContains(why, "imed out") || absl::StrContains(why, "imeout");
  std::string msg = absl::StrFormat("%s: %s %s: %s", where, op,
                                    timeout ? "timed out" : "failed", why);
  return timeout ? absl::DeadlineExceededError(msg) : absl::UnavailableError(msg);
}

}  // namespace

struct Work::State {
  c10::intrusive_ptr<c10d::Work> work;  // null: nothing to wait for
  std::function<void()> finish;          // runs after a successful wait (copies, averages)
  std::string where;                      // group and rank, for messages
  const char* op = "";
  std::chrono::milliseconds timeout{0};
};

Work::Work(absl::Status error) : error_(std::move(error)) {}

absl::Status Work::Wait() {
  if (!error_.ok()) return error_;
  if (!state_) return absl::OkStatus();
  std::shared_ptr<State> s = std::move(state_);
  try {
    if (s->work) s->work->wait(s->timeout);
    if (s->finish) s->finish();
  } catch (const std::exception& e) {
    error_ = Failure(s->where, s->op, FirstLine(e));
    return error_;
  }
  return absl::OkStatus();
}

struct Group::Impl {
  std::string name;
  std::vector<int> ranks;
  int rank = 0;
  std::chrono::milliseconds timeout{0};
  // Both null for a group of one; nccl also null unless the communicator uses NCCL.
  c10::intrusive_ptr<C10dBackend> gloo, nccl;
  bool uses_nccl = false;

  std::string Where() const {
    return absl::StrFormat("group %s, member %d of %d (global rank %d)", name, rank,
                           ranks.size(), ranks[rank]);
  }

  // Starts `start` (which gets the backend for `tensor`'s device and returns the c10d work)
  // and wraps it; exceptions become errors. An undefined tensor means Gloo.
  template <typename Start>
  Work Run(const char* op, const at::Tensor& tensor, Start&& start, std::function<void()> finish = nullptr) {
    auto state = std::make_shared<Work::State>();
    state->where = Where();
    state->op = op;
    state->timeout = timeout;
    state->finish = std::move(finish);
    C10dBackend* backend = gloo.get();
    if (tensor.defined() && tensor.is_cuda()) {
      if (!uses_nccl) {
        return Work(absl::FailedPreconditionError(absl::StrFormat(
            "%s: %s of a CUDA tensor, but this communicator has Gloo groups only (CommOptions.backend)",
            state->where, op)));
      }
      backend = nccl.get();
    }
    try {
      if (backend != nullptr) state->work = start(*backend);
    } catch (const std::exception& e) {
      return Work(Failure(state->where, op, FirstLine(e)));
    }
    return Work::FromState(std::move(state));
  }

  // A Work whose only job is `finish` (which waits on inner work itself).
  Work Then(const char* op, std::function<void()> finish) const {
    auto state = std::make_shared<Work::State>();
    state->where = Where();
    state->op = op;
    state->timeout = timeout;
    state->finish = std::move(finish);
    return Work::FromState(std::move(state));
  }
};

Group::Group(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
Group::~Group() = default;
const std::string& Group::name() const { return impl_->name; }
int Group::rank() const { return impl_->rank; }
int Group::size() const { return static_cast<int>(impl_->ranks.size()); }
const std::vector<int>& Group::ranks() const { return impl_->ranks; }

// Every member holds the same number of elements in these collectives, so when there are
// none all of them return here alike (Gloo divides by the element count).
Work Group::AllReduce(at::Tensor& tensor, ReduceOp op) {
  if (tensor.defined() && tensor.numel() == 0) return Work();
  if (GlooBf16(tensor)) {
    // Summed in fp32 and rounded once, which is also closer than a bf16 running sum.
    at::Tensor wide = tensor.to(at::kFloat);
    Work w = AllReduce(wide, op);
    return impl_->Then("all_reduce", [w, wide, tensor]() mutable {
      const absl::Status s = w.Wait();
      if (!s.ok()) throw std::runtime_error(std::string(s.message()));
      tensor.copy_(wide);
    });
  }
  std::function<void()> finish;
  if (op == ReduceOp::kAvg) {
    finish = [tensor, n = size()]() mutable { tensor.div_(n); };
  }
  return impl_->Run("all_reduce", tensor, [&](C10dBackend& b) {
    std::vector<at::Tensor> ts{tensor};
    c10d::AllreduceOptions o;
    o.reduceOp = ToC10d(op);
    o.timeout = impl_->timeout;
    return b.allreduce(ts, o);
  }, std::move(finish));
}

Work Group::Broadcast(at::Tensor& tensor, int root) {
  if (root < 0 || root >= size()) {
    return Work(absl::InvalidArgumentError(absl::StrFormat(
        "%s: broadcast root %d is not a member index", impl_->Where(), root)));
  }
  if (tensor.defined() && tensor.numel() == 0) return Work();
  return impl_->Run("broadcast", tensor, [&](C10dBackend& b) {
    std::vector<at::Tensor> ts{Words(tensor)};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = impl_->timeout;
    return b.broadcast(ts, o);
  });
}

Work Group::AllGather(const at::Tensor& in, at::Tensor& out) {
  const int64_t n = in.size(0);
  if (out.size(0) != n * size()) {
    return Work(absl::InvalidArgumentError(absl::StrFormat(
        "%s: all_gather output has %d rows, expected %d × %d", impl_->Where(), out.size(0),
        size(), n)));
  }
  if (size() == 1) {
    out.copy_(in);
    return Work();
  }
  if (in.numel() == 0) return Work();
  // c10d's all-gather writes into a list of outputs: give it views of `out`.
  auto outs = std::make_shared<std::vector<std::vector<at::Tensor>>>(1);
  for (int i = 0; i < size(); ++i) (*outs)[0].push_back(Words(out).narrow(0, i * n, n));
  return impl_->Run("all_gather", in, [&](C10dBackend& b) {
    std::vector<at::Tensor> ins{Words(in)};
    c10d::AllgatherOptions o;
    o.timeout = impl_->timeout;
    return b.allgather(*outs, ins, o);
  }, [outs] {});
}

Work Group::AllGatherV(const at::Tensor& in, at::Tensor& out, const std::vector<int64_t>& counts) {
  if (static_cast<int>(counts.size()) != size() || counts[rank()] != in.size(0)) {
    return Work(absl::InvalidArgumentError(absl::StrFormat(
        "%s: all_gather_v needs %d counts with counts[%d] = %d rows of the input",
        impl_->Where(), size(), rank(), in.size(0))));
  }
  int64_t total = 0, max_rows = 0;
  for (int64_t c : counts) {
    if (c < 0) {
      return Work(absl::InvalidArgumentError(absl::StrFormat(
          "%s: all_gather_v counts must be >= 0; got [%s]", impl_->Where(), absl::StrJoin(counts, ","))));
    }
    total += c;
    max_rows = std::max(max_rows, c);
  }
  if (out.size(0) != total) {
    return Work(absl::InvalidArgumentError(absl::StrFormat(
        "%s: all_gather_v output has %d rows, counts add up to %d", impl_->Where(),
        out.size(0), total)));
  }
  if (total == 0) return Work();  // counts are the same on every member
  // Gloo gathers equal sizes only: pad every contribution to the largest, then compact.
  std::vector<int64_t> shape = in.sizes().vec();
  shape[0] = max_rows;
  at::Tensor padded = at::zeros(shape, in.options());
  if (in.size(0) > 0) padded.narrow(0, 0, in.size(0)).copy_(in);
  shape[0] = max_rows * size();
  at::Tensor gathered = at::empty(shape, in.options());
  Work w = AllGather(padded, gathered);
  return impl_->Then("all_gather_v", [w, gathered, out, counts, max_rows]() mutable {
    absl::Status s = w.Wait();
    if (!s.ok()) throw std::runtime_error(std::string(s.message()));
    int64_t at_row = 0;
    for (size_t i = 0; i < counts.size(); ++i) {
      if (counts[i] > 0) {
        out.narrow(0, at_row, counts[i]).copy_(gathered.narrow(0, i * max_rows, counts[i]));
      }
      at_row += counts[i];
    }
  });
}

Work Group::ReduceScatter(const at::Tensor& in, at::Tensor& out, ReduceOp op) {
  const int64_t n = out.size(0);
  if (in.size(0) != n * size()) {
    return Work(absl::InvalidArgumentError(absl::StrFormat(
        "%s: reduce_scatter input has %d rows, expected %d × %d", impl_->Where(), in.size(0),
        size(), n)));
  }
#if defined(SY_TORCH_NCCL)
  if (in.is_cuda() && size() > 1) {
    std::function<void()> finish;
    if (op == ReduceOp::kAvg) finish = [out, n = size()]() mutable { out.div_(n); };
    return impl_->Run("reduce_scatter", in, [&](C10dBackend& b) {
      at::Tensor o = out, i = in;
      c10d::ReduceScatterOptions opts;
      opts.reduceOp = ToC10d(op);
      opts.timeout = impl_->timeout;
      return b._reduce_scatter_base(o, i, opts);
    }, std::move(finish));
  }
#endif
  // c10d's Gloo backend has no reduce-scatter: all-reduce a copy and keep this rank's block.
  at::Tensor buf = in.clone();
  Work w = AllReduce(buf, op);
  return impl_->Then("reduce_scatter", [w, buf, out, n, r = rank()]() mutable {
    absl::Status s = w.Wait();
    if (!s.ok()) throw std::runtime_error(std::string(s.message()));
    out.copy_(buf.narrow(0, r * n, n));
  });
}

Work Group::AllToAllV(const at::Tensor& in, at::Tensor& out,
                      const std::vector<int64_t>& send_counts,
                      const std::vector<int64_t>& recv_counts) {
  int64_t send_total = 0, recv_total = 0;
  bool negative = false;
  for (int64_t c : send_counts) send_total += c, negative |= c < 0;
  for (int64_t c : recv_counts) recv_total += c, negative |= c < 0;
  if (negative || static_cast<int>(send_counts.size()) != size() ||
      static_cast<int>(recv_counts.size()) != size() || send_total != in.size(0) ||
      recv_total != out.size(0)) {
    return Work(absl::InvalidArgumentError(absl::StrFormat(
        "%s: all_to_all_v needs %d send and recv counts >= 0 adding up to the input (%d) and "
        "output (%d) rows; got sends [%s], recvs [%s]",
        impl_->Where(), size(), in.size(0), out.size(0), absl::StrJoin(send_counts, ","),
        absl::StrJoin(recv_counts, ","))));
  }
  if (size() == 1) {
    out.copy_(in);
    return Work();
  }
  return impl_->Run("all_to_all_v", in, [&](C10dBackend& b) {
    at::Tensor o = Words(out), i = Words(in);
    std::vector<int64_t> rc = recv_counts, sc = send_counts;
    c10d::AllToAllOptions opts;
    opts.timeout = impl_->timeout;
    return b.alltoall_base(o, i, rc, sc, opts);
  });
}

Work Group::Barrier() {
  return impl_->Run("barrier", at::Tensor(), [&](C10dBackend& b) {
    c10d::BarrierOptions o;
    o.timeout = impl_->timeout;
    return b.barrier(o);
  });
}

Work Group::Send(const at::Tensor& tensor, int dst, int tag) {
  if (dst < 0 || dst >= size() || dst == rank()) {
    return Work(absl::InvalidArgumentError(
        absl::StrFormat("%s: send to member %d is not another member", impl_->Where(), dst)));
  }
  return impl_->Run("send", tensor, [&](C10dBackend& b) {
    std::vector<at::Tensor> ts{Words(tensor)};
    return b.send(ts, dst, tag);
  });
}

Work Group::Recv(at::Tensor& tensor, int src, int tag) {
  if (src < 0 || src >= size() || src == rank()) {
    return Work(absl::InvalidArgumentError(
        absl::StrFormat("%s: recv from member %d is not another member", impl_->Where(), src)));
  }
  return impl_->Run("recv", tensor, [&](C10dBackend& b) {
    std::vector<at::Tensor> ts{Words(tensor)};
    return b.recv(ts, src, tag);
  });
}

absl::Status NcclAvailable() {
#if defined(SY_TORCH_NCCL)
  if (c10::cuda::device_count() == 0) {
    return absl::FailedPreconditionError("NCCL: no CUDA device is visible to this process");
  }
  return absl::OkStatus();
#else
  return absl::FailedPreconditionError(
      "NCCL: this build has no NCCL backend; build with --config=cuda against a CUDA LibTorch "
      "(LIBTORCH_HOME=<a CUDA torch wheel's torch/ folder>; Debian's LibTorch is CPU-only)");
#endif
}

absl::StatusOr<std::unique_ptr<Communicator>> Communicator::Create(std::shared_ptr<Store> store,
                                                                   int rank,
                                                                   const Layout& layout,
                                                                   const CommOptions& options) {
  if (rank < 0 || rank >= layout.world_size()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "rank %d is outside the world of %d ranks", rank, layout.world_size()));
  }
  const bool nccl = options.backend == Backend::kNccl;
  if (nccl) {
    if (absl::Status st = NcclAvailable(); !st.ok()) return st;
#if defined(SY_TORCH_NCCL)
    const int devices = c10::cuda::device_count();
    if (options.device < 0 || options.device >= devices) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "rank %d: CUDA device %d does not exist (%d visible); NCCL needs one device per rank",
          rank, options.device, devices));
    }
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(options.device));
#endif
  }
  std::unique_ptr<Communicator> comm(new Communicator(rank, layout));
  comm->store_ = store;
  std::shared_ptr<::gloo::transport::Device> device;
  try {
    device = !options.interface.empty()
                 ? c10d::ProcessGroupGloo::createDeviceForInterface(options.interface)
             : !options.hostname.empty()
                 ? c10d::ProcessGroupGloo::createDeviceForHostname(options.hostname)
                 : c10d::ProcessGroupGloo::createDefaultDevice();
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrFormat(
        "rank %d: cannot open a Gloo device on %s: %s", rank,
        options.interface.empty() ? "host \"" + options.hostname + "\""
                                  : "interface " + options.interface,
        FirstLine(e)));
  }
  auto make = [&](const std::string& name, const std::vector<int>& ranks)
      -> absl::StatusOr<std::unique_ptr<Group>> {
    auto impl = std::make_shared<Group::Impl>();
    impl->name = name;
    impl->ranks = ranks;
    impl->rank = static_cast<int>(std::find(ranks.begin(), ranks.end(), rank) - ranks.begin());
    impl->timeout = options.timeout;
    impl->uses_nccl = nccl;
    if (ranks.size() > 1) {
      try {
        auto opts = c10d::ProcessGroupGloo::Options::create(
            options.setup_timeout.count() > 0 ? options.setup_timeout : options.timeout);
        opts->devices.push_back(device);
        auto prefixed = c10::make_intrusive<c10d::PrefixStore>("sy/" + name, store->impl().store);
        impl->gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(
            prefixed, impl->rank, static_cast<int>(ranks.size()), opts);
#if defined(SY_TORCH_NCCL)
        if (nccl) {
          // NCCL connects lazily, at the group's first CUDA collective.
          auto nccl_opts = c10d::ProcessGroupNCCL::Options::create();
          nccl_opts->timeout = options.timeout;
          auto nccl_store = c10::make_intrusive<c10d::PrefixStore>("sy/nccl/" + name, store->impl().store);
          impl->nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(
              nccl_store, impl->rank, static_cast<int>(ranks.size()), nccl_opts);
        }
#endif
      } catch (const std::exception& e) {
        return Failure(impl->Where(), "create", FirstLine(e));
      }
    }
    return std::make_unique<Group>(impl);
  };
  std::vector<int> all(layout.world_size());
  for (int r = 0; r < layout.world_size(); ++r) all[r] = r;
  absl::StatusOr<std::unique_ptr<Group>> world = make("world", all);
  if (!world.ok()) return world.status();
  comm->world_ = *std::move(world);
  // Same member list → same c10d group. Every rank walks the kinds in the same order, so
  // they agree on which name (store prefix) each list gets.
  std::map<std::vector<int>, const Group*> made;
  for (GroupKind kind : kAllGroupKinds) {
    const std::vector<int>& members = layout.GroupOf(kind, rank);
    if (members.empty()) continue;
    if (members == all) {
      comm->by_kind_[kind] = std::make_unique<Group>(*comm->world_);
      continue;
    }
    auto it = made.find(members);
    if (it != made.end()) {
      comm->by_kind_[kind] = std::make_unique<Group>(*it->second);
      continue;
    }
    const std::string name =
        absl::StrFormat("%s#%d[%s]", GroupKindName(kind), layout.GroupIndex(kind, rank),
                        absl::StrJoin(members, ","));
    absl::StatusOr<std::unique_ptr<Group>> g = make(name, members);
    if (!g.ok()) return g.status();
    made[members] = g->get();
    comm->by_kind_[kind] = *std::move(g);
  }
  // Constructing a Gloo group is not a synchronisation point: a rank whose side of every
  // connection is done may return, finish its work and close its sockets while a peer is
  // still reading the connection handshake, which then fails with "Connection closed by
  // peer" (seen here about once in tens of runs; PyTorch's own Gloo tests hit the same race).
  // Past this barrier every rank has finished constructing every group.
  if (layout.world_size() > 1) {
    if (absl::Status st = comm->world_->Barrier().Wait(); !st.ok()) return st;
  }
  return comm;
}

}  // namespace switchyard::groups
