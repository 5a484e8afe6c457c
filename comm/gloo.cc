#include "comm/gloo.h"

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>
#include <gloo/types.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "comm/backend_util.h"
#include "comm/elementwise.h"

namespace strata::comm {

namespace {

using std::chrono::milliseconds;

// Slot prefixes of our own Gloo traffic; Gloo's collectives use 0x01..0x08.
constexpr uint8_t kReduceScatterSlotPrefix = 0x40;
constexpr uint8_t kP2PSlotPrefix = 0x41;

bool LooksLikeTimeout(const std::string& msg) {
  return msg.find("imed out") != std::string::npos || msg.find("imeout") != std::string::npos ||
         msg.find("DEADLINE_EXCEEDED") != std::string::npos;
}

// Our Store seen through Gloo's rendezvous interface. Gloo expects failures as exceptions;
// the Status is kept so MakeGlooGroup can report the store's own code and message.
class StoreAdapter final : public gloo::rendezvous::Store {
 public:
  StoreAdapter(comm::Store& store, std::string prefix, milliseconds timeout)
      : store_(store), prefix_(std::move(prefix)), timeout_(timeout) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    Check(store_.Set(Key(key), std::string(data.begin(), data.end())));
  }
  std::vector<char> get(const std::string& key) override {
    Result<std::string> v = store_.Get(Key(key), timeout_);
    Check(v.status());
    return std::vector<char>(v->begin(), v->end());
  }
  void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }
  void wait(const std::vector<std::string>& keys, const milliseconds& timeout) override {
    std::vector<std::string> full;
    for (const auto& k : keys) full.push_back(Key(k));
    Check(store_.Wait(full, timeout.count() > 0 ? timeout : timeout_));
  }

  const Status& error() const { return error_; }

 private:
  std::string Key(const std::string& k) const { return prefix_ + "/" + k; }
  void Check(const Status& s) {
    if (s.ok()) return;
    error_ = s;
    throw gloo::IoException(s.ToString());
  }

  comm::Store& store_;
  const std::string prefix_;
  const milliseconds timeout_;
  Status error_;
};

// One op of a group as its Work sees it. Fields guarded by Core::mu.
struct Op {
  std::string label;  // "<group>: <op>"
  bool done = false;
  Status status;
};

// A thread that runs tasks in order: the collective lane, or one point-to-point lane per
// (peer, direction).
struct Lane {
  std::deque<std::function<void()>> tasks;
  std::thread thread;
};

// State shared by a group, its lanes and its Works (which may outlive the group).
struct Core {
  std::string name;
  std::string prefix;
  int rank = 0;
  int size = 1;
  milliseconds timeout{0};
  GlooOptions options;
  std::shared_ptr<comm::Store> store;
  std::shared_ptr<gloo::transport::Device> device;
  std::shared_ptr<gloo::rendezvous::Context> context;  // null when size == 1

  std::mutex mu;
  std::condition_variable cv;  // lane activity and op completion
  Status broken;               // after a failure or Abort, every later op fails at once
  bool stopping = false;
  int busy = 0;  // tasks running right now
  std::set<std::shared_ptr<Op>> pending;
  std::map<int, std::unique_ptr<Lane>> lanes;  // -1: collectives; 2*peer (+1 for recv): p2p
  uint32_t next_tag = 0;
  int next_split = 0;
  std::vector<uint8_t> scratch;  // reduce-scatter buffers; used by the collective lane only

  // Marks op finished (once). Needs mu.
  void FinishLocked(const std::shared_ptr<Op>& op, Status s) {
    if (!op->done) {
      op->done = true;
      op->status = std::move(s);
    }
    pending.erase(op);
    cv.notify_all();
  }

  Status BrokenFor(const std::string& label) const {
    return Status(broken.code(), label + " failed: " + broken.message());
  }
};

