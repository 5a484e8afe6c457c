#include "comm/mpi.h"

#include <mpi.h>
#if defined(__linux__)
#include <sys/prctl.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <condition_variable>
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

using Clock = std::chrono::steady_clock;
using std::chrono::microseconds;
using std::chrono::milliseconds;

// The direct path (see mpi.h): groups of at most this many ranks, one request per peer and
// direction, so an op's requests fit in a fixed array.
constexpr int kMaxDirectRanks = 8;
constexpr int kMaxRequests = 2 * (kMaxDirectRanks - 1);
// All direct-path messages of a group use one tag on the group's second communicator: MPI
// matches messages between two ranks on one (communicator, tag) in posting order, and every
// rank issues the group's ops in the same order, so the k-th op's messages meet each other.
constexpr int kDirectTag = 0;
// Point-to-point messages up to this size are eager in Open MPI's shared-memory transport
// (4 KB with its header): they complete without the receiver, so the progress thread need not
// watch them.
constexpr size_t kEagerBytes = kMpiDirectCopyMaxBytes;
// How often the progress thread polls in-flight ops when nobody waits (STRATA_MPI_PROGRESS_US
// overrides; 0 turns the thread off), how often it looks while a thread waits (the waiter
// drives MPI itself), and how long it stays warm after the last op before sleeping untimed.
constexpr microseconds kDefaultPollInterval{100};
constexpr microseconds kWaiterPollInterval{1000};
constexpr milliseconds kLinger{50};
// Work::Wait polls without pause kSpinPolls times and then for kSpin before it yields the core.
constexpr int kSpinPolls = 64;
constexpr microseconds kSpin{20};

struct Op;

// Process-wide state. Allocated once and never destroyed: at exit, static destructors run while
// the progress thread may still be asleep on these members.
struct Global {
  // Held around every MPI call Strata makes, on any thread: MPI_THREAD_SERIALIZED is all MPI
  // has to provide. Recursive because dropping the last reference to a Comm (which frees the
  // MPI_Comm) can happen while it is held.
  std::recursive_mutex mu;
  std::vector<std::shared_ptr<Op>> polled;  // GUARDED_BY(mu): ops the progress thread tests
  bool finalized = false;                   // GUARDED_BY(mu): MpiFinalize ran MPI_Finalize
  std::thread thread;                       // GUARDED_BY(mu)
  std::atomic<int> waiters{0};              // threads in Work::Wait's slow path
  microseconds interval = kDefaultPollInterval;

  // The progress thread sleeps on `wake` with sleep_mu, never with mu: it must not queue for
  // the MPI lock behind a thread that is polling.
  std::mutex sleep_mu;
  std::condition_variable wake;
  bool idle = false;    // GUARDED_BY(sleep_mu): asleep until kicked
  bool kicked = false;  // GUARDED_BY(sleep_mu): an op was handed over since the last round
  bool stop = false;    // GUARDED_BY(sleep_mu)

  Global() {
    if (const char* v = std::getenv("STRATA_MPI_PROGRESS_US")) {
      interval = microseconds(std::max(0L, std::strtol(v, nullptr, 10)));
    }
  }
};

