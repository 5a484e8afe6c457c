#include "comm/inprocess.h"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "comm/backend_util.h"
#include "comm/elementwise.h"

namespace strata::comm {

namespace {

enum class Kind { kAllReduce, kReduceScatter, kAllGather, kBroadcast, kBarrier };

const char* KindName(Kind k) {
  switch (k) {
    case Kind::kAllReduce:
      return "all_reduce";
    case Kind::kReduceScatter:
      return "reduce_scatter";
    case Kind::kAllGather:
      return "all_gather";
    case Kind::kBroadcast:
      return "broadcast";
    case Kind::kBarrier:
      return "barrier";
  }
  return "?";
}

// One collective: the k-th collective issued on every rank of a group.
struct Coll {
  uint64_t seq = 0;
  Kind kind = Kind::kBarrier;
  ElemType type = ElemType::kF32;
  ReduceOp op = ReduceOp::kSum;
  size_t count = 0;
  int root = 0;
  int defined_by = 0;  // the rank whose call fixed the signature above
  std::vector<const void*> in;
  std::vector<void*> out;
  std::vector<bool> joined;
  int arrived = 0;
  bool done = false;
  Status status;

  std::string Signature() const {
    std::string s = std::string(KindName(kind)) + "(" + internal::ElemTypeName(type) + " x " +
                    std::to_string(count);
    if (kind == Kind::kAllReduce || kind == Kind::kReduceScatter) {
      s += std::string(", ") + internal::ReduceOpName(op);
    }
    if (kind == Kind::kBroadcast) s += ", root " + std::to_string(root);
    return s + ")";
  }
};

// One point-to-point message half (a send or a recv) waiting for its partner.
struct P2P {
  const void* src = nullptr;  // send side
  void* dst = nullptr;        // recv side
  size_t bytes = 0;
  bool done = false;
  Status status;
};

using P2PKey = std::tuple<int, int, int>;  // (src, dst, tag)

}  // namespace

namespace internal {

// The state all members of one group share. Everything below `mu` is guarded by it.
struct InProcessComm {
  std::string name;
  std::string key;
  std::vector<int> parent_ranks;  // as passed to Split (0..n-1 for a world group)
  int size = 0;

