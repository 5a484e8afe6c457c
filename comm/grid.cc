#include "comm/grid.h"

namespace strata::comm {

namespace {

// The common divisors of a and b, "1, 2, 4".
std::string Divisors(int a, int b) {
  std::string s;
  for (int k = 1; k <= a && k <= b; ++k) {
    if (a % k != 0 || b % k != 0) continue;
    if (!s.empty()) s += ", ";
    s += std::to_string(k);
  }
  return s;
}

std::string List(const std::vector<int>& v) {
  std::string s = "{";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(v[i]);
  }
  s += '}';
  return s;
}

}  // namespace

Result<Grid> Grid::Create(int world_size, int dp, int tp, int pp) {
  if (world_size <= 0) {
    return InvalidArgument("parallel: world size " + std::to_string(world_size) +
                           " must be positive (the number of ranks/workers)");
  }
  const struct {
    const char* field;
    int value;
  } sizes[] = {{"dp", dp}, {"tp", tp}, {"pp", pp}};
  for (const auto& s : sizes) {
    if (s.value <= 0) {
      return InvalidArgument("parallel." + std::string(s.field) + " = " + std::to_string(s.value) +
                             " must be >= 1 (use 1 to disable " + s.field + " parallelism)");
    }
  }
  const long long product = static_cast<long long>(dp) * tp * pp;
  if (product != world_size) {
    std::string hint;
    if (world_size % (static_cast<long long>(tp) * pp) == 0) {
      hint = "; with tp = " + std::to_string(tp) + " and pp = " + std::to_string(pp) +
             " set dp = " + std::to_string(world_size / (tp * pp));
    } else {
      hint = "; tp*pp = " + std::to_string(static_cast<long long>(tp) * pp) +
             " must divide the world size (divisors of " + std::to_string(world_size) + ": " +
             Divisors(world_size, world_size) + ")";
    }
    return InvalidArgument("parallel: dp*tp*pp = " + std::to_string(dp) + "*" + std::to_string(tp) +
                           "*" + std::to_string(pp) + " = " + std::to_string(product) +
                           " does not match world size " + std::to_string(world_size) + hint);
  }
  return Grid(dp, tp, pp);
}

GridCoords Grid::coords(int rank) const {
  CHECK_MSG(rank >= 0 && rank < world_size(), "Grid::coords: rank out of range");
  GridCoords c;
  c.t = rank % tp_;
  c.p = (rank / tp_) % pp_;
  c.d = rank / (tp_ * pp_);
  return c;
}

int Grid::rank_of(int d, int t, int p) const {
  CHECK_MSG(d >= 0 && d < dp_ && t >= 0 && t < tp_ && p >= 0 && p < pp_,
            "Grid::rank_of: coordinates out of range");
  return d * (pp_ * tp_) + p * tp_ + t;
}

std::vector<int> Grid::tp_group(int rank) const {
  const GridCoords c = coords(rank);
  std::vector<int> g;
  for (int t = 0; t < tp_; ++t) g.push_back(rank_of(c.d, t, c.p));
  return g;
}

std::vector<int> Grid::pp_group(int rank) const {
  const GridCoords c = coords(rank);
  std::vector<int> g;
  for (int p = 0; p < pp_; ++p) g.push_back(rank_of(c.d, c.t, p));
  return g;
}

std::vector<int> Grid::dp_group(int rank) const {
  const GridCoords c = coords(rank);
  std::vector<int> g;
  for (int d = 0; d < dp_; ++d) g.push_back(rank_of(d, c.t, c.p));
  return g;
}

std::string Grid::tp_group_name(int rank) const {
  const GridCoords c = coords(rank);
  return "tp[" + std::to_string(c.d * pp_ + c.p) + "]";
}

std::string Grid::pp_group_name(int rank) const {
  const GridCoords c = coords(rank);
  return "pp[" + std::to_string(c.d * tp_ + c.t) + "]";
}

