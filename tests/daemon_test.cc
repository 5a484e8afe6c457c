// Daemon mode end to end with real worker processes: a coordinator's job store, rendezvous store
// and control plane in this process, `strata-worker --coordinator` daemons as children. A job
// runs to SUCCEEDED; `kill -9` of a worker mid-job is detected, the job is re-planned on the
// survivors, resumes from the last committed checkpoint and still succeeds.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "comm/tcp_store.h"
#include "coordinator/control_plane.h"
#include "coordinator/job_store.h"
#include "tests/test_util.h"

extern char** environ;

namespace strata {
namespace {

using Clock = std::chrono::steady_clock;

pid_t Spawn(const std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = -1;
  EXPECT_EQ(posix_spawn(&pid, argv[0], nullptr, nullptr, argv.data(), environ), 0);
  return pid;
}

struct Cluster {
  testing::ScratchDir dir;
  std::unique_ptr<coordinator::JobStore> store;
  std::unique_ptr<comm::TcpStoreServer> rendezvous;
  std::unique_ptr<coordinator::ControlPlane> cp;
  std::vector<pid_t> workers;

  int control_port = 0;

  explicit Cluster(int n) {
    StartCoordinator();
    for (int i = 0; i < n; ++i) {
      workers.push_back(
          Spawn({std::string(STRATA_BINARY_DIR) + "/bin/strata-worker", "--coordinator",
                 fmt::format("127.0.0.1:{}", control_port), "--worker-id", fmt::format("w{}", i),
                 "--threads", "1", "--log-level", "warn"}));
    }
  }

  // Opens the store and starts the rendezvous store and control plane (again after
  // StopCoordinator: same data dir, same control port, as a restarted daemon would).
  void StartCoordinator() {
    auto s = coordinator::JobStore::Open(dir.path() + "/state");
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    store = std::move(*s);
    rendezvous = std::make_unique<comm::TcpStoreServer>();
    ASSERT_TRUE(rendezvous->Start("127.0.0.1:0").ok());
    coordinator::ControlPlaneOptions o;
    o.listen = fmt::format("127.0.0.1:{}", control_port);
    o.checkpoint_root = dir.path() + "/ckpt";
    o.heartbeat = std::chrono::milliseconds(100);
    o.dead_after = std::chrono::milliseconds(1500);
    auto c = coordinator::ControlPlane::Start(store.get(), rendezvous.get(), o);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    cp = std::move(*c);
    control_port = cp->port();
  }
  void StopCoordinator() {
    cp->Stop();
    cp.reset();
    rendezvous->Stop();
    rendezvous.reset();
    store.reset();
  }
  ~Cluster() {
    for (pid_t p : workers) {
      ::kill(p, SIGTERM);
    }
    for (pid_t p : workers) {
      int st = 0;
      ::waitpid(p, &st, 0);
    }
    if (cp) cp->Stop();
  }

  // Waits until `pred(record)` holds or `seconds` pass; returns the last record.
  // Submits a 2-worker job of `steps` steps on fresh text; returns its id ("" on failure).
  std::string Submit(int steps);
  proto::JobRecord WaitForStep(const std::string& id, int64_t step) {
    return WaitFor(
        id, [&](const proto::JobRecord& j) { return j.step() >= step; }, 120);
  }
  proto::JobRecord WaitForEnd(const std::string& id) {
    return WaitFor(
        id, [](const proto::JobRecord& j) { return coordinator::IsTerminal(j.state()); }, 180);
  }
  // RUNNING again in a generation after `generation` (a recovery finished).
  proto::JobRecord WaitForRecovery(const std::string& id, int64_t generation) {
    return WaitFor(
        id,
        [&](const proto::JobRecord& j) {
          return j.state() == proto::JOB_STATE_RUNNING && j.generation() > generation;
        },
        60);
  }

