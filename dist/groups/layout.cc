#include "dist/groups/layout.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace switchyard::groups {
namespace {

constexpr std::array<absl::string_view, 5> kOrderTokens = {"tp", "cp", "ep", "dp", "pp"};

// Rank → index along each dimension of `sizes` (first fastest).
std::vector<int> Decompose(int index, const std::vector<int>& sizes) {
  std::vector<int> out(sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    out[i] = index % sizes[i];
    index /= sizes[i];
  }
  return out;
}

// Splits and checks the order string; appends the dimensions it leaves out (allowed only for
// size-1 dimensions), as Megatron-Core does.
absl::StatusOr<std::vector<std::string>> ParseOrder(const std::string& order,
                                                    const std::array<int, 5>& sizes) {
  std::vector<std::string> tokens;
  if (!order.empty()) tokens = absl::StrSplit(order, '-');
  for (const std::string& t : tokens) {
    auto it = std::find(kOrderTokens.begin(), kOrderTokens.end(), t);
    if (it == kOrderTokens.end()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "parallel.order: \"%s\" has unknown dimension \"%s\" (expected a '-'-separated "
          "permutation of tp, cp, ep, dp, pp, e.g. \"tp-cp-ep-dp-pp\")",
          order, t));
    }
    if (std::count(tokens.begin(), tokens.end(), t) > 1) {
      return absl::InvalidArgumentError(
          absl::StrFormat("parallel.order: \"%s\" names \"%s\" twice", order, t));
    }
  }
  for (size_t i = 0; i < kOrderTokens.size(); ++i) {
    std::string t(kOrderTokens[i]);
    if (std::find(tokens.begin(), tokens.end(), t) != tokens.end()) continue;
    if (sizes[i] != 1) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "parallel.order: \"%s\" leaves out \"%s\", whose size is %d (only size-1 "
          "dimensions may be left out)",
          order, t, sizes[i]));
    }
    tokens.push_back(t);
  }
  return tokens;
}

absl::Status CheckPositive(absl::string_view field, int value) {
  if (value < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("parallel.%s: %d must be at least 1", field, value));
  }
  return absl::OkStatus();
}

// Ranks spanned by the dimensions listed before pp: the stride of the pipeline stage.
int PrefixRanks(const std::vector<int>& sizes, const std::vector<std::string>& tokens) {
  int n = 1;
  for (size_t i = 0; i < tokens.size() && tokens[i] != "pp"; ++i) n *= sizes[i];
  return n;
}

}  // namespace

absl::string_view GroupKindName(GroupKind kind) {
  switch (kind) {
    case GroupKind::kTp: return "tp";
    case GroupKind::kCp: return "cp";
    case GroupKind::kDp: return "dp";
    case GroupKind::kDpCp: return "dp_cp";
    case GroupKind::kTpCp: return "tp_cp";
    case GroupKind::kPp: return "pp";
    case GroupKind::kMp: return "mp";
    case GroupKind::kEp: return "ep";
    case GroupKind::kEdp: return "edp";
    case GroupKind::kEtp: return "etp";
    case GroupKind::kEtpEp: return "etp_ep";
    case GroupKind::kTpEpPp: return "tp_ep_pp";
    case GroupKind::kGate: return "gate";
    case GroupKind::kSlice: return "slice";
    case GroupKind::kEmbedding: return "embedding";
  }
  return "unknown";
}

std::vector<std::vector<int>> MaskedOrthogonalGroups(int world_size,
                                                     const std::vector<int>& sizes,
                                                     const std::vector<bool>& mask) {
  std::vector<int> masked_shape, unmasked_shape, masked_stride, unmasked_stride;
  int stride = 1;
  for (size_t i = 0; i < sizes.size(); ++i) {
    (mask[i] ? masked_shape : unmasked_shape).push_back(sizes[i]);
    (mask[i] ? masked_stride : unmasked_stride).push_back(stride);
    stride *= sizes[i];
  }
  int group_size = 1;
  for (int s : masked_shape) group_size *= s;
  const int num_groups = world_size / group_size;
  std::vector<std::vector<int>> groups(num_groups, std::vector<int>(group_size));
  for (int g = 0; g < num_groups; ++g) {
    std::vector<int> gi = Decompose(g, unmasked_shape);
    int base = 0;
    for (size_t i = 0; i < gi.size(); ++i) base += gi[i] * unmasked_stride[i];
    for (int r = 0; r < group_size; ++r) {
      std::vector<int> ri = Decompose(r, masked_shape);
      int rank = base;
      for (size_t i = 0; i < ri.size(); ++i) rank += ri[i] * masked_stride[i];
      groups[g][r] = rank;
    }
  }
  return groups;
}

