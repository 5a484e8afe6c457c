#include "comm/nccl.h"

#include <cuda_runtime.h>
#include <nccl.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <tuple>
#include <vector>

#include "comm/backend_util.h"
#include "comm/nccl_testing.h"

namespace strata::comm {

namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

static_assert(kNcclUniqueIdBytes == NCCL_UNIQUE_ID_BYTES, "nccl.h: kNcclUniqueIdBytes is stale");
static_assert(sizeof(ncclUniqueId) == NCCL_UNIQUE_ID_BYTES);

// How often the watchdog looks at a group with ops in flight, and how Wait polls: tightly for
// the first kWaitSpin (small ops finish in tens of microseconds), then backing off.
constexpr auto kWatchdogInterval = std::chrono::milliseconds(2);
constexpr auto kWaitSpin = std::chrono::milliseconds(2);
constexpr auto kWaitFastPoll = std::chrono::microseconds(20);
constexpr auto kWaitSlowPoll = std::chrono::microseconds(500);
// Init, Split and Finalize poll the communicator's state this often.
constexpr auto kStatePoll = std::chrono::milliseconds(1);

std::string CudaError(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ")";
}

std::string NcclError(ncclResult_t r, ncclComm_t comm) {
  std::string s = std::string("NCCL error ") + std::to_string(static_cast<int>(r)) + ": " +
                  ncclGetErrorString(r);
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && *last != '\0') s += std::string(" (") + last + ")";
  return s;
}

// A failed NCCL call: bad arguments are the caller's; everything else means the communicator
// (or a peer, or the network) is gone.
Status NcclFailure(const std::string& label, ncclResult_t r, ncclComm_t comm) {
  const StatusCode code = r == ncclInvalidArgument || r == ncclInvalidUsage
                              ? StatusCode::kInvalidArgument
                          : r == ncclInternalError ? StatusCode::kInternal
                                                   : StatusCode::kUnavailable;
  return Status(code, label + ": " + NcclError(r, comm));
}

ncclDataType_t NcclType(ElemType t) {
  switch (t) {
    case ElemType::kF32:
      return ncclFloat32;
    case ElemType::kF64:
      return ncclFloat64;
    case ElemType::kI32:
      return ncclInt32;
    case ElemType::kI64:
      return ncclInt64;
    case ElemType::kU8:
      return ncclUint8;
    case ElemType::kBF16:
      return ncclBfloat16;
    case ElemType::kF16:
      return ncclFloat16;
  }
  CHECK_MSG(false, "NcclType: unknown ElemType");
  return ncclFloat32;
}

ncclRedOp_t NcclOp(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kAvg:
      return ncclAvg;  // integers: sum, then truncating division (the interface's kAvg)
    case ReduceOp::kMax:
      return ncclMax;
  }
  CHECK_MSG(false, "NcclOp: unknown ReduceOp");
  return ncclSum;
}

// Makes `device` current on the calling thread and restores the previous one on destruction, so
// the backend never changes a caller's current device behind its back.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) {
      (void)cudaGetLastError();
      previous_ = -1;
    }
    if (previous_ != device_) {
      const cudaError_t e = cudaSetDevice(device_);
      if (e != cudaSuccess) {
        (void)cudaGetLastError();
        status_ = Status(StatusCode::kUnavailable,
                         "cudaSetDevice(" + std::to_string(device_) + "): " + CudaError(e));
      }
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0 && previous_ != device_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

  const Status& status() const { return status_; }

 private:
  int device_;
  int previous_ = -1;
  Status status_;
};

