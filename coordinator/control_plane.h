// The control plane: the coordinator's side of proto/control.proto. Workers connect, register
// (WorkerHello) and heartbeat; a scheduler thread (every 100 ms)
//   - starts PENDING jobs when enough idle workers exist: PLANNING (new generation) -> plan ->
//     RUNNING, one Assign per rank;
//   - declares a worker dead after `dead_after` without a heartbeat (or when its connection
//     drops) and recovers every job it served: RECOVERING (new generation; the rendezvous
//     store fences the old one out), AbortJob to the survivors, wait for their RankExit (bounded),
//     re-plan on the idle workers, RUNNING again with resume = true: every rank loads the last
//     committed checkpoint resharded onto the new layout;
//   - finishes a job when every rank reported RankExit ok (SUCCEEDED), or fails it after
//     resources.max_restarts recoveries, or when fewer than resources.min_workers stay available
//     for `min_workers_wait`.
// Connections are served by one Boost.Asio thread (length-prefixed frames, proto/frame.h):
// garbage, an oversized or unparsable frame, a first frame that is not a WorkerHello, a wrong
// secret or silence past hello_timeout drop that connection and nothing else. A Heartbeat with
// want_ack is answered with a HeartbeatAck once processed (bench/coordinator_scale measures it).
// Cancellation through the API (JobStore observer) sends AbortJob to the job's workers.
// Jobs without checkpoint.dir get <checkpoint_root>/<job id> and checkpoint.every 10 (0 stays
// "only at the end" when set explicitly with a dir), so that recovery has something to resume.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "common/status.h"
#include "coordinator/job_store.h"
#include "coordinator/planner.h"
#include "coordinator/worker_directory.h"
#include "proto/job.pb.h"

namespace strata::comm {
class TcpStoreServer;
}

namespace strata::coordinator {

// Picks a layout for `workers` workers (it may use fewer). `worker_flops`: the slowest of those
// workers' measured GEMM rate (WorkerHello.gemm_flops; 0 = unknown).
using LayoutFn =
    std::function<Result<Layout>(const proto::JobSpec&, int workers, double worker_flops)>;
// tp = pp = 1 and the largest dp <= workers that divides global_batch / micro_batch.
Result<Layout> DataParallelLayout(const proto::JobSpec& spec, int workers, double worker_flops = 0);
// The planner (planner.h) for CPU workers — any of dp, tp, pp may change between
// generations — falling back to DataParallelLayout when it finds nothing.
// CPU workers are costed at `worker_flops` when it is known (the rate each worker measured at
// start with its own thread count), else at the CPU profile's default.
Result<Layout> PlannedLayout(const proto::JobSpec& spec, int workers, double worker_flops = 0);

struct ControlPlaneOptions {
  std::string listen = "127.0.0.1:0";
  std::string secret;  // workers must present it when not empty
  std::chrono::milliseconds heartbeat{250};
  std::chrono::milliseconds dead_after{2000};
  std::chrono::milliseconds exit_wait{5000};  // how long survivors get to report RankExit
  std::chrono::milliseconds min_workers_wait{60000};
  // A new connection must send its WorkerHello within this, or it is dropped.
  std::chrono::milliseconds hello_timeout{5000};
  std::string checkpoint_root;  // for jobs without checkpoint.dir
  std::string store_host = "127.0.0.1";
  LayoutFn layout = PlannedLayout;
};

class ControlPlane : public WorkerDirectory {
 public:
  // Listens and starts the scheduler. `store` and `rendezvous` must outlive it.
  static Result<std::unique_ptr<ControlPlane>> Start(JobStore* store,
                                                     comm::TcpStoreServer* rendezvous,
                                                     ControlPlaneOptions options);
  ~ControlPlane() override;  // Stop()
  void Stop();
  int port() const;
  std::vector<WorkerInfo> List() override;
  int64_t recoveries() const;

 private:
  ControlPlane() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace strata::coordinator