absl::StatusOr<Layout> Layout::Create(const LayoutSpec& spec) {
  if (spec.world_size < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "launch: the world size (nnodes × nproc_per_node) is %d; it must be at least 1",
        spec.world_size));
  }
  for (auto [field, value] : {std::pair<absl::string_view, int>{"tp", spec.tp},
                              {"cp", spec.cp}, {"pp", spec.pp}, {"ep", spec.ep}}) {
    if (absl::Status s = CheckPositive(field, value); !s.ok()) return s;
  }
  if (spec.dp < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "parallel.dp: %d must be at least 1 (or 0 for auto)", spec.dp));
  }
  if (spec.etp < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "parallel.etp: %d must be at least 1 (or 0 for the same as tp)", spec.etp));
  }
  const int64_t tcp = int64_t{spec.tp} * spec.cp * spec.pp;
  int dp = spec.dp;
  if (dp == 0) {
    if (spec.world_size % tcp != 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "parallel: tp × cp × pp = %d × %d × %d = %d does not divide the world size %d",
          spec.tp, spec.cp, spec.pp, tcp, spec.world_size));
    }
    dp = static_cast<int>(spec.world_size / tcp);
  } else if (tcp * dp != spec.world_size) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "parallel.dp: tp × cp × dp × pp = %d × %d × %d × %d = %d does not equal the world "
        "size %d",
        spec.tp, spec.cp, dp, spec.pp, tcp * dp, spec.world_size));
  }
  const int etp = spec.etp == 0 ? spec.tp : spec.etp;
  const int stage = spec.tp * spec.cp * dp;  // ranks per pipeline stage
  if (stage % (int64_t{etp} * spec.ep) != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "parallel.ep: etp × ep = %d × %d = %d does not divide tp × cp × dp = %d × %d × %d = "
        "%d (the ranks of one pipeline stage)",
        etp, spec.ep, int64_t{etp} * spec.ep, spec.tp, spec.cp, dp, stage));
  }
  const int edp = stage / (etp * spec.ep);

  // The order's tokens name dense sizes for the dense grid; for the expert grid "tp" means
  // etp, "dp" means edp, and cp is 1 (Megatron-Core's expert RankGenerator).
  absl::StatusOr<std::vector<std::string>> tokens =
      ParseOrder(spec.order, {std::max(spec.tp, etp), spec.cp, spec.ep, std::max(dp, edp), spec.pp});
  if (!tokens.ok()) return tokens.status();

  Layout l;
  l.world_size_ = spec.world_size;
  l.tp_ = spec.tp;
  l.cp_ = spec.cp;
  l.dp_ = dp;
  l.pp_ = spec.pp;
  l.ep_ = spec.ep;
  l.etp_ = etp;
  l.edp_ = edp;
  l.order_ = absl::StrJoin(*tokens, "-");

  std::vector<int> dense_sizes, expert_sizes;
  for (const std::string& t : *tokens) {
    dense_sizes.push_back(t == "tp" ? spec.tp : t == "cp" ? spec.cp : t == "dp" ? dp
                          : t == "pp" ? spec.pp : 1);
    expert_sizes.push_back(t == "tp" ? etp : t == "ep" ? spec.ep : t == "dp" ? edp
                           : t == "pp" ? spec.pp : 1);
  }
  auto mask = [&](std::initializer_list<absl::string_view> dims) {
    std::vector<bool> m(tokens->size(), false);
    for (size_t i = 0; i < tokens->size(); ++i) {
      m[i] = std::find(dims.begin(), dims.end(), (*tokens)[i]) != dims.end();
    }
    return m;
  };
  const int W = spec.world_size;
  auto set = [&](GroupKind k, std::vector<std::vector<int>> g) {
    l.groups_[static_cast<int>(k)] = std::move(g);
  };
  set(GroupKind::kTp, MaskedOrthogonalGroups(W, dense_sizes, mask({"tp"})));
  set(GroupKind::kCp, MaskedOrthogonalGroups(W, dense_sizes, mask({"cp"})));
  set(GroupKind::kDp, MaskedOrthogonalGroups(W, dense_sizes, mask({"dp"})));
  set(GroupKind::kDpCp, MaskedOrthogonalGroups(W, dense_sizes, mask({"dp", "cp"})));
  set(GroupKind::kTpCp, MaskedOrthogonalGroups(W, dense_sizes, mask({"tp", "cp"})));
  set(GroupKind::kPp, MaskedOrthogonalGroups(W, dense_sizes, mask({"pp"})));
  set(GroupKind::kMp, MaskedOrthogonalGroups(W, dense_sizes, mask({"tp", "pp"})));
  set(GroupKind::kGate, MaskedOrthogonalGroups(W, dense_sizes, mask({"tp", "cp", "dp"})));
  set(GroupKind::kSlice, l.Groups(GroupKind::kTp));
  set(GroupKind::kEp, MaskedOrthogonalGroups(W, expert_sizes, mask({"ep"})));
  set(GroupKind::kEdp, MaskedOrthogonalGroups(W, expert_sizes, mask({"dp"})));
  set(GroupKind::kEtp, MaskedOrthogonalGroups(W, expert_sizes, mask({"tp"})));
  set(GroupKind::kEtpEp, MaskedOrthogonalGroups(W, expert_sizes, mask({"tp", "ep"})));
  set(GroupKind::kTpEpPp, MaskedOrthogonalGroups(W, expert_sizes, mask({"tp", "ep", "pp"})));

  // Both grids must put every rank on the same pipeline stage, or a stage's experts would
  // live on another stage's ranks.
  if (MaskedOrthogonalGroups(W, expert_sizes, mask({"pp"})) != l.Groups(GroupKind::kPp)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "parallel.order: \"%s\" puts ranks on different pipeline stages for dense layers "
        "and experts: the dimensions before pp span %d ranks on the dense grid (tp, cp, dp) "
        "but %d on the expert grid (etp, ep, edp); put pp last in the order",
        l.order_, PrefixRanks(dense_sizes, *tokens), PrefixRanks(expert_sizes, *tokens)));
  }
  std::vector<std::vector<int>> embedding;
  for (const std::vector<int>& g : l.Groups(GroupKind::kPp)) {
    embedding.push_back(g.size() == 1 ? g : std::vector<int>{g.front(), g.back()});
  }
  set(GroupKind::kEmbedding, std::move(embedding));

  for (size_t k = 0; k < kAllGroupKinds.size(); ++k) {
    l.group_index_[k].assign(W, -1);
    for (size_t g = 0; g < l.groups_[k].size(); ++g) {
      for (int r : l.groups_[k][g]) l.group_index_[k][r] = static_cast<int>(g);
    }
  }
  l.dense_.resize(W);
  l.expert_.resize(W);
  for (int r = 0; r < W; ++r) {
    std::vector<int> d = Decompose(r, dense_sizes), e = Decompose(r, expert_sizes);
    for (size_t i = 0; i < tokens->size(); ++i) {
      const std::string& t = (*tokens)[i];
      if (t == "tp") { l.dense_[r].tp = d[i]; l.expert_[r].etp = e[i]; }
      if (t == "cp") l.dense_[r].cp = d[i];
      if (t == "dp") { l.dense_[r].dp = d[i]; l.expert_[r].edp = e[i]; }
      if (t == "ep") l.expert_[r].ep = e[i];
      if (t == "pp") { l.dense_[r].pp = d[i]; l.expert_[r].pp = e[i]; }
    }
  }
  return l;
}