Global& G() {
  static Global* g = new Global();
  return *g;
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

// A communicator and what its Works need to know about it. Fields guarded by G().mu.
struct Comm {
  MPI_Comm comm = MPI_COMM_NULL;    // MPI's collectives and the caller's point-to-point
  MPI_Comm direct = MPI_COMM_NULL;  // the direct path's messages, never mixed with the above
  std::string name;
  int rank = 0;
  int size = 1;
  int tag_ub = 32767;
  Status aborted;

  ~Comm() {
    std::lock_guard<std::recursive_mutex> lock(G().mu);
    // Freeing is legal with ops pending: MPI deallocates once they complete.
    if (!MpiActive()) return;
    if (comm != MPI_COMM_NULL) MPI_Comm_free(&comm);
    if (direct != MPI_COMM_NULL) MPI_Comm_free(&direct);
  }

  // Sets up a freshly created `comm`: errors return, rank/size, the direct communicator.
  int Init() {
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    const int rc = MPI_Comm_dup(comm, &direct);
    if (rc == MPI_SUCCESS) MPI_Comm_set_errhandler(direct, MPI_ERRORS_RETURN);
    return rc;
  }
};

// Bytes an op needs of its own (fp32 copies, received blocks, de-aliased inputs): small ones
// inline, so a small collective allocates nothing but its Op.
class Scratch {
 public:
  Scratch() {}  // leaves inline_ uninitialised
  uint8_t* Get(size_t bytes) {
    if (bytes <= sizeof(inline_)) return inline_;
    heap_.reset(new uint8_t[bytes]);
    return heap_.get();
  }
  void Release() { heap_.reset(); }

 private:
  alignas(16) uint8_t inline_[256];
  std::unique_ptr<uint8_t[]> heap_;
};

// What runs once MPI has completed an op (on whichever thread sees it complete).
enum class Finish : uint8_t {
  kNone,
  kDivide,       // kAvg: out /= n
  kHalfOut,      // fp32 result in fbuf: kAvg divide, round into out
  kRecvCount,    // check the received count
  kReduceSlots,  // direct path: reduce the n blocks in scratch (own block: in) into out
};

// One op in flight. Guarded by G().mu, except that `complete` may be read without it: once
// set (release) nothing else of the op changes.
struct Op {
  Op() {}  // no zero-filling of reqs and scratch: a small op's cost is counted in nanoseconds

  std::shared_ptr<Comm> comm;
  const char* what = "";  // "all_reduce", "send to rank", ...
  int peer = -1, tag = -1;
  std::array<MPI_Request, kMaxRequests> reqs;
  int nreq = 0;
  Finish finish = Finish::kNone;
  void* out = nullptr;
  const void* in = nullptr;
  float* fbuf = nullptr;
  uint8_t* slots = nullptr;
  size_t count = 0;
  ElemType type = ElemType::kF32;
  ReduceOp rop = ReduceOp::kSum;
  Scratch scratch;
  std::atomic<bool> complete{false};
  bool orphaned = false;  // its Work is gone: nobody reads the outcome, leave user memory be
  bool polled = false;    // in G().polled
  Status status;

  std::string Label() const {
    std::string s = comm->name + ": " + what;
    if (peer >= 0) s += " " + std::to_string(peer) + " (tag " + std::to_string(tag) + ")";
    return s;
  }
};

// Direct path: blocks 0..n-1 of `count` elements sit in o.slots, except this rank's, which is
// o.in. Reduces them in rank order (so every rank gets the same bits) into o.out; bf16/f16 in
// fp32, rounded once. o.out may alias o.in.
void ReduceSlots(Op& o) {
  const Comm& c = *o.comm;
  const int n = c.size;
  const size_t bytes = o.count * ElemSize(o.type);
  auto slot = [&](int q) { return o.slots + static_cast<size_t>(q) * bytes; };
  std::memcpy(slot(c.rank), o.in, bytes);
  if (internal::IsHalf(o.type)) {
    const bool bf = o.type == ElemType::kBF16;
    auto* out = static_cast<uint16_t*>(o.out);
    for (size_t i = 0; i < o.count; ++i) {
      auto at = [&](int q) {
        uint16_t h;
        std::memcpy(&h, slot(q) + 2 * i, 2);
        return bf ? internal::Bf16BitsToFloat(h) : internal::F16BitsToFloat(h);
      };
      float v = at(0);
      for (int q = 1; q < n; ++q) v = o.rop == ReduceOp::kMax ? std::max(v, at(q)) : v + at(q);
      if (o.rop == ReduceOp::kAvg) v /= static_cast<float>(n);
      out[i] = bf ? internal::FloatToBf16Bits(v) : internal::FloatToF16Bits(v);
    }
    return;
  }
  for (int q = 1; q < n; ++q) internal::Combine(slot(0), slot(0), slot(q), o.count, o.type, o.rop);
  if (o.rop == ReduceOp::kAvg) internal::DivideBy(slot(0), o.count, o.type, n);
  std::memcpy(o.out, slot(0), bytes);
}

Status RunFinish(Op& o, const MPI_Status& st) {
  switch (o.finish) {
    case Finish::kNone:
      break;
    case Finish::kDivide:
      internal::DivideBy(o.out, o.count, o.type, o.comm->size);
      break;
    case Finish::kHalfOut:
      if (o.rop == ReduceOp::kAvg)
        internal::DivideBy(o.fbuf, o.count, ElemType::kF32, o.comm->size);
      internal::FloatToHalf(o.out, o.fbuf, o.count, o.type);
      break;
    case Finish::kRecvCount: {
      int got = 0;
      MPI_Get_count(&st, RawType(o.type), &got);
      if (got != static_cast<int>(o.count)) {
        return InvalidArgument(o.Label() + ": received " + std::to_string(got) +
                               " elements, expected " + std::to_string(o.count));
      }
      break;
    }
    case Finish::kReduceSlots:
      ReduceSlots(o);
      break;
  }
  return Status();
}

// Marks o complete with `s`, dropping what only the op in flight needed.
void Complete(Op& o, Status s) {
  o.status = std::move(s);
  o.scratch.Release();
  o.complete.store(true, std::memory_order_release);
}

// Tests op once; true when it is complete (op.status then holds the outcome). Needs G().mu.
bool TestLocked(Op& o) {
  if (o.complete) return true;
  int flag = 0;
  MPI_Status st;
  const int rc = o.nreq == 1 ? MPI_Test(&o.reqs[0], &flag, &st)
                             : MPI_Testall(o.nreq, o.reqs.data(), &flag, MPI_STATUSES_IGNORE);
  if (rc != MPI_SUCCESS) {
    Complete(o, Status(StatusCode::kUnavailable, o.Label() + ": " + MpiError(rc)));
  } else if (flag) {
    Complete(o, o.orphaned ? Status() : RunFinish(o, st));
  } else {
    return false;
  }
  return true;
}

// The progress thread: while ops it watches are in flight, it tests them every `interval`,
// so MPI's non-blocking collectives move while the caller computes (Open MPI advances every
// pending request inside any MPI_Test). It skips a round when another thread holds the MPI
// lock or waits in Work::Wait: that thread drives MPI meanwhile.
void ProgressLoop(Global* g) {
#if defined(__linux__)
  prctl(PR_SET_TIMERSLACK, 1000UL);  // 1 us: sleep the interval asked for, not 50 us more
#endif
  auto last_busy = Clock::now();
  bool empty = false;
  while (true) {
    {
      std::unique_lock<std::mutex> sl(g->sleep_mu);
      if (g->stop) return;
      const auto now = Clock::now();
      if (!empty || g->kicked) {
        last_busy = now;
      } else if (now - last_busy > kLinger) {
        g->idle = true;
        g->wake.wait(sl, [&] { return g->stop || g->kicked; });
        g->idle = false;
        if (g->stop) return;
        last_busy = Clock::now();
      }
      g->kicked = false;
    }
    if (g->waiters.load(std::memory_order_relaxed) == 0 && g->mu.try_lock()) {
      std::lock_guard<std::recursive_mutex> lock(g->mu, std::adopt_lock);
      for (size_t i = 0; i < g->polled.size(); ++i) TestLocked(*g->polled[i]);
      // Dropping a finished op may free its Comm (MPI_Comm_free, under the lock: fine).
      std::erase_if(g->polled, [](const std::shared_ptr<Op>& o) {
        if (!o->complete) return false;
        o->polled = false;
        return true;
      });
      empty = g->polled.empty();
    } else {
      empty = false;
    }
    std::unique_lock<std::mutex> sl(g->sleep_mu);
    if (g->stop) return;
    if (!g->kicked) {
      g->wake.wait_for(sl, empty || g->waiters.load(std::memory_order_relaxed) > 0
                               ? kWaiterPollInterval
                               : g->interval);
    }
  }
}

// Hands an in-flight op to the progress thread (starting it on first use). Needs G().mu.
void WatchLocked(const std::shared_ptr<Op>& o) {
  Global& g = G();
  if (o->polled || o->complete) return;
  o->polled = true;
  g.polled.push_back(o);
  if (g.interval.count() == 0) return;
  std::lock_guard<std::mutex> sl(g.sleep_mu);
  if (g.stop) return;
  g.kicked = true;
  if (!g.thread.joinable()) {
    g.thread = std::thread(ProgressLoop, &g);
  } else if (g.idle) {
    g.wake.notify_one();
  }
}

class MpiWork final : public Work {
 public:
  explicit MpiWork(std::shared_ptr<Op> op) : op_(std::move(op)) {}

  ~MpiWork() override {
    if (op_->complete.load(std::memory_order_acquire)) return;
    std::lock_guard<std::recursive_mutex> lock(G().mu);
    if (op_->complete || G().finalized) return;
    // Its buffers must live until MPI is done: the progress thread (or MpiFinalize) finishes
    // it, and nothing of the op touches user memory after MPI's own transfers.
    op_->orphaned = true;
    WatchLocked(op_);
  }

  Status Wait(milliseconds timeout) override {
    if (op_->complete.load(std::memory_order_acquire)) return op_->status;
    Global& g = G();
    std::unique_lock<std::recursive_mutex> lock(g.mu);
    if (op_->complete) return op_->status;
    if (Status s = Failed(); !s.ok()) return s;
    // While this thread drives MPI, the progress thread keeps out of its way (it would only
    // compete for the lock and the core). Direct-path ops never involve it.
    struct Waiting {
      std::atomic<int>* waiters;
      ~Waiting() {
        if (waiters) waiters->fetch_sub(1, std::memory_order_relaxed);
      }
    } waiting{op_->polled ? &g.waiters : nullptr};
    if (waiting.waiters) waiting.waiters->fetch_add(1, std::memory_order_relaxed);
    // A small op completes within microseconds: poll flat out, holding the lock (releasing it
    // between polls would cost more than a poll); read the clock only once that has not sufficed.
    for (int i = 0; i < kSpinPolls; ++i) {
      if (TestLocked(*op_)) return op_->status;
    }
    const auto start = Clock::now();
    for (int i = 1;; ++i) {
      if (TestLocked(*op_)) return op_->status;
      if (i % 32 == 0 && Clock::now() - start >= kSpin) break;
    }
    const auto deadline = internal::DeadlineAfter(timeout) - (Clock::now() - start);
    while (true) {
      lock.unlock();
      const auto now = Clock::now();
      if (now >= deadline) {
        return Status(StatusCode::kDeadlineExceeded,
                      op_->Label() + " timed out after " + std::to_string(timeout.count()) +
                          " ms (MPI op still in flight; a peer has not joined)");
      }
      // Yield the core for a while, then back off so a stuck op does not burn one.
      if (now - start >= milliseconds(2)) {
        std::this_thread::sleep_for(microseconds(50));
      } else {
        std::this_thread::yield();
      }
      lock.lock();
      if (op_->complete) return op_->status;
      if (Status s = Failed(); !s.ok()) return s;
      if (TestLocked(*op_)) return op_->status;
    }
  }

 private:
  // Needs G().mu: CANCELLED after Abort, FAILED_PRECONDITION after MpiFinalize, else OK.
  Status Failed() const {
    if (!op_->comm->aborted.ok()) {
      return Status(op_->comm->aborted.code(),
                    op_->Label() + " failed: " + op_->comm->aborted.message());
    }
    if (G().finalized) return FailedPrecondition(op_->Label() + ": MPI was finalised meanwhile");
    return Status();
  }

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
    auto o = NewOp("all_reduce", count, type, op);
    const int n = size();
    const int c = static_cast<int>(count);
    const size_t bytes = count * ElemSize(type);
    if (Direct(bytes, kMpiDirectReduceMaxBytes)) {
      // Every rank sends its buffer to every other and reduces what it receives.
      o->in = o->out = buf;
      o->finish = Finish::kReduceSlots;
      o->slots = o->scratch.Get(bytes * n);
      uint8_t* slots = o->slots;
      return StartDirect(std::move(o), [&](MPI_Request* req, int* k) {
        return Exchange(
            req, k, bytes, [&](int q) { return slots + q * bytes; }, [&](int) { return buf; });
      });
    }
    o->out = buf;
    if (internal::IsHalf(type)) {
      o->fbuf = reinterpret_cast<float*>(o->scratch.Get(count * sizeof(float)));
      internal::HalfToFloat(o->fbuf, buf, count, type);
      o->finish = Finish::kHalfOut;
      float* f = o->fbuf;
      return Start(std::move(o), [&](MPI_Comm comm, MPI_Request* req) {
        return MPI_Iallreduce(MPI_IN_PLACE, f, c, MPI_FLOAT, RawOp(op), comm, req);
      });
    }
    if (op == ReduceOp::kAvg) o->finish = Finish::kDivide;
    return Start(std::move(o), [&](MPI_Comm comm, MPI_Request* req) {
      return MPI_Iallreduce(MPI_IN_PLACE, buf, c, RawType(type), RawOp(op), comm, req);
    });
  }

  std::unique_ptr<Work> ReduceScatter(const void* in, void* out, size_t count, ElemType type,
                                      ReduceOp op) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "reduce_scatter", in, count));
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "reduce_scatter", out, count));
    RETURN_WORK_IF_ERROR(CheckCount(name(), "reduce_scatter", count));
    auto o = NewOp("reduce_scatter", count, type, op);
    const int n = size();
    const int c = static_cast<int>(count);
    const size_t bytes = count * ElemSize(type);
    if (Direct(bytes, kMpiDirectReduceMaxBytes)) {
      // Block q goes to rank q; out is written only once every send is done, so it may alias
      // the input.
      const auto* src = static_cast<const uint8_t*>(in);
      o->in = src + rank() * bytes;
      o->out = out;
      o->finish = Finish::kReduceSlots;
      o->slots = o->scratch.Get(bytes * n);
      uint8_t* slots = o->slots;
      return StartDirect(std::move(o), [&](MPI_Request* req, int* k) {
        return Exchange(
            req, k, bytes, [&](int q) { return slots + q * bytes; },
            [&](int q) { return src + q * bytes; });
      });
    }
    o->out = out;
    if (internal::IsHalf(type)) {
      float* fin = reinterpret_cast<float*>(o->scratch.Get(count * (n + 1) * sizeof(float)));
      float* fout = fin + count * n;
      internal::HalfToFloat(fin, in, count * n, type);
      o->fbuf = fout;
      o->finish = Finish::kHalfOut;
      return Start(std::move(o), [&](MPI_Comm comm, MPI_Request* req) {
        return MPI_Ireduce_scatter_block(fin, fout, c, MPI_FLOAT, RawOp(op), comm, req);
      });
    }
    const void* send = in;
    if (Overlap(in, bytes * n, out, bytes)) {  // MPI forbids aliased send/recv buffers
      uint8_t* copy = o->scratch.Get(bytes * n);
      std::memcpy(copy, in, bytes * n);
      send = copy;
    }
    if (op == ReduceOp::kAvg) o->finish = Finish::kDivide;
    return Start(std::move(o), [&](MPI_Comm comm, MPI_Request* req) {
      return MPI_Ireduce_scatter_block(send, out, c, RawType(type), RawOp(op), comm, req);
    });
  }

  std::unique_ptr<Work> AllGather(const void* in, void* out, size_t count, ElemType type) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "all_gather", in, count));
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "all_gather", out, count));
    RETURN_WORK_IF_ERROR(CheckCount(name(), "all_gather", count));
    auto o = NewOp("all_gather", count, type, ReduceOp::kSum);
    const size_t bytes = count * ElemSize(type);
    const int c = static_cast<int>(count);
    auto* dst = static_cast<uint8_t*>(out);
    uint8_t* mine = dst + rank() * bytes;
    const void* send = in;
    const bool in_place = in == mine;
    if (!in_place && Overlap(in, bytes, out, bytes * size())) {
      uint8_t* copy = o->scratch.Get(bytes);
      std::memcpy(copy, in, bytes);
      send = copy;
    }
    if (Direct(bytes, kMpiDirectCopyMaxBytes)) {
      return StartDirect(std::move(o), [&](MPI_Request* req, int* k) {
        if (!in_place) std::memcpy(mine, send, bytes);
        return Exchange(
            req, k, bytes, [&](int q) { return dst + q * bytes; }, [&](int) { return mine; });
      });
    }
    if (in_place) send = MPI_IN_PLACE;
    return Start(std::move(o), [&](MPI_Comm comm, MPI_Request* req) {
      return MPI_Iallgather(send, c, RawType(type), out, c, RawType(type), comm, req);
    });
  }

  std::unique_ptr<Work> Broadcast(void* buf, size_t count, ElemType type, int root) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "broadcast", buf, count));
    RETURN_WORK_IF_ERROR(
        internal::CheckPeer(name(), "broadcast", "root", root, rank(), size(), true));
    RETURN_WORK_IF_ERROR(CheckCount(name(), "broadcast", count));
    auto o = NewOp("broadcast", count, type, ReduceOp::kSum);
    const size_t bytes = count * ElemSize(type);
    if (Direct(bytes, kMpiDirectCopyMaxBytes)) {
      return StartDirect(std::move(o), [&](MPI_Request* req, int* k) {
        const int n = size();
        if (rank() != root) return Irecv(buf, bytes, root, &req[(*k)++]);
        int rc = MPI_SUCCESS;
        for (int i = 1; i < n && rc == MPI_SUCCESS; ++i) {
          rc = Isend(buf, bytes, (root + i) % n, &req[(*k)++]);
        }
        return rc;
      });
    }
    return Start(std::move(o), [&](MPI_Comm comm, MPI_Request* req) {
      return MPI_Ibcast(buf, static_cast<int>(count), RawType(type), root, comm, req);
    });
  }

  std::unique_ptr<Work> Send(const void* buf, size_t count, ElemType type, int dst,
                             int tag) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "send", buf, count));
    RETURN_WORK_IF_ERROR(internal::CheckPeer(name(), "send", "dst", dst, rank(), size(), false));
    RETURN_WORK_IF_ERROR(CheckP2PTag("send", tag));
    RETURN_WORK_IF_ERROR(CheckCount(name(), "send", count));
    auto o = NewOp("send to rank", count, type, ReduceOp::kSum);
    o->peer = dst;
    o->tag = tag;
    return Start(
        std::move(o),
        [&](MPI_Comm comm, MPI_Request* req) {
          return MPI_Isend(buf, static_cast<int>(count), RawType(type), dst, tag, comm, req);
        },
        count * ElemSize(type) > kEagerBytes);
  }

  std::unique_ptr<Work> Recv(void* buf, size_t count, ElemType type, int src, int tag) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "recv", buf, count));
    RETURN_WORK_IF_ERROR(internal::CheckPeer(name(), "recv", "src", src, rank(), size(), false));
    RETURN_WORK_IF_ERROR(CheckP2PTag("recv", tag));
    RETURN_WORK_IF_ERROR(CheckCount(name(), "recv", count));
    auto o = NewOp("recv from rank", count, type, ReduceOp::kSum);
    o->peer = src;
    o->tag = tag;
    o->finish = Finish::kRecvCount;
    return Start(
        std::move(o),
        [&](MPI_Comm comm, MPI_Request* req) {
          return MPI_Irecv(buf, static_cast<int>(count), RawType(type), src, tag, comm, req);
        },
        count * ElemSize(type) > kEagerBytes);
  }

  std::unique_ptr<Work> Barrier() override {
    auto o = NewOp("barrier", 0, ElemType::kU8, ReduceOp::kSum);
    return Start(std::move(o),
                 [](MPI_Comm comm, MPI_Request* req) { return MPI_Ibarrier(comm, req); });
  }

  Result<std::unique_ptr<ProcessGroup>> Split(const std::vector<int>& ranks,
                                              const std::string& new_name) override {
    int index = 0;
    RETURN_IF_ERROR(internal::CheckSplitRanks(name(), new_name, ranks, rank(), size(), &index));
    const std::string what = name() + ": split into '" + new_name + "'";
    const int color = *std::min_element(ranks.begin(), ranks.end());
    std::lock_guard<std::recursive_mutex> lock(G().mu);
    if (!comm_->aborted.ok())
      return Status(comm_->aborted.code(), what + " failed: " + comm_->aborted.message());
    auto sub = std::make_shared<Comm>();
    sub->name = new_name;
    int rc = MPI_Comm_split(comm_->comm, color, index, &sub->comm);
    if (rc != MPI_SUCCESS) return Internal(what + ": MPI_Comm_split: " + MpiError(rc));
    rc = sub->Init();
    if (rc != MPI_SUCCESS) return Internal(what + ": MPI_Comm_dup: " + MpiError(rc));
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
    std::lock_guard<std::recursive_mutex> lock(G().mu);
    if (comm_->aborted.ok()) {
      comm_->aborted = Cancelled("group aborted by rank " + std::to_string(rank()) +
                                 " (MPI cannot cancel collectives; end the run)");
    }
  }

 private:
  // Direct path: posts a receive from every other rank into recv_at(q), then a send of
  // send_at(q) to it, starting with the next rank up (spreads the first messages over peers).
  // Counts the requests in *k; returns the first MPI error.
  template <typename RecvAt, typename SendAt>
  int Exchange(MPI_Request* req, int* k, size_t bytes, RecvAt recv_at, SendAt send_at) const {
    const int n = size(), r = rank();
    int rc = MPI_SUCCESS;
    for (int i = 1; i < n && rc == MPI_SUCCESS; ++i) {
      rc = Irecv(recv_at((r + i) % n), bytes, (r + i) % n, &req[(*k)++]);
    }
    for (int i = 1; i < n && rc == MPI_SUCCESS; ++i) {
      rc = Isend(send_at((r + i) % n), bytes, (r + i) % n, &req[(*k)++]);
    }
    return rc;
  }

  // `bytes`: one message, i.e. this rank's block (all-gather, reduce-scatter) or the whole
  // buffer (all-reduce, broadcast), which goes to (or comes from) every peer. `limit`: see
  // kMpiDirectReduceMaxBytes.
  bool Direct(size_t bytes, size_t limit) const {
    return size() <= kMaxDirectRanks && bytes * static_cast<size_t>(size() - 1) <= limit;
  }

  int Isend(const void* p, size_t bytes, int dst, MPI_Request* req) const {
    return MPI_Isend(p, static_cast<int>(bytes), MPI_BYTE, dst, kDirectTag, comm_->direct, req);
  }
  int Irecv(void* p, size_t bytes, int src, MPI_Request* req) const {
    return MPI_Irecv(p, static_cast<int>(bytes), MPI_BYTE, src, kDirectTag, comm_->direct, req);
  }

  std::shared_ptr<Op> NewOp(const char* what, size_t count, ElemType type, ReduceOp op) {
    auto o = std::make_shared<Op>();
    o->comm = comm_;
    o->what = what;
    o->count = count;
    o->type = type;
    o->rop = op;
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

  Status AbortedLocked(const Op& o) const {
    if (comm_->aborted.ok()) return Status();
    return Status(comm_->aborted.code(), o.Label() + " failed: " + comm_->aborted.message());
  }

  // MPI's own non-blocking op; `watch`: the progress thread moves it while nobody waits.
  template <typename StartFn>
  std::unique_ptr<Work> Start(std::shared_ptr<Op> o, StartFn&& start, bool watch = true) {
    std::lock_guard<std::recursive_mutex> lock(G().mu);
    RETURN_WORK_IF_ERROR(AbortedLocked(*o));
    const int rc = start(comm_->comm, &o->reqs[0]);
    if (rc != MPI_SUCCESS) return internal::Done(Internal(o->Label() + ": " + MpiError(rc)));
    o->nreq = 1;
    if (watch) WatchLocked(o);
    return std::make_unique<MpiWork>(std::move(o));
  }

  // The direct path: `post` posts point-to-point messages on the direct communicator. Eager
  // messages need no progress thread; without any (one rank, count 0) the op completes here.
  template <typename PostFn>
  std::unique_ptr<Work> StartDirect(std::shared_ptr<Op> o, PostFn&& post) {
    std::lock_guard<std::recursive_mutex> lock(G().mu);
    RETURN_WORK_IF_ERROR(AbortedLocked(*o));
    if (o->count == 0) return internal::Done();
    int k = 0;
    const int rc = post(o->reqs.data(), &k);
    if (rc != MPI_SUCCESS) return internal::Done(Internal(o->Label() + ": " + MpiError(rc)));
    o->nreq = k;
    if (k == 0) return internal::Done(RunFinish(*o, MPI_Status{}));
    if (o->count * ElemSize(o->type) > kEagerBytes) WatchLocked(o);
    return std::make_unique<MpiWork>(std::move(o));
  }

  std::shared_ptr<Comm> comm_;
};

}  // namespace