  std::mutex mu;
  std::condition_variable cv;
  Status broken;  // first Abort / mismatch; once set, new ops fail at once
  std::vector<uint64_t> next_coll;
  std::vector<uint64_t> next_split;
  std::map<uint64_t, std::shared_ptr<Coll>> colls;
  std::map<P2PKey, std::deque<std::shared_ptr<P2P>>> sends;
  std::map<P2PKey, std::deque<std::shared_ptr<P2P>>> recvs;
  int joined = 0;  // members that have their handle (formation only)
};

// Groups being formed, by key; an entry goes away once every member has joined.
struct InProcessRegistry {
  std::mutex mu;
  std::map<std::string, std::shared_ptr<InProcessComm>> forming;
  std::vector<int> world_generation;  // per rank: how many world handles it has made
};

}  // namespace internal

namespace {

using internal::InProcessComm;
using internal::InProcessRegistry;

// Joins (creating if first) the group `key`; checks every member saw the same member list.
Result<std::shared_ptr<InProcessComm>> JoinComm(InProcessRegistry& reg, const std::string& key,
                                                const std::string& name,
                                                const std::vector<int>& ranks) {
  std::lock_guard<std::mutex> lock(reg.mu);
  auto& slot = reg.forming[key];
  if (!slot) {
    slot = std::make_shared<InProcessComm>();
    slot->name = name;
    slot->key = key;
    slot->parent_ranks = ranks;
    slot->size = static_cast<int>(ranks.size());
    slot->next_coll.assign(ranks.size(), 0);
    slot->next_split.assign(ranks.size(), 0);
  } else if (slot->parent_ranks != ranks || slot->name != name) {
    return InvalidArgument("split: members disagree on the new group: one passed '" + slot->name +
                           "' " + internal::RankList(slot->parent_ranks) + ", another '" + name +
                           "' " + internal::RankList(ranks) +
                           " (every member must pass the same name and ranks)");
  }
  std::shared_ptr<InProcessComm> comm = slot;
  if (++comm->joined == comm->size) reg.forming.erase(key);
  return comm;
}

// Reduces block [offset, offset+count) of every input into dst (count elements of `type`).
void ReduceBlock(const std::vector<const void*>& ins, size_t offset, size_t count, ElemType type,
                 ReduceOp op, void* dst) {
  if (count == 0) return;
  const size_t es = ElemSize(type);
  const int n = static_cast<int>(ins.size());
  auto at = [&](int r) { return static_cast<const uint8_t*>(ins[r]) + offset * es; };
  if (internal::IsHalf(type)) {
    std::vector<float> acc(count), tmp(count);
    internal::HalfToFloat(acc.data(), at(0), count, type);
    for (int r = 1; r < n; ++r) {
      internal::HalfToFloat(tmp.data(), at(r), count, type);
      internal::Combine(acc.data(), acc.data(), tmp.data(), count, ElemType::kF32, op);
    }
    if (op == ReduceOp::kAvg) internal::DivideBy(acc.data(), count, ElemType::kF32, n);
    internal::FloatToHalf(dst, acc.data(), count, type);
    return;
  }
  std::memcpy(dst, at(0), count * es);
  for (int r = 1; r < n; ++r) internal::Combine(dst, dst, at(r), count, type, op);
  if (op == ReduceOp::kAvg) internal::DivideBy(dst, count, type, n);
}

// Runs a collective once every rank has posted its buffers. Results go to temporaries first
// and are copied out at the end, so outputs may alias inputs in any way.
void Execute(Coll& c) {
  const size_t es = ElemSize(c.type);
  const size_t bytes = c.count * es;
  const int n = static_cast<int>(c.in.size());
  switch (c.kind) {
    case Kind::kAllReduce: {
      std::vector<uint8_t> res(bytes);
      ReduceBlock(c.in, 0, c.count, c.type, c.op, res.data());
      for (int r = 0; r < n; ++r) {
        if (bytes) std::memcpy(c.out[r], res.data(), bytes);
      }
      break;
    }
    case Kind::kReduceScatter: {
      std::vector<std::vector<uint8_t>> res(n, std::vector<uint8_t>(bytes));
      for (int r = 0; r < n; ++r)
        ReduceBlock(c.in, r * c.count, c.count, c.type, c.op, res[r].data());
      for (int r = 0; r < n; ++r) {
        if (bytes) std::memcpy(c.out[r], res[r].data(), bytes);
      }
      break;
    }
    case Kind::kAllGather: {
      std::vector<uint8_t> res(bytes * n);
      for (int r = 0; r < n; ++r) {
        if (bytes) std::memcpy(res.data() + r * bytes, c.in[r], bytes);
      }
      for (int r = 0; r < n; ++r) {
        if (bytes) std::memcpy(c.out[r], res.data(), bytes * n);
      }
      break;
    }
    case Kind::kBroadcast: {
      std::vector<uint8_t> res(bytes);
      if (bytes) std::memcpy(res.data(), c.in[c.root], bytes);
      for (int r = 0; r < n; ++r) {
        if (r != c.root && bytes) std::memcpy(c.out[r], res.data(), bytes);
      }
      break;
    }
    case Kind::kBarrier:
      break;
  }
}

class CollWork final : public Work {
 public:
  CollWork(std::shared_ptr<InProcessComm> comm, std::shared_ptr<Coll> op)
      : comm_(std::move(comm)), op_(std::move(op)) {}

  Status Wait(std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> lock(comm_->mu);
    const bool finished = comm_->cv.wait_until(lock, internal::DeadlineAfter(timeout),
                                               [&] { return op_->done || !comm_->broken.ok(); });
    if (op_->done) return op_->status;
    const char* what = KindName(op_->kind);
    if (finished) {
      return Status(comm_->broken.code(),
                    internal::OpLabel(comm_->name, what) + " failed: " + comm_->broken.message());
    }
    std::vector<int> missing;
    for (int r = 0; r < comm_->size; ++r) {
      if (!op_->joined[r]) missing.push_back(r);
    }
    return internal::TimedOut(comm_->name, what, timeout,
                              "collective #" + std::to_string(op_->seq) + " " + op_->Signature() +
                                  "; ranks that have not joined: " + internal::RankList(missing));
  }