std::string Grid::dp_group_name(int rank) const {
  const GridCoords c = coords(rank);
  return "dp[" + std::to_string(c.p * tp_ + c.t) + "]";
}

std::string Grid::Describe() const {
  std::string s = "grid: world " + std::to_string(world_size()) + " = dp " + std::to_string(dp_) +
                  " x pp " + std::to_string(pp_) + " x tp " + std::to_string(tp_) + " (rank = d*" +
                  std::to_string(pp_ * tp_) + " + p*" + std::to_string(tp_) + " + t)\n";
  auto section = [&](const char* label, int groups, auto first_rank, auto members, auto name) {
    s += "  ";
    s += label;
    s += ':';
    for (int i = 0; i < groups; ++i) {
      const int r = first_rank(i);
      s += ' ';
      s += name(r);
      s += '=';
      s += List(members(r));
    }
    s += '\n';
  };
  section(
      "tp groups", dp_ * pp_, [&](int i) { return rank_of(i / pp_, 0, i % pp_); },
      [&](int r) { return tp_group(r); }, [&](int r) { return tp_group_name(r); });
  section(
      "pp groups", dp_ * tp_, [&](int i) { return rank_of(i / tp_, i % tp_, 0); },
      [&](int r) { return pp_group(r); }, [&](int r) { return pp_group_name(r); });
  section(
      "dp groups", pp_ * tp_, [&](int i) { return rank_of(0, i % tp_, i / tp_); },
      [&](int r) { return dp_group(r); }, [&](int r) { return dp_group_name(r); });
  return s;
}

Status CheckModelFits(const Grid& grid, int heads, int d_model, int vocab, int layers) {
  const int tp = grid.tp();
  const int pp = grid.pp();
  if (heads <= 0 || d_model <= 0 || vocab <= 0 || layers <= 0) {
    return InvalidArgument("model: heads, d_model, vocab_size and layers must be positive (got " +
                           std::to_string(heads) + ", " + std::to_string(d_model) + ", " +
                           std::to_string(vocab) + ", " + std::to_string(layers) + ")");
  }
  if (heads % tp != 0) {
    return InvalidArgument("parallel.tp = " + std::to_string(tp) +
                           " does not divide model.heads = " + std::to_string(heads) +
                           " (each tensor-parallel rank owns whole heads); " + "choose tp in {" +
                           Divisors(heads, grid.world_size()) + "}");
  }
  if (d_model % tp != 0) {
    return InvalidArgument("parallel.tp = " + std::to_string(tp) +
                           " does not divide model.d_model = " + std::to_string(d_model) +
                           "; choose tp in {" + Divisors(d_model, grid.world_size()) + "}");
  }
  // The vocabulary need not divide: the model pads the embedding rows to a multiple of tp
  // (padding rows never receive probability mass).
  if (pp > layers) {
    return InvalidArgument(
        "parallel.pp = " + std::to_string(pp) +
        " exceeds model.layers = " + std::to_string(layers) +
        " (every pipeline stage needs at least one layer); choose pp <= " + std::to_string(layers));
  }
  return Status();
}

Result<GridGroups> SplitGrid(ProcessGroup& world, const Grid& grid) {
  if (world.size() != grid.world_size()) {
    return InvalidArgument(world.name() + ": grid of " + std::to_string(grid.world_size()) +
                           " ranks does not match group size " + std::to_string(world.size()));
  }
  const int r = world.rank();
  GridGroups g;
  ASSIGN_OR_RETURN(g.tp, world.Split(grid.tp_group(r), grid.tp_group_name(r)));
  ASSIGN_OR_RETURN(g.pp, world.Split(grid.pp_group(r), grid.pp_group_name(r)));
  ASSIGN_OR_RETURN(g.dp, world.Split(grid.dp_group(r), grid.dp_group_name(r)));
  return g;
}

}  // namespace strata::comm