Status MpiInit(int* argc, char*** argv) {
  std::lock_guard<std::recursive_mutex> lock(G().mu);
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
  Global& g = G();
  std::thread progress;
  {
    std::lock_guard<std::recursive_mutex> lock(g.mu);
    if (!MpiActive()) return Status();
    {
      std::lock_guard<std::mutex> sl(g.sleep_mu);
      g.stop = true;
    }
    g.wake.notify_all();
    progress = std::move(g.thread);
  }
  if (progress.joinable()) progress.join();
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  while (true) {
    {
      std::lock_guard<std::recursive_mutex> lock(g.mu);
      std::erase_if(g.polled, [](const std::shared_ptr<Op>& o) {
        if (!TestLocked(*o)) return false;
        o->polled = false;
        return true;
      });
      if (g.polled.empty()) {
        g.finalized = true;
        const int rc = MPI_Finalize();
        if (rc != MPI_SUCCESS) return Internal("mpi: MPI_Finalize failed: " + MpiError(rc));
        return Status();
      }
      if (Clock::now() >= deadline) {
        // Not finalising: hand the ops back to a progress thread and let the caller end.
        {
          std::lock_guard<std::mutex> sl(g.sleep_mu);
          g.stop = false;
        }
        if (g.interval.count() > 0) g.thread = std::thread(ProgressLoop, &g);
        return FailedPrecondition(
            "mpi: " + std::to_string(g.polled.size()) +
            " abandoned op(s) still in flight (first: " + g.polled.front()->Label() +
            "); not finalising, MPI_Finalize would hang");
      }
    }
    std::this_thread::sleep_for(milliseconds(1));
  }
}