// The test hook's host function: holds the comm stream until the flag is set.
void CUDART_CB BlockUntilReleased(void* flag) {
  auto* released = static_cast<std::atomic<bool>*>(flag);
  while (!released->load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

// One op as its Work, the pump and the watchdog see it. Fields guarded by Core::mu.
struct Op {
  std::string desc;   // "all_reduce", "send to rank 3 (tag 7)"
  std::string label;  // "<group>: <desc>"
  bool p2p = false;
  bool send = false;  // point-to-point: direction, peer and tag (the launch order within a batch)
  int peer = -1;
  int tag = 0;
  // The NCCL call(s); run by the pump under Core::mu with the device current. Point-to-point
  // launches run between ncclGroupStart and ncclGroupEnd.
  std::function<ncclResult_t(ncclComm_t, cudaStream_t)> launch;
  cudaEvent_t ready = nullptr;  // recorded on the compute stream at issue time
  cudaEvent_t end = nullptr;    // recorded on the comm stream after the launch
  // The watchdog's limit. While NCCL launches it: launch + timeout. Once launched, the clock
  // starts ("armed") only when the op can run: its inputs are ready (the ready event has
  // completed) and every earlier op of the comm stream is done. So a long queue of compute
  // work in front of an op never counts against it.
  Clock::time_point deadline = Clock::time_point::max();
  bool armed = false;
  bool done = false;
  Status status;

  ~Op() {
    // Destroying an event whose work is pending is allowed: CUDA releases it on completion.
    if (ready != nullptr) (void)cudaEventDestroy(ready);
    if (end != nullptr) (void)cudaEventDestroy(end);
  }
};

using OpPtr = std::shared_ptr<Op>;

// State shared by a group, its watchdog and its Works (which may outlive the group).
struct Core {
  std::string name;
  std::string prefix;
  int rank = 0;
  int size = 1;
  int device = 0;
  milliseconds timeout{0};
  std::shared_ptr<Store> store;

  std::mutex mu;
  std::condition_variable cv;  // op completion, new work for the watchdog, stopping
  ncclComm_t comm = nullptr;   // null once aborted or destroyed
  cudaStream_t stream = nullptr;
  cudaStream_t compute = nullptr;  // the stream every op waits for (nullptr: legacy default)
  int* barrier_buf = nullptr;      // one device int for Barrier's all-reduce
  Status broken;                   // after a failure or Abort every later op fails at once
  std::deque<OpPtr> queued;        // issued, not launched yet (held point-to-point, or comm busy)
  std::vector<OpPtr> launching;    // launched, NCCL answered ncclInProgress: comm busy
  std::deque<OpPtr> running;       // launched, end event recorded, in issue order
  bool stopping = false;
  std::thread watchdog;
  int next_split = 0;
  // Test hook (nccl_testing.h): the next launch first enqueues a host function that blocks
  // the comm stream until *stall_next is set.
  std::atomic<bool>* stall_next = nullptr;

  ~Core() {
    DeviceGuard guard(device);
    if (comm != nullptr) (void)ncclCommAbort(comm);  // only if a group never took ownership
    if (barrier_buf != nullptr) (void)cudaFree(barrier_buf);
    if (stream != nullptr) (void)cudaStreamDestroy(stream);
  }

  Status BrokenFor(const std::string& label) const {
    return Status(broken.code(), label + " failed: " + broken.message());
  }

  bool Idle() const { return queued.empty() && launching.empty() && running.empty(); }

  void FinishLocked(const OpPtr& op, Status s) {
    if (op->done) return;
    op->done = true;
    op->status = std::move(s);
    cv.notify_all();
  }

  // Aborts the communicator (if not yet) and fails every pending op: `trigger` with `reason`,
  // the others with "<label> failed: <reason>". Needs mu and the device current. When it
  // returns, no kernel of this group runs any more (bounded by `timeout`, see DrainLocked).
  void AbortLocked(Status reason, const OpPtr& trigger = nullptr) {
    if (broken.ok()) {
      broken = reason;
      if (comm != nullptr) {
        const ncclResult_t r = ncclCommAbort(comm);
        if (r != ncclSuccess) {
          spdlog::warn("{}: ncclCommAbort: {}", name, ncclGetErrorString(r));
        }
        comm = nullptr;
      }
      DrainLocked();
    }
    if (trigger) FinishLocked(trigger, std::move(reason));
    for (auto* list : {&queued, &running}) {
      for (const auto& op : *list) FinishLocked(op, BrokenFor(op->label));
      list->clear();
    }
    for (const auto& op : launching) FinishLocked(op, BrokenFor(op->label));
    launching.clear();
    cv.notify_all();
  }

  // After ncclCommAbort the kernels of the group exit, so the comm stream empties. It may
  // still wait for the compute stream (the ready events): wait for it, bounded by `timeout`.
  void DrainLocked() {
    if (stream == nullptr) return;
    const auto deadline = internal::DeadlineAfter(timeout);
    while (true) {
      const cudaError_t e = cudaStreamQuery(stream);
      if (e != cudaErrorNotReady) {
        if (e != cudaSuccess) (void)cudaGetLastError();
        return;
      }
      if (Clock::now() >= deadline) {
        spdlog::warn("{}: comm stream still busy {} ms after ncclCommAbort", name, timeout.count());
        return;
      }
      std::this_thread::sleep_for(kStatePoll);
    }
  }

  // Records the end event of every op of a finished launch and moves them to `running`.
  Status RecordEndsLocked(std::vector<OpPtr>& batch) {
    for (const auto& op : batch) {
      const cudaError_t e = cudaEventRecord(op->end, stream);
      if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return Internal(op->label + ": cudaEventRecord: " + CudaError(e));
      }
      op->deadline = Clock::time_point::max();  // armed by PollLocked when it can run
      running.push_back(op);
    }
    batch.clear();
    return Status();
  }

  // Launches queued ops while the communicator accepts them: the op at the front, or the run of
  // point-to-point ops at the front as one NCCL group. Such a run is held until flush_p2p or
  // until a collective follows it. Needs mu and the device current.
  void PumpLocked(bool flush_p2p) {
    while (broken.ok()) {
      if (!launching.empty()) {
        ncclResult_t state = ncclSuccess;
        const ncclResult_t r = ncclCommGetAsyncError(comm, &state);
        if (r != ncclSuccess) state = r;
        if (state == ncclInProgress) return;
        if (state != ncclSuccess) {
          const OpPtr trigger = launching.front();
          return AbortLocked(NcclFailure(trigger->label, state, comm), trigger);
        }
        Status s = RecordEndsLocked(launching);
        if (!s.ok()) return AbortLocked(std::move(s));
      }
      if (queued.empty()) return;
      size_t n = 1;
      if (queued.front()->p2p) {
        while (n < queued.size() && queued[n]->p2p) ++n;
        if (n == queued.size() && !flush_p2p) return;
      }
      // From here the batch is in `launching`, so a failure below fails all of it.
      launching.assign(queued.begin(), queued.begin() + static_cast<ptrdiff_t>(n));
      queued.erase(queued.begin(), queued.begin() + static_cast<ptrdiff_t>(n));
      const std::vector<OpPtr>& batch = launching;
      if (stall_next != nullptr) {
        const cudaError_t e = cudaLaunchHostFunc(stream, BlockUntilReleased, stall_next);
        stall_next = nullptr;
        if (e != cudaSuccess) {
          (void)cudaGetLastError();
          return AbortLocked(Internal(name + ": stall hook: " + CudaError(e)));
        }
      }
      const auto deadline = internal::DeadlineAfter(timeout);
      for (const auto& op : batch) {
        op->deadline = deadline;
        const cudaError_t e = cudaStreamWaitEvent(stream, op->ready, 0);
        if (e != cudaSuccess) {
          (void)cudaGetLastError();
          return AbortLocked(Internal(op->label + ": cudaStreamWaitEvent: " + CudaError(e)), op);
        }
      }
      ncclResult_t r = ncclSuccess;
      if (batch.front()->p2p) {
        // NCCL matches the messages of a pair in posting order and has no tags: within a batch
        // they are posted by (peer, direction, tag, issue order), so two ranks that issued the
        // same messages before their Waits post them in the same order whatever their tags.
        std::vector<Op*> order;
        for (const auto& op : batch) order.push_back(op.get());
        std::stable_sort(order.begin(), order.end(), [](const Op* a, const Op* b) {
          return std::tie(a->peer, a->send, a->tag) < std::tie(b->peer, b->send, b->tag);
        });
        r = ncclGroupStart();
        for (size_t i = 0; i < order.size() && r == ncclSuccess; ++i) {
          r = order[i]->launch(comm, stream);
        }
        // A group that was started must be ended, whatever happened inside it.
        const ncclResult_t end = ncclGroupEnd();
        if (r == ncclSuccess) r = end;
      } else {
        r = batch.front()->launch(comm, stream);
      }
      if (r == ncclInProgress) continue;  // the top of the loop polls the state once
      if (r != ncclSuccess) {
        const OpPtr trigger = batch.front();
        return AbortLocked(NcclFailure(trigger->label, r, comm), trigger);
      }
      Status s = RecordEndsLocked(launching);
      if (!s.ok()) return AbortLocked(std::move(s));
    }
  }

  // One round of the watchdog (also run by Wait): launches what can be launched, completes
  // finished ops in order, and aborts on an asynchronous NCCL error, a CUDA error or an op past
  // its deadline. Needs mu and the device current.
  void PollLocked(bool flush_p2p) {
    PumpLocked(flush_p2p);
    while (broken.ok() && !running.empty()) {
      const OpPtr& op = running.front();
      const cudaError_t e = cudaEventQuery(op->end);
      if (e == cudaErrorNotReady) break;
      if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return AbortLocked(
            Status(StatusCode::kUnavailable, op->label + ": CUDA error: " + CudaError(e)), op);
      }
      FinishLocked(op, Status());
      running.pop_front();
    }
    if (!broken.ok() || comm == nullptr) return;
    if (launching.empty()) {  // while launching, PumpLocked has just looked at the state
      ncclResult_t state = ncclSuccess;
      const ncclResult_t r = ncclCommGetAsyncError(comm, &state);
      if (r != ncclSuccess) state = r;
      if (state != ncclSuccess && state != ncclInProgress) {
        const OpPtr trigger = running.empty() ? nullptr : running.front();
        const std::string label = trigger ? trigger->label : name;
        return AbortLocked(NcclFailure(label + " (asynchronous error)", state, comm), trigger);
      }
    }
    // The watchdog's limits (see Op::deadline). Only the oldest running op can be executing.
    const auto now = Clock::now();
    for (const auto& op : launching) {
      if (now >= op->deadline) return TimeOutLocked(op, "watchdog: NCCL did not launch it");
    }
    if (running.empty()) return;
    const OpPtr& front = running.front();
    if (!front->armed) {
      const cudaError_t e = cudaEventQuery(front->ready);
      if (e == cudaErrorNotReady) return;
      if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return AbortLocked(
            Status(StatusCode::kUnavailable, front->label + ": CUDA error: " + CudaError(e)),
            front);
      }
      front->armed = true;
      front->deadline = internal::DeadlineAfter(timeout);
    }
    if (now >= front->deadline) {
      return TimeOutLocked(front, "watchdog: not complete on the device");
    }
  }

  void TimeOutLocked(const OpPtr& op, const std::string& detail) {
    AbortLocked(
        internal::TimedOut(name, op->desc.c_str(), timeout, detail + "; communicator aborted"), op);
  }

  bool HasLaunchedWork() const { return !launching.empty() || !running.empty(); }
};

