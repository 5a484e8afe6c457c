#include "comm/mpi.h"

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "comm/backend_util.h"
#include "comm/elementwise.h"

namespace strata::comm {

namespace {

using std::chrono::milliseconds;

// Every MPI call below holds this lock: MPI_THREAD_SERIALIZED is all MPI has to provide.
// Recursive because dropping the last reference to a Comm (which frees the MPI_Comm) can
// happen while it is held.
std::recursive_mutex& MpiMutex() {
  static std::recursive_mutex mu;
  return mu;
}

bool MpiActive() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

std::string MpiError(int code) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, buf, &len) != MPI_SUCCESS) return "MPI error " + std::to_string(code);
  return std::string(buf, static_cast<size_t>(len));
}

MPI_Datatype RawType(ElemType t) {
  switch (t) {
    case ElemType::kF32:
      return MPI_FLOAT;
    case ElemType::kF64:
      return MPI_DOUBLE;
    case ElemType::kI32:
      return MPI_INT32_T;
    case ElemType::kI64:
      return MPI_INT64_T;
    case ElemType::kU8:
      return MPI_UINT8_T;
    case ElemType::kBF16:
    case ElemType::kF16:
      return MPI_UINT16_T;  // moved as bits; reductions convert to fp32 first
  }
  return MPI_DATATYPE_NULL;
}

MPI_Op RawOp(ReduceOp op) { return op == ReduceOp::kMax ? MPI_MAX : MPI_SUM; }

bool Overlap(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  const auto* pa = static_cast<const uint8_t*>(a);
  const auto* pb = static_cast<const uint8_t*>(b);
  return a_bytes && b_bytes && pa < pb + b_bytes && pb < pa + a_bytes;
}

// A communicator and what its Works need to know about it. Fields guarded by MpiMutex().
struct Comm {
  MPI_Comm comm = MPI_COMM_NULL;
  std::string name;
  int rank = 0;
  int size = 1;
  int tag_ub = 32767;
  Status aborted;

  ~Comm() {
    std::lock_guard<std::recursive_mutex> lock(MpiMutex());
    // Freeing is legal with ops pending: MPI deallocates once they complete.
    if (comm != MPI_COMM_NULL && MpiActive()) MPI_Comm_free(&comm);
  }
};

// One non-blocking op. Guarded by MpiMutex().
struct Op {
  std::shared_ptr<Comm> comm;
  std::string what;  // "all_reduce", "send to rank 1 (tag 3)", ...
  MPI_Request req = MPI_REQUEST_NULL;
  std::vector<uint8_t> scratch_in, scratch_out;     // fp32 copies, de-aliased inputs
  std::function<Status(const MPI_Status&)> finish;  // runs once, after MPI completes the op
  bool complete = false;
  Status status;

  std::string Label() const { return comm->name + ": " + what; }
};

// Ops whose Work was destroyed before they completed: their scratch buffers must live until
// MPI is done with them. Drained by MpiFinalize. Guarded by MpiMutex().
std::vector<std::shared_ptr<Op>>& Orphans() {
  static std::vector<std::shared_ptr<Op>> orphans;
  return orphans;
}

// Tests op once; true when it is complete (op->status then holds the outcome). Needs the lock.
bool TestLocked(Op& op) {
  if (op.complete) return true;
  int flag = 0;
  MPI_Status st;
  const int rc = MPI_Test(&op.req, &flag, &st);
  if (rc != MPI_SUCCESS) {
    op.complete = true;
    op.status = Status(StatusCode::kUnavailable, op.Label() + ": " + MpiError(rc));
  } else if (flag) {
    op.complete = true;
    op.status = op.finish ? op.finish(st) : Status();
  } else {
    return false;
  }
  op.finish = nullptr;
  op.scratch_in = {};
  op.scratch_out = {};
  return true;
}

class MpiWork final : public Work {
 public:
  explicit MpiWork(std::shared_ptr<Op> op) : op_(std::move(op)) {}

  ~MpiWork() override {
    std::lock_guard<std::recursive_mutex> lock(MpiMutex());
    if (!op_->complete && MpiActive()) Orphans().push_back(std::move(op_));
  }

