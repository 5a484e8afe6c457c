// strata-worker: the mpirun entry (architecture mode 2).
//
//   mpirun -np 8 strata-worker --job job.yaml --dp 2 --tp 2 --pp 2
//   mpirun -np 4 strata-worker --job job.yaml          # layout chosen by a simple rule
//
// MPI gives the ranks; every rank loads the same job, builds the same 3D grid and splits its
// groups; rank 0 prints the layout and the per-step log. A failure ends the run (MPI semantics).
// The daemon mode (--coordinator) arrives with the coordinator issue.
//
// Exit codes: 0 done, 1 runtime failure, 2 bad input, 130 interrupted.
#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "comm/device_staged.h"
#include "comm/grid.h"
#include "comm/mpi.h"
#include "comm/nccl.h"
#include "common/logging.h"
#include "model/cpu_info.h"
#include "proto/job_spec.h"
#include "worker/daemon.h"
#include "worker/device_ops.h"
#include "worker/trainer.h"

namespace {

constexpr const char* kUsage =
    "usage: mpirun -np N strata-worker --job JOB.yaml [--dp N] [--tp N] [--pp N] [--zero1]\n"
    "                                  [--max-steps N] [--micro-batch N] [--threads N]\n"
    "                                  [--metrics FILE] [--resume]\n"
    "                                  [--checkpoint-dir DIR] [--checkpoint-every N]\n"
    "                                  [--no-overlap] [--log-level LEVEL]\n"
    "                                  [--device cpu|cuda]\n"
    "  --dp/--tp/--pp override parallel.dp/tp/pp of the job (0 or absent: chosen by the rule\n"
    "  tp = pp = 1, dp = world size). --threads: CPU threads per rank (default: cores divided\n"
    "  among the ranks on this node; under srun, SLURM_CPUS_PER_TASK when set).\n"
    "  --metrics: rank 0 appends one JSON line per step.\n"
    "  --no-overlap: reduce gradients after backward instead of during it (benchmarking).\n"
    "  --memory-report: every rank prints its memory, measured and estimated, as JSON.\n"
    "  --resume: continue from the latest usable committed checkpoint in checkpoint.dir,\n"
    "  whatever layout wrote it; --checkpoint-dir/--checkpoint-every override the job's.\n"
    "  --device: overrides resources.device. cuda: each rank uses GPU (local rank % visible\n"
    "  GPUs); tensor- and data-parallel groups are NCCL when every rank of every node has a\n"
    "  GPU of its own, else MPI with host staging (slow); pipeline activations go through\n"
    "  host memory over MPI.\n";

struct Args {
  std::string job, metrics, level = "info", device;
  int dp = -1, tp = -1, pp = -1, threads = -1, micro_batch = -1;
  long long max_steps = -1;
  bool zero1 = false;
  bool no_overlap = false;
  bool memory_report = false;
  bool resume = false;
  std::string checkpoint_dir;
  long long checkpoint_every = -1;
};

bool ParseInt(const std::string& s, long long* out) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || errno != 0 || v < 0) return false;
  *out = v;
  return true;
}

