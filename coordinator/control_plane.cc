#include "coordinator/control_plane.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio.hpp>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include "checkpoint/store.h"
#include "comm/tcp_store.h"
#include "proto/control.pb.h"
#include "proto/frame.h"

namespace strata::coordinator {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// One worker connection. Every member is touched on the io thread only (the scheduler and API
// threads reach a connection through asio::post).
struct Conn {
  explicit Conn(tcp::socket s) : sock(std::move(s)), hello_timer(sock.get_executor()) {}
  tcp::socket sock;
  asio::steady_timer hello_timer;
  unsigned char len[4] = {};
  std::string body;
  std::deque<std::string> out;  // encoded frames waiting to be written
  bool writing = false;
  bool close_after_write = false;
  bool closed = false;
  std::string id;  // the worker id once its hello was accepted
};

bool ConstantTimeEqual(const std::string& a, const std::string& b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) diff |= a[i] ^ b[i];
  return diff == 0;
}

TransitionUpdate Update(std::string reason, std::string error) {
  TransitionUpdate u;
  u.reason = std::move(reason);
  u.error = std::move(error);
  return u;
}

}  // namespace

Result<Layout> DataParallelLayout(const proto::JobSpec& spec, int workers, double) {
  const int micro = std::max(1, spec.train().micro_batch());
  const int global = spec.train().global_batch();
  for (int dp = std::min(workers, global / micro); dp >= 1; --dp) {
    if (global % (dp * micro) != 0) continue;
    Layout l;
    l.dp = dp;
    l.micro_batch = micro;
    l.zero1 = spec.parallel().zero1();
    l.recompute = spec.model().recompute();
    return l;
  }
  return InvalidArgument(fmt::format(
      "train.global_batch {} cannot be split over any of {} workers with micro_batch {}", global,
      workers, micro));
}

Result<Layout> PlannedLayout(const proto::JobSpec& spec, int workers, double worker_flops) {
  // CUDA jobs are planned with the H100 profile (GPU workers report no measured profile yet),
  // CPU jobs with the CPU one.
  Result<DeviceProfile> cpu =
      DeviceProfileByName(spec.resources().device() == "cuda" ? "h100" : "cpu");
  if (cpu.ok()) {
    if (spec.resources().device() != "cuda" && worker_flops > 0) {
      cpu->flops = worker_flops;
      cpu->fp32_flops = worker_flops;
    }
    Result<PlanRequest> req = PlanRequestFromJob(spec, workers, *cpu);
    if (req.ok()) {
      Result<PlanResult> plan = MakePlan(*req);
      if (plan.ok()) return static_cast<const Layout&>(plan->best);
      spdlog::warn("planner: {}; falling back to data parallelism", plan.status().ToString());
    }
  }
  return DataParallelLayout(spec, workers);
}

struct ControlPlane::Impl {
  struct Worker {
    std::shared_ptr<Conn> conn;
    std::string host, device;
    int64_t memory = 0;
    double gemm_flops = 0;  // measured by the worker at start (0: unknown)
    Clock::time_point last_beat;
    std::string job;  // assigned job ("" idle)
    int64_t generation = 0;
    int rank = -1;
    bool dead = false;
    // Hung: still busy with an aborted generation after exit_wait. Never planned on again
    // until the worker registers anew (a restarted process).
    bool quarantined = false;
  };
  struct Active {
    int64_t generation = 0;
    bool recovering = false;
    std::vector<std::string> ranks;  // worker id per rank
    std::set<int> exited, failed;
    std::string first_error;
    Clock::time_point deadline;       // recovering: survivors' exit wait
    Clock::time_point waiting_since;  // recovering: since when too few workers
    bool waiting = false;
    // The running generation's spec as assigned (checkpoint.dir resolved, layout set).
    proto::JobSpec spec;
    // Checkpoint steps of this generation some rank reported written (CheckpointWritten).
    struct Pending {
      std::set<int> written;
      std::optional<proto::Manifest> manifest;  // rank 0's
      bool failed = false;
    };
    std::map<int64_t, Pending> checkpoints;
  };
  // A checkpoint step every rank of `generation` reported durable: the scheduler commits it.
  struct ReadyCommit {
    std::string job;
    int64_t generation = 0;
    int world = 0;
    proto::JobSpec spec;
    proto::Manifest manifest;
  };

