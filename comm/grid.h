// The 3D rank grid of a training job: world = dp x pp x tp ranks.
//
// Tensor-parallel groups are innermost (neighbouring ranks: same node, fastest links), then
// pipeline, then data:  rank = d * (pp * tp) + p * tp + t.
// The grid is pure arithmetic (no communication); SplitGrid turns it into process groups.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "comm/process_group.h"
#include "common/status.h"

namespace strata::comm {

struct GridCoords {
  int d = 0;  // data-parallel index    [0, dp)
  int t = 0;  // tensor-parallel index  [0, tp)
  int p = 0;  // pipeline stage         [0, pp)
  bool operator==(const GridCoords&) const = default;
};

class Grid {
 public:
  // INVALID_ARGUMENT (naming the parallel field and the fix) if a size is <= 0 or
  // dp * tp * pp != world_size.
  static Result<Grid> Create(int world_size, int dp, int tp, int pp);

  int world_size() const { return dp_ * tp_ * pp_; }
  int dp() const { return dp_; }
  int tp() const { return tp_; }
  int pp() const { return pp_; }

  // rank must be in [0, world_size()); coordinates in range (CHECKed).
  GridCoords coords(int rank) const;
  int rank_of(int d, int t, int p) const;
  int rank_of(const GridCoords& c) const { return rank_of(c.d, c.t, c.p); }

  // World ranks of the groups `rank` belongs to, ordered by the varying coordinate, so that a
  // rank's index in its tp group is t, in its pp group p, in its dp group d.
  std::vector<int> tp_group(int rank) const;
  std::vector<int> pp_group(int rank) const;
  std::vector<int> dp_group(int rank) const;
  // Group names for messages: "tp[i]" with i = d*pp + p; "pp[i]" with i = d*tp + t;
  // "dp[i]" with i = p*tp + t.
  std::string tp_group_name(int rank) const;
  std::string pp_group_name(int rank) const;
  std::string dp_group_name(int rank) const;

  // Several lines: the layout and every tp, pp and dp group with its ranks (rank 0 prints it).
  std::string Describe() const;

 private:
  Grid(int dp, int tp, int pp) : dp_(dp), tp_(tp), pp_(pp) {}
  int dp_, tp_, pp_;
};

// Model-dependent layout checks, kept apart from Grid::Create because the planner calls them
// per candidate: tp divides heads (and so d_model's heads), pp <= layers (every stage needs a
// layer). The vocabulary need not divide by tp: the model pads it.
// INVALID_ARGUMENT naming the parallel field, the model field and the fix.
Status CheckModelFits(const Grid& grid, int heads, int d_model, int vocab, int layers);

// This rank's three groups, split from `world` (a collective over world: every rank calls it).
struct GridGroups {
  std::unique_ptr<ProcessGroup> tp, pp, dp;
};
Result<GridGroups> SplitGrid(ProcessGroup& world, const Grid& grid);

}  // namespace strata::comm