strata::Status ParseArgs(int argc, char** argv, Args* a) {
  for (int i = 1; i < argc; ++i) {
    const std::string f = argv[i];
    auto value = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    if (f == "--zero1") {
      a->zero1 = true;
      continue;
    }
    if (f == "--no-overlap") {
      a->no_overlap = true;
      continue;
    }
    if (f == "--memory-report") {
      a->memory_report = true;
      continue;
    }
    if (f == "--resume") {
      a->resume = true;
      continue;
    }
    if (f == "--help" || f == "-h") return strata::InvalidArgument("");
    const char* v = value();
    if (v == nullptr) return strata::InvalidArgument(f + " needs a value");
    long long n = 0;
    if (f == "--job") {
      a->job = v;
    } else if (f == "--metrics") {
      a->metrics = v;
    } else if (f == "--log-level") {
      a->level = v;
    } else if (f == "--device") {
      if (std::string(v) != "cpu" && std::string(v) != "cuda") {
        return strata::InvalidArgument(std::string("--device: '") + v + "' is not cpu or cuda");
      }
      a->device = v;
    } else if (f == "--checkpoint-dir") {
      a->checkpoint_dir = v;
    } else if (f == "--dp" || f == "--tp" || f == "--pp" || f == "--threads" ||
               f == "--max-steps" || f == "--micro-batch" || f == "--checkpoint-every") {
      if (!ParseInt(v, &n)) {
        return strata::InvalidArgument(f + ": '" + v + "' is not a non-negative integer");
      }
      if (f == "--dp") a->dp = static_cast<int>(n);
      if (f == "--tp") a->tp = static_cast<int>(n);
      if (f == "--pp") a->pp = static_cast<int>(n);
      if (f == "--threads") a->threads = static_cast<int>(n);
      if (f == "--max-steps") a->max_steps = n;
      if (f == "--micro-batch") a->micro_batch = static_cast<int>(n);
      if (f == "--checkpoint-every") a->checkpoint_every = n;
    } else {
      return strata::InvalidArgument("unknown flag '" + f + "'");
    }
  }
  if (a->job.empty()) return strata::InvalidArgument("--job JOB.yaml is required");
  return strata::Status::Ok();
}

// Threads per rank when not given: this node's cores divided among its ranks on it. Under
// mpirun, OMPI_COMM_WORLD_LOCAL_SIZE counts them (first: Slurm variables of an enclosing
// allocation describe its tasks, not mpirun's ranks). Under srun, the CPUs Slurm gave the task
// (SLURM_CPUS_PER_TASK, from --cpus-per-task), else the cores divided by --ntasks-per-node
// (SLURM_NTASKS_PER_NODE). One rank when none is set.
int DefaultThreads() {
  // 0 when unset or not a number.
  auto env_int = [](const char* name) {
    const char* v = std::getenv(name);
    return v != nullptr ? std::max(0, std::atoi(v)) : 0;
  };
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  int ranks = env_int("OMPI_COMM_WORLD_LOCAL_SIZE");
  if (ranks == 0) {
    if (const int cpus = env_int("SLURM_CPUS_PER_TASK"); cpus > 0) return cpus;
    ranks = env_int("SLURM_NTASKS_PER_NODE");
  }
  return std::max(1, cores / std::max(1, ranks));
}

// This process's index among the ranks on its node, and their number (Open MPI, then MPICH /
// Hydra, then Slurm); the world rank and size when none is set (one node).
int LocalRank(int world_rank) {
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"}) {
    if (const char* v = std::getenv(name)) return std::max(0, std::atoi(v));
  }
  return world_rank;
}
int LocalSize(int world_size) {
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"}) {
    if (const char* v = std::getenv(name)) return std::max(1, std::atoi(v));
  }
  return world_size;
}

// An NCCL group over the ranks of the MPI group `mpi` (size > 1): the unique id is made on its
// rank 0 and broadcast over `mpi`.
strata::Result<std::unique_ptr<strata::comm::ProcessGroup>> NcclOver(
    strata::comm::ProcessGroup& mpi, int device, std::chrono::milliseconds timeout) {
  ASSIGN_OR_RETURN(std::string id, strata::comm::ShareNcclUniqueId(mpi, timeout));
  strata::comm::NcclGroupOptions o;
  o.rank = mpi.rank();
  o.size = mpi.size();
  o.device = device;
  o.unique_id = id;
  o.name = mpi.name() + "/nccl";
  o.timeout = timeout;
  return strata::comm::CreateNcclGroup(o);
}