void LaneLoop(Core* core, Lane* lane) {
  std::unique_lock<std::mutex> lock(core->mu);
  while (true) {
    core->cv.wait(lock, [&] { return core->stopping || !lane->tasks.empty(); });
    if (lane->tasks.empty()) return;
    std::function<void()> task = std::move(lane->tasks.front());
    lane->tasks.pop_front();
    ++core->busy;
    lock.unlock();
    task();
    task = nullptr;
    lock.lock();
    --core->busy;
    core->cv.notify_all();
  }
}

// Runs body, turning Gloo's exceptions into a Status that names the op.
Status Guarded(const std::string& label, const std::function<void()>& body) {
  try {
    body();
    return Status();
  } catch (const gloo::IoException& e) {
    const std::string msg = e.what();
    if (LooksLikeTimeout(msg)) {
      return Status(StatusCode::kDeadlineExceeded, label + " timed out inside gloo: " + msg);
    }
    return Status(StatusCode::kUnavailable, label + ": transport error: " + msg);
  } catch (const std::exception& e) {
    return Internal(label + ": gloo error: " + e.what());
  }
}

class GlooWork final : public Work {
 public:
  GlooWork(std::shared_ptr<Core> core, std::shared_ptr<Op> op)
      : core_(std::move(core)), op_(std::move(op)) {}

  Status Wait(milliseconds timeout) override {
    std::unique_lock<std::mutex> lock(core_->mu);
    if (core_->cv.wait_until(lock, internal::DeadlineAfter(timeout), [&] { return op_->done; })) {
      return op_->status;
    }
    return Status(StatusCode::kDeadlineExceeded,
                  op_->label + " timed out after " + std::to_string(timeout.count()) + " ms");
  }

 private:
  std::shared_ptr<Core> core_;
  std::shared_ptr<Op> op_;
};

template <typename T>
void GlooAllreduce(const std::shared_ptr<gloo::Context>& ctx, T* buf, size_t count, ElemType type,
                   ReduceOp op, uint32_t tag, milliseconds timeout) {
  gloo::AllreduceOptions o(ctx);
  o.setOutput(buf, count);
  o.setReduceFunction([type, op](void* c, const void* a, const void* b, size_t n) {
    internal::Combine(c, a, b, n, type, op);
  });
  o.setTag(tag);
  o.setTimeout(timeout);
  gloo::allreduce(o);
}

// In-place all-reduce of `count` elements of `type` (not bf16/f16), without the kAvg division.
void AllreduceNative(const std::shared_ptr<gloo::Context>& ctx, void* buf, size_t count,
                     ElemType type, ReduceOp op, uint32_t tag, milliseconds timeout) {
  switch (type) {
    case ElemType::kF32:
      return GlooAllreduce(ctx, static_cast<float*>(buf), count, type, op, tag, timeout);
    case ElemType::kF64:
      return GlooAllreduce(ctx, static_cast<double*>(buf), count, type, op, tag, timeout);
    case ElemType::kI32:
      return GlooAllreduce(ctx, static_cast<int32_t*>(buf), count, type, op, tag, timeout);
    case ElemType::kI64:
      return GlooAllreduce(ctx, static_cast<int64_t*>(buf), count, type, op, tag, timeout);
    case ElemType::kU8:
      return GlooAllreduce(ctx, static_cast<uint8_t*>(buf), count, type, op, tag, timeout);
    case ElemType::kBF16:
    case ElemType::kF16:
      break;
  }
  CHECK_MSG(false, "AllreduceNative: bf16/f16 go through fp32");
}

void ThrowIfAborted(bool completed, const char* what) {
  if (!completed) throw gloo::IoException(std::string(what) + " aborted");
}

