#include "dist/groups/layout.h"

#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"

namespace switchyard::groups {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Groups = std::vector<std::vector<int>>;

Layout Make(LayoutSpec spec) {
  absl::StatusOr<Layout> l = Layout::Create(spec);
  EXPECT_TRUE(l.ok()) << l.status();
  return *std::move(l);
}

// The example in Megatron-Core's initialize_model_parallel docstring: 16 GPUs, tp=2, pp=4.
TEST(Layout, MegatronDocstringExample) {
  Layout l = Make({.world_size = 16, .tp = 2, .pp = 4});
  EXPECT_EQ(l.dp(), 2);
  EXPECT_EQ(l.Groups(GroupKind::kTp),
            (Groups{{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}, {12, 13}, {14, 15}}));
  EXPECT_EQ(l.Groups(GroupKind::kDp),
            (Groups{{0, 2}, {1, 3}, {4, 6}, {5, 7}, {8, 10}, {9, 11}, {12, 14}, {13, 15}}));
  EXPECT_EQ(l.Groups(GroupKind::kPp),
            (Groups{{0, 4, 8, 12}, {1, 5, 9, 13}, {2, 6, 10, 14}, {3, 7, 11, 15}}));
  EXPECT_EQ(l.Groups(GroupKind::kEmbedding), (Groups{{0, 12}, {1, 13}, {2, 14}, {3, 15}}));
  EXPECT_EQ(l.Groups(GroupKind::kGate), (Groups{{0, 1, 2, 3}, {4, 5, 6, 7}, {8, 9, 10, 11},
                                                {12, 13, 14, 15}}));
  EXPECT_THAT(l.GroupOf(GroupKind::kMp, 6), ElementsAre(2, 3, 6, 7, 10, 11, 14, 15));
  EXPECT_TRUE(l.GroupOf(GroupKind::kEmbedding, 6).empty());  // stage 1 of 4
}

// Worked by hand: rank = etp + 2·ep + 4·edp on the expert grid, tp + 2·dp on the dense one.
TEST(Layout, ExpertGridTp2Ep2) {
  Layout l = Make({.world_size = 8, .tp = 2, .ep = 2});
  EXPECT_EQ(l.etp(), 2);
  EXPECT_EQ(l.edp(), 2);
  EXPECT_EQ(l.Groups(GroupKind::kEp), (Groups{{0, 2}, {1, 3}, {4, 6}, {5, 7}}));
  EXPECT_EQ(l.Groups(GroupKind::kEdp), (Groups{{0, 4}, {1, 5}, {2, 6}, {3, 7}}));
  EXPECT_EQ(l.Groups(GroupKind::kEtpEp), (Groups{{0, 1, 2, 3}, {4, 5, 6, 7}}));
  EXPECT_EQ(l.Groups(GroupKind::kDp), (Groups{{0, 2, 4, 6}, {1, 3, 5, 7}}));
  EXPECT_EQ(l.Expert(5).etp, 1);
  EXPECT_EQ(l.Expert(5).ep, 0);
  EXPECT_EQ(l.Expert(5).edp, 1);
  EXPECT_EQ(l.Dense(5).dp, 2);
}

TEST(Layout, ExpertTpDiffersFromTp) {
  // tp=2 dense, experts etp=1 ep=4: rank = ep + 4·edp.
  Layout l = Make({.world_size = 8, .tp = 2, .ep = 4, .etp = 1});
  EXPECT_EQ(l.edp(), 2);
  EXPECT_EQ(l.Groups(GroupKind::kEp), (Groups{{0, 1, 2, 3}, {4, 5, 6, 7}}));
  EXPECT_EQ(l.Groups(GroupKind::kEdp), (Groups{{0, 4}, {1, 5}, {2, 6}, {3, 7}}));
  EXPECT_EQ(l.Groups(GroupKind::kEtp), (Groups{{0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}}));
  EXPECT_EQ(l.Groups(GroupKind::kTp), (Groups{{0, 1}, {2, 3}, {4, 5}, {6, 7}}));
}

TEST(Layout, OrderLeavingOutSizeOneDimensions) {
  Layout l = Make({.world_size = 4, .tp = 2, .order = "tp-dp"});
  EXPECT_EQ(l.order(), "tp-dp-cp-ep-pp");
  EXPECT_EQ(l.Groups(GroupKind::kDp), (Groups{{0, 2}, {1, 3}}));
  Layout d = Make({.world_size = 4, .tp = 2, .order = "dp-tp"});
  EXPECT_EQ(d.Groups(GroupKind::kTp), (Groups{{0, 2}, {1, 3}}));
  EXPECT_EQ(d.Groups(GroupKind::kDp), (Groups{{0, 1}, {2, 3}}));
}

TEST(Layout, ErrorsNameTheField) {
  auto err = [](LayoutSpec s) { return std::string(Layout::Create(s).status().message()); };
  EXPECT_THAT(err({.world_size = 8, .tp = 3}), HasSubstr("tp × cp × pp = 3 × 1 × 1 = 3 does not divide the world size 8"));
  EXPECT_THAT(err({.world_size = 8, .tp = 2, .dp = 3}), HasSubstr("parallel.dp: tp × cp × dp × pp = 2 × 1 × 3 × 1 = 6 does not equal the world size 8"));
  EXPECT_THAT(err({.world_size = 8, .ep = 3}), HasSubstr("parallel.ep: etp × ep = 1 × 3 = 3 does not divide"));
  EXPECT_THAT(err({.world_size = 8, .tp = 0}), HasSubstr("parallel.tp: 0 must be at least 1"));
  EXPECT_THAT(err({.world_size = 8, .pp = -2}), HasSubstr("parallel.pp: -2 must be at least 1"));
  EXPECT_THAT(err({.world_size = 8, .dp = -1}), HasSubstr("parallel.dp: -1"));
  EXPECT_THAT(err({.world_size = 8, .etp = -1}), HasSubstr("parallel.etp: -1"));
  EXPECT_THAT(err({.world_size = 0}), HasSubstr("world size"));
  EXPECT_THAT(err({.world_size = 4, .order = "tp-xp"}), HasSubstr("parallel.order: \"tp-xp\" has unknown dimension \"xp\""));
  EXPECT_THAT(err({.world_size = 4, .order = "tp-tp"}), HasSubstr("names \"tp\" twice"));
  EXPECT_THAT(err({.world_size = 4, .tp = 2, .order = "dp-pp"}), HasSubstr("leaves out \"tp\", whose size is 2"));
  // pp before dp, with tp × cp = 2 ranks before pp on the dense grid but etp × ep = 4 on
  // the expert grid: the two grids would disagree on stages.
  EXPECT_THAT(err({.world_size = 16, .tp = 2, .pp = 2, .ep = 4, .etp = 1, .order = "tp-cp-ep-pp-dp"}),
              HasSubstr("parallel.order: \"tp-cp-ep-pp-dp\" puts ranks on different pipeline "
                        "stages for dense layers and experts: the dimensions before pp span 2 "
                        "ranks on the dense grid (tp, cp, dp) but 4 on the expert grid"));
}

std::vector<int> Divisors(int n) {
  std::vector<int> d;
  for (int i = 1; i <= n; ++i)
    if (n % i == 0) d.push_back(i);
  return d;
}

// Every property the rest of the code relies on, for one layout.
void CheckProperties(const Layout& l, const std::string& what) {
  SCOPED_TRACE(what);
  const int W = l.world_size();
  ASSERT_EQ(l.tp() * l.cp() * l.dp() * l.pp(), W);
  ASSERT_EQ(l.etp() * l.ep() * l.edp(), l.tp() * l.cp() * l.dp());
  auto expected_size = [&](GroupKind k) {
    switch (k) {
      case GroupKind::kTp: case GroupKind::kSlice: return l.tp();
      case GroupKind::kCp: return l.cp();
      case GroupKind::kDp: return l.dp();
      case GroupKind::kDpCp: return l.dp() * l.cp();
      case GroupKind::kTpCp: return l.tp() * l.cp();
      case GroupKind::kPp: return l.pp();
      case GroupKind::kMp: return l.tp() * l.pp();
      case GroupKind::kEp: return l.ep();
      case GroupKind::kEdp: return l.edp();
      case GroupKind::kEtp: return l.etp();
      case GroupKind::kEtpEp: return l.etp() * l.ep();
      case GroupKind::kTpEpPp: return l.etp() * l.ep() * l.pp();
      case GroupKind::kGate: return l.tp() * l.cp() * l.dp();
      case GroupKind::kEmbedding: return l.pp() == 1 ? 1 : 2;
    }
    return -1;
  };
  for (GroupKind k : kAllGroupKinds) {
    std::vector<int> seen(W, 0);
    for (const auto& g : l.Groups(k)) {
      ASSERT_EQ(static_cast<int>(g.size()), expected_size(k)) << GroupKindName(k);
      for (int r : g) {
        ASSERT_GE(r, 0);
        ASSERT_LT(r, W);
        ++seen[r];
      }
    }
    for (int r = 0; r < W; ++r) {
      if (k == GroupKind::kEmbedding) {
        const int stage = l.Dense(r).pp;
        ASSERT_EQ(seen[r], (stage == 0 || stage == l.pp() - 1) ? 1 : 0) << "rank " << r;
      } else {
        ASSERT_EQ(seen[r], 1) << GroupKindName(k) << " rank " << r;
      }
    }
  }
  // Coordinates are a bijection on both grids, and the grids agree on the stage.
  std::set<std::vector<int>> dense_coords, expert_coords;
  for (int r = 0; r < W; ++r) {
    DenseCoord d = l.Dense(r);
    ExpertCoord e = l.Expert(r);
    ASSERT_EQ(d.pp, e.pp) << "rank " << r;
    dense_coords.insert({d.tp, d.cp, d.dp, d.pp});
    expert_coords.insert({e.etp, e.ep, e.edp, e.pp});
  }
  ASSERT_EQ(static_cast<int>(dense_coords.size()), W);
  ASSERT_EQ(static_cast<int>(expert_coords.size()), W);
  // Members of a group differ exactly in the group's own coordinate, listed 0, 1, ...
  auto check_axis = [&](GroupKind k, auto coord, auto others) {
    for (const auto& g : l.Groups(k)) {
      for (size_t i = 0; i < g.size(); ++i) {
        ASSERT_EQ(coord(g[i]), static_cast<int>(i)) << GroupKindName(k);
        ASSERT_EQ(others(g[i]), others(g[0])) << GroupKindName(k);
      }
    }
  };
  using V = std::vector<int>;
  check_axis(GroupKind::kTp, [&](int r) { return l.Dense(r).tp; },
             [&](int r) { auto d = l.Dense(r); return V{d.cp, d.dp, d.pp}; });
  check_axis(GroupKind::kCp, [&](int r) { return l.Dense(r).cp; },
             [&](int r) { auto d = l.Dense(r); return V{d.tp, d.dp, d.pp}; });
  check_axis(GroupKind::kDp, [&](int r) { return l.Dense(r).dp; },
             [&](int r) { auto d = l.Dense(r); return V{d.tp, d.cp, d.pp}; });
  check_axis(GroupKind::kPp, [&](int r) { return l.Dense(r).pp; },
             [&](int r) { auto d = l.Dense(r); return V{d.tp, d.cp, d.dp}; });
  check_axis(GroupKind::kEp, [&](int r) { return l.Expert(r).ep; },
             [&](int r) { auto e = l.Expert(r); return V{e.etp, e.edp, e.pp}; });
  check_axis(GroupKind::kEdp, [&](int r) { return l.Expert(r).edp; },
             [&](int r) { auto e = l.Expert(r); return V{e.etp, e.ep, e.pp}; });
  check_axis(GroupKind::kEtp, [&](int r) { return l.Expert(r).etp; },
             [&](int r) { auto e = l.Expert(r); return V{e.ep, e.edp, e.pp}; });
  // Each EP (and ETP×EP) group lies inside one TP×CP×DP slice (one gate group).
  for (GroupKind k : {GroupKind::kEp, GroupKind::kEtpEp, GroupKind::kEdp}) {
    for (const auto& g : l.Groups(k)) {
      for (int r : g) {
        ASSERT_EQ(l.GroupIndex(GroupKind::kGate, r), l.GroupIndex(GroupKind::kGate, g[0]))
            << GroupKindName(k);
      }
    }
  }
  // tp_ep_pp is the union of the etp×ep groups along pp.
  for (int r = 0; r < W; ++r) {
    for (int q : l.GroupOf(GroupKind::kTpEpPp, r)) {
      ASSERT_EQ(l.Expert(q).edp, l.Expert(r).edp);
    }
  }
}

TEST(Layout, EveryFactorisationUpTo64) {
  int checked = 0;
  for (int W = 1; W <= 64; ++W) {
    for (int tp : Divisors(W)) {
      for (int cp : Divisors(W / tp)) {
        for (int pp : Divisors(W / (tp * cp))) {
          const int dp = W / (tp * cp * pp);
          const int stage = tp * cp * dp;
          for (int etp : Divisors(stage)) {
            for (int ep : Divisors(stage / etp)) {
              for (const char* order : {"tp-cp-ep-dp-pp", "tp-cp-ep-pp-dp"}) {
                LayoutSpec spec{.world_size = W, .tp = tp, .cp = cp, .pp = pp, .dp = dp,
                                .ep = ep, .etp = etp, .order = order};
                absl::StatusOr<Layout> l = Layout::Create(spec);
                const std::string what = absl::StrFormat(
                    "W=%d tp=%d cp=%d pp=%d dp=%d etp=%d ep=%d order=%s", W, tp, cp, pp, dp,
                    etp, ep, order);
                // Both grids put a rank on the same stage when pp comes last, or when the
                // dimensions before it span as many ranks on each grid.
                if (std::string(order) == "tp-cp-ep-dp-pp" || tp * cp == etp * ep || pp == 1) {
                  ASSERT_TRUE(l.ok()) << what << ": " << l.status();
                }
                if (!l.ok()) {
                  ASSERT_NE(tp * cp, etp * ep) << what;
                  ASSERT_THAT(std::string(l.status().message()), HasSubstr("parallel.order")) << what;
                  continue;
                }
                CheckProperties(*l, what);
                if (testing::Test::HasFatalFailure()) return;
                ++checked;
              }
            }
          }
        }
      }
    }
  }
  EXPECT_GT(checked, 10000);
}

// Group lists made by Megatron-Core's own RankGenerator (tests/oracles/make_layout_fixtures.py).
TEST(Layout, MatchesMegatronCoreFixtures) {
  std::ifstream in("dist/groups/testdata/megatron_layouts.txt");
  ASSERT_TRUE(in) << "fixture file missing";
  std::map<std::string, GroupKind> kinds;
  for (GroupKind k : kAllGroupKinds) kinds[std::string(GroupKindName(k))] = k;
  std::string line;
  std::optional<Layout> layout;
  std::string config;
  int configs = 0, compared = 0;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::vector<std::string> words = absl::StrSplit(line, ' ');
    if (words[0] == "config") {
      std::map<std::string, std::string> kv;
      for (size_t i = 1; i < words.size(); ++i) {
        std::vector<std::string> p = absl::StrSplit(words[i], absl::MaxSplits('=', 1));
        kv[p[0]] = p[1];
      }
      auto num = [&](const char* k) {
        int v = -1;
        EXPECT_TRUE(absl::SimpleAtoi(kv[k], &v)) << line;
        return v;
      };
      LayoutSpec spec{.world_size = num("world"), .tp = num("tp"), .cp = num("cp"),
                      .pp = num("pp"), .ep = num("ep"), .etp = num("etp"), .order = kv["order"]};
      absl::StatusOr<Layout> l = Layout::Create(spec);
      ASSERT_TRUE(l.ok()) << line << ": " << l.status();
      layout = *std::move(l);
      config = line;
      ++configs;
      continue;
    }
    ASSERT_TRUE(layout.has_value()) << "group line before any config: " << line;
    ASSERT_TRUE(kinds.count(words[0])) << "unknown kind " << words[0];
    Groups want;
    for (size_t i = 1; i < words.size(); ++i) {
      std::vector<int> g;
      for (absl::string_view r : absl::StrSplit(words[i], ',')) {
        int v;
        ASSERT_TRUE(absl::SimpleAtoi(r, &v)) << line;
        g.push_back(v);
      }
      want.push_back(g);
    }
    EXPECT_EQ(layout->Groups(kinds[words[0]]), want) << config << " kind " << words[0];
    ++compared;
  }
  EXPECT_GE(configs, 12);
  EXPECT_EQ(compared, configs * 14);  // every kind but slice (which is tp)
}

}  // namespace
}  // namespace switchyard::groups