int Fail(int rank, const std::string& what, const strata::Status& s) {
  if (rank == 0 || s.code() != strata::StatusCode::kInvalidArgument) {
    std::fprintf(stderr, "strata-worker[%d]: %s: %s\n", rank, what.c_str(), s.message().c_str());
  }
  const int code = (s.code() == strata::StatusCode::kInvalidArgument ||
                    s.code() == strata::StatusCode::kNotFound)
                       ? 2
                       : 1;
  // Every rank reaches the same verdict on bad input, so all can finalise; after a runtime
  // failure peers may be stuck in a collective and MPI ends the job when this rank exits.
  if (code == 2) strata::comm::MpiFinalize().IgnoreError();
  return code;
}

// Daemon mode: `strata-worker --coordinator HOST:PORT [--host ADDR] [--worker-id ID]
// [--threads N] [--secret-file F] [--device cpu|cuda] [--cuda-device N] [--log-level L]` registers
// with the coordinator and runs what it is assigned until SIGINT/SIGTERM.
std::atomic<bool> g_daemon_stop{false};

int DaemonMain(int argc, char** argv) {
  strata::worker::DaemonOptions o;
  std::string level = "info";
  for (int i = 1; i < argc; ++i) {
    const std::string f = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "strata-worker: %s needs a value\n", f.c_str());
      return 2;
    }
    const std::string v = argv[++i];
    long long n = 0;
    if (f == "--coordinator") {
      o.coordinator = v;
    } else if (f == "--host") {
      o.host = v;
    } else if (f == "--worker-id") {
      o.worker_id = v;
    } else if (f == "--log-level") {
      level = v;
    } else if (f == "--device") {
      if (v != "cpu" && v != "cuda") {
        std::fprintf(stderr, "strata-worker: --device: '%s' is not cpu or cuda\n", v.c_str());
        return 2;
      }
      if (v == "cuda") {
        const strata::Status usable = strata::worker::CudaUsable();
        if (!usable.ok()) {
          std::fprintf(stderr, "strata-worker: --device cuda: %s\n", usable.message().c_str());
          return 2;
        }
      }
      o.device = v;
    } else if (f == "--cuda-device") {
      if (!ParseInt(v, &n) || n >= strata::worker::VisibleCudaDevices()) {
        std::fprintf(stderr,
                     "strata-worker: --cuda-device: '%s' is not a visible CUDA device index "
                     "(%d visible)\n",
                     v.c_str(), strata::worker::VisibleCudaDevices());
        return 2;
      }
      o.cuda_device = static_cast<int>(n);
    } else if (f == "--threads") {
      if (!ParseInt(v, &n)) {
        std::fprintf(stderr, "strata-worker: --threads: '%s' is not a non-negative integer\n",
                     v.c_str());
        return 2;
      }
      o.threads = static_cast<int>(n);
    } else if (f == "--secret-file") {
      std::ifstream in(v);
      if (!in) {
        std::fprintf(stderr, "strata-worker: --secret-file: cannot read %s\n", v.c_str());
        return 2;
      }
      std::getline(in, o.secret);
    } else {
      std::fprintf(stderr, "strata-worker: unknown flag '%s' in daemon mode\n", f.c_str());
      return 2;
    }
  }
  strata::InitLogging(level.c_str());
  std::signal(SIGINT, [](int) { g_daemon_stop.store(true); });
  std::signal(SIGTERM, [](int) { g_daemon_stop.store(true); });
  strata::Status s = strata::worker::RunWorkerDaemon(o, &g_daemon_stop);
  if (!s.ok()) {
    std::fprintf(stderr, "strata-worker: %s\n", s.ToString().c_str());
    return s.code() == strata::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}

