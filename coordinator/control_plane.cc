#include "coordinator/control_plane.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "comm/tcp_store.h"
#include "proto/control.pb.h"
#include "proto/frame.h"

namespace strata::coordinator {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

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

Result<Layout> DataParallelLayout(const proto::JobSpec& spec, int workers) {
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

Result<Layout> PlannedLayout(const proto::JobSpec& spec, int workers) {
  Result<DeviceProfile> cpu = DeviceProfileByName("cpu");
  if (cpu.ok()) {
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
    int fd = -1;
    std::string host, device;
    int64_t memory = 0;
    Clock::time_point last_beat;
    std::string job;  // assigned job ("" idle)
    int64_t generation = 0;
    int rank = -1;
    bool dead = false;
    std::shared_ptr<std::mutex> write_mu = std::make_shared<std::mutex>();
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
  };

  JobStore* store = nullptr;
  comm::TcpStoreServer* rendezvous = nullptr;
  ControlPlaneOptions options;
  int listen_fd = -1, port = 0;
  std::atomic<bool> stopping{false};
  std::atomic<int64_t> recoveries{0};
  std::thread acceptor, scheduler;
  std::mutex mu;
  std::map<std::string, Worker> workers;  // GUARDED_BY(mu)
  std::map<std::string, Active> active;   // GUARDED_BY(mu)
  // One thread per worker connection; finished ones are joined when the next one is accepted,
  // so reconnecting workers do not accumulate threads.
  struct Reader {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  std::vector<Reader> readers;  // GUARDED_BY(mu)

  void Send(const std::string& worker_id, const proto::ControlMessage& m) {
    int fd;
    std::shared_ptr<std::mutex> wmu;
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = workers.find(worker_id);
      if (it == workers.end() || it->second.dead) return;
      fd = it->second.fd;
      wmu = it->second.write_mu;
    }
    std::lock_guard<std::mutex> lock(*wmu);
    if (!wire::WriteFrame(fd, m).ok()) {
      std::lock_guard<std::mutex> l(mu);
      auto it = workers.find(worker_id);
      if (it != workers.end() && it->second.fd == fd) it->second.dead = true;
    }
  }

  void Log(const std::string& job, const std::string& text) {
    Result<int64_t> r = store->AppendLog(job, text);
    (void)r;
  }

  // ---- connections ----

  void Accept() {
    while (!stopping.load()) {
      const int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) {
        if (stopping.load()) return;
        std::this_thread::sleep_for(milliseconds(10));
        continue;
      }
      std::lock_guard<std::mutex> lock(mu);
      for (auto it = readers.begin(); it != readers.end();) {
        if (!it->done->load()) {
          ++it;
          continue;
        }
        it->thread.join();
        it = readers.erase(it);
      }
      auto done = std::make_shared<std::atomic<bool>>(false);
      readers.push_back({std::thread([this, fd, done] {
                           Serve(fd);
                           done->store(true);
                         }),
                         done});
    }
  }

  void Serve(int fd) {
    proto::ControlMessage m;
    if (!wire::ReadFrame(fd, &m, milliseconds(5000)).ok() || !m.has_hello()) {
      ::close(fd);  // garbage, a stranger or too slow: drop the connection, stay up
      return;
    }
    const proto::WorkerHello hello = m.hello();
    proto::ControlMessage reply;
    proto::HelloReply* r = reply.mutable_hello_reply();
    if (!ConstantTimeEqual(hello.secret(), options.secret) || hello.worker_id().empty()) {
      r->set_ok(false);
      r->set_error(hello.worker_id().empty() ? "worker_id is empty" : "wrong control-plane secret");
      (void)wire::WriteFrame(fd, reply);
      ::close(fd);
      return;
    }
    const std::string id = hello.worker_id();
    {
      std::lock_guard<std::mutex> lock(mu);
      Worker& w = workers[id];
      if (w.fd >= 0 && !w.dead) ::shutdown(w.fd, SHUT_RDWR);  // a re-registration replaces it
      w = Worker();
      w.fd = fd;
      w.host = hello.host();
      w.device = hello.device();
      w.memory = hello.memory_bytes();
      w.last_beat = Clock::now();
    }
    r->set_ok(true);
    r->set_heartbeat_ms(static_cast<int32_t>(options.heartbeat.count()));
    r->set_store_host(options.store_host);
    r->set_store_port(rendezvous->port());
    Send(id, reply);
    spdlog::info("worker {} registered ({} at {})", id, hello.device(), hello.host());
    while (!stopping.load()) {
      proto::ControlMessage in;
      Status s = wire::ReadFrame(fd, &in, milliseconds(500));
      if (s.code() == StatusCode::kDeadlineExceeded) continue;
      if (!s.ok()) break;
      Handle(id, fd, in);
    }
    std::lock_guard<std::mutex> lock(mu);
    auto it = workers.find(id);
    if (it != workers.end() && it->second.fd == fd) it->second.dead = true;
    ::close(fd);
  }

  void Handle(const std::string& id, int fd, const proto::ControlMessage& in) {
    if (in.has_heartbeat()) {
      std::lock_guard<std::mutex> lock(mu);
      auto it = workers.find(id);
      if (it != workers.end() && it->second.fd == fd) it->second.last_beat = Clock::now();
    } else if (in.has_step()) {
      const proto::StepReport& s = in.step();
      Status st = store->ReportProgress(s.job_id(), s.generation(),
                                        {s.step(), s.loss(), s.tokens_per_second()});
      if (st.ok()) {
        Log(s.job_id(), fmt::format("step {} | loss {:.4f} | {:.0f} tok/s", s.step(), s.loss(),
                                    s.tokens_per_second()));
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

  std::vector<std::string> IdleWorkers() {  // REQUIRES(mu)
    std::vector<std::string> idle;
    for (const auto& [id, w] : workers) {
      if (!w.dead && w.job.empty()) idle.push_back(id);
    }
    return idle;
  }

  // Plans `spec` over `idle` and assigns it (the job's record is at `generation`).
  Status Assign(const proto::JobRecord& rec, std::vector<std::string> idle, bool resume) {
    const int want = std::max(1, rec.spec().resources().workers());
    if (static_cast<int>(idle.size()) > want) idle.resize(static_cast<size_t>(want));
    ASSIGN_OR_RETURN(Layout l, options.layout(rec.spec(), static_cast<int>(idle.size())));
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
                            resume ? ", resuming from the last committed checkpoint" : "");
    ASSIGN_OR_RETURN(proto::JobRecord now,
                     store->Transition(rec.id(), proto::JOB_STATE_RUNNING, up));
    rendezvous->SetMinGeneration(rec.id(), now.generation());
    Active a;
    a.generation = now.generation();
    a.ranks.assign(idle.begin(), idle.begin() + world);
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
    Result<proto::JobRecord> now =
        store->Transition(job, proto::JOB_STATE_RECOVERING, Update(why, ""));
    if (!now.ok()) return;
    rendezvous->SetMinGeneration(job, now->generation());
    recoveries.fetch_add(1);
    spdlog::warn("{}: recovering (generation {}): {}", job, now->generation(), why);
    AbortWorkers(job, why);
    std::lock_guard<std::mutex> lock(mu);
    Active& a = active[job];
    a.recovering = true;
    a.generation = now->generation();
    a.deadline = Clock::now() + options.exit_wait;
    a.waiting = false;
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
          if (w.fd >= 0) ::shutdown(w.fd, SHUT_RDWR);
          it = workers.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (const auto& [job, why] : lost) Recover(job, why);

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
      {
        std::lock_guard<std::mutex> lock(mu);
        for (const auto& [id, w] : workers) {
          if (w.job == job && w.generation < a.generation) survivors_busy = true;
        }
        if (survivors_busy && now < a.deadline) continue;
        for (auto& [id, w] : workers) {
          if (w.job == job) w.job.clear();  // exit wait over: the next Assign replaces the rank
        }
        idle = IdleWorkers();
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
        idle = IdleWorkers();
      }
      const int want = std::max(1, rec.spec().resources().workers());
      if (static_cast<int>(idle.size()) < want) break;  // first come, first served
      Result<proto::JobRecord> planning = store->Transition(rec.id(), proto::JOB_STATE_PLANNING);
      if (!planning.ok()) continue;
      Status s = Assign(*planning, idle, /*resume=*/true);
      if (!s.ok()) Fail(rec.id(), "planning failed: " + s.ToString());
    }
  }

  void Schedule() {
    while (!stopping.load()) {
      Tick();
      std::this_thread::sleep_for(milliseconds(100));
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
  ASSIGN_OR_RETURN(m.listen_fd, wire::Listen(m.options.listen, &m.port));
  m.acceptor = std::thread([&m] { m.Accept(); });
  m.scheduler = std::thread([&m] { m.Schedule(); });
  return cp;
}

ControlPlane::~ControlPlane() { Stop(); }

void ControlPlane::Stop() {
  if (!impl_ || impl_->stopping.exchange(true)) return;
  Impl& m = *impl_;
  ::shutdown(m.listen_fd, SHUT_RDWR);
  ::close(m.listen_fd);
  if (m.acceptor.joinable()) m.acceptor.join();
  if (m.scheduler.joinable()) m.scheduler.join();
  std::vector<Impl::Reader> readers;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    for (auto& [id, w] : m.workers) {
      if (w.fd >= 0) ::shutdown(w.fd, SHUT_RDWR);
    }
    readers.swap(m.readers);
  }
  for (Impl::Reader& r : readers) r.thread.join();
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
    i.state = w.dead ? "lost" : (w.job.empty() ? "idle" : "busy");
    i.job_id = w.job;
    i.heartbeat_lag_seconds = std::chrono::duration<double>(now - w.last_beat).count();
    out.push_back(i);
  }
  return out;
}

}  // namespace strata::coordinator