 private:
  std::shared_ptr<InProcessComm> comm_;
  std::shared_ptr<Coll> op_;
};

class P2PWork final : public Work {
 public:
  P2PWork(std::shared_ptr<InProcessComm> comm, std::shared_ptr<P2P> op, std::string what)
      : comm_(std::move(comm)), op_(std::move(op)), what_(std::move(what)) {}

  Status Wait(std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> lock(comm_->mu);
    const bool finished = comm_->cv.wait_until(lock, internal::DeadlineAfter(timeout),
                                               [&] { return op_->done || !comm_->broken.ok(); });
    if (op_->done) return op_->status;
    if (finished) {
      return Status(comm_->broken.code(),
                    comm_->name + ": " + what_ + " failed: " + comm_->broken.message());
    }
    return internal::TimedOut(comm_->name, what_.c_str(), timeout, "no matching peer op posted");
  }

 private:
  std::shared_ptr<InProcessComm> comm_;
  std::shared_ptr<P2P> op_;
  std::string what_;
};

class InProcessGroup final : public ProcessGroup {
 public:
  InProcessGroup(std::shared_ptr<InProcessRegistry> reg, std::shared_ptr<InProcessComm> comm,
                 int rank)
      : reg_(std::move(reg)), comm_(std::move(comm)), rank_(rank) {}

  ~InProcessGroup() override {
    // Ops of this rank still in flight would write into memory the caller is about to free:
    // fail them (and with them the group) instead.
    bool pending = false;
    {
      std::lock_guard<std::mutex> lock(comm_->mu);
      for (const auto& [seq, op] : comm_->colls) pending |= !op->done && op->joined[rank_];
      for (const auto& [key, q] : comm_->sends) pending |= std::get<0>(key) == rank_ && !q.empty();
      for (const auto& [key, q] : comm_->recvs) pending |= std::get<1>(key) == rank_ && !q.empty();
    }
    if (pending) AbortWith("rank " + std::to_string(rank_) + " destroyed its group handle");
  }

  int rank() const override { return rank_; }
  int size() const override { return comm_->size; }
  const std::string& name() const override { return comm_->name; }

