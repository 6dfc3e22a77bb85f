// Rank layout: which coordinates every rank has and which ranks form each group.
// Pure functions, no communication; every other package relies on these lists.
//
// Dense layers use the grid TP × CP × DP × PP; experts use ETP × EP × EDP × PP over the same
// ranks (ETP × EP × EDP = TP × CP × DP). Ranks are numbered with the first dimension of the
// order string varying fastest (default "tp-cp-ep-dp-pp", as Megatron-Core). Group lists are
// the ones Megatron-Core's RankGenerator produces for the same order.
//
//   LayoutSpec spec{.world_size = 8, .tp = 2, .ep = 2};
//   absl::StatusOr<Layout> layout = Layout::Create(spec);
//   const std::vector<int>& ep_peers = layout->GroupOf(GroupKind::kEp, /*rank=*/3);
#ifndef DIST_GROUPS_LAYOUT_H_
#define DIST_GROUPS_LAYOUT_H_

#include <array>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace switchyard::groups {

// The parallel sizes. Field names match the job spec's `parallel` section, and so do the
// field paths in error messages.
struct LayoutSpec {
  int world_size = 1;
  int tp = 1;
  int cp = 1;
  int pp = 1;
  int dp = 0;   // 0: world_size / (tp × cp × pp)
  int ep = 1;
  int etp = 0;  // 0: same as tp
  std::string order = "tp-cp-ep-dp-pp";
};

enum class GroupKind {
  kTp,         // tensor parallel
  kCp,         // context parallel
  kDp,         // data parallel (dense params)
  kDpCp,       // data × context parallel (what dense grads are reduced over)
  kTpCp,       // tensor × context parallel: the ranks that hold one replica's tokens of a layer
  kPp,         // pipeline
  kMp,         // model parallel: tp × pp (dense grad norm)
  kEp,         // expert parallel (all-to-all)
  kEdp,        // expert data parallel: replicas of the same experts
  kEtp,        // expert tensor parallel
  kEtpEp,      // etp × ep: all ranks that hold one replica of every expert of a stage
  kTpEpPp,     // etp × ep × pp: what the expert grad norm reduces over
  kGate,       // every rank of one pipeline stage (router replicas)
  kSlice,      // the TP group when tokens are replicated across it (FastMoE's slice_group)
  kEmbedding,  // first and last pipeline stage (tied embeddings); middle stages have none
};
inline constexpr std::array<GroupKind, 15> kAllGroupKinds = {
    GroupKind::kTp,  GroupKind::kCp,    GroupKind::kDp,     GroupKind::kDpCp,
    GroupKind::kTpCp, GroupKind::kPp,   GroupKind::kMp,     GroupKind::kEp,
    GroupKind::kEdp, GroupKind::kEtp,   GroupKind::kEtpEp,  GroupKind::kTpEpPp,
    GroupKind::kGate, GroupKind::kSlice, GroupKind::kEmbedding};

// "tp", "dp_cp", "tp_ep_pp", ...
absl::string_view GroupKindName(GroupKind kind);

struct DenseCoord {
  int tp = 0, cp = 0, dp = 0, pp = 0;
};
struct ExpertCoord {
  int etp = 0, ep = 0, edp = 0, pp = 0;
};

class Layout {
 public:
  // Validates `spec` (sizes ≥ 1, products match the world, a well-formed order) and builds
  // every group. Errors name the field, e.g. "parallel.ep: 3 does not divide ...".
  static absl::StatusOr<Layout> Create(const LayoutSpec& spec);

  int world_size() const { return world_size_; }
  int tp() const { return tp_; }
  int cp() const { return cp_; }
  int dp() const { return dp_; }
  int pp() const { return pp_; }
  int ep() const { return ep_; }
  int etp() const { return etp_; }
  int edp() const { return edp_; }
  // The order string with every dimension present ("tp-cp-ep-dp-pp" form).
  const std::string& order() const { return order_; }

  DenseCoord Dense(int rank) const { return dense_[rank]; }
  ExpertCoord Expert(int rank) const { return expert_[rank]; }

  // All groups of a kind, in Megatron-Core's order.
  const std::vector<std::vector<int>>& Groups(GroupKind kind) const {
    return groups_[static_cast<int>(kind)];
  }
  // The group of `kind` that holds `rank`; empty when the rank is in none (only possible for
  // kEmbedding, on middle pipeline stages).
  const std::vector<int>& GroupOf(GroupKind kind, int rank) const;
  // Index into Groups(kind) of the group holding `rank`, or -1.
  int GroupIndex(GroupKind kind, int rank) const {
    return group_index_[static_cast<int>(kind)][rank];
  }

  // A human-readable table of every rank's coordinates and every group (for --dry_run).
  std::string Describe() const;

 private:
  Layout() = default;

  int world_size_ = 1, tp_ = 1, cp_ = 1, dp_ = 1, pp_ = 1, ep_ = 1, etp_ = 1, edp_ = 1;
  std::string order_;
  std::vector<DenseCoord> dense_;
  std::vector<ExpertCoord> expert_;
  std::array<std::vector<std::vector<int>>, kAllGroupKinds.size()> groups_;
  std::array<std::vector<int>, kAllGroupKinds.size()> group_index_;
};

// Megatron-Core's generate_masked_orthogonal_rank_groups: the grid `sizes` (first fastest)
// over `world_size` ranks; each group varies the dimensions where `mask` is true and fixes
// the others. Groups are listed with the first unmasked dimension varying fastest.
std::vector<std::vector<int>> MaskedOrthogonalGroups(int world_size,
                                                     const std::vector<int>& sizes,
                                                     const std::vector<bool>& mask);

}  // namespace switchyard::groups

#endif  // DIST_GROUPS_LAYOUT_H_
