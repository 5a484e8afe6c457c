#include "comm/backend_util.h"

#include <algorithm>

namespace strata::comm::internal {

Status CheckPeer(const std::string& group, const char* op, const char* what, int peer, int rank,
                 int size, bool allow_self) {
  if (peer < 0 || peer >= size) {
    return InvalidArgument(OpLabel(group, op) + ": " + what + " " + std::to_string(peer) +
                           " is not a rank of this group (size " + std::to_string(size) + ")");
  }
  if (!allow_self && peer == rank) {
    return InvalidArgument(OpLabel(group, op) + ": " + what + " " + std::to_string(peer) +
                           " is this rank; point-to-point needs another rank");
  }
  return Status();
}

Status CheckTag(const std::string& group, const char* op, int tag) {
  if (tag < 0) {
    return InvalidArgument(OpLabel(group, op) + ": tag " + std::to_string(tag) + " is negative");
  }
  return Status();
}

Status CheckBuffer(const std::string& group, const char* op, const void* p, size_t count) {
  if (p == nullptr && count > 0) {
    return InvalidArgument(OpLabel(group, op) + ": null buffer for " + std::to_string(count) +
                           " elements");
  }
  return Status();
}

Status TimedOut(const std::string& group, const char* op, std::chrono::milliseconds timeout,
                const std::string& detail) {
  return Status(StatusCode::kDeadlineExceeded, OpLabel(group, op) + " timed out after " +
                                                   std::to_string(timeout.count()) + " ms" +
                                                   (detail.empty() ? "" : " (" + detail + ")"));
}

std::chrono::steady_clock::time_point DeadlineAfter(std::chrono::milliseconds timeout) {
  const auto now = std::chrono::steady_clock::now();
  // Saturate: a huge timeout means "forever", not an overflowed time point in the past.
  // (condition_variable::wait_until converts between clocks and would overflow on max()).
  constexpr auto kForever = std::chrono::hours(24 * 365);
  if (timeout > kForever) return now + kForever;
  if (timeout.count() < 0) return now;
  return now + timeout;
}

}  // namespace strata::comm::internal

namespace strata::comm::internal {

std::string RankList(const std::vector<int>& ranks) {
  std::string s = "[";
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(ranks[i]);
  }
  s += ']';
  return s;
}

Status CheckSplitRanks(const std::string& group, const std::string& new_name,
                       const std::vector<int>& ranks, int rank, int size, int* index) {
  const std::string what = group + ": split into '" + new_name + "'";
  if (ranks.empty()) return InvalidArgument(what + ": empty rank list");
  std::vector<int> sorted = ranks;
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
    return InvalidArgument(what + ": rank list " + RankList(ranks) + " has duplicates");
  }
  if (sorted.front() < 0 || sorted.back() >= size) {
    return InvalidArgument(what + ": rank list " + RankList(ranks) + " is outside [0, " +
                           std::to_string(size) + ")");
  }
  const auto me = std::find(ranks.begin(), ranks.end(), rank);
  if (me == ranks.end()) {
    return InvalidArgument(what + ": rank list " + RankList(ranks) + " does not contain rank " +
                           std::to_string(rank));
  }
  *index = static_cast<int>(me - ranks.begin());
  return Status();
}

}  // namespace strata::comm::internal