  std::unique_ptr<Work> AllReduce(void* buf, size_t count, ElemType type, ReduceOp op) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "all_reduce", buf, count));
    return Issue(Kind::kAllReduce, buf, buf, count, type, op, 0);
  }
  std::unique_ptr<Work> ReduceScatter(const void* in, void* out, size_t count, ElemType type,
                                      ReduceOp op) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "reduce_scatter", in, count));
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "reduce_scatter", out, count));
    return Issue(Kind::kReduceScatter, in, out, count, type, op, 0);
  }
  std::unique_ptr<Work> AllGather(const void* in, void* out, size_t count, ElemType type) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "all_gather", in, count));
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "all_gather", out, count));
    return Issue(Kind::kAllGather, in, out, count, type, ReduceOp::kSum, 0);
  }
  std::unique_ptr<Work> Broadcast(void* buf, size_t count, ElemType type, int root) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "broadcast", buf, count));
    RETURN_WORK_IF_ERROR(
        internal::CheckPeer(name(), "broadcast", "root", root, rank_, size(), true));
    return Issue(Kind::kBroadcast, buf, buf, count, type, ReduceOp::kSum, root);
  }
  std::unique_ptr<Work> Barrier() override {
    return Issue(Kind::kBarrier, nullptr, nullptr, 0, ElemType::kU8, ReduceOp::kSum, 0);
  }

  std::unique_ptr<Work> Send(const void* buf, size_t count, ElemType type, int dst,
                             int tag) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "send", buf, count));
    RETURN_WORK_IF_ERROR(internal::CheckPeer(name(), "send", "dst", dst, rank_, size(), false));
    RETURN_WORK_IF_ERROR(internal::CheckTag(name(), "send", tag));
    auto op = std::make_shared<P2P>();
    op->src = buf;
    op->bytes = count * ElemSize(type);
    return Post(op, P2PKey{rank_, dst, tag}, /*is_send=*/true,
                "send to rank " + std::to_string(dst) + " (tag " + std::to_string(tag) + ")");
  }
  std::unique_ptr<Work> Recv(void* buf, size_t count, ElemType type, int src, int tag) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "recv", buf, count));
    RETURN_WORK_IF_ERROR(internal::CheckPeer(name(), "recv", "src", src, rank_, size(), false));
    RETURN_WORK_IF_ERROR(internal::CheckTag(name(), "recv", tag));
    auto op = std::make_shared<P2P>();
    op->dst = buf;
    op->bytes = count * ElemSize(type);
    return Post(op, P2PKey{src, rank_, tag}, /*is_send=*/false,
                "recv from rank " + std::to_string(src) + " (tag " + std::to_string(tag) + ")");
  }

  Result<std::unique_ptr<ProcessGroup>> Split(const std::vector<int>& ranks,
                                              const std::string& new_name) override {
    int index = 0;
    RETURN_IF_ERROR(internal::CheckSplitRanks(name(), new_name, ranks, rank_, size(), &index));
    const std::string what = name() + ": split into '" + new_name + "'";
    const int color = *std::min_element(ranks.begin(), ranks.end());
    std::string key;
    {
      std::lock_guard<std::mutex> lock(comm_->mu);
      if (!comm_->broken.ok()) {
        return Status(comm_->broken.code(), what + " failed: " + comm_->broken.message());
      }
      // Every member makes its k-th Split call at the same point; members of one new group
      // share the smallest rank (MPI's "color"), so that identifies the new group.
      key = comm_->key + "/split" + std::to_string(comm_->next_split[rank_]++) + "@" +
            std::to_string(color);
    }
    auto joined = JoinComm(*reg_, key, new_name, ranks);
    if (!joined.ok()) return joined.status().WithContext(name());
    return std::unique_ptr<ProcessGroup>(
        std::make_unique<InProcessGroup>(reg_, std::move(joined).value(), index));
  }

  void Abort() override { AbortWith("group aborted by rank " + std::to_string(rank_)); }

 private:
  std::unique_ptr<Work> Issue(Kind kind, const void* in, void* out, size_t count, ElemType type,
                              ReduceOp op, int root) {
    std::lock_guard<std::mutex> lock(comm_->mu);
    if (!comm_->broken.ok()) {
      return internal::Done(Status(
          comm_->broken.code(),
          internal::OpLabel(name(), KindName(kind)) + " failed: " + comm_->broken.message()));
    }
    const uint64_t seq = comm_->next_coll[rank_]++;
    auto& slot = comm_->colls[seq];
    if (!slot) {
      slot = std::make_shared<Coll>();
      slot->seq = seq;
      slot->kind = kind;
      slot->type = type;
      slot->op = op;
      slot->count = count;
      slot->root = root;
      slot->defined_by = rank_;
      slot->in.assign(comm_->size, nullptr);
      slot->out.assign(comm_->size, nullptr);
      slot->joined.assign(comm_->size, false);
    }
    std::shared_ptr<Coll> c = slot;
    const bool same = c->kind == kind && c->type == type && c->count == count &&
                      (c->op == op || (kind != Kind::kAllReduce && kind != Kind::kReduceScatter)) &&
                      c->root == root;
    if (!same) {
      Coll mine = *c;
      mine.kind = kind;
      mine.type = type;
      mine.op = op;
      mine.count = count;
      mine.root = root;
      const Status s = InvalidArgument(
          internal::OpLabel(name(), KindName(kind)) + ": collective #" + std::to_string(seq) +
          " differs between ranks: rank " + std::to_string(rank_) + " issued " + mine.Signature() +
          ", rank " + std::to_string(c->defined_by) + " issued " + c->Signature() +
          " (collectives must be issued in the same order on every rank)");
      FailAllLocked(s);
      return internal::Done(s);
    }
    c->in[rank_] = in;
    c->out[rank_] = out;
    c->joined[rank_] = true;
    if (++c->arrived == comm_->size) {
      Execute(*c);
      c->done = true;
      comm_->colls.erase(seq);
      comm_->cv.notify_all();
    }
    return std::make_unique<CollWork>(comm_, std::move(c));
  }

  std::unique_ptr<Work> Post(std::shared_ptr<P2P> op, const P2PKey& key, bool is_send,
                             std::string what) {
    std::lock_guard<std::mutex> lock(comm_->mu);
    if (!comm_->broken.ok()) {
      return internal::Done(Status(comm_->broken.code(),
                                   name() + ": " + what + " failed: " + comm_->broken.message()));
    }
    auto& partners = is_send ? comm_->recvs[key] : comm_->sends[key];
    if (partners.empty()) {
      (is_send ? comm_->sends[key] : comm_->recvs[key]).push_back(op);
      return std::make_unique<P2PWork>(comm_, std::move(op), std::move(what));
    }
    std::shared_ptr<P2P> partner = partners.front();
    partners.pop_front();
    P2P& send = is_send ? *op : *partner;
    P2P& recv = is_send ? *partner : *op;
    if (send.bytes != recv.bytes) {
      const Status s = InvalidArgument(
          name() + ": " + what + ": send of " + std::to_string(send.bytes) + " bytes met recv of " +
          std::to_string(recv.bytes) + " bytes (tag " + std::to_string(std::get<2>(key)) + ")");
      send.status = recv.status = s;
    } else if (send.bytes) {
      std::memcpy(recv.dst, send.src, send.bytes);
    }
    send.done = recv.done = true;
    comm_->cv.notify_all();
    return std::make_unique<P2PWork>(comm_, std::move(op), std::move(what));
  }

  // Marks the group broken and fails every pending op on every rank. Needs comm_->mu.
  void FailAllLocked(const Status& why) {
    if (comm_->broken.ok()) comm_->broken = why;
    for (auto& [seq, c] : comm_->colls) {
      c->done = true;
      c->status = Status(comm_->broken.code(), internal::OpLabel(name(), KindName(c->kind)) +
                                                   " failed: " + comm_->broken.message());
    }
    comm_->colls.clear();
    for (auto* queues : {&comm_->sends, &comm_->recvs}) {
      for (auto& [key, q] : *queues) {
        for (auto& p : q) {
          p->done = true;
          p->status = Status(comm_->broken.code(), name() + ": point-to-point (tag " +
                                                       std::to_string(std::get<2>(key)) +
                                                       ") failed: " + comm_->broken.message());
        }
      }
      queues->clear();
    }
    comm_->cv.notify_all();
  }

  void AbortWith(const std::string& why) {
    std::lock_guard<std::mutex> lock(comm_->mu);
    FailAllLocked(Cancelled(why));
  }

  std::shared_ptr<InProcessRegistry> reg_;
  std::shared_ptr<InProcessComm> comm_;
  const int rank_;
};

}  // namespace

InProcessWorld::InProcessWorld(int size)
    : size_(size), registry_(std::make_shared<InProcessRegistry>()) {
  CHECK_MSG(size >= 1, "InProcessWorld size must be >= 1");
  registry_->world_generation.assign(size, 0);
}

InProcessWorld::~InProcessWorld() = default;

Result<std::unique_ptr<ProcessGroup>> MakeInProcessGroup(InProcessWorld& world, int rank) {
  if (rank < 0 || rank >= world.size()) {
    return InvalidArgument("in-process world: rank " + std::to_string(rank) + " is outside [0, " +
                           std::to_string(world.size()) + ")");
  }
  int generation;
  {
    std::lock_guard<std::mutex> lock(world.registry_->mu);
    generation = world.registry_->world_generation[rank]++;
  }
  std::vector<int> all(world.size());
  for (int r = 0; r < world.size(); ++r) all[r] = r;
  ASSIGN_OR_RETURN(auto comm,
                   JoinComm(*world.registry_, "world#" + std::to_string(generation), "world", all));
  return std::unique_ptr<ProcessGroup>(
      std::make_unique<InProcessGroup>(world.registry_, std::move(comm), rank));
}

}  // namespace strata::comm
