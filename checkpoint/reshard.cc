#include "checkpoint/reshard.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

namespace strata::checkpoint {
namespace {

int64_t Product(const google::protobuf::RepeatedField<int64_t>& s, int from = 0) {
  int64_t p = 1;
  for (int i = from; i < s.size(); ++i) p *= s[i];
  return p;
}

}  // namespace

Status ValidateLayout(const proto::ShardLayout& l, const std::string& what) {
  const int rank = l.global_shape_size();
  if (rank == 0 || l.local_shape_size() != rank) {
    return InvalidArgument(fmt::format("{}: global shape has {} dims, local shape {}", what, rank,
                                       l.local_shape_size()));
  }
  for (int i = 0; i < rank; ++i) {
    if (l.global_shape(i) <= 0 || l.local_shape(i) <= 0) {
      return InvalidArgument(fmt::format("{}: non-positive dimension {}", what, i));
    }
  }
  const int d = l.shard_dim();
  if (d < -1 || d >= rank) {
    return InvalidArgument(fmt::format("{}: shard_dim {} out of range", what, d));
  }
  if (d == -1) {
    for (int i = 0; i < rank; ++i) {
      if (l.global_shape(i) != l.local_shape(i)) {
        return InvalidArgument(
            fmt::format("{}: unsharded but local and global shapes differ", what));
      }
    }
  } else {
    const int64_t blocks = l.shard_blocks();
    if (blocks < 1 || l.global_shape(d) % blocks != 0 || l.local_shape(d) % blocks != 0) {
      return InvalidArgument(
          fmt::format("{}: {} blocks do not divide dimension {}", what, blocks, d));
    }
    const int64_t gblock = l.global_shape(d) / blocks, lblock = l.local_shape(d) / blocks;
    if (l.shard_offset() < 0 || l.shard_extent() < 0 || l.shard_extent() > lblock ||
        l.shard_offset() + l.shard_extent() > gblock) {
      return InvalidArgument(fmt::format("{}: shard [{}, +{}) does not fit a block of {} / {}",
                                         what, l.shard_offset(), l.shard_extent(), gblock, lblock));
    }
    for (int i = 0; i < rank; ++i) {
      if (i != d && l.global_shape(i) != l.local_shape(i)) {
        return InvalidArgument(fmt::format("{}: dimension {} differs but is not sharded", what, i));
      }
    }
  }
  const int64_t n = Product(l.local_shape());
  if (l.begin() < 0 || l.end() < l.begin() || l.end() > n) {
    return InvalidArgument(fmt::format("{}: element range [{}, {}) outside the local tensor of {}",
                                       what, l.begin(), l.end(), n));
  }
  return Status::Ok();
}

std::vector<Run> LocalRuns(const proto::ShardLayout& l) {
  std::vector<Run> runs;
  const int rank = l.local_shape_size();
  const int d = l.shard_dim();
  // Segments of the whole local tensor, in local order, then clipped to [begin, end).
  auto emit = [&](int64_t local, int64_t global, int64_t len) {
    const int64_t a = std::max(local, l.begin()), b = std::min(local + len, l.end());
    if (a >= b) return;
    if (!runs.empty() && runs.back().local + runs.back().len == a &&
        runs.back().global + runs.back().len == global + (a - local)) {
      runs.back().len += b - a;
      return;
    }
    runs.push_back({a, global + (a - local), b - a});
  };
  if (d < 0) {
    emit(0, 0, Product(l.local_shape()));
    return runs;
  }
  const int64_t outer = [&] {
    int64_t p = 1;
    for (int i = 0; i < d; ++i) p *= l.local_shape(i);
    return p;
  }();
  const int64_t inner = Product(l.local_shape(), d + 1);  // == global inner
  const int64_t ldim = l.local_shape(d), gdim = l.global_shape(d);
  const int64_t blocks = l.shard_blocks();
  const int64_t lblock = ldim / blocks, gblock = gdim / blocks;
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t local = (o * ldim + b * lblock) * inner;
      const int64_t global = (o * gdim + b * gblock + l.shard_offset()) * inner;
      emit(local, global, l.shard_extent() * inner);
    }
  }
  (void)rank;
  return runs;
}

int64_t CountReal(const proto::ShardLayout& l) {
  int64_t n = 0;
  for (const Run& r : LocalRuns(l)) n += r.len;
  return n;
}

void SortByGlobal(std::vector<Run>* runs) {
  std::sort(runs->begin(), runs->end(),
            [](const Run& a, const Run& b) { return a.global < b.global; });
}

int64_t CopyOverlap(const std::vector<Run>& dst_runs, int64_t dst_begin, float* dst,
                    const std::vector<Run>& src_runs, int64_t src_begin, const float* src) {
  int64_t copied = 0;
  for (const Run& d : dst_runs) {
    // First source run that ends after d starts.
    auto it = std::upper_bound(src_runs.begin(), src_runs.end(), d.global,
                               [](int64_t g, const Run& r) { return g < r.global + r.len; });
    for (; it != src_runs.end() && it->global < d.global + d.len; ++it) {
      const int64_t a = std::max(d.global, it->global);
      const int64_t b = std::min(d.global + d.len, it->global + it->len);
      if (a >= b) continue;
      std::memcpy(dst + (d.local + (a - d.global) - dst_begin),
                  src + (it->local + (a - it->global) - src_begin),
                  static_cast<size_t>(b - a) * sizeof(float));
      copied += b - a;
    }
  }
  return copied;
}

bool Overlaps(const std::vector<Run>& a, const std::vector<Run>& b) {
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    const int64_t lo = std::max(a[i].global, b[j].global);
    const int64_t hi = std::min(a[i].global + a[i].len, b[j].global + b[j].len);
    if (lo < hi) return true;
    if (a[i].global + a[i].len < b[j].global + b[j].len) {
      ++i;
    } else {
      ++j;
    }
  }
  return false;
}

}  // namespace strata::checkpoint