  // Declared first so that it is destroyed last: connections and pending handlers that refer to
  // it go before it.
  asio::io_context io{1};
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work;
  std::optional<tcp::acceptor> acceptor;
  std::optional<asio::steady_timer> accept_retry;
  JobStore* store = nullptr;
  comm::TcpStoreServer* rendezvous = nullptr;
  ControlPlaneOptions options;
  int port = 0;
  std::atomic<bool> stopping{false};
  std::atomic<int64_t> recoveries{0};
  std::thread io_thread, scheduler;
  std::mutex mu;
  std::map<std::string, Worker> workers;   // GUARDED_BY(mu)
  std::map<std::string, Active> active;    // GUARDED_BY(mu)
  std::vector<ReadyCommit> ready_commits;  // GUARDED_BY(mu)
  std::condition_variable wake;            // the scheduler's: a commit is ready, or stop
  std::shared_ptr<checkpoint::Storage> storage = checkpoint::DefaultStorage();
  // Every connection not yet known closed, registered or not (io thread only).
  std::vector<std::weak_ptr<Conn>> conns;

  // Queues `m` for the worker's connection (any thread). A worker whose connection fails is
  // marked dead; the scheduler recovers its job.
  void Send(const std::string& worker_id, const proto::ControlMessage& m) {
    std::shared_ptr<Conn> conn;
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = workers.find(worker_id);
      if (it == workers.end() || it->second.dead) return;
      conn = it->second.conn;
    }
    Result<std::string> frame = wire::EncodeFrame(m);
    if (!frame.ok() || conn == nullptr) return;
    asio::post(io, [this, conn, f = std::move(*frame)]() mutable { Queue(conn, std::move(f)); });
  }

  void Log(const std::string& job, const std::string& text) {
    Result<int64_t> r = store->AppendLog(job, text);
    (void)r;
  }

  // ---- connections (io thread) ----

  void Accept() {
    acceptor->async_accept([this](const boost::system::error_code& ec, tcp::socket sock) {
      if (stopping.load() || !acceptor->is_open()) return;
      if (ec) {
        // Out of descriptors or a transient error: try again shortly instead of spinning.
        spdlog::warn("control plane: accept: {}", ec.message());
        accept_retry->expires_after(milliseconds(50));
        accept_retry->async_wait([this](const boost::system::error_code& e) {
          if (!e) Accept();
        });
        return;
      }
      boost::system::error_code ignored;
      sock.set_option(tcp::no_delay(true), ignored);
      auto c = std::make_shared<Conn>(std::move(sock));
      std::erase_if(conns, [](const std::weak_ptr<Conn>& w) {
        auto p = w.lock();
        return p == nullptr || p->closed;
      });
      conns.push_back(c);
      c->hello_timer.expires_after(options.hello_timeout);
      c->hello_timer.async_wait([this, c](const boost::system::error_code& e) {
        if (!e && c->id.empty()) Close(c);  // too slow to introduce itself
      });
      ReadHeader(c);
      Accept();
    });
  }

  void ReadHeader(const std::shared_ptr<Conn>& c) {
    asio::async_read(c->sock, asio::buffer(c->len, 4),
                     [this, c](const boost::system::error_code& ec, size_t) {
                       if (ec) return Lost(c);
                       const uint32_t n = c->len[0] | (c->len[1] << 8) | (c->len[2] << 16) |
                                          (static_cast<uint32_t>(c->len[3]) << 24);
                       if (n == 0 || n > wire::kMaxFrameBytes) return Drop(c, "frame length");
                       c->body.resize(n);
                       ReadBody(c);
                     });
  }

  void ReadBody(const std::shared_ptr<Conn>& c) {
    asio::async_read(c->sock, asio::buffer(c->body),
                     [this, c](const boost::system::error_code& ec, size_t) {
                       if (ec) return Lost(c);
                       proto::ControlMessage m;
                       if (!m.ParseFromString(c->body)) return Drop(c, "unparsable frame");
                       c->body.clear();
                       if (c->id.empty()) {
                         if (!Hello(c, m)) return;
                       } else {
                         Handle(c, m);
                       }
                       if (!c->closed) ReadHeader(c);
                     });
  }

  // A peer that breaks the protocol: drop the connection, stay up.
  void Drop(const std::shared_ptr<Conn>& c, const char* what) {
    spdlog::warn("control plane: dropping a connection{}: {}",
                 c->id.empty() ? std::string() : " of worker " + c->id, what);
    Lost(c);
  }

  // The connection is gone (or must go): close it and mark its worker dead.
  void Lost(const std::shared_ptr<Conn>& c) {
    Close(c);
    if (c->id.empty()) return;
    std::lock_guard<std::mutex> lock(mu);
    auto it = workers.find(c->id);
    if (it != workers.end() && it->second.conn == c) it->second.dead = true;
  }

  void Close(const std::shared_ptr<Conn>& c) {
    if (c->closed) return;
    c->closed = true;
    boost::system::error_code ignored;
    c->hello_timer.cancel();
    c->sock.shutdown(tcp::socket::shutdown_both, ignored);
    c->sock.close(ignored);
  }

  void Queue(const std::shared_ptr<Conn>& c, std::string frame) {
    if (c->closed) return;
    c->out.push_back(std::move(frame));
    if (!c->writing) WriteNext(c);
  }

  void WriteNext(const std::shared_ptr<Conn>& c) {
    c->writing = true;
    asio::async_write(c->sock, asio::buffer(c->out.front()),
                      [this, c](const boost::system::error_code& ec, size_t) {
                        c->out.pop_front();
                        if (ec) return Lost(c);
                        if (!c->out.empty()) return WriteNext(c);
                        c->writing = false;
                        if (c->close_after_write) Close(c);
                      });
  }

  void Reply(const std::shared_ptr<Conn>& c, const proto::ControlMessage& m) {
    Result<std::string> frame = wire::EncodeFrame(m);
    if (frame.ok()) Queue(c, std::move(*frame));
  }

  // The first frame of a connection. Returns false when the connection was refused.
  bool Hello(const std::shared_ptr<Conn>& c, const proto::ControlMessage& m) {
    if (!m.has_hello()) {
      Drop(c, "first frame is not a WorkerHello");
      return false;
    }
    const proto::WorkerHello& hello = m.hello();
    proto::ControlMessage reply;
    proto::HelloReply* r = reply.mutable_hello_reply();
    if (!ConstantTimeEqual(hello.secret(), options.secret) || hello.worker_id().empty()) {
      r->set_ok(false);
      r->set_error(hello.worker_id().empty() ? "worker_id is empty" : "wrong control-plane secret");
      Reply(c, reply);
      c->close_after_write = true;
      return false;
    }
    const std::string id = hello.worker_id();
    c->id = id;
    c->hello_timer.cancel();
    std::shared_ptr<Conn> replaced;
    {
      std::lock_guard<std::mutex> lock(mu);
      Worker& w = workers[id];
      if (w.conn != nullptr && w.conn != c) replaced = w.conn;  // a re-registration replaces it
      w = Worker();
      w.conn = c;
      w.host = hello.host();
      w.device = hello.device();
      w.memory = hello.memory_bytes();
      w.gemm_flops = hello.gemm_flops();
      w.last_beat = Clock::now();
    }
    if (replaced) Close(replaced);
    r->set_ok(true);
    r->set_heartbeat_ms(static_cast<int32_t>(options.heartbeat.count()));
    r->set_store_host(options.store_host);
    r->set_store_port(rendezvous->port());
    Reply(c, reply);
    spdlog::info("worker {} registered ({} at {})", id, hello.device(), hello.host());
    return true;
  }

  void Handle(const std::shared_ptr<Conn>& c, const proto::ControlMessage& in) {
    const std::string& id = c->id;
    if (in.has_heartbeat()) {
      {
        std::lock_guard<std::mutex> lock(mu);
        auto it = workers.find(id);
        if (it != workers.end() && it->second.conn == c) it->second.last_beat = Clock::now();
      }
      if (in.heartbeat().want_ack()) {
        proto::ControlMessage ack;
        ack.mutable_heartbeat_ack()->set_seq(in.heartbeat().seq());
        Reply(c, ack);
      }
    } else if (in.has_step()) {
      const proto::StepReport& s = in.step();
      Status st = store->ReportProgress(s.job_id(), s.generation(),
                                        {s.step(), s.loss(), s.tokens_per_second()});
      if (st.ok()) {
        Log(s.job_id(), fmt::format("step {} | loss {:.6f} | {:.0f} tok/s", s.step(), s.loss(),
                                    s.tokens_per_second()));
      }
    } else if (in.has_checkpoint()) {
      const proto::CheckpointWritten& cw = in.checkpoint();
      std::string event;
      {
        std::lock_guard<std::mutex> lock(mu);
        auto a = active.find(cw.job_id());
        if (a == active.end() || a->second.generation != cw.generation() || a->second.recovering) {
          return;  // stale: an older generation's save is never committed
        }
        const std::vector<std::string>& ranks = a->second.ranks;
        if (cw.rank() < 0 || cw.rank() >= static_cast<int>(ranks.size()) ||
            ranks[static_cast<size_t>(cw.rank())] != id) {
          spdlog::warn(
              "{}: worker {} reported checkpoint step {} for rank {}, which it does not "
              "hold; ignored",
              cw.job_id(), id, cw.step(), cw.rank());
          return;
        }
        Active::Pending& p = a->second.checkpoints[cw.step()];
        if (!cw.ok()) {
          p.failed = true;
          event = fmt::format(
              "checkpoint step {}: rank {} ({}) could not write its shards: {}; "
              "not committed, the previous checkpoints stay",
              cw.step(), cw.rank(), id, cw.error());
        } else {
          p.written.insert(cw.rank());
          if (cw.rank() == 0) p.manifest = cw.manifest();
          const int world = static_cast<int>(a->second.ranks.size());
          if (!p.failed && p.manifest && static_cast<int>(p.written.size()) == world) {
            ready_commits.push_back(
                {cw.job_id(), cw.generation(), world, a->second.spec, *p.manifest});
            wake.notify_one();
            a->second.checkpoints.erase(cw.step());
          }
        }
      }
      if (!event.empty()) {
        spdlog::warn("{}: {}", cw.job_id(), event);
        Log(cw.job_id(), event);
      }
    } else if (in.has_exit()) {
      const proto::RankExit& e = in.exit();
      std::lock_guard<std::mutex> lock(mu);
      auto w = workers.find(id);
      if (w != workers.end() && w->second.job == e.job_id() &&
          w->second.generation == e.generation()) {
        w->second.job.clear();
        w->second.rank = -1;
      }
      auto a = active.find(e.job_id());
      if (a == active.end() || a->second.generation != e.generation()) return;  // stale
      a->second.exited.insert(e.rank());
      if (!e.ok()) {
        a->second.failed.insert(e.rank());
        if (a->second.first_error.empty()) {
          a->second.first_error = fmt::format("rank {} ({}): {}", e.rank(), id, e.error());
        }
      }
    }
  }

  // ---- scheduling (scheduler thread only, except where noted) ----

  // The slowest measured GEMM rate among `ids` (0 when any is unknown).
  double SlowestFlops(const std::vector<std::string>& ids) {  // REQUIRES(mu)
    double slowest = 0;
    for (const std::string& id : ids) {
      auto it = workers.find(id);
      const double f = it == workers.end() ? 0 : it->second.gemm_flops;
      if (f <= 0) return 0;
      slowest = slowest == 0 ? f : std::min(slowest, f);
    }
    return slowest;
  }

  // Idle workers of the device kind `spec` asks for (resources.device; cpu by default).
  std::vector<std::string> IdleWorkers(const proto::JobSpec& spec) {  // REQUIRES(mu)
    const std::string device =
        spec.resources().device().empty() ? "cpu" : spec.resources().device();
    std::vector<std::string> idle;
    for (const auto& [id, w] : workers) {
      const std::string kind = w.device.empty() ? "cpu" : w.device;
      if (!w.dead && !w.quarantined && w.job.empty() && kind == device) idle.push_back(id);
    }
    return idle;
  }

  // Plans `spec` over `idle` and assigns it (the job's record is at `generation`).
  Status Assign(const proto::JobRecord& rec, std::vector<std::string> idle, bool resume) {
    const int want = std::max(1, rec.spec().resources().workers());
    if (static_cast<int>(idle.size()) > want) idle.resize(static_cast<size_t>(want));
    double flops = 0;
    {
      std::lock_guard<std::mutex> lock(mu);
      flops = SlowestFlops(idle);
    }
    ASSIGN_OR_RETURN(Layout l, options.layout(rec.spec(), static_cast<int>(idle.size()), flops));
    const int world = l.dp * l.tp * l.pp;
    proto::JobSpec spec = rec.spec();
    spec.mutable_parallel()->set_dp(l.dp);
    spec.mutable_parallel()->set_tp(l.tp);
    spec.mutable_parallel()->set_pp(l.pp);
    spec.mutable_parallel()->set_zero1(l.zero1);
    if (l.micro_batch > 0) spec.mutable_train()->set_micro_batch(l.micro_batch);
    spec.mutable_model()->set_recompute(l.recompute);
    proto::CheckpointSpec* ck = spec.mutable_checkpoint();
    if (ck->dir().empty()) {
      ck->set_dir(options.checkpoint_root + "/" + rec.id());
      if (ck->every() == 0) ck->set_every(10);
    }
    TransitionUpdate up;
    proto::JobLayout jl;
    jl.set_dp(l.dp);
    jl.set_tp(l.tp);
    jl.set_pp(l.pp);
    jl.set_zero1(l.zero1);
    up.layout = jl;
    up.expected_generation = rec.generation();
    up.reason = fmt::format("{} workers: dp {} x tp {} x pp {}{}{}", world, l.dp, l.tp, l.pp,
                            l.zero1 ? " (ZeRO-1)" : "",
                            rec.state() == proto::JOB_STATE_RECOVERING
                                ? ", resuming from the last committed checkpoint"
                                : "");
    ASSIGN_OR_RETURN(proto::JobRecord now,
                     store->Transition(rec.id(), proto::JOB_STATE_RUNNING, up));
    rendezvous->SetMinGeneration(rec.id(), now.generation());
    Active a;
    a.generation = now.generation();
    a.ranks.assign(idle.begin(), idle.begin() + world);
    a.spec = spec;
    {
      std::lock_guard<std::mutex> lock(mu);
      for (int r = 0; r < world; ++r) {
        Worker& w = workers[a.ranks[static_cast<size_t>(r)]];
        w.job = rec.id();
        w.generation = now.generation();
        w.rank = r;
      }
      active[rec.id()] = a;
    }
    for (int r = 0; r < world; ++r) {
      proto::ControlMessage m;
      proto::Assign* as = m.mutable_assign();
      as->set_job_id(rec.id());
      as->set_generation(now.generation());
      *as->mutable_job() = spec;
      as->set_rank(r);
      as->set_world(world);
      as->set_resume(resume);
      Send(a.ranks[static_cast<size_t>(r)], m);
    }
    return Status::Ok();
  }

  void Fail(const std::string& job, const std::string& error) {
    Result<proto::JobRecord> r = store->Transition(job, proto::JOB_STATE_FAILED, Update("", error));
    if (!r.ok()) spdlog::warn("{}", r.status().ToString());
    AbortWorkers(job, "job failed");
    std::lock_guard<std::mutex> lock(mu);
    active.erase(job);
  }

  void AbortWorkers(const std::string& job, const std::string& reason) {
    std::vector<std::pair<std::string, int64_t>> targets;
    {
      std::lock_guard<std::mutex> lock(mu);
      for (const auto& [id, w] : workers) {
        if (w.job == job && !w.dead) targets.push_back({id, w.generation});
      }
    }
    for (const auto& [id, gen] : targets) {
      proto::ControlMessage m;
      m.mutable_abort()->set_job_id(job);
      m.mutable_abort()->set_generation(gen);
      m.mutable_abort()->set_reason(reason);
      Send(id, m);
    }
  }

  // A running job lost a rank: new generation, abort the survivors, re-plan later.
  void Recover(const std::string& job, const std::string& why) {
    Result<proto::JobRecord> rec = store->Get(job);
    if (!rec.ok() || rec->state() != proto::JOB_STATE_RUNNING) return;
    const int max_restarts =
        rec->spec().resources().max_restarts() > 0 ? rec->spec().resources().max_restarts() : 10;
    if (rec->restarts() >= max_restarts) {
      Fail(job, fmt::format("{}; giving up after {} recoveries (resources.max_restarts)", why,
                            rec->restarts()));
      return;
    }
    if (EnterRecovering(job, Update(why, ""), why)) {
      recoveries.fetch_add(1);
    }
  }

  // RECOVERING with a new generation: the rendezvous store fences the old one out, its ranks
  // are aborted, and the scheduler re-plans once they stopped (or exit_wait passed). Used by
  // failure recovery and by the planned scale-up. False when the transition was refused.
  bool EnterRecovering(const std::string& job, const TransitionUpdate& update,
                       const std::string& why) {
    Result<proto::JobRecord> now = store->Transition(job, proto::JOB_STATE_RECOVERING, update);
    if (!now.ok()) return false;
    rendezvous->SetMinGeneration(job, now->generation());
    spdlog::warn("{}: recovering (generation {}): {}", job, now->generation(), why);
    AbortWorkers(job, why);
    std::lock_guard<std::mutex> lock(mu);
    Active& a = active[job];
    a.recovering = true;
    a.generation = now->generation();
    a.deadline = Clock::now() + options.exit_wait;
    a.waiting = false;
    a.checkpoints.clear();
    return true;
  }

  // Writes the manifest of a checkpoint every rank reported durable (the commit), applies the
  // job's retention, and scales the job up onto idle workers when that gives a larger layout.
  void Commit(const ReadyCommit& c) {
    const std::string root = c.spec.checkpoint().dir();
    const int64_t step = c.manifest.step();
    auto current = [this, &c]() -> Status {
      std::lock_guard<std::mutex> lock(mu);
      auto a = active.find(c.job);
      if (a == active.end() || a->second.generation != c.generation || a->second.recovering) {
        return Cancelled(
            fmt::format("generation {} of {} is no longer running", c.generation, c.job));
      }
      return Status::Ok();
    };
    Status s =
        checkpoint::CommitWhenDurable(storage, root, c.manifest, c.world, std::chrono::seconds(30),
                                      &stopping, fmt::format("g{}", c.generation), current);
    if (!s.ok()) {
      const std::string e =
          fmt::format("checkpoint step {} not committed: {}; the previous checkpoints stay", step,
                      s.ToString());
      spdlog::warn("{}: {}", c.job, e);
      Log(c.job, e);
      return;
    }
    Log(c.job,
        fmt::format("checkpoint step {} committed by the coordinator ({} ranks)", step, c.world));
    checkpoint::RetentionPolicy keep;
    keep.keep_last = std::max(1, c.spec.checkpoint().keep());
    keep.keep_every = c.spec.checkpoint().keep_every();
    Result<int> gc = checkpoint::CollectGarbage(*storage, root, keep, step);
    if (!gc.ok()) spdlog::warn("{}: checkpoint retention: {}", c.job, gc.status().ToString());
    MaybeScaleUp(c, step);
  }

  void MaybeScaleUp(const ReadyCommit& c, int64_t step) {
    const proto::ResourceSpec& res = c.spec.resources();
    if (res.has_scale_up_at_checkpoint() && !res.scale_up_at_checkpoint()) return;
    if (c.world >= std::max(1, res.workers())) return;
    int idle = 0;
    double flops = 0;
    {
      std::lock_guard<std::mutex> lock(mu);
      std::vector<std::string> pool = IdleWorkers(c.spec);
      idle = static_cast<int>(pool.size());
      auto a = active.find(c.job);
      if (a != active.end())
        pool.insert(pool.end(), a->second.ranks.begin(), a->second.ranks.end());
      flops = SlowestFlops(pool);
    }
    if (idle == 0) return;
    Result<proto::JobRecord> rec = store->Get(c.job);
    if (!rec.ok() || rec->state() != proto::JOB_STATE_RUNNING ||
        rec->generation() != c.generation) {
      return;
    }
    // Plan from the job as submitted (the assigned spec has this generation's sizes fixed).
    const int available = std::min(std::max(1, res.workers()), c.world + idle);
    Result<Layout> bigger = options.layout(rec->spec(), available, flops);
    if (!bigger.ok() || bigger->dp * bigger->tp * bigger->pp <= c.world) return;
    const std::string why = fmt::format(
        "scale-up at checkpoint step {}: {} idle worker(s) give dp {} x tp {} x pp {} instead of "
        "{} ranks",
        step, idle, bigger->dp, bigger->tp, bigger->pp, c.world);
    TransitionUpdate up = Update(why, "");
    up.count_restart = false;
    up.expected_generation = c.generation;
    EnterRecovering(c.job, up, why);
  }

  void Tick() {
    const auto now = Clock::now();
    // Dead workers.
    std::vector<std::pair<std::string, std::string>> lost;  // (job, why)
    {
      std::lock_guard<std::mutex> lock(mu);
      for (auto it = workers.begin(); it != workers.end();) {
        Worker& w = it->second;
        const bool silent = now - w.last_beat > options.dead_after;
        if (w.dead || silent) {
          const std::string why = fmt::format(
              "worker {} {}", it->first,
              silent ? fmt::format("missed heartbeats for {} ms", options.dead_after.count())
                     : std::string("disconnected"));
          spdlog::warn("{}", why);
          if (!w.job.empty()) lost.push_back({w.job, why});
          if (w.conn != nullptr) {
            asio::post(io, [this, c = w.conn] { Close(c); });
          }
          it = workers.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (const auto& [job, why] : lost) Recover(job, why);

    // Checkpoints every rank has written: commit them (the coordinator is the committer in
    // daemon mode), then apply retention and consider a scale-up.
    std::vector<ReadyCommit> commits;
    {
      std::lock_guard<std::mutex> lock(mu);
      commits.swap(ready_commits);
    }
    for (const ReadyCommit& c : commits) Commit(c);

    // Running and recovering jobs.
    std::vector<std::string> jobs;
    {
      std::lock_guard<std::mutex> lock(mu);
      for (const auto& [id, a] : active) jobs.push_back(id);
    }
    for (const std::string& job : jobs) {
      Result<proto::JobRecord> rec = store->Get(job);
      if (!rec.ok()) continue;
      if (IsTerminal(rec->state())) {  // cancelled through the API
        AbortWorkers(job, "job " + std::string(JobStateName(rec->state())));
        std::lock_guard<std::mutex> lock(mu);
        active.erase(job);
        continue;
      }
      Active a;
      {
        std::lock_guard<std::mutex> lock(mu);
        a = active[job];
      }
      if (!a.recovering) {
        if (!a.failed.empty()) {
          Recover(job, a.first_error);
        } else if (a.exited.size() == a.ranks.size()) {
          Result<proto::JobRecord> r =
              store->Transition(job, proto::JOB_STATE_SUCCEEDED, Update("every rank finished", ""));
          if (!r.ok()) spdlog::warn("{}", r.status().ToString());
          std::lock_guard<std::mutex> lock(mu);
          active.erase(job);
        }
        continue;
      }
      // Recovering: wait for the survivors to stop (bounded), then re-plan on the idle workers.
      bool survivors_busy = false;
      std::vector<std::string> idle;
      std::vector<std::string> hung;
      {
        std::lock_guard<std::mutex> lock(mu);
        for (const auto& [id, w] : workers) {
          if (w.job == job && w.generation < a.generation) survivors_busy = true;
        }
        if (survivors_busy && now < a.deadline) continue;
        for (auto& [id, w] : workers) {
          if (w.job != job) continue;
          if (w.generation < a.generation) {
            // Heartbeating but still in an aborted generation after the exit wait: its rank
            // is hung (a deadlock, a stuck device, ...). Name it and keep it out of plans.
            w.quarantined = true;
            hung.push_back(fmt::format(
                "rank {} (worker {}) did not stop within {} ms of the abort of generation {}: "
                "hung; quarantined from the next plans (restart the worker to clear)",
                w.rank, id, options.exit_wait.count(), w.generation));
          }
          w.job.clear();  // exit wait over: the next Assign replaces the rank
        }
        idle = IdleWorkers(rec->spec());
      }
      for (const std::string& h : hung) {
        spdlog::warn("{}: {}", job, h);
        Log(job, h);
      }
      const int min_workers = std::max(1, rec->spec().resources().min_workers());
      if (static_cast<int>(idle.size()) < min_workers) {
        bool give_up = false;
        {
          std::lock_guard<std::mutex> lock(mu);
          Active& act = active[job];
          if (!act.waiting) {
            act.waiting = true;
            act.waiting_since = now;
          }
          give_up = now - act.waiting_since > options.min_workers_wait;
        }
        if (give_up) {
          Fail(job, fmt::format("fewer than resources.min_workers = {} workers for {} s",
                                min_workers, options.min_workers_wait.count() / 1000));
        }
        continue;
      }
      Status s = Assign(*rec, idle, /*resume=*/true);
      if (!s.ok()) Fail(job, "re-plan failed: " + s.ToString());
    }

    // Pending jobs, in submission order, while enough workers are idle.
    for (const proto::JobRecord& rec : store->List()) {
      if (rec.state() != proto::JOB_STATE_PENDING) continue;
      std::vector<std::string> idle;
      {
        std::lock_guard<std::mutex> lock(mu);
        idle = IdleWorkers(rec.spec());
      }
      const int want = std::max(1, rec.spec().resources().workers());
      if (static_cast<int>(idle.size()) < want) break;  // first come, first served
      Result<proto::JobRecord> planning = store->Transition(rec.id(), proto::JOB_STATE_PLANNING);
      if (!planning.ok()) continue;
      Status s = Assign(*planning, idle, /*resume=*/true);
      if (!s.ok()) Fail(rec.id(), "planning failed: " + s.ToString());
    }
  }

  // Listens on options.listen and starts the io thread.
  Status StartIo() {
    ASSIGN_OR_RETURN(const int fd, wire::Listen(options.listen, &port));
    // A large backlog: thousands of workers may (re)connect at once after a coordinator restart.
    ::listen(fd, 4096);
    acceptor.emplace(io);
    boost::system::error_code ec;
    acceptor->assign(tcp::v4(), fd, ec);
    if (ec) {
      ::close(fd);
      return Internal(fmt::format("control plane: {}", ec.message()));
    }
    accept_retry.emplace(io);
    work.emplace(io.get_executor());
    asio::post(io, [this] { Accept(); });
    io_thread = std::thread([this] { io.run(); });
    return Status::Ok();
  }

  void Schedule() {
    while (!stopping.load()) {
      Tick();
      // Every 100 ms, or at once when a checkpoint is ready to commit.
      std::unique_lock<std::mutex> lock(mu);
      wake.wait_for(lock, milliseconds(100),
                    [this] { return stopping.load() || !ready_commits.empty(); });
    }
  }
};

Result<std::unique_ptr<ControlPlane>> ControlPlane::Start(JobStore* store,
                                                          comm::TcpStoreServer* rendezvous,
                                                          ControlPlaneOptions options) {
  std::unique_ptr<ControlPlane> cp(new ControlPlane());
  cp->impl_ = std::make_unique<Impl>();
  Impl& m = *cp->impl_;
  m.store = store;
  m.rendezvous = rendezvous;
  m.options = std::move(options);
  // Jobs that were planning, running or recovering when a previous coordinator stopped: their
  // workers lost it and aborted their ranks, so each becomes RECOVERING (a new generation) and
  // is re-planned on the workers that register again; they resume from the last checkpoint.
  for (const proto::JobRecord& rec : store->List()) {
    if (rec.state() != proto::JOB_STATE_PLANNING && rec.state() != proto::JOB_STATE_RUNNING &&
        rec.state() != proto::JOB_STATE_RECOVERING) {
      continue;
    }
    int64_t generation = rec.generation();
    if (rec.state() != proto::JOB_STATE_RECOVERING) {
      ASSIGN_OR_RETURN(proto::JobRecord now,
                       store->Transition(rec.id(), proto::JOB_STATE_RECOVERING,
                                         Update("coordinator restarted", "")));
      generation = now.generation();
    }
    rendezvous->SetMinGeneration(rec.id(), generation);
    Impl::Active a;
    a.generation = generation;
    a.recovering = true;
    a.deadline = Clock::now();
    m.active[rec.id()] = a;
  }
  RETURN_IF_ERROR(m.StartIo());
  m.scheduler = std::thread([&m] { m.Schedule(); });
  return cp;
}

ControlPlane::~ControlPlane() { Stop(); }

void ControlPlane::Stop() {
  if (!impl_ || impl_->stopping.exchange(true)) return;
  Impl& m = *impl_;
  m.wake.notify_all();
  if (m.scheduler.joinable()) m.scheduler.join();
  if (m.io_thread.joinable()) {
    // Close the listener and every connection on the io thread, then let it run out.
    asio::post(m.io, [&m] {
      boost::system::error_code ignored;
      m.acceptor->close(ignored);
      m.accept_retry->cancel();
      for (const std::weak_ptr<Conn>& w : m.conns) {
        if (auto c = w.lock()) m.Close(c);
      }
    });
    m.work.reset();
    m.io_thread.join();  // returns once the closed connections' handlers have finished
  }
}

int ControlPlane::port() const { return impl_->port; }
int64_t ControlPlane::recoveries() const { return impl_->recoveries.load(); }

std::vector<WorkerInfo> ControlPlane::List() {
  std::vector<WorkerInfo> out;
  const auto now = Clock::now();
  std::lock_guard<std::mutex> lock(impl_->mu);
  for (const auto& [id, w] : impl_->workers) {
    WorkerInfo i;
    i.id = id;
    i.host = w.host;
    i.device = w.device;
    i.memory_bytes = w.memory;
    i.state = w.dead ? "lost" : w.quarantined ? "quarantined" : (w.job.empty() ? "idle" : "busy");
    i.job_id = w.job;
    i.heartbeat_lag_seconds = std::chrono::duration<double>(now - w.last_beat).count();
    out.push_back(i);
  }
  return out;
}

}  // namespace strata::coordinator
