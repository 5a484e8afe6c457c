// Resharding arithmetic: which elements of a saved shard land where in a rank's local tensor,
// whatever layouts wrote and read them. Pure functions on proto::ShardLayout (no I/O).
//
// Both sides are described in the global tensor's row-major index space as "runs": maximal
// ranges where consecutive local elements map to consecutive global elements. A rank's local
// tensor of a Megatron layout has few runs (a column-parallel weight: one per block; a
// row-parallel one: one per row), so copying is a handful of memcpys per tensor, and when the
// layouts are equal it is one memcpy per run of the shard.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"
#include "proto/checkpoint.pb.h"

namespace strata::checkpoint {

struct Run {
  int64_t local = 0;   // index into the local tensor (row-major)
  int64_t global = 0;  // index into the global tensor (row-major)
  int64_t len = 0;
};

// INVALID_ARGUMENT naming `what` when the layout is inconsistent (rank mismatch between the
// shapes, shard_dim out of range, blocks not dividing the dimensions, extent beyond a block,
// [begin, end) outside the local tensor).
Status ValidateLayout(const proto::ShardLayout& layout, const std::string& what);

// Runs of local elements [layout.begin, layout.end) that are not padding, in local order.
std::vector<Run> LocalRuns(const proto::ShardLayout& layout);

// Number of non-padding elements in [begin, end).
int64_t CountReal(const proto::ShardLayout& layout);

// Copies into `dst` (elements [dst_layout.begin, end) of the destination local tensor) every
// element that `src` (elements [src_layout.begin, end) of a saved shard) holds. Returns the
// number of elements written. Runs of `dst` must come from LocalRuns(dst_layout); `src_runs`
// from LocalRuns(src_layout) sorted by global index (SortByGlobal).
int64_t CopyOverlap(const std::vector<Run>& dst_runs, int64_t dst_begin, float* dst,
                    const std::vector<Run>& src_runs, int64_t src_begin, const float* src);
void SortByGlobal(std::vector<Run>* runs);

// True when some element of `a` is also in `b` (both sorted by global index).
bool Overlaps(const std::vector<Run>& a, const std::vector<Run>& b);

}  // namespace strata::checkpoint