  Status Wait(milliseconds timeout) override {
    const auto start = std::chrono::steady_clock::now();
    const auto deadline = internal::DeadlineAfter(timeout);
    // Spin (yielding) for a short while: small collectives complete in microseconds and a
    // sleep would dominate their latency. Then back off so a stuck op does not burn a core.
    const auto spin_until = start + std::chrono::milliseconds(2);
    while (true) {
      {
        std::lock_guard<std::recursive_mutex> lock(MpiMutex());
        if (op_->complete) return op_->status;
        if (!op_->comm->aborted.ok()) {
          return Status(op_->comm->aborted.code(),
                        op_->Label() + " failed: " + op_->comm->aborted.message());
        }
        if (TestLocked(*op_)) return op_->status;
      }
      const auto now = std::chrono::steady_clock::now();
      if (now >= deadline) {
        return Status(StatusCode::kDeadlineExceeded,
                      op_->Label() + " timed out after " + std::to_string(timeout.count()) +
                          " ms (MPI op still in flight; a peer has not joined)");
      }
      if (now < spin_until) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
    }
  }

 private:
  std::shared_ptr<Op> op_;
};

Status CheckCount(const std::string& group, const char* what, size_t count) {
  if (count > static_cast<size_t>(INT_MAX)) {
    return InvalidArgument(internal::OpLabel(group, what) + ": count " + std::to_string(count) +
                           " exceeds MPI's limit of " + std::to_string(INT_MAX) +
                           " elements per op; split it");
  }
  return Status();
}

class MpiGroup final : public ProcessGroup {
 public:
  explicit MpiGroup(std::shared_ptr<Comm> comm) : comm_(std::move(comm)) {}

  int rank() const override { return comm_->rank; }
  int size() const override { return comm_->size; }
  const std::string& name() const override { return comm_->name; }

