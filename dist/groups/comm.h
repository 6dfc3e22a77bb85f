// Process groups and collectives: one facade over c10d (Gloo for CPU tensors; NCCL for CUDA
// tensors when built with --config=cuda against a CUDA LibTorch and asked for).
//
// Every collective starts asynchronously and returns a Work to wait on; every failure
// (a timeout, a dead peer) becomes a status that names the group, the rank and the op.
// Any dtype LibTorch's backends move, bfloat16 included on Gloo (1.13's has none: the facade
// moves its 16-bit words and sums an fp32 copy); tensors with no elements are allowed.
// Several ranks as threads of one process under LibTorch 2.x need TORCH_FR_BUFFER_SIZE=0
// (its flight recorder races there; testing::RunRanks sets it).
//
//   auto comm = Communicator::Create(store, rank, layout, {.timeout = std::chrono::seconds(60)});
//   at::Tensor g = ...;
//   SY_RETURN_IF_ERROR((*comm)->Get(GroupKind::kEdp).AllReduce(g, ReduceOp::kSum).Wait());
#ifndef DIST_GROUPS_COMM_H_
#define DIST_GROUPS_COMM_H_

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "dist/groups/layout.h"
#include "dist/groups/store.h"

namespace switchyard::groups {

enum class ReduceOp { kSum, kMax, kMin, kAvg };

// kGloo: Gloo groups only (CPU tensors). kNccl: NCCL groups for CUDA tensors as well, each
// beside a Gloo group of the same members for CPU tensors (counts, flags, barriers).
enum class Backend { kGloo, kNccl };

// OK when this build can create NCCL groups; otherwise why not, in words for the user.
absl::Status NcclAvailable();

// A collective in flight. Wait() returns once it is done (or failed, or timed out).
class Work {
 public:
  Work() = default;  // already done
  explicit Work(absl::Status error);
  absl::Status Wait();

  struct State;  // defined in comm.cc
  static Work FromState(std::shared_ptr<State> state) {
    Work w;
    w.state_ = std::move(state);
    return w;
  }

 private:
  std::shared_ptr<State> state_;
  absl::Status error_;
};

struct CommOptions {
  // Limit for every collective.
  std::chrono::milliseconds timeout = std::chrono::seconds(300);
  // Limit for creating each group (all its members must arrive); 0: the same as timeout.
  // Send and Recv, which take no per-call limit in c10d, also use this one.
  std::chrono::milliseconds setup_timeout = std::chrono::milliseconds(0);
  // Address Gloo binds to: a hostname or IP; "" = resolve this machine's hostname.
  std::string hostname = "127.0.0.1";
  // A network interface (e.g. "eth0"); wins over hostname when set.
  std::string interface;
  Backend backend = Backend::kGloo;
  // kNccl: this rank's CUDA device (made current by Create); NCCL wants one device per rank.
  int device = -1;
};

// One process group: a list of global ranks, this rank's place in it, and the collectives.
// Tensors must be contiguous; CPU tensors go over Gloo, CUDA tensors over NCCL (an error
// naming the group when the communicator has no NCCL). Sizes are along dim 0 for the -V
// variants. Barrier is a host-side barrier over Gloo.
class Group {
 public:
  struct Impl;
  explicit Group(std::shared_ptr<Impl> impl);
  ~Group();

  // "ep#1[2,3]": kind, index among the groups of that kind, members.
  const std::string& name() const;
  int rank() const;  // this rank's index in ranks()
  int size() const;
  const std::vector<int>& ranks() const;

  Work AllReduce(at::Tensor& tensor, ReduceOp op = ReduceOp::kSum);
  Work Broadcast(at::Tensor& tensor, int root);  // root: index in ranks()
  // out = concatenation of every member's `in` (all the same shape) along dim 0.
  Work AllGather(const at::Tensor& in, at::Tensor& out);
  // Like AllGather, member i contributing counts[i] rows; out has Σ counts rows.
  Work AllGatherV(const at::Tensor& in, at::Tensor& out, const std::vector<int64_t>& counts);
  // in has size() × n rows; out (n rows) = the op over members of row block rank().
  Work ReduceScatter(const at::Tensor& in, at::Tensor& out, ReduceOp op = ReduceOp::kSum);
  // Rows in[send_counts[0] ...] go to member 0, and so on; out receives recv_counts[i] rows
  // from member i, in member order. Zero counts are allowed.
  Work AllToAllV(const at::Tensor& in, at::Tensor& out, const std::vector<int64_t>& send_counts,
                 const std::vector<int64_t>& recv_counts);
  Work Barrier();
  Work Send(const at::Tensor& tensor, int dst, int tag = 0);  // dst: index in ranks()
  Work Recv(at::Tensor& tensor, int src, int tag = 0);

 private:
  std::shared_ptr<Impl> impl_;
};

class Communicator {
 public:
  // Creates the world group and, for every kind, the group holding `rank` (identical member
  // lists share one c10d group). Every rank of the layout must call this; a rank that never
  // does makes the others fail after options.timeout with an error naming the group.
  static absl::StatusOr<std::unique_ptr<Communicator>> Create(std::shared_ptr<Store> store,
                                                              int rank, const Layout& layout,
                                                              const CommOptions& options);
  int rank() const { return rank_; }
  int world_size() const { return world_->size(); }
  const Layout& layout() const { return layout_; }

  Group& World() { return *world_; }
  // This rank's group of `kind`. Has() is false only for kEmbedding on middle stages.
  bool Has(GroupKind kind) const { return by_kind_.count(kind) > 0; }
  Group& Get(GroupKind kind) { return *by_kind_.at(kind); }

 private:
  Communicator(int rank, Layout layout) : rank_(rank), layout_(std::move(layout)) {}
  int rank_;
  Layout layout_;
  std::shared_ptr<Store> store_;
  std::unique_ptr<Group> world_;
  std::map<GroupKind, std::unique_ptr<Group>> by_kind_;
};

}  // namespace switchyard::groups

#endif  // DIST_GROUPS_COMM_H_
