// Pieces every backend shares (private to comm/): a Work that is already finished, argument
// checks with uniform messages, and the deadline arithmetic of Wait.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "comm/process_group.h"

namespace strata::comm::internal {

// A Work whose outcome is known at issue time (bad arguments, a broken group, a no-op).
class DoneWork final : public Work {
 public:
  explicit DoneWork(Status s) : status_(std::move(s)) {}
  Status Wait(std::chrono::milliseconds) override { return status_; }

 private:
  Status status_;
};

inline std::unique_ptr<Work> Done(Status s = Status()) {
  return std::make_unique<DoneWork>(std::move(s));
}

// In a method returning std::unique_ptr<Work>: returns a finished Work holding `expr`'s status
// when that is not OK.
#define RETURN_WORK_IF_ERROR(expr)                                        \
  do {                                                                    \
    ::strata::Status _st = (expr);                                        \
    if (!_st.ok()) return ::strata::comm::internal::Done(std::move(_st)); \
  } while (0)

// "<group>: <op>" — the prefix of every message about an op.
inline std::string OpLabel(const std::string& group, const char* op) { return group + ": " + op; }

// Checks a peer rank (root, src, dst) against the group; self is allowed only if allow_self.
Status CheckPeer(const std::string& group, const char* op, const char* what, int peer, int rank,
                 int size, bool allow_self);
// Checks a point-to-point tag (>= 0).
Status CheckTag(const std::string& group, const char* op, int tag);
// A non-null buffer is required when count > 0.
Status CheckBuffer(const std::string& group, const char* op, const void* p, size_t count);

// "<group>: <op> timed out after <ms> ms" + detail.
Status TimedOut(const std::string& group, const char* op, std::chrono::milliseconds timeout,
                const std::string& detail = "");

std::chrono::steady_clock::time_point DeadlineAfter(std::chrono::milliseconds timeout);

}  // namespace strata::comm::internal

namespace strata::comm::internal {

// "[0,1,2]".
std::string RankList(const std::vector<int>& ranks);

// Checks the rank list passed to Split: non-empty, distinct, inside [0, size), contains rank.
// On success *index is rank's position in the list (its rank in the new group).
Status CheckSplitRanks(const std::string& group, const std::string& new_name,
                       const std::vector<int>& ranks, int rank, int size, int* index);

}  // namespace strata::comm::internal
