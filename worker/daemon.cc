#include "worker/daemon.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>

#include "comm/device_staged.h"
#include "comm/gloo.h"
#include "comm/grid.h"
#include "comm/tcp_store.h"
#include "model/cpu_info.h"
#include "proto/control.pb.h"
#include "proto/frame.h"
#include "worker/trainer.h"

namespace strata::worker {
namespace {

using std::chrono::milliseconds;

// The daemon's own stop flag (RunWorkerDaemon's argument), for the fault-injection hook below.
std::atomic<const std::atomic<bool>*> g_daemon_stop{nullptr};

// Fault injection for tests (tests/daemon_test.cc, Daemon.HungRankIsNamedAndQuarantined):
// with STRATA_FAULT_HANG_AFTER_STEP=N in its environment, this worker's rank stops responding
// after step N of the first generation it runs — the training thread sleeps, ignoring aborts,
// while the daemon keeps heartbeating: a hung (not dead) rank. It wakes only when the daemon
// itself is stopped. Unset (always, outside tests): nothing happens.
int64_t HangAfterStep() {
  static const int64_t step = [] {
    const char* v = std::getenv("STRATA_FAULT_HANG_AFTER_STEP");
    return v != nullptr ? std::atoll(v) : -1;
  }();
  return step;
}
std::atomic<bool> g_hung_once{false};

void MaybeHang(int64_t steps_done) {
  if (HangAfterStep() < 0 || steps_done != HangAfterStep() || g_hung_once.exchange(true)) return;
  spdlog::warn("fault injection: rank hangs after step {} (STRATA_FAULT_HANG_AFTER_STEP)",
               steps_done);
  const std::atomic<bool>* stop = g_daemon_stop.load();
  while (stop == nullptr || !stop->load()) std::this_thread::sleep_for(milliseconds(50));
}

// One connection to the coordinator: writes from several threads are serialized.
class Link {
 public:
  explicit Link(int fd) : fd_(fd) {}
  ~Link() { ::close(fd_); }
  int fd() const { return fd_; }
  Status Send(const proto::ControlMessage& m) {
    std::lock_guard<std::mutex> lock(mu_);
    return wire::WriteFrame(fd_, m);
  }

 private:
  int fd_;
  std::mutex mu_;
};

// The rank this worker runs (at most one at a time).
class RankRunner {
 public:
  RankRunner(const DaemonOptions& options, std::string store_addr)
      : options_(options), store_addr_(std::move(store_addr)) {}
  ~RankRunner() { Stop(); }

  bool busy() {
    std::lock_guard<std::mutex> lock(mu_);
    return thread_.joinable() && !finished_;
  }
  std::string job() {
    std::lock_guard<std::mutex> lock(mu_);
    return job_;
  }
  int64_t generation() {
    std::lock_guard<std::mutex> lock(mu_);
    return generation_;
  }

  // Aborts the running rank (if any) and waits for its thread.
  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_.store(true);
      for (comm::ProcessGroup* g : groups_) g->Abort();
      if (trainer_ != nullptr) trainer_->CancelCheckpointCommitWait();
    }
    if (thread_.joinable()) thread_.join();
    std::lock_guard<std::mutex> lock(mu_);
    groups_.clear();
    job_.clear();
    generation_ = 0;
  }

  void Start(const proto::Assign& a, std::shared_ptr<Link> link) {
    Stop();
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(false);
    finished_ = false;
    job_ = a.job_id();
    generation_ = a.generation();
    thread_ = std::thread([this, a, link] { Run(a, link); });
  }