int Main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--coordinator") return DaemonMain(argc, argv);
  }
  strata::Status st = strata::comm::MpiInit(&argc, &argv);
  if (!st.ok()) {
    std::fprintf(stderr, "strata-worker: MPI: %s\n", st.message().c_str());
    return 1;
  }
  const int rank = strata::comm::MpiWorldRank(), world_size = strata::comm::MpiWorldSize();
  Args a;
  st = ParseArgs(argc, argv, &a);
  if (!st.ok()) {
    if (rank == 0) {
      if (!st.message().empty())
        std::fprintf(stderr, "strata-worker: %s\n\n", st.message().c_str());
      std::fprintf(stderr, "%s", kUsage);
    }
    strata::comm::MpiFinalize().IgnoreError();
    return 2;
  }
  strata::InitLogging(rank == 0 ? a.level.c_str() : "warn");

  auto spec = strata::spec::LoadJobFile(a.job);
  if (!spec.ok()) return Fail(rank, a.job, spec.status());
  auto* par = spec->mutable_parallel();
  if (a.dp >= 0) par->set_dp(a.dp);
  if (a.tp >= 0) par->set_tp(a.tp);
  if (a.pp >= 0) par->set_pp(a.pp);
  if (a.zero1) par->set_zero1(true);
  if (a.micro_batch > 0) spec->mutable_train()->set_micro_batch(a.micro_batch);
  // The simple rule for "auto": no model parallelism, all ranks data-parallel.
  const int tp = par->tp() > 0 ? par->tp() : 1;
  const int pp = par->pp() > 0 ? par->pp() : 1;
  const int dp = par->dp() > 0 ? par->dp() : std::max(1, world_size / (tp * pp));
  auto grid = strata::comm::Grid::Create(world_size, dp, tp, pp);
  if (!grid.ok()) return Fail(rank, "layout", grid.status());
  st = strata::comm::CheckModelFits(*grid, spec->model().heads(), spec->model().d_model(),
                                    spec->model().vocab_size(), spec->model().layers());
  if (!st.ok()) return Fail(rank, "layout", st);
  par->set_dp(dp);
  par->set_tp(tp);
  par->set_pp(pp);

  auto world = strata::comm::MakeMpiWorldGroup();
  if (!world.ok()) return Fail(rank, "MPI world group", world.status());
  auto groups = strata::comm::SplitGrid(**world, *grid);
  if (!groups.ok()) return Fail(rank, "process groups", groups.status());

  strata::worker::TrainOptions opt;
  // device cuda: the tensor- and data-parallel groups must take device buffers. NCCL when every
  // rank has a GPU of its own (NCCL needs one device per rank), else the MPI groups wrapped with
  // host staging. The decision is the same on every rank (a max over the world). The pipeline
  // group stays the plain MPI group: activations travel through host memory in v1.
  const std::string device = a.device.empty() ? spec->resources().device() : a.device;
  if (device == "cuda") {
    st = strata::worker::CudaUsable();
    if (!st.ok()) return Fail(rank, "device", st);
    const int gpus = strata::worker::VisibleCudaDevices();
    opt.device = "cuda";
    opt.cuda_device = LocalRank(rank) % gpus;
    opt.device_groups = true;
    int32_t shared = LocalSize(world_size) > gpus ? 1 : 0;
    st = (*world)
             ->AllReduce(&shared, 1, strata::comm::ElemType::kI32, strata::comm::ReduceOp::kMax)
             ->Wait(opt.comm_timeout);
    if (!st.ok()) return Fail(rank, "device placement", st);
    const bool nccl = shared == 0 && strata::comm::NcclAvailable();
    for (std::unique_ptr<strata::comm::ProcessGroup>* g : {&groups->tp, &groups->dp}) {
      if ((*g)->size() == 1) continue;  // never used by the trainer
      if (nccl) {
        auto made = NcclOver(**g, opt.cuda_device, opt.comm_timeout);
        if (!made.ok()) return Fail(rank, "NCCL group " + (*g)->name(), made.status());
        *g = std::move(*made);  // the MPI group is no longer needed
      } else {
        strata::comm::HostStagingOptions so;
        so.device = opt.cuda_device;
        *g = strata::comm::WrapWithHostStaging(std::move(*g), so);
      }
    }
    if (rank == 0) {
      spdlog::info("device cuda: {} GPU(s) visible per node; tp/dp groups: {}", gpus,
                   nccl ? "NCCL" : "MPI with host staging");
    }
  }
  opt.threads = a.threads >= 0 ? a.threads : DefaultThreads();
  opt.max_steps = a.max_steps;
  opt.log_steps = rank == 0;
  opt.dp_group = groups->dp.get();
  opt.tp_group = groups->tp.get();
  opt.pp_group = groups->pp.get();
  opt.overlap_grad_reduce = !a.no_overlap;
  if (rank == 0) opt.metrics_path = a.metrics;
  if (!a.checkpoint_dir.empty()) spec->mutable_checkpoint()->set_dir(a.checkpoint_dir);
  if (a.checkpoint_every >= 0) {
    spec->mutable_checkpoint()->set_every(static_cast<int32_t>(a.checkpoint_every));
  }
  auto trainer = strata::worker::Trainer::Create(*spec, opt);
  if (!trainer.ok()) return Fail(rank, a.job, trainer.status());
  auto start = (*trainer)->StartCheckpoints(a.resume);
  if (!start.ok()) return Fail(rank, "checkpoint", start.status());
  if (rank == 0) {
    spdlog::info("job '{}': world {} = dp {} x tp {} x pp {}{}, {} threads per rank", spec->name(),
                 world_size, dp, tp, pp, par->zero1() ? " (ZeRO-1)" : "",
                 strata::model::NumThreads());
    std::fprintf(stderr, "%s\n", grid->Describe().c_str());
  }
  // No SIGINT handler: ranks could notice a flag at different steps and leave their peers in a
  // collective; Ctrl-C ends the MPI job (mpirun forwards it) and --resume continues it from
  // the last committed checkpoint.
  auto run = (*trainer)->Run(nullptr);
  if (!run.ok()) return Fail(rank, "training", run.status());
  if (a.memory_report) {
    const strata::worker::MemoryReport m = (*trainer)->Memory();
    std::printf(
        "{\"rank\":%d,\"dp\":%d,\"tp\":%d,\"pp\":%d,\"params\":%lld,\"compute_copy\":%lld,"
        "\"grads\":%lld,\"optimizer\":%lld,\"activations\":%lld,\"est_params\":%lld,"
        "\"est_compute_copy\":%lld,\"est_grads\":%lld,\"est_optimizer\":%lld,"
        "\"est_activations\":%lld}\n",
        rank, dp, tp, pp, static_cast<long long>(m.params), static_cast<long long>(m.compute_copy),
        static_cast<long long>(m.grads), static_cast<long long>(m.optimizer),
        static_cast<long long>(m.activations), static_cast<long long>(m.est_params),
        static_cast<long long>(m.est_compute_copy), static_cast<long long>(m.est_grads),
        static_cast<long long>(m.est_optimizer), static_cast<long long>(m.est_activations));
    std::fflush(stdout);
  }
  if (rank == 0) {
    const auto& s = *run;
    spdlog::info("{}: {} steps in {:.1f} s | loss {:.4f} -> {:.4f}{} | {:.0f} tok/s",
                 s.interrupted ? "interrupted" : "done", s.steps, s.seconds, s.first_loss,
                 s.last_loss,
                 s.last_val_loss >= 0 ? fmt::format(" | val loss {:.4f}", s.last_val_loss) : "",
                 s.tokens_per_second);
  }
  groups->tp.reset();
  groups->pp.reset();
  groups->dp.reset();
  world->reset();
  st = strata::comm::MpiFinalize();
  if (!st.ok()) std::fprintf(stderr, "strata-worker[%d]: %s\n", rank, st.message().c_str());
  return run->interrupted ? 130 : 0;
}

}  // namespace

int main(int argc, char** argv) { return Main(argc, argv); }