int MpiWorldRank() {
  std::lock_guard<std::recursive_mutex> lock(G().mu);
  int r = 0;
  if (MpiActive()) MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

int MpiWorldSize() {
  std::lock_guard<std::recursive_mutex> lock(G().mu);
  int n = 1;
  if (MpiActive()) MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

Result<std::unique_ptr<ProcessGroup>> MakeMpiWorldGroup() {
  std::lock_guard<std::recursive_mutex> lock(G().mu);
  if (!MpiActive()) return FailedPrecondition("mpi: MPI is not initialised (call MpiInit first)");
  auto comm = std::make_shared<Comm>();
  comm->name = "world";
  int rc = MPI_Comm_dup(MPI_COMM_WORLD, &comm->comm);
  if (rc != MPI_SUCCESS) return Internal("mpi: MPI_Comm_dup failed: " + MpiError(rc));
  rc = comm->Init();
  if (rc != MPI_SUCCESS) return Internal("mpi: MPI_Comm_dup failed: " + MpiError(rc));
  void* attr = nullptr;
  int flag = 0;
  MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &attr, &flag);
  if (flag && attr) comm->tag_ub = *static_cast<int*>(attr);
  return std::unique_ptr<ProcessGroup>(std::make_unique<MpiGroup>(std::move(comm)));
}

}  // namespace strata::comm