  std::unique_ptr<Work> AllReduce(void* buf, size_t count, ElemType type, ReduceOp op) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "all_reduce", buf, count));
    RETURN_WORK_IF_ERROR(CheckCount(name(), "all_reduce", count));
    auto o = NewOp("all_reduce");
    const int n = size();
    const int c = static_cast<int>(count);
    if (internal::IsHalf(type)) {
      o->scratch_in.resize(count * sizeof(float));
      float* f = reinterpret_cast<float*>(o->scratch_in.data());
      internal::HalfToFloat(f, buf, count, type);
      o->finish = [=](const MPI_Status&) {
        if (op == ReduceOp::kAvg) internal::DivideBy(f, count, ElemType::kF32, n);
        internal::FloatToHalf(buf, f, count, type);
        return Status();
      };
      return Start(o, [&](MPI_Comm comm, MPI_Request* req) {
        return MPI_Iallreduce(MPI_IN_PLACE, f, c, MPI_FLOAT, RawOp(op), comm, req);
      });
    }
    if (op == ReduceOp::kAvg) {
      o->finish = [=](const MPI_Status&) {
        internal::DivideBy(buf, count, type, n);
        return Status();
      };
    }
    return Start(o, [&](MPI_Comm comm, MPI_Request* req) {
      return MPI_Iallreduce(MPI_IN_PLACE, buf, c, RawType(type), RawOp(op), comm, req);
    });
  }

  std::unique_ptr<Work> ReduceScatter(const void* in, void* out, size_t count, ElemType type,
                                      ReduceOp op) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "reduce_scatter", in, count));
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "reduce_scatter", out, count));
    RETURN_WORK_IF_ERROR(CheckCount(name(), "reduce_scatter", count));
    auto o = NewOp("reduce_scatter");
    const int n = size();
    const int c = static_cast<int>(count);
    if (internal::IsHalf(type)) {
      o->scratch_in.resize(count * n * sizeof(float));
      o->scratch_out.resize(count * sizeof(float));
      float* fin = reinterpret_cast<float*>(o->scratch_in.data());
      float* fout = reinterpret_cast<float*>(o->scratch_out.data());
      internal::HalfToFloat(fin, in, count * n, type);
      o->finish = [=](const MPI_Status&) {
        if (op == ReduceOp::kAvg) internal::DivideBy(fout, count, ElemType::kF32, n);
        internal::FloatToHalf(out, fout, count, type);
        return Status();
      };
      return Start(o, [&](MPI_Comm comm, MPI_Request* req) {
        return MPI_Ireduce_scatter_block(fin, fout, c, MPI_FLOAT, RawOp(op), comm, req);
      });
    }
    const size_t bytes = count * ElemSize(type);
    const void* send = in;
    if (Overlap(in, bytes * n, out, bytes)) {  // MPI forbids aliased send/recv buffers
      o->scratch_in.assign(static_cast<const uint8_t*>(in),
                           static_cast<const uint8_t*>(in) + bytes * n);
      send = o->scratch_in.data();
    }
    if (op == ReduceOp::kAvg) {
      o->finish = [=](const MPI_Status&) {
        internal::DivideBy(out, count, type, n);
        return Status();
      };
    }
    return Start(o, [&](MPI_Comm comm, MPI_Request* req) {
      return MPI_Ireduce_scatter_block(send, out, c, RawType(type), RawOp(op), comm, req);
    });
  }

  std::unique_ptr<Work> AllGather(const void* in, void* out, size_t count, ElemType type) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "all_gather", in, count));
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "all_gather", out, count));
    RETURN_WORK_IF_ERROR(CheckCount(name(), "all_gather", count));
    auto o = NewOp("all_gather");
    const size_t bytes = count * ElemSize(type);
    const int c = static_cast<int>(count);
    const void* send = in;
    if (in == static_cast<const uint8_t*>(out) + rank() * bytes) {
      send = MPI_IN_PLACE;
    } else if (Overlap(in, bytes, out, bytes * size())) {
      o->scratch_in.assign(static_cast<const uint8_t*>(in),
                           static_cast<const uint8_t*>(in) + bytes);
      send = o->scratch_in.data();
    }
    return Start(o, [&](MPI_Comm comm, MPI_Request* req) {
      return MPI_Iallgather(send, c, RawType(type), out, c, RawType(type), comm, req);
    });
  }

  std::unique_ptr<Work> Broadcast(void* buf, size_t count, ElemType type, int root) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "broadcast", buf, count));
    RETURN_WORK_IF_ERROR(
        internal::CheckPeer(name(), "broadcast", "root", root, rank(), size(), true));
    RETURN_WORK_IF_ERROR(CheckCount(name(), "broadcast", count));
    auto o = NewOp("broadcast");
    return Start(o, [&](MPI_Comm comm, MPI_Request* req) {
      return MPI_Ibcast(buf, static_cast<int>(count), RawType(type), root, comm, req);
    });
  }

  std::unique_ptr<Work> Send(const void* buf, size_t count, ElemType type, int dst,
                             int tag) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "send", buf, count));
    RETURN_WORK_IF_ERROR(internal::CheckPeer(name(), "send", "dst", dst, rank(), size(), false));
    RETURN_WORK_IF_ERROR(CheckP2PTag("send", tag));
    RETURN_WORK_IF_ERROR(CheckCount(name(), "send", count));
    auto o = NewOp("send to rank " + std::to_string(dst) + " (tag " + std::to_string(tag) + ")");
    return Start(o, [&](MPI_Comm comm, MPI_Request* req) {
      return MPI_Isend(buf, static_cast<int>(count), RawType(type), dst, tag, comm, req);
    });
  }

  std::unique_ptr<Work> Recv(void* buf, size_t count, ElemType type, int src, int tag) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "recv", buf, count));
    RETURN_WORK_IF_ERROR(internal::CheckPeer(name(), "recv", "src", src, rank(), size(), false));
    RETURN_WORK_IF_ERROR(CheckP2PTag("recv", tag));
    RETURN_WORK_IF_ERROR(CheckCount(name(), "recv", count));
    auto o = NewOp("recv from rank " + std::to_string(src) + " (tag " + std::to_string(tag) + ")");
    Op* raw = o.get();
    o->finish = [raw, count, type](const MPI_Status& st) {
      int got = 0;
      MPI_Get_count(&st, RawType(type), &got);
      if (got != static_cast<int>(count)) {
        return InvalidArgument(raw->Label() + ": received " + std::to_string(got) +
                               " elements, expected " + std::to_string(count));
      }
      return Status();
    };
    return Start(o, [&](MPI_Comm comm, MPI_Request* req) {
      return MPI_Irecv(buf, static_cast<int>(count), RawType(type), src, tag, comm, req);
    });
  }

  std::unique_ptr<Work> Barrier() override {
    auto o = NewOp("barrier");
    return Start(o, [](MPI_Comm comm, MPI_Request* req) { return MPI_Ibarrier(comm, req); });
  }

  Result<std::unique_ptr<ProcessGroup>> Split(const std::vector<int>& ranks,
                                              const std::string& new_name) override {
    int index = 0;
    RETURN_IF_ERROR(internal::CheckSplitRanks(name(), new_name, ranks, rank(), size(), &index));
    const std::string what = name() + ": split into '" + new_name + "'";
    const int color = *std::min_element(ranks.begin(), ranks.end());
    std::lock_guard<std::recursive_mutex> lock(MpiMutex());
    if (!comm_->aborted.ok())
      return Status(comm_->aborted.code(), what + " failed: " + comm_->aborted.message());
    auto sub = std::make_shared<Comm>();
    sub->name = new_name;
    int rc = MPI_Comm_split(comm_->comm, color, index, &sub->comm);
    if (rc != MPI_SUCCESS) return Internal(what + ": MPI_Comm_split: " + MpiError(rc));
    MPI_Comm_set_errhandler(sub->comm, MPI_ERRORS_RETURN);
    MPI_Comm_rank(sub->comm, &sub->rank);
    MPI_Comm_size(sub->comm, &sub->size);
    sub->tag_ub = comm_->tag_ub;
    // Members that share a colour must have passed the same list: compare a digest.
    const std::string desc = new_name + " " + internal::RankList(ranks);
    const uint64_t mine = std::hash<std::string>{}(desc);
    std::vector<uint64_t> all(static_cast<size_t>(sub->size));
    rc = MPI_Allgather(&mine, 1, MPI_UINT64_T, all.data(), 1, MPI_UINT64_T, sub->comm);
    if (rc != MPI_SUCCESS) return Internal(what + ": MPI_Allgather: " + MpiError(rc));
    const bool agree = std::all_of(all.begin(), all.end(), [&](uint64_t h) { return h == mine; });
    if (!agree || sub->size != static_cast<int>(ranks.size()) || sub->rank != index) {
      return InvalidArgument(what + ": members with smallest rank " + std::to_string(color) +
                             " passed different names or rank lists (this rank passed '" + desc +
                             "')");
    }
    return std::unique_ptr<ProcessGroup>(std::make_unique<MpiGroup>(std::move(sub)));
  }

  void Abort() override {
    std::lock_guard<std::recursive_mutex> lock(MpiMutex());
    if (comm_->aborted.ok()) {
      comm_->aborted = Cancelled("group aborted by rank " + std::to_string(rank()) +
                                 " (MPI cannot cancel collectives; end the run)");
    }
  }

 private:
  std::shared_ptr<Op> NewOp(std::string what) {
    auto o = std::make_shared<Op>();
    o->comm = comm_;
    o->what = std::move(what);
    return o;
  }

  Status CheckP2PTag(const char* what, int tag) const {
    RETURN_IF_ERROR(internal::CheckTag(name(), what, tag));
    if (tag > comm_->tag_ub) {
      return InvalidArgument(internal::OpLabel(name(), what) + ": tag " + std::to_string(tag) +
                             " exceeds MPI_TAG_UB = " + std::to_string(comm_->tag_ub));
    }
    return Status();
  }

  std::unique_ptr<Work> Start(const std::shared_ptr<Op>& o,
                              const std::function<int(MPI_Comm, MPI_Request*)>& start) {
    std::lock_guard<std::recursive_mutex> lock(MpiMutex());
    if (!comm_->aborted.ok()) {
      return internal::Done(
          Status(comm_->aborted.code(), o->Label() + " failed: " + comm_->aborted.message()));
    }
    const int rc = start(comm_->comm, &o->req);
    if (rc != MPI_SUCCESS) return internal::Done(Internal(o->Label() + ": " + MpiError(rc)));
    return std::make_unique<MpiWork>(o);
  }

  std::shared_ptr<Comm> comm_;
};

}  // namespace