const std::vector<int>& Layout::GroupOf(GroupKind kind, int rank) const {
  static const std::vector<int> kNone;
  int g = GroupIndex(kind, rank);
  return g < 0 ? kNone : Groups(kind)[g];
}

std::string Layout::Describe() const {
  std::string out = absl::StrFormat(
      "layout: world %d = tp %d × cp %d × dp %d × pp %d; experts: etp %d × ep %d × edp %d × "
      "pp %d; order %s\n",
      world_size_, tp_, cp_, dp_, pp_, etp_, ep_, edp_, pp_, order_);
  absl::StrAppend(&out, "rank   tp  cp  dp  pp | etp  ep edp\n");
  for (int r = 0; r < world_size_; ++r) {
    const DenseCoord& d = dense_[r];
    const ExpertCoord& e = expert_[r];
    absl::StrAppendFormat(&out, "%4d  %3d %3d %3d %3d | %3d %3d %3d\n", r, d.tp, d.cp, d.dp,
                          d.pp, e.etp, e.ep, e.edp);
  }
  for (GroupKind k : kAllGroupKinds) {
    std::vector<std::string> gs;
    for (const auto& g : Groups(k)) gs.push_back("[" + absl::StrJoin(g, ",") + "]");
    absl::StrAppendFormat(&out, "%-10s %s\n", GroupKindName(k), absl::StrJoin(gs, " "));
  }
  return out;
}

}  // namespace switchyard::groups