void WatchdogLoop(Core* c) {
  // This thread's current device is the group's for good.
  if (cudaSetDevice(c->device) != cudaSuccess) (void)cudaGetLastError();
  std::unique_lock<std::mutex> lock(c->mu);
  while (!c->stopping) {
    // Held point-to-point ops are not in NCCL yet: nothing to watch until they launch.
    if (c->broken.ok() && c->HasLaunchedWork()) {
      c->cv.wait_for(lock, kWatchdogInterval);
    } else {
      c->cv.wait(lock, [&] { return c->stopping || (c->broken.ok() && c->HasLaunchedWork()); });
    }
    if (c->stopping) break;
    if (c->broken.ok()) c->PollLocked(/*flush_p2p=*/false);
  }
}

class NcclWork final : public Work {
 public:
  NcclWork(std::shared_ptr<Core> core, OpPtr op) : core_(std::move(core)), op_(std::move(op)) {}

  Status Wait(milliseconds timeout) override {
    const auto start = Clock::now();
    const auto deadline = internal::DeadlineAfter(timeout);
    std::unique_lock<std::mutex> lock(core_->mu);
    if (op_->done) return op_->status;
    DeviceGuard guard(core_->device);
    if (!guard.status().ok()) return guard.status().WithContext(op_->label);
    bool flush = true;  // the first round launches held point-to-point ops, this one included
    while (true) {
      core_->PollLocked(flush);
      flush = false;
      if (op_->done) return op_->status;
      const auto now = Clock::now();
      if (now >= deadline) {
        // A hung NCCL kernel stalls the comm stream: the group cannot be waited for again.
        core_->AbortLocked(
            internal::TimedOut(core_->name, op_->desc.c_str(), timeout, "communicator aborted"),
            op_);
        return op_->status;
      }
      core_->cv.wait_for(lock, now - start < kWaitSpin ? kWaitFastPoll : kWaitSlowPoll);
      if (op_->done) return op_->status;
    }
  }

