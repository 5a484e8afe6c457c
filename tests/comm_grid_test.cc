// The 3D rank grid: the rank <-> coordinate mapping, group membership, and every invalid
// layout message.
#include <gtest/gtest.h>

#include <set>

#include "comm/grid.h"
#include "tests/test_util.h"

namespace strata::comm {
namespace {

TEST(Grid, RankMappingIsTpInnermostThenPpThenDp) {
  auto g = Grid::Create(8, 2, 2, 2);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  // rank = d*4 + p*2 + t
  EXPECT_EQ(g->rank_of(0, 0, 0), 0);
  EXPECT_EQ(g->rank_of(0, 1, 0), 1);
  EXPECT_EQ(g->rank_of(0, 0, 1), 2);
  EXPECT_EQ(g->rank_of(1, 0, 0), 4);
  EXPECT_EQ(g->rank_of(1, 1, 1), 7);
  EXPECT_EQ(g->coords(6), (GridCoords{1, 0, 1}));
  EXPECT_EQ(g->coords(5), (GridCoords{1, 1, 0}));
}

TEST(Grid, CoordsRoundTripForManyLayouts) {
  for (auto [dp, tp, pp] : std::vector<std::tuple<int, int, int>>{
           {1, 1, 1}, {4, 1, 1}, {1, 4, 1}, {1, 1, 4}, {2, 3, 2}, {3, 2, 4}, {1, 8, 2}}) {
    const int w = dp * tp * pp;
    auto g = Grid::Create(w, dp, tp, pp);
    ASSERT_TRUE(g.ok());
    std::set<int> seen;
    for (int d = 0; d < dp; ++d) {
      for (int p = 0; p < pp; ++p) {
        for (int t = 0; t < tp; ++t) {
          const int r = g->rank_of(d, t, p);
          EXPECT_EQ(r, d * pp * tp + p * tp + t);
          EXPECT_EQ(g->coords(r), (GridCoords{d, t, p}));
          seen.insert(r);
        }
      }
    }
    EXPECT_EQ(static_cast<int>(seen.size()), w);
  }
}

TEST(Grid, GroupsOfARank) {
  auto g = Grid::Create(12, 3, 2, 2);  // rank = d*4 + p*2 + t
  ASSERT_TRUE(g.ok());
  const int r = g->rank_of(1, 1, 0);  // 5
  EXPECT_EQ(r, 5);
  EXPECT_EQ(g->tp_group(r), (std::vector<int>{4, 5}));
  EXPECT_EQ(g->pp_group(r), (std::vector<int>{5, 7}));
  EXPECT_EQ(g->dp_group(r), (std::vector<int>{1, 5, 9}));
  EXPECT_EQ(g->tp_group_name(r), "tp[2]");  // d*pp + p = 2
  EXPECT_EQ(g->pp_group_name(r), "pp[3]");  // d*tp + t = 3
  EXPECT_EQ(g->dp_group_name(r), "dp[1]");  // p*tp + t = 1
  // Every rank's index in its groups is its coordinate, and group members agree.
  for (int q = 0; q < g->world_size(); ++q) {
    const GridCoords c = g->coords(q);
    EXPECT_EQ(g->tp_group(q)[c.t], q);
    EXPECT_EQ(g->pp_group(q)[c.p], q);
    EXPECT_EQ(g->dp_group(q)[c.d], q);
    for (int m : g->tp_group(q)) EXPECT_EQ(g->tp_group(m), g->tp_group(q));
    for (int m : g->dp_group(q)) EXPECT_EQ(g->dp_group_name(m), g->dp_group_name(q));
  }
}

TEST(Grid, DescribeListsEveryGroup) {
  auto g = Grid::Create(8, 2, 2, 2);
  ASSERT_TRUE(g.ok());
  const std::string d = g->Describe();
  EXPECT_HAS(d, "grid: world 8 = dp 2 x pp 2 x tp 2 (rank = d*4 + p*2 + t)");
  EXPECT_HAS(d, "tp groups: tp[0]={0,1} tp[1]={2,3} tp[2]={4,5} tp[3]={6,7}");
  EXPECT_HAS(d, "pp groups: pp[0]={0,2} pp[1]={1,3} pp[2]={4,6} pp[3]={5,7}");
  EXPECT_HAS(d, "dp groups: dp[0]={0,4} dp[1]={1,5} dp[2]={2,6} dp[3]={3,7}");
}

void ExpectInvalid(const Result<Grid>& g, const std::string& needle) {
  ASSERT_FALSE(g.ok());
  EXPECT_EQ(g.status().code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(g.status().message(), needle);
}

TEST(Grid, InvalidLayouts) {
  ExpectInvalid(Grid::Create(8, 2, 2, 1),
                "parallel: dp*tp*pp = 2*2*1 = 4 does not match world size 8; with tp = 2 and "
                "pp = 1 set dp = 4");
  ExpectInvalid(Grid::Create(6, 1, 4, 1),
                "dp*tp*pp = 1*4*1 = 4 does not match world size 6; tp*pp = 4 must divide the "
                "world size (divisors of 6: 1, 2, 3, 6)");
  ExpectInvalid(Grid::Create(0, 1, 1, 1), "parallel: world size 0 must be positive");
  ExpectInvalid(Grid::Create(4, 0, 2, 2), "parallel.dp = 0 must be >= 1");
  ExpectInvalid(Grid::Create(4, 4, -1, 1), "parallel.tp = -1 must be >= 1");
  ExpectInvalid(Grid::Create(4, 4, 1, 0), "parallel.pp = 0 must be >= 1");
  // Large sizes must not overflow into a false match.
  ExpectInvalid(Grid::Create(8, 65536, 65536, 2), "does not match world size 8");
}

TEST(Grid, ModelFits) {
  auto g = Grid::Create(8, 2, 2, 2);
  ASSERT_TRUE(g.ok());
  EXPECT_TRUE(CheckModelFits(*g, 4, 128, 256, 4).ok());
  EXPECT_TRUE(CheckModelFits(*g, 2, 64, 256, 2).ok());
}

void ExpectMisfit(const Status& s, const std::string& needle) {
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_HAS(s.message(), needle);
}

TEST(Grid, ModelMisfits) {
  auto tp4 = Grid::Create(8, 1, 4, 2);
  ASSERT_TRUE(tp4.ok());
  ExpectMisfit(CheckModelFits(*tp4, 6, 384, 256, 12),
               "parallel.tp = 4 does not divide model.heads = 6 (each tensor-parallel rank owns "
               "whole heads); choose tp in {1, 2}");
  ExpectMisfit(CheckModelFits(*tp4, 8, 102, 256, 12),
               "parallel.tp = 4 does not divide model.d_model = 102; choose tp in {1, 2}");
  // GPT-2's vocabulary (50257) splits at any tp: the model pads it.
  EXPECT_TRUE(CheckModelFits(*tp4, 8, 512, 50257, 12).ok());
  auto pp16 = Grid::Create(16, 1, 1, 16);
  ASSERT_TRUE(pp16.ok());
  ExpectMisfit(CheckModelFits(*pp16, 12, 768, 256, 12),
               "parallel.pp = 16 exceeds model.layers = 12 (every pipeline stage needs at least "
               "one layer); choose pp <= 12");
  ExpectMisfit(CheckModelFits(*pp16, 0, 768, 256, 12), "must be positive");
}

}  // namespace
}  // namespace strata::comm