// Ring reduce-scatter (Gloo 2022 has no unbound-buffer reduce_scatter). n-1 steps; in step k
// rank r sends the partial sum of block r-1-k to r+1 and receives the partial sum of block
// r-2-k from r-1, adding its own contribution, so after n-1 steps it holds the full reduction
// of its own block r. Partial sums travel in `wtype` (fp32 for bf16/f16: rounded once, at
// the end). Two block-sized buffers alternate between receiving and sending; each block moves
// in segments, all posted at once, so adding one segment overlaps receiving the next (a
// (pair, slot) delivers in posting order). The result (wtype, not yet averaged) is left in
// the returned pointer, which lies in c.scratch.
uint8_t* RingReduceScatter(Core& c, const void* in, ElemType type, size_t count, ReduceOp op,
                           uint32_t tag) {
  constexpr size_t kSegmentBytes = 512 * 1024;
  const int n = c.size;
  const int r = c.rank;
  const bool half = internal::IsHalf(type);
  const ElemType wtype = half ? ElemType::kF32 : type;
  const size_t es = ElemSize(wtype);
  const size_t block = count * es;
  const size_t seg = std::max(es, kSegmentBytes / es * es);
  const size_t segments = (block + seg - 1) / seg;
  // Reused across ops (only this group's collective lane touches it): no page faults per op.
  if (c.scratch.size() < 3 * block) c.scratch.resize(3 * block);
  uint8_t* bufs[2] = {c.scratch.data(), c.scratch.data() + block};
  uint8_t* own_f32 = c.scratch.data() + 2 * block;  // bf16/f16: one block of ours, in fp32
  const auto* in_bytes = static_cast<const uint8_t*>(in);
  // This rank's contribution to block b, in wtype.
  auto own = [&](int b) -> const uint8_t* {
    if (!half) return in_bytes + static_cast<size_t>(b) * count * ElemSize(type);
    internal::HalfToFloat(reinterpret_cast<float*>(own_f32),
                          in_bytes + static_cast<size_t>(b) * count * ElemSize(type), count, type);
    return own_f32;
  };
  std::unique_ptr<gloo::transport::UnboundBuffer> ub[2] = {
      c.context->createUnboundBuffer(bufs[0], block),
      c.context->createUnboundBuffer(bufs[1], block)};
  const uint64_t slot = gloo::Slot::build(kReduceScatterSlotPrefix, tag);
  const int right = (r + 1) % n;
  const int left = (r + n - 1) % n;
  auto len = [&](size_t s) { return std::min(seg, block - s * seg); };
  auto mod = [n](int b) { return (b % n + n) % n; };
  // Step 0 sends our own contribution; for fp32/native types straight from the input.
  std::unique_ptr<gloo::transport::UnboundBuffer> first;
  if (half) {
    std::memcpy(bufs[1], own(mod(r - 1)), block);
  } else {
    first = c.context->createUnboundBuffer(
        const_cast<uint8_t*>(in_bytes) + static_cast<size_t>(mod(r - 1)) * block, block);
  }
  for (int k = 0; k < n - 1; ++k) {
    gloo::transport::UnboundBuffer* recv = ub[k % 2].get();
    gloo::transport::UnboundBuffer* send = k == 0 && !half ? first.get() : ub[(k + 1) % 2].get();
    uint8_t* acc = bufs[k % 2];
    for (size_t s = 0; s < segments; ++s) recv->recv(left, slot, s * seg, len(s));
    for (size_t s = 0; s < segments; ++s) send->send(right, slot, s * seg, len(s));
    const uint8_t* mine = own(mod(r - 2 - k));
    for (size_t s = 0; s < segments; ++s) {
      ThrowIfAborted(recv->waitRecv(c.timeout), "reduce_scatter recv");
      internal::Combine(acc + s * seg, acc + s * seg, mine + s * seg, len(s) / es, wtype, op);
    }
    for (size_t s = 0; s < segments; ++s) {
      ThrowIfAborted(send->waitSend(c.timeout), "reduce_scatter send");
    }
  }
  return bufs[(n - 2) % 2];
}

class GlooGroup final : public ProcessGroup {
 public:
  explicit GlooGroup(std::shared_ptr<Core> core) : core_(std::move(core)) {}