 private:
  std::shared_ptr<Core> core_;
  OpPtr op_;
};

// Creates the comm stream, the barrier's scratch int and starts the watchdog. Device current.
Status StartCore(Core& c) {
  cudaError_t e = cudaStreamCreateWithFlags(&c.stream, cudaStreamNonBlocking);
  if (e == cudaSuccess) e = cudaMalloc(reinterpret_cast<void**>(&c.barrier_buf), sizeof(int));
  if (e == cudaSuccess) e = cudaMemset(c.barrier_buf, 0, sizeof(int));
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return Status(StatusCode::kUnavailable,
                  c.name + ": setting up the comm stream: " + CudaError(e));
  }
  c.watchdog = std::thread(WatchdogLoop, &c);
  return Status();
}

// Polls `comm` until it leaves ncclInProgress. DEADLINE_EXCEEDED at `deadline` (the caller
// aborts), the NCCL error otherwise.
Status AwaitReady(ncclComm_t comm, Clock::time_point deadline, const std::string& what,
                  milliseconds timeout,
                  const char* detail = "a rank did not join; communicator aborted") {
  while (true) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) state = r;
    if (state == ncclSuccess) return Status();
    if (state != ncclInProgress) return NcclFailure(what, state, comm);
    if (Clock::now() >= deadline) {
      return DeadlineExceeded(what + " timed out after " + std::to_string(timeout.count()) +
                              " ms (" + detail + ")");
    }
    std::this_thread::sleep_for(kStatePoll);
  }
}

ncclConfig_t NonBlockingConfig(const std::string& name) {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  config.commName = name.c_str();  // name lives in the Core, which outlives the communicator
  return config;
}

class NcclGroup final : public ProcessGroup {
 public:
  explicit NcclGroup(std::shared_ptr<Core> core) : core_(std::move(core)) {}