  // Aborts only when (job, generation) is what runs (fencing).
  void Abort(const proto::AbortJob& m) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (m.job_id() != job_ || m.generation() != generation_) return;
    }
    spdlog::info("abort {} generation {}: {}", m.job_id(), m.generation(), m.reason());
    Stop();
  }

 private:
  void Run(proto::Assign a, std::shared_ptr<Link> link) {
    proto::RankExit exit;
    exit.set_job_id(a.job_id());
    exit.set_generation(a.generation());
    exit.set_rank(a.rank());
    Status s = Train(a, link, &exit);
    exit.set_ok(s.ok());
    if (!s.ok()) exit.set_error(s.ToString());
    if (!s.ok() && !stop_.load())
      spdlog::error("rank {} of {}: {}", a.rank(), a.job_id(), s.ToString());
    proto::ControlMessage m;
    *m.mutable_exit() = exit;
    (void)link->Send(m);  // a lost coordinator learns from the missing heartbeats instead
    std::lock_guard<std::mutex> lock(mu_);
    finished_ = true;
  }

  Status Train(const proto::Assign& a, const std::shared_ptr<Link>& link, proto::RankExit* exit) {
    comm::TcpStoreOptions so;
    so.secret = options_.secret;
    so.job = a.job_id();
    so.generation = a.generation();
    std::string host;
    int port = 0;
    RETURN_IF_ERROR(wire::SplitHostPort(store_addr_, &host, &port, "store address"));
    ASSIGN_OR_RETURN(std::shared_ptr<comm::TcpStoreClient> store,
                     comm::ConnectTcpStoreClient(host, port, so));
    const milliseconds timeout =
        a.job().resources().has_collective_timeout_s()
            ? milliseconds(1000LL * a.job().resources().collective_timeout_s())
            : options_.collective_timeout;
    comm::GlooOptions go;
    go.hostname = options_.host;
    go.name = "world";
    ASSIGN_OR_RETURN(std::unique_ptr<comm::ProcessGroup> world,
                     comm::MakeGlooGroup(store, "world", a.rank(), a.world(), timeout, go));
    const proto::ParallelSpec& par = a.job().parallel();
    ASSIGN_OR_RETURN(comm::Grid grid, comm::Grid::Create(a.world(), par.dp(), par.tp(), par.pp()));
    ASSIGN_OR_RETURN(comm::GridGroups groups, comm::SplitGrid(*world, grid));
    const bool cuda = options_.device == "cuda";
    if (cuda) {
      comm::HostStagingOptions staging;
      staging.device = options_.cuda_device;
      groups.dp = comm::WrapWithHostStaging(std::move(groups.dp), staging);
      groups.tp = comm::WrapWithHostStaging(std::move(groups.tp), staging);
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      groups_ = {world.get(), groups.dp.get(), groups.tp.get(), groups.pp.get()};
      if (stop_.load()) return Cancelled("aborted while forming groups");
    }
    TrainOptions opt;
    opt.threads = options_.threads;
    if (cuda) {
      opt.device = "cuda";
      opt.cuda_device = options_.cuda_device;
      opt.device_groups = true;  // dp and tp take device buffers (staged), pp host buffers
    }
    opt.log_steps = a.rank() == 0;
    opt.dp_group = groups.dp.get();
    opt.tp_group = groups.tp.get();
    opt.pp_group = groups.pp.get();
    opt.comm_timeout = timeout;
    opt.checkpoint_tag = fmt::format("g{}", a.generation());
    // The coordinator commits: each rank reports its shards written, rank 0 with the manifest.
    opt.external_commit = true;
    opt.on_checkpoint_written = [job = a.job_id(), generation = a.generation(), rank = a.rank(),
                                 link](const proto::Manifest& manifest, const Status& s) {
      proto::ControlMessage m;
      proto::CheckpointWritten* cw = m.mutable_checkpoint();
      cw->set_job_id(job);
      cw->set_generation(generation);
      cw->set_rank(rank);
      cw->set_step(manifest.step());
      cw->set_ok(s.ok());
      if (!s.ok()) cw->set_error(s.ToString());
      if (rank == 0) *cw->mutable_manifest() = manifest;
      (void)link->Send(m);
    };
    // The rendezvous store refuses a fenced-out generation: ask it before committing.
    opt.checkpoint_fence = [store]() -> Status {
      Result<bool> r = store->Check({"world/rank_0"});
      return r.ok() ? Status::Ok() : r.status();
    };
    if (a.rank() != 0 && HangAfterStep() >= 0) {
      opt.on_step = [](const StepStats& st) { MaybeHang(st.step + 1); };
    }
    if (a.rank() == 0) {
      opt.on_step = [&](const StepStats& st) {
        MaybeHang(st.step + 1);
        proto::ControlMessage m;
        proto::StepReport* r = m.mutable_step();
        r->set_job_id(a.job_id());
        r->set_generation(a.generation());
        r->set_rank(a.rank());
        r->set_step(st.step + 1);
        r->set_loss(st.loss);
        r->set_tokens_per_second(st.tokens_per_second);
        (void)link->Send(m);
      };
    }
    ASSIGN_OR_RETURN(std::unique_ptr<Trainer> trainer, Trainer::Create(a.job(), opt));
    struct Registered {  // trainer_ points at the trainer while it exists
      RankRunner* r;
      ~Registered() {
        std::lock_guard<std::mutex> lock(r->mu_);
        r->trainer_ = nullptr;
      }
    } registered{this};
    {
      std::lock_guard<std::mutex> lock(mu_);
      trainer_ = trainer.get();
      if (stop_.load()) return Cancelled("aborted before training");
    }
    ASSIGN_OR_RETURN(const int64_t start, trainer->StartCheckpoints(a.resume()));
    if (a.rank() == 0) {
      spdlog::info("{} generation {}: rank 0 of {} (dp {} tp {} pp {}), starting at step {}",
                   a.job_id(), a.generation(), a.world(), par.dp(), par.tp(), par.pp(), start);
    }
    Result<TrainSummary> run = trainer->Run(&stop_);
    exit->set_step(trainer->step());
    {
      std::lock_guard<std::mutex> lock(mu_);
      groups_.clear();
    }
    if (!run.ok()) return run.status();
    if (run->interrupted) return Cancelled("aborted by the coordinator");
    return Status::Ok();
  }

  const DaemonOptions& options_;
  const std::string store_addr_;
  std::mutex mu_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  bool finished_ = false;                    // GUARDED_BY(mu_)
  std::string job_;                          // GUARDED_BY(mu_)
  int64_t generation_ = 0;                   // GUARDED_BY(mu_)
  std::vector<comm::ProcessGroup*> groups_;  // GUARDED_BY(mu_)
  Trainer* trainer_ = nullptr;               // GUARDED_BY(mu_)
};