Status MpiInit(int* argc, char*** argv) {
  std::lock_guard<std::recursive_mutex> lock(MpiMutex());
  int initialized = 0;
  MPI_Initialized(&initialized);
  int provided = 0;
  if (!initialized) {
    // Open MPI's non-blocking all-reduce (libnbc) picks a binomial tree for fewer than 4 ranks
    // at every size, which moves twice the data: 2.5x slower than MPI_Allreduce for MBs on 2
    // ranks. The ring is bandwidth-optimal. Only a default: an OMPI_MCA_ variable the user
    // (or mpirun --mca) already set wins, and other MPI implementations ignore it.
    setenv("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "1", /*overwrite=*/0);
    const int rc = MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided);
    if (rc != MPI_SUCCESS) return Internal("mpi: MPI_Init_thread failed: " + MpiError(rc));
  } else {
    MPI_Query_thread(&provided);
  }
  if (provided < MPI_THREAD_SERIALIZED) {
    return FailedPrecondition("mpi: MPI provides thread level " + std::to_string(provided) +
                              ", Strata needs MPI_THREAD_SERIALIZED");
  }
  return Status();
}

Status MpiFinalize() {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (true) {
    {
      std::lock_guard<std::recursive_mutex> lock(MpiMutex());
      if (!MpiActive()) return Status();
      auto& orphans = Orphans();
      orphans.erase(std::remove_if(orphans.begin(), orphans.end(),
                                   [](const std::shared_ptr<Op>& op) { return TestLocked(*op); }),
                    orphans.end());
      if (orphans.empty()) {
        const int rc = MPI_Finalize();
        if (rc != MPI_SUCCESS) return Internal("mpi: MPI_Finalize failed: " + MpiError(rc));
        return Status();
      }
      if (std::chrono::steady_clock::now() >= deadline) {
        return FailedPrecondition(
            "mpi: " + std::to_string(orphans.size()) + " abandoned op(s) still in flight (first: " +
            orphans.front()->Label() + "); not finalising, MPI_Finalize would hang");
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

int MpiWorldRank() {
  std::lock_guard<std::recursive_mutex> lock(MpiMutex());
  int r = 0;
  if (MpiActive()) MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

int MpiWorldSize() {
  std::lock_guard<std::recursive_mutex> lock(MpiMutex());
  int n = 1;
  if (MpiActive()) MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

Result<std::unique_ptr<ProcessGroup>> MakeMpiWorldGroup() {
  std::lock_guard<std::recursive_mutex> lock(MpiMutex());
  if (!MpiActive()) return FailedPrecondition("mpi: MPI is not initialised (call MpiInit first)");
  auto comm = std::make_shared<Comm>();
  comm->name = "world";
  int rc = MPI_Comm_dup(MPI_COMM_WORLD, &comm->comm);
  if (rc != MPI_SUCCESS) return Internal("mpi: MPI_Comm_dup failed: " + MpiError(rc));
  MPI_Comm_set_errhandler(comm->comm, MPI_ERRORS_RETURN);
  MPI_Comm_rank(comm->comm, &comm->rank);
  MPI_Comm_size(comm->comm, &comm->size);
  void* attr = nullptr;
  int flag = 0;
  MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &attr, &flag);
  if (flag && attr) comm->tag_ub = *static_cast<int*>(attr);
  return std::unique_ptr<ProcessGroup>(std::make_unique<MpiGroup>(std::move(comm)));
}

}  // namespace strata::comm