  ~NcclGroup() override {
    {
      std::lock_guard<std::mutex> lock(core_->mu);
      core_->stopping = true;
      core_->cv.notify_all();
    }
    if (core_->watchdog.joinable()) core_->watchdog.join();
    std::lock_guard<std::mutex> lock(core_->mu);
    DeviceGuard guard(core_->device);
    if (core_->broken.ok()) core_->PollLocked(/*flush_p2p=*/false);
    if (!core_->Idle()) {
      core_->AbortLocked(Cancelled(name() + ": group destroyed with ops in flight"));
    } else if (core_->broken.ok() && core_->comm != nullptr) {
      // A clean teardown: ncclCommFinalize flushes (non-blocking, polled), then destroy.
      // Bounded: a peer that never finalises makes us abort instead.
      ncclResult_t r = ncclCommFinalize(core_->comm);
      Status s = r == ncclSuccess || r == ncclInProgress
                     ? AwaitReady(core_->comm, internal::DeadlineAfter(core_->timeout),
                                  name() + ": finalize", core_->timeout,
                                  "a peer did not finalize; aborting instead")
                     : NcclFailure(name() + ": finalize", r, core_->comm);
      if (s.ok()) {
        r = ncclCommDestroy(core_->comm);
        if (r != ncclSuccess)
          spdlog::warn("{}: ncclCommDestroy: {}", name(), ncclGetErrorString(r));
        core_->comm = nullptr;
        core_->broken = Cancelled(name() + ": group destroyed");
      } else {
        spdlog::warn("{}", s.ToString());
        core_->AbortLocked(std::move(s));
      }
    }
    if (core_->broken.ok()) core_->broken = Cancelled(name() + ": group destroyed");
    // The stream and scratch are released with the Core (Works may still hold it).
  }

  int rank() const override { return core_->rank; }
  int size() const override { return core_->size; }
  const std::string& name() const override { return core_->name; }