// One registration: returns when the connection is lost or *stop.
Status Session(const DaemonOptions& options, const std::atomic<bool>* stop, int fd) {
  auto link = std::make_shared<Link>(fd);
  proto::ControlMessage hello;
  proto::WorkerHello* h = hello.mutable_hello();
  h->set_worker_id(options.worker_id);
  h->set_host(options.host);
  h->set_device(options.device);
  h->set_gemm_flops(model::MeasuredGemmFlops());
  h->set_threads(model::NumThreads());
  h->set_secret(options.secret);
  RETURN_IF_ERROR(link->Send(hello));
  proto::ControlMessage reply;
  RETURN_IF_ERROR(wire::ReadFrame(fd, &reply, milliseconds(10000)));
  if (!reply.has_hello_reply()) return Status(StatusCode::kUnavailable, "no hello reply");
  if (!reply.hello_reply().ok()) {
    return InvalidArgument("coordinator refused the registration: " + reply.hello_reply().error());
  }
  const std::string store_addr =
      fmt::format("{}:{}", reply.hello_reply().store_host(), reply.hello_reply().store_port());
  const milliseconds beat(std::max(50, reply.hello_reply().heartbeat_ms()));
  spdlog::info("registered with {} as {} (store {})", options.coordinator, options.worker_id,
               store_addr);
  RankRunner runner(options, store_addr);
  std::atomic<bool> lost{false};
  std::thread heartbeat([&] {
    while (!stop->load() && !lost.load()) {
      proto::ControlMessage m;
      m.mutable_heartbeat()->set_job_id(runner.job());
      m.mutable_heartbeat()->set_generation(runner.generation());
      if (!link->Send(m).ok()) lost.store(true);
      std::this_thread::sleep_for(beat);
    }
  });
  Status status;
  while (!stop->load() && !lost.load()) {
    proto::ControlMessage m;
    Status s = wire::ReadFrame(fd, &m, milliseconds(200));
    if (s.code() == StatusCode::kDeadlineExceeded) continue;
    if (!s.ok()) {
      status = Status(StatusCode::kUnavailable, "lost the coordinator: " + s.message());
      break;
    }
    if (m.has_assign()) {
      spdlog::info("assigned {} generation {}: rank {} of {}", m.assign().job_id(),
                   m.assign().generation(), m.assign().rank(), m.assign().world());
      runner.Start(m.assign(), link);
    } else if (m.has_abort()) {
      runner.Abort(m.abort());
    }
  }
  lost.store(true);
  heartbeat.join();
  runner.Stop();
  return status;
}

}  // namespace

Status RunWorkerDaemon(const DaemonOptions& in, const std::atomic<bool>* stop) {
  g_daemon_stop.store(stop);
  DaemonOptions options = in;
  if (options.worker_id.empty()) {
    options.worker_id = fmt::format("{}:{}", options.host, ::getpid());
  }
  milliseconds backoff(100);
  while (!stop->load()) {
    Result<int> fd = wire::Connect(options.coordinator, milliseconds(2000));
    if (!fd.ok()) {
      std::this_thread::sleep_for(backoff);
      backoff = std::min(backoff * 2, milliseconds(2000));
      continue;
    }
    backoff = milliseconds(100);
    Status s = Session(options, stop, *fd);
    if (s.code() == StatusCode::kInvalidArgument) return s;
    if (!s.ok()) spdlog::warn("{}; reconnecting", s.ToString());
  }
  return Status::Ok();
}

}  // namespace strata::worker