  ~GlooGroup() override {
    bool pending;
    {
      std::lock_guard<std::mutex> lock(core_->mu);
      pending = !core_->pending.empty();
    }
    if (pending) Abort();
    std::vector<std::thread> threads;
    {
      std::lock_guard<std::mutex> lock(core_->mu);
      core_->stopping = true;
      core_->cv.notify_all();
      for (auto& [key, lane] : core_->lanes) threads.push_back(std::move(lane->thread));
    }
    for (auto& t : threads) t.join();
    // A normal destruction closes the sockets softly (data already written still arrives);
    // Abort() has already hard-closed them.
    core_->context.reset();
    core_->device.reset();
  }

  int rank() const override { return core_->rank; }
  int size() const override { return core_->size; }
  const std::string& name() const override { return core_->name; }

  std::unique_ptr<Work> AllReduce(void* buf, size_t count, ElemType type, ReduceOp op) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "all_reduce", buf, count));
    if (count == 0 || size() == 1) return Local(buf, buf, count, type, op, 0, "all_reduce");
    return Collective("all_reduce", [=](Core& c, uint32_t tag) {
      const int n = c.size;
      if (internal::IsHalf(type)) {
        std::vector<float> f(count);
        internal::HalfToFloat(f.data(), buf, count, type);
        GlooAllreduce(c.context, f.data(), count, ElemType::kF32, op, tag, c.timeout);
        if (op == ReduceOp::kAvg) internal::DivideBy(f.data(), count, ElemType::kF32, n);
        internal::FloatToHalf(buf, f.data(), count, type);
      } else {
        AllreduceNative(c.context, buf, count, type, op, tag, c.timeout);
        if (op == ReduceOp::kAvg) internal::DivideBy(buf, count, type, n);
      }
    });
  }

  std::unique_ptr<Work> ReduceScatter(const void* in, void* out, size_t count, ElemType type,
                                      ReduceOp op) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "reduce_scatter", in, count));
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "reduce_scatter", out, count));
    if (count == 0 || size() == 1) return Local(in, out, count, type, op, 0, "reduce_scatter");
    return Collective("reduce_scatter", [=](Core& c, uint32_t tag) {
      const int n = c.size;
      const bool half = internal::IsHalf(type);
      const ElemType wtype = half ? ElemType::kF32 : type;
      const size_t block = count * ElemSize(wtype);
      uint8_t* mine = RingReduceScatter(c, in, type, count, op, tag);
      if (op == ReduceOp::kAvg) internal::DivideBy(mine, count, wtype, n);
      if (half) {
        internal::FloatToHalf(out, reinterpret_cast<const float*>(mine), count, type);
      } else {
        std::memcpy(out, mine, block);
      }
    });
  }

  std::unique_ptr<Work> AllGather(const void* in, void* out, size_t count, ElemType type) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "all_gather", in, count));
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "all_gather", out, count));
    if (count == 0 || size() == 1) {
      return Local(in, out, count, type, ReduceOp::kSum, 0, "all_gather");
    }
    return Collective("all_gather", [=](Core& c, uint32_t tag) {
      const size_t bytes = count * ElemSize(type);
      auto* o = static_cast<uint8_t*>(out);
      gloo::AllgatherOptions opts(c.context);
      // Gloo treats a missing input as "already in place in block rank of the output".
      if (in != o + c.rank * bytes) {
        opts.setInput(const_cast<uint8_t*>(static_cast<const uint8_t*>(in)), bytes);
      }
      opts.setOutput(o, bytes * c.size);
      opts.setTag(tag);
      opts.setTimeout(c.timeout);
      gloo::allgather(opts);
    });
  }

  std::unique_ptr<Work> Broadcast(void* buf, size_t count, ElemType type, int root) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "broadcast", buf, count));
    RETURN_WORK_IF_ERROR(
        internal::CheckPeer(name(), "broadcast", "root", root, rank(), size(), true));
    if (count == 0 || size() == 1) {
      return Local(buf, buf, count, type, ReduceOp::kSum, root, "broadcast");
    }
    return Collective("broadcast", [=](Core& c, uint32_t tag) {
      gloo::BroadcastOptions opts(c.context);
      opts.setOutput(static_cast<uint8_t*>(buf), count * ElemSize(type));
      opts.setRoot(root);
      opts.setTag(tag);
      opts.setTimeout(c.timeout);
      gloo::broadcast(opts);
    });
  }

  std::unique_ptr<Work> Barrier() override {
    if (size() == 1) return Local(nullptr, nullptr, 0, ElemType::kU8, ReduceOp::kSum, 0, "barrier");
    return Collective("barrier", [](Core& c, uint32_t tag) {
      gloo::BarrierOptions opts(c.context);
      opts.setTag(tag);
      opts.setTimeout(c.timeout);
      gloo::barrier(opts);
    });
  }

  std::unique_ptr<Work> Send(const void* buf, size_t count, ElemType type, int dst,
                             int tag) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "send", buf, count));
    RETURN_WORK_IF_ERROR(internal::CheckPeer(name(), "send", "dst", dst, rank(), size(), false));
    RETURN_WORK_IF_ERROR(internal::CheckTag(name(), "send", tag));
    return PointToPoint(const_cast<void*>(buf), count * ElemSize(type), dst, tag, true);
  }

  std::unique_ptr<Work> Recv(void* buf, size_t count, ElemType type, int src, int tag) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "recv", buf, count));
    RETURN_WORK_IF_ERROR(internal::CheckPeer(name(), "recv", "src", src, rank(), size(), false));
    RETURN_WORK_IF_ERROR(internal::CheckTag(name(), "recv", tag));
    return PointToPoint(buf, count * ElemSize(type), src, tag, false);
  }

  Result<std::unique_ptr<ProcessGroup>> Split(const std::vector<int>& ranks,
                                              const std::string& new_name) override {
    int index = 0;
    RETURN_IF_ERROR(internal::CheckSplitRanks(name(), new_name, ranks, rank(), size(), &index));
    int k;
    {
      std::lock_guard<std::mutex> lock(core_->mu);
      if (!core_->broken.ok()) return core_->BrokenFor(name() + ": split into '" + new_name + "'");
      k = core_->next_split++;
    }
    // Members of one new group share its smallest rank (MPI's "color"); the k-th Split call
    // is the same call on every rank, so (k, color) names the new group in the store.
    const int color = *std::min_element(ranks.begin(), ranks.end());
    const std::string prefix =
        core_->prefix + "/split" + std::to_string(k) + "@" + std::to_string(color);
    // The colour rank publishes the member list; the others check they agree with it.
    const std::string members = new_name + " " + internal::RankList(ranks);
    if (rank() == color) {
      RETURN_IF_ERROR(core_->store->Set(prefix + "/members", members).WithContext(name()));
    } else {
      Result<std::string> theirs = core_->store->Get(prefix + "/members", core_->timeout);
      if (!theirs.ok()) {
        return theirs.status().WithContext(name() + ": split into '" + new_name + "'");
      }
      if (*theirs != members) {
        return InvalidArgument(name() + ": split: rank " + std::to_string(rank()) + " passed '" +
                               members + "' but rank " + std::to_string(color) + " passed '" +
                               *theirs + "' (every member must pass the same name and ranks)");
      }
    }
    GlooOptions opts = core_->options;
    opts.name = new_name;
    return MakeGlooGroup(core_->store, prefix, index, static_cast<int>(ranks.size()),
                         core_->timeout, opts);
  }

  void Abort() override {
    std::vector<std::function<void()>> dropped;
    {
      std::lock_guard<std::mutex> lock(core_->mu);
      if (core_->broken.ok()) {
        core_->broken = Cancelled("group aborted by rank " + std::to_string(rank()));
      }
      for (const auto& op : core_->pending) {
        if (!op->done) {
          op->done = true;
          op->status = core_->BrokenFor(op->label);
        }
      }
      core_->pending.clear();
      // Queued tasks hold unbound buffers Gloo's pairs may still reference: drop them only
      // after the pairs are closed below.
      for (auto& [key, lane] : core_->lanes) {
        for (auto& task : lane->tasks) dropped.push_back(std::move(task));
        lane->tasks.clear();
      }
      core_->cv.notify_all();
    }
    // Interrupt whatever is blocked inside Gloo. Gloo has no abort call in this version, but
    // an application-side timeout on an unbound buffer "signals all pairs" of the context:
    // every pending send/recv throws and the sockets close, which peers see at once.
    if (core_->context) {
      try {
        char dummy = 0;
        auto probe = core_->context->createUnboundBuffer(&dummy, 1);
        probe->waitRecv(nullptr, milliseconds(0));
      } catch (const std::exception&) {
        // Expected: the probe's timeout is how the pairs get signalled.
      }
    }
    // When the running tasks have left Gloo, no op touches user memory any more.
    std::unique_lock<std::mutex> lock(core_->mu);
    core_->cv.wait(lock, [&] { return core_->busy == 0; });
    lock.unlock();
    dropped.clear();
  }

 private:
  // Size-1 groups and count-0 ops never touch Gloo: the result is local (count 0 needs no
  // synchronisation because every rank passes the same count).
  std::unique_ptr<Work> Local(const void* in, void* out, size_t count, ElemType type, ReduceOp op,
                              int /*root*/, const char* what) {
    {
      std::lock_guard<std::mutex> lock(core_->mu);
      if (!core_->broken.ok())
        return internal::Done(core_->BrokenFor(internal::OpLabel(name(), what)));
    }
    const size_t bytes = count * ElemSize(type);
    if (bytes == 0 || in == out) return internal::Done();
    // One rank: all-reduce and broadcast are in place (in == out); reduce-scatter and
    // all-gather copy in to out; avg over one rank and the fp32 round trip change nothing.
    (void)op;
    std::memmove(out, in, bytes);
    return internal::Done();
  }

  std::unique_ptr<Work> Collective(const char* what, std::function<void(Core&, uint32_t)> body) {
    auto op = std::make_shared<Op>();
    op->label = internal::OpLabel(name(), what);
    std::lock_guard<std::mutex> lock(core_->mu);
    if (!core_->broken.ok()) return internal::Done(core_->BrokenFor(op->label));
    const uint32_t tag = core_->next_tag++;
    core_->pending.insert(op);
    Core* c = core_.get();
    LaneFor(-1).tasks.push_back([c, op, tag, body = std::move(body)] {
      {
        std::lock_guard<std::mutex> l(c->mu);
        if (op->done) return;  // aborted while queued
        if (!c->broken.ok()) return c->FinishLocked(op, c->BrokenFor(op->label));
      }
      Status s = Guarded(op->label, [&] { body(*c, tag); });
      std::lock_guard<std::mutex> l(c->mu);
      // A Gloo failure leaves the context unusable (its pairs are closed).
      if (!s.ok() && c->broken.ok()) c->broken = s;
      c->FinishLocked(op, std::move(s));
    });
    core_->cv.notify_all();
    return std::make_unique<GlooWork>(core_, op);
  }

  // Posts the send/recv now (so exchanges cannot deadlock behind a queued collective) and
  // waits for its completion on the lane of (peer, direction).
  std::unique_ptr<Work> PointToPoint(void* buf, size_t bytes, int peer, int tag, bool is_send) {
    auto op = std::make_shared<Op>();
    op->label = name() + ": " + (is_send ? "send to" : "recv from") + " rank " +
                std::to_string(peer) + " (tag " + std::to_string(tag) + ")";
    if (bytes == 0)
      return Local(nullptr, nullptr, 0, ElemType::kU8, ReduceOp::kSum, 0,
                   is_send ? "send" : "recv");
    std::shared_ptr<gloo::transport::UnboundBuffer> ub;
    {
      std::lock_guard<std::mutex> lock(core_->mu);
      if (!core_->broken.ok()) return internal::Done(core_->BrokenFor(op->label));
    }
    Status posted = Guarded(op->label, [&] {
      ub = core_->context->createUnboundBuffer(buf, bytes);
      const uint64_t slot = gloo::Slot::build(kP2PSlotPrefix, static_cast<uint32_t>(tag));
      if (is_send) {
        ub->send(peer, slot);
      } else {
        ub->recv(peer, slot);
      }
    });
    std::lock_guard<std::mutex> lock(core_->mu);
    if (!posted.ok()) {
      if (core_->broken.ok()) core_->broken = posted;
      return internal::Done(posted);
    }
    core_->pending.insert(op);
    Core* c = core_.get();
    LaneFor(2 * peer + (is_send ? 0 : 1)).tasks.push_back([c, op, ub, is_send] {
      {
        std::lock_guard<std::mutex> l(c->mu);
        if (op->done) return;
      }
      Status s = Guarded(op->label, [&] {
        ThrowIfAborted(is_send ? ub->waitSend(c->timeout) : ub->waitRecv(c->timeout),
                       is_send ? "send" : "recv");
      });
      std::lock_guard<std::mutex> l(c->mu);
      if (!s.ok() && c->broken.ok()) c->broken = s;
      c->FinishLocked(op, std::move(s));
    });
    core_->cv.notify_all();
    return std::make_unique<GlooWork>(core_, op);
  }

  // The lane with `key`, started on first use. Needs core_->mu.
  Lane& LaneFor(int key) {
    auto& lane = core_->lanes[key];
    if (!lane) {
      lane = std::make_unique<Lane>();
      lane->thread = std::thread(LaneLoop, core_.get(), lane.get());
    }
    return *lane;
  }

  std::shared_ptr<Core> core_;
};

}  // namespace