  std::unique_ptr<Work> AllReduce(void* buf, size_t count, ElemType type, ReduceOp op) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "all_reduce", buf, count));
    if (count == 0) return Empty("all_reduce");
    const ncclDataType_t dt = NcclType(type);
    const ncclRedOp_t rop = NcclOp(op);
    return Issue("all_reduce", -1, [=](ncclComm_t comm, cudaStream_t s) {
      return ncclAllReduce(buf, buf, count, dt, rop, comm, s);
    });
  }

  std::unique_ptr<Work> ReduceScatter(const void* in, void* out, size_t count, ElemType type,
                                      ReduceOp op) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "reduce_scatter", in, count));
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "reduce_scatter", out, count));
    if (count == 0) return Empty("reduce_scatter");
    const ncclDataType_t dt = NcclType(type);
    const ncclRedOp_t rop = NcclOp(op);
    return Issue("reduce_scatter", -1, [=](ncclComm_t comm, cudaStream_t s) {
      return ncclReduceScatter(in, out, count, dt, rop, comm, s);
    });
  }

  std::unique_ptr<Work> AllGather(const void* in, void* out, size_t count, ElemType type) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "all_gather", in, count));
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "all_gather", out, count));
    if (count == 0) return Empty("all_gather");
    const ncclDataType_t dt = NcclType(type);
    return Issue("all_gather", -1, [=](ncclComm_t comm, cudaStream_t s) {
      return ncclAllGather(in, out, count, dt, comm, s);
    });
  }

  std::unique_ptr<Work> Broadcast(void* buf, size_t count, ElemType type, int root) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "broadcast", buf, count));
    RETURN_WORK_IF_ERROR(
        internal::CheckPeer(name(), "broadcast", "root", root, rank(), size(), true));
    if (count == 0) return Empty("broadcast");
    const ncclDataType_t dt = NcclType(type);
    return Issue("broadcast", -1, [=](ncclComm_t comm, cudaStream_t s) {
      return ncclBroadcast(buf, buf, count, dt, root, comm, s);
    });
  }

  std::unique_ptr<Work> Barrier() override {
    int* scratch = core_->barrier_buf;
    // max, not sum: the scratch int stays 0 however many barriers run.
    return Issue("barrier", -1, [=](ncclComm_t comm, cudaStream_t s) {
      return ncclAllReduce(scratch, scratch, 1, ncclInt32, ncclMax, comm, s);
    });
  }

  std::unique_ptr<Work> Send(const void* buf, size_t count, ElemType type, int dst,
                             int tag) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "send", buf, count));
    RETURN_WORK_IF_ERROR(internal::CheckPeer(name(), "send", "dst", dst, rank(), size(), false));
    RETURN_WORK_IF_ERROR(internal::CheckTag(name(), "send", tag));
    if (count == 0) return Empty("send");
    const ncclDataType_t dt = NcclType(type);
    return Issue(
        "send", dst,
        [=](ncclComm_t comm, cudaStream_t s) { return ncclSend(buf, count, dt, dst, comm, s); },
        tag);
  }

  std::unique_ptr<Work> Recv(void* buf, size_t count, ElemType type, int src, int tag) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "recv", buf, count));
    RETURN_WORK_IF_ERROR(internal::CheckPeer(name(), "recv", "src", src, rank(), size(), false));
    RETURN_WORK_IF_ERROR(internal::CheckTag(name(), "recv", tag));
    if (count == 0) return Empty("recv");
    const ncclDataType_t dt = NcclType(type);
    return Issue(
        "recv", src,
        [=](ncclComm_t comm, cudaStream_t s) { return ncclRecv(buf, count, dt, src, comm, s); },
        tag);
  }

  Result<std::unique_ptr<ProcessGroup>> Split(const std::vector<int>& ranks,
                                              const std::string& new_name) override {
    int index = 0;
    RETURN_IF_ERROR(internal::CheckSplitRanks(name(), new_name, ranks, rank(), size(), &index));
    const std::string what = name() + ": split into '" + new_name + "'";
    const int color = *std::min_element(ranks.begin(), ranks.end());
    std::lock_guard<std::mutex> lock(core_->mu);
    if (!core_->broken.ok()) return core_->BrokenFor(what);
    DeviceGuard guard(core_->device);
    RETURN_IF_ERROR(guard.status().WithContext(what));
    const auto deadline = internal::DeadlineAfter(core_->timeout);
    // ncclCommSplit is a call on the parent: everything issued before it goes first, and the
    // parent must have left ncclInProgress. The lock is held throughout (bounded by the
    // deadline), so no other thread issues on the parent meanwhile.
    core_->PumpLocked(/*flush_p2p=*/true);
    while (core_->broken.ok() && (!core_->launching.empty() || !core_->queued.empty())) {
      if (Clock::now() >= deadline) {
        core_->AbortLocked(internal::TimedOut(name(), "split", core_->timeout,
                                              "earlier ops did not launch; communicator aborted"));
        return core_->broken;
      }
      std::this_thread::sleep_for(kStatePoll);
      core_->PumpLocked(/*flush_p2p=*/true);
    }
    if (!core_->broken.ok()) return core_->BrokenFor(what);
    const int k = core_->next_split++;
    auto child = std::make_shared<Core>();
    child->name = new_name;
    child->prefix = core_->prefix + "/split" + std::to_string(k) + "@" + std::to_string(color);
    child->rank = index;
    child->size = static_cast<int>(ranks.size());
    child->device = core_->device;
    child->timeout = core_->timeout;
    child->store = core_->store;
    child->compute = core_->compute;
    ncclConfig_t config = NonBlockingConfig(child->name);
    ncclComm_t comm = nullptr;
    const ncclResult_t r = ncclCommSplit(core_->comm, color, index, &comm, &config);
    child->comm = comm;  // from here the child's destructor aborts it unless it is handed over
    Status s;
    if (r != ncclSuccess && r != ncclInProgress) {
      s = NcclFailure(what, r, core_->comm);
    } else {
      // The parent leaves ncclInProgress, and the child becomes ready, once every rank of the
      // parent has called ncclCommSplit.
      s = AwaitReady(core_->comm, deadline, what, core_->timeout);
      if (s.ok() && comm != nullptr) s = AwaitReady(comm, deadline, what, core_->timeout);
      if (s.ok() && comm == nullptr)
        s = Internal(what + ": ncclCommSplit returned no communicator");
    }
    if (!s.ok()) {
      core_->AbortLocked(s);  // the parent's bootstrap may be mid-exchange: not reusable
      return s;
    }
    RETURN_IF_ERROR(StartCore(*child));
    return std::unique_ptr<ProcessGroup>(std::make_unique<NcclGroup>(std::move(child)));
  }

  void Abort() override {
    std::lock_guard<std::mutex> lock(core_->mu);
    DeviceGuard guard(core_->device);
    core_->AbortLocked(Cancelled(name() + ": group aborted by rank " + std::to_string(rank())));
  }

  Status SetComputeStream(void* stream) {
    std::lock_guard<std::mutex> lock(core_->mu);
    core_->compute = static_cast<cudaStream_t>(stream);
    return Status();
  }

  std::function<void()> StallNextOp() {
    // Leaked on purpose (test only, one bool per call): the host function may run after the
    // group and the returned function are gone.
    auto* flag = new std::atomic<bool>(false);
    std::lock_guard<std::mutex> lock(core_->mu);
    core_->stall_next = flag;
    return [flag] { flag->store(true); };
  }

  Status StreamWaitForIssued(void* stream) {
    const std::string what = name() + ": stream wait";
    std::lock_guard<std::mutex> lock(core_->mu);
    if (!core_->broken.ok()) return core_->BrokenFor(what);
    DeviceGuard guard(core_->device);
    RETURN_IF_ERROR(guard.status().WithContext(what));
    // Every issued op must be in the comm stream before the event: while NCCL is still
    // launching (ncclInProgress, e.g. connecting to peers on a first op) poll, bounded.
    const auto deadline = internal::DeadlineAfter(core_->timeout);
    core_->PumpLocked(/*flush_p2p=*/true);
    while (core_->broken.ok() && (!core_->launching.empty() || !core_->queued.empty())) {
      if (Clock::now() >= deadline) {
        core_->AbortLocked(internal::TimedOut(name(), "stream wait", core_->timeout,
                                              "ops did not launch; communicator aborted"));
        break;
      }
      std::this_thread::sleep_for(kStatePoll);
      core_->PumpLocked(/*flush_p2p=*/true);
    }
    if (!core_->broken.ok()) return core_->BrokenFor(what);
    cudaEvent_t ev = nullptr;
    cudaError_t e = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
    if (e == cudaSuccess) e = cudaEventRecord(ev, core_->stream);
    if (e == cudaSuccess) e = cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), ev, 0);
    if (ev != nullptr) (void)cudaEventDestroy(ev);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      return Internal(what + ": " + CudaError(e));
    }
    return Status();
  }

 private:
  // Count-0 ops need no NCCL call (every rank passes the same count), but still fail on a
  // broken group.
  std::unique_ptr<Work> Empty(const char* what) {
    std::lock_guard<std::mutex> lock(core_->mu);
    if (!core_->broken.ok()) {
      return internal::Done(core_->BrokenFor(internal::OpLabel(name(), what)));
    }
    return internal::Done();
  }

  std::unique_ptr<Work> Issue(const char* what, int peer,
                              std::function<ncclResult_t(ncclComm_t, cudaStream_t)> launch,
                              int tag = 0) {
    auto op = std::make_shared<Op>();
    op->p2p = peer >= 0;
    op->send = std::strcmp(what, "send") == 0;
    op->peer = peer;
    op->tag = tag;
    op->desc = what;
    if (op->p2p) {
      op->desc += std::string(op->send ? " to" : " from") + " rank " + std::to_string(peer) +
                  " (tag " + std::to_string(tag) + ")";
    }
    op->label = internal::OpLabel(name(), op->desc.c_str());
    op->launch = std::move(launch);
    std::lock_guard<std::mutex> lock(core_->mu);
    if (!core_->broken.ok()) return internal::Done(core_->BrokenFor(op->label));
    DeviceGuard guard(core_->device);
    RETURN_WORK_IF_ERROR(guard.status().WithContext(op->label));
    cudaError_t e = cudaEventCreateWithFlags(&op->ready, cudaEventDisableTiming);
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&op->end, cudaEventDisableTiming);
    // The op waits (on the device) for what the caller enqueued on the compute stream so far.
    if (e == cudaSuccess) e = cudaEventRecord(op->ready, core_->compute);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      return internal::Done(Internal(op->label + ": " + CudaError(e)));
    }
    core_->queued.push_back(op);
    // A collective launches the point-to-point ops held before it (issue order is stream order).
    core_->PumpLocked(/*flush_p2p=*/!op->p2p);
    core_->cv.notify_all();  // the watchdog watches the new op
    if (op->done) return internal::Done(op->status);
    return std::make_unique<NcclWork>(core_, op);
  }

  std::shared_ptr<Core> core_;
};