  template <typename Pred>
  proto::JobRecord WaitFor(const std::string& id, Pred pred, int seconds) {
    const auto end = Clock::now() + std::chrono::seconds(seconds);
    proto::JobRecord r;
    while (Clock::now() < end) {
      auto rec = store->Get(id);
      if (rec.ok()) {
        r = *rec;
        if (pred(r)) return r;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return r;
  }
};

proto::JobSpec Job(const std::string& text, int workers, int steps) {
  return testing::SpecFromYaml(fmt::format(
      "name: daemon\n"
      "model: {{layers: 2, heads: 2, d_model: 32, seq_len: 16}}\n"
      "data: {{train: {}}}\n"
      "train: {{steps: {}, global_batch: 8, micro_batch: 2, lr: 1.0e-2, warmup: 2, seed: 5}}\n"
      "eval: {{every: 0}}\n"
      "checkpoint: {{every: 5, async: true}}\n"
      "resources: {{workers: {}, min_workers: 1}}\n",
      text, steps, workers));
}

std::string Cluster::Submit(int steps) {
  const std::string text = testing::WriteText(dir.path() + "/in.txt", 20000);
  auto sub = store->Submit(Job(text, 2, steps), "");
  EXPECT_TRUE(sub.ok()) << sub.status().ToString();
  return sub.ok() ? sub->job.id() : "";
}

// The busy worker's index, or -1.
int BusyWorker(Cluster& c, const std::string& id) {
  for (const coordinator::WorkerInfo& w : c.cp->List()) {
    if (w.job_id == id) return std::stoi(w.id.substr(1));
  }
  return -1;
}

TEST(Daemon, JobRunsToSuccessOnWorkers) {
  Cluster c(2);
  const std::string id = c.Submit(12);
  ASSERT_FALSE(id.empty());
  const proto::JobRecord r = c.WaitForEnd(id);
  EXPECT_EQ(r.state(), proto::JOB_STATE_SUCCEEDED) << r.last_error();
  EXPECT_EQ(r.step(), 12);
  EXPECT_EQ(r.layout().dp(), 2);
  EXPECT_EQ(r.restarts(), 0);
}

TEST(Daemon, KilledWorkerIsReplacedAndTheJobSucceeds) {
  Cluster c(3);
  const std::string id = c.Submit(60);
  ASSERT_FALSE(id.empty());
  proto::JobRecord r = c.WaitForStep(id, 12);
  ASSERT_GE(r.step(), 12) << coordinator::JobStateName(r.state()) << " " << r.last_error();
  const int64_t generation = r.generation();
  // Kill one busy worker.
  const int index = BusyWorker(c, id);
  ASSERT_GE(index, 0);
  const auto killed_at = Clock::now();
  ASSERT_EQ(::kill(c.workers[index], SIGKILL), 0);
  r = c.WaitForRecovery(id, generation);
  const double recovered_s = std::chrono::duration<double>(Clock::now() - killed_at).count();
  EXPECT_GT(r.generation(), generation);
  EXPECT_EQ(r.restarts(), 1);
  r = c.WaitForEnd(id);
  EXPECT_EQ(r.state(), proto::JOB_STATE_SUCCEEDED) << r.last_error();
  EXPECT_EQ(r.step(), 60);
  std::printf("re-planned %.2f s after kill -9\n", recovered_s);
}

TEST(Daemon, CoordinatorRestartMidJobContinuesTheJob) {
  Cluster c(2);
  const std::string id = c.Submit(50);
  ASSERT_FALSE(id.empty());
  proto::JobRecord r = c.WaitForStep(id, 10);
  ASSERT_GE(r.step(), 10);
  const int64_t generation = r.generation();
  c.StopCoordinator();  // what kill -9 does to the coordinator's sockets; the store is synced
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  c.StartCoordinator();
  r = c.WaitForEnd(id);
  EXPECT_EQ(r.state(), proto::JOB_STATE_SUCCEEDED) << r.last_error();
  EXPECT_GT(r.generation(), generation);
  EXPECT_EQ(r.step(), 50);
  // The same worker processes ran it: none exited.
  for (pid_t p : c.workers) EXPECT_EQ(::kill(p, 0), 0);
}

TEST(Daemon, PausedWorkerIsEvictedAndItsLateMessagesDoNotCount) {
  Cluster c(3);
  const std::string id = c.Submit(50);
  ASSERT_FALSE(id.empty());
  proto::JobRecord r = c.WaitForStep(id, 10);
  ASSERT_GE(r.step(), 10);
  const int64_t generation = r.generation();
  const int victim = BusyWorker(c, id);
  ASSERT_GE(victim, 0);
  ASSERT_EQ(::kill(c.workers[victim], SIGSTOP), 0);
  r = c.WaitForRecovery(id, generation);
  EXPECT_GT(r.generation(), generation) << "missed heartbeats must evict the paused worker";
  ASSERT_EQ(::kill(c.workers[victim], SIGCONT), 0);  // it wakes up in an older generation
  r = c.WaitForEnd(id);
  EXPECT_EQ(r.state(), proto::JOB_STATE_SUCCEEDED) << r.last_error();
  EXPECT_EQ(r.step(), 50);
  EXPECT_EQ(r.restarts(), 1) << "the woken worker's stale reports must not trigger anything";
}

}  // namespace
}  // namespace strata