Result<std::unique_ptr<ProcessGroup>> MakeGlooGroup(std::shared_ptr<Store> store,
                                                    const std::string& prefix, int rank, int size,
                                                    milliseconds timeout,
                                                    const GlooOptions& options) {
  const std::string name = options.name.empty() ? prefix : options.name;
  if (!store) return InvalidArgument(name + ": gloo group needs a store");
  if (size < 1 || rank < 0 || rank >= size) {
    return InvalidArgument(name + ": gloo group rank " + std::to_string(rank) + " of size " +
                           std::to_string(size) + " is out of range");
  }
  if (timeout.count() <= 0) {
    return InvalidArgument(name + ": gloo group timeout must be positive");
  }
  auto core = std::make_shared<Core>();
  core->name = name;
  core->prefix = prefix;
  core->rank = rank;
  core->size = size;
  core->timeout = timeout;
  core->options = options;
  core->store = store;
  if (size > 1) {
    StoreAdapter adapter(*store, prefix, timeout);
    gloo::transport::tcp::attr attr;
    if (!options.iface.empty()) {
      attr.iface = options.iface;
    } else {
      attr.hostname = options.hostname;
    }
    const std::string what = name + ": forming gloo group (rank " + std::to_string(rank) + " of " +
                             std::to_string(size) + ", prefix '" + prefix + "')";
    try {
      core->device = gloo::transport::tcp::CreateDevice(attr);
      core->context = std::make_shared<gloo::rendezvous::Context>(rank, size);
      core->context->setTimeout(timeout);
      core->context->connectFullMesh(adapter, core->device);
    } catch (const std::exception& e) {
      core->context.reset();
      core->device.reset();
      if (!adapter.error().ok()) return adapter.error().WithContext(what);
      const std::string msg = e.what();
      return Status(
          LooksLikeTimeout(msg) ? StatusCode::kDeadlineExceeded : StatusCode::kUnavailable,
          what + " failed: " + msg);
    }
  }
  return std::unique_ptr<ProcessGroup>(std::make_unique<GlooGroup>(std::move(core)));
}

}  // namespace strata::comm