NcclGroup* AsNccl(ProcessGroup& group) { return dynamic_cast<NcclGroup*>(&group); }

Status CheckOptions(const NcclGroupOptions& o, const std::string& name) {
  if (o.size < 1 || o.rank < 0 || o.rank >= o.size) {
    return InvalidArgument(name + ": nccl group rank " + std::to_string(o.rank) + " of size " +
                           std::to_string(o.size) + " is out of range");
  }
  if (o.timeout.count() <= 0)
    return InvalidArgument(name + ": nccl group timeout must be positive");
  if (o.device < 0) {
    return InvalidArgument(name + ": CUDA device index " + std::to_string(o.device) +
                           " is negative");
  }
  if (!o.unique_id.empty() && o.unique_id.size() != kNcclUniqueIdBytes) {
    return InvalidArgument(name + ": nccl unique id has " + std::to_string(o.unique_id.size()) +
                           " bytes, expected " + std::to_string(kNcclUniqueIdBytes));
  }
  if (o.size > 1 && o.unique_id.empty()) {
    if (!o.store) {
      return InvalidArgument(name + ": nccl group of " + std::to_string(o.size) +
                             " ranks needs a store or a pre-shared unique id");
    }
    if (o.prefix.empty()) {
      return InvalidArgument(name + ": nccl group rendezvous through a store needs a key prefix");
    }
  }
  return Status();
}

Status CheckDevice(int device, const std::string& name) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return Status(StatusCode::kUnavailable,
                  name + ": no usable CUDA device (cudaGetDeviceCount: " + CudaError(e) + ")");
  }
  if (count == 0) {
    return Status(StatusCode::kUnavailable, name + ": no CUDA device visible");
  }
  if (device >= count) {
    return InvalidArgument(name + ": CUDA device " + std::to_string(device) + " requested but " +
                           std::to_string(count) + " visible");
  }
  return Status();
}

}  // namespace

bool NcclAvailable() { return true; }

Result<std::string> NcclUniqueId() {
  ncclUniqueId id;
  const ncclResult_t r = ncclGetUniqueId(&id);
  if (r != ncclSuccess) {
    return Status(StatusCode::kUnavailable, "nccl: ncclGetUniqueId: " + NcclError(r, nullptr));
  }
  return std::string(id.internal, sizeof(id.internal));
}

Result<std::string> ShareNcclUniqueId(ProcessGroup& cpu_group, milliseconds timeout) {
  // Byte 0: 1 when rank 0 made an id (so the others never wait for one that is not coming).
  std::string buf(1 + kNcclUniqueIdBytes, '\0');
  Status made;
  if (cpu_group.rank() == 0) {
    Result<std::string> id = NcclUniqueId();
    if (id.ok()) {
      buf[0] = 1;
      std::memcpy(buf.data() + 1, id->data(), kNcclUniqueIdBytes);
    } else {
      made = id.status();
    }
  }
  RETURN_IF_ERROR(cpu_group.Broadcast(buf.data(), buf.size(), ElemType::kU8, 0)
                      ->Wait(timeout)
                      .WithContext(cpu_group.name() + ": sharing the nccl unique id"));
  if (!made.ok()) return made;
  if (buf[0] != 1) {
    return Status(StatusCode::kUnavailable, cpu_group.name() +
                                                ": sharing the nccl unique id: rank 0 could not "
                                                "make one (see its log)");
  }
  return buf.substr(1);
}

Result<std::unique_ptr<ProcessGroup>> CreateNcclGroup(const NcclGroupOptions& options) {
  const auto deadline = internal::DeadlineAfter(options.timeout);
  const std::string name = !options.name.empty()     ? options.name
                           : !options.prefix.empty() ? options.prefix
                                                     : std::string("nccl");
  RETURN_IF_ERROR(CheckOptions(options, name));
  RETURN_IF_ERROR(CheckDevice(options.device, name));
  const std::string what =
      name + ": forming nccl group (rank " + std::to_string(options.rank) + " of " +
      std::to_string(options.size) + ", device " + std::to_string(options.device) +
      (options.prefix.empty() ? "" : ", prefix '" + options.prefix + "'") + ")";
  DeviceGuard guard(options.device);
  RETURN_IF_ERROR(guard.status().WithContext(what));

  // The unique id: pre-shared, made here (one rank, or rank 0 publishing it), or from the store.
  std::string id_bytes = options.unique_id;
  if (id_bytes.empty()) {
    const std::string key = options.prefix + "/nccl_id";
    if (options.size == 1 || options.rank == 0) {
      ASSIGN_OR_RETURN(id_bytes, NcclUniqueId());
      if (options.size > 1) RETURN_IF_ERROR(options.store->Set(key, id_bytes).WithContext(what));
    } else {
      Result<std::string> v = options.store->Get(key, options.timeout);
      if (!v.ok()) return v.status().WithContext(what);
      id_bytes = std::move(*v);
      if (id_bytes.size() != kNcclUniqueIdBytes) {
        return InvalidArgument(what + ": store key '" + key + "' holds " +
                               std::to_string(id_bytes.size()) + " bytes, not an nccl unique id");
      }
    }
  }
  ncclUniqueId id;
  std::memcpy(id.internal, id_bytes.data(), sizeof(id.internal));

  auto core = std::make_shared<Core>();
  core->name = name;
  core->prefix = options.prefix;
  core->rank = options.rank;
  core->size = options.size;
  core->device = options.device;
  core->timeout = options.timeout;
  core->store = options.store;
  core->compute = static_cast<cudaStream_t>(options.compute_stream);

  // Non-blocking init, polled up to what is left of the timeout (the store wait used some).
  ncclConfig_t config = NonBlockingConfig(core->name);
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRankConfig(&comm, options.size, id, options.rank, &config);
  core->comm = comm;  // ~Core aborts it on every early return below
  if (r != ncclSuccess && r != ncclInProgress) return NcclFailure(what, r, comm);
  if (comm == nullptr) return Internal(what + ": ncclCommInitRankConfig returned no communicator");
  RETURN_IF_ERROR(AwaitReady(comm, deadline, what, options.timeout));
  RETURN_IF_ERROR(StartCore(*core));
  return std::unique_ptr<ProcessGroup>(std::make_unique<NcclGroup>(std::move(core)));
}

Status SetNcclComputeStream(ProcessGroup& group, void* stream) {
  NcclGroup* g = AsNccl(group);
  if (g == nullptr) {
    return InvalidArgument(group.name() + ": SetNcclComputeStream: not an NCCL group");
  }
  return g->SetComputeStream(stream);
}

Result<std::function<void()>> NcclStallNextOpForTesting(ProcessGroup& group) {
  NcclGroup* g = AsNccl(group);
  if (g == nullptr) {
    return InvalidArgument(group.name() + ": NcclStallNextOpForTesting: not an NCCL group");
  }
  return g->StallNextOp();
}

Status NcclStreamWaitForIssued(ProcessGroup& group, void* stream) {
  NcclGroup* g = AsNccl(group);
  if (g == nullptr) {
    return InvalidArgument(group.name() + ": NcclStreamWaitForIssued: not an NCCL group");
  }
  return g->StreamWaitForIssued(stream);
}

}  // namespace strata::comm
