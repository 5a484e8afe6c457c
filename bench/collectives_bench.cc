// Collective benchmarks in the style of nccl-tests.
//
//   mpirun -np N collectives_bench [--max-bytes B] [--min-bytes B]
//       all-reduce, reduce-scatter and all-gather of fp32 through our MPI-backend ProcessGroup
//       and through the blocking MPI call (MPI_Allreduce / MPI_Reduce_scatter_block /
//       MPI_Allgather) on the same buffers in the same run, alternating, best of --rounds;
//       also the raw non-blocking call + MPI_Wait ("nb"), which is what the backend pays
//       underneath above its direct path (comm/mpi.h: point-to-point messages for small
//       sizes), so the table separates MPI's non-blocking cost from the wrapper's.
//   mpirun -np N collectives_bench --overlap-ms C [--min-bytes B] [--max-bytes B]
//       overlap of an all-reduce with computation, as data parallelism does it: issue, compute
//       for about C ms (the same arithmetic on every rank), then Wait. Reports the op alone, the
//       computation alone and with the op in flight, and the Wait left after it ("exposed"); best
//       of --rounds each. hidden = 1 - exposed / alone. Run it with STRATA_MPI_PROGRESS_US=0 to
//       see what Wait alone achieves.
//   collectives_bench --gloo-threads N [...]
//       the same collectives through the Gloo backend, ranks as threads over TCP loopback,
//       and through gloo::allreduce / gloo::allgather called directly on separate contexts
//       (Gloo 2022 has no reduce-scatter of its own; ours is a ring over unbound buffers).
//
// size is the whole buffer as nccl-tests counts it: the all-reduce buffer, the reduce-scatter
// input, the all-gather output (each rank contributes size/N). time is the slowest rank's
// mean per op. algbw = size / time; busbw = algbw * 2(n-1)/n for all-reduce and
// algbw * (n-1)/n for reduce-scatter and all-gather (the bytes each link must carry).
#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/hash_store.h>
#include <gloo/transport/tcp/device.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "comm/gloo.h"
#include "comm/mpi.h"
#include "comm/store.h"

namespace strata::comm {
namespace {

using Clock = std::chrono::steady_clock;

enum class Coll { kAllReduce, kReduceScatter, kAllGather };
const char* CollName(Coll c) {
  return c == Coll::kAllReduce       ? "all_reduce"
         : c == Coll::kReduceScatter ? "reduce_scatter"
                                     : "all_gather";
}
double BusFactor(Coll c, int n) {
  return c == Coll::kAllReduce ? 2.0 * (n - 1) / n : static_cast<double>(n - 1) / n;
}

struct Buffers {
  std::vector<float> in, out;
  size_t count = 0;  // elements per rank's block (all-reduce: the whole buffer)
  size_t bytes = 0;  // the size as reported
};

Buffers MakeBuffers(Coll c, size_t size_bytes, int n) {
  Buffers b;
  if (c == Coll::kAllReduce) {
    b.count = std::max<size_t>(1, size_bytes / sizeof(float));
    b.in.assign(b.count, 1.f);
    b.bytes = b.count * sizeof(float);
  } else {
    b.count = std::max<size_t>(1, size_bytes / sizeof(float) / n);
    b.bytes = b.count * n * sizeof(float);
    if (c == Coll::kReduceScatter) {
      b.in.assign(b.count * n, 1.f);
      b.out.assign(b.count, 0.f);
    } else {
      b.in.assign(b.count, 1.f);
      b.out.assign(b.count * n, 0.f);
    }
  }
  return b;
}

int ItersFor(size_t bytes) {
  // About 64 MB of traffic per measurement, between 5 and 2000 ops.
  return static_cast<int>(std::clamp<size_t>((64u << 20) / std::max<size_t>(bytes, 1), 5, 2000));
}

std::unique_ptr<Work> Issue(ProcessGroup& g, Coll c, Buffers& b) {
  switch (c) {
    case Coll::kAllReduce:
      return g.AllReduce(b.in.data(), b.count, ElemType::kF32, ReduceOp::kSum);
    case Coll::kReduceScatter:
      return g.ReduceScatter(b.in.data(), b.out.data(), b.count, ElemType::kF32, ReduceOp::kSum);
    case Coll::kAllGather:
      return g.AllGather(b.in.data(), b.out.data(), b.count, ElemType::kF32);
  }
  return nullptr;
}

void Die(const Status& s) {
  std::fprintf(stderr, "collectives_bench: %s\n", s.ToString().c_str());
  std::exit(1);
}

// Mean seconds per op on this rank for `iters` ops after `warmup` ones.
double TimeOps(int warmup, int iters, const std::function<void()>& op) {
  for (int i = 0; i < warmup; ++i) op();
  const auto t0 = Clock::now();
  for (int i = 0; i < iters; ++i) op();
  return std::chrono::duration<double>(Clock::now() - t0).count() / iters;
}

void PrintHeader(int n, const char* backend, bool with_raw) {
  std::printf("# %s, %d ranks, fp32 sum; time = slowest rank's mean per op; bw in GB/s\n", backend,
              n);
  if (with_raw) {
    std::printf("%-15s %10s %10s %9s %9s %10s %10s %9s %9s %8s\n", "# collective", "size(B)",
                "raw(us)", "algbw", "busbw", "nb(us)", "ours(us)", "algbw", "busbw", "ours/raw");
  } else {
    std::printf("%-15s %10s %10s %9s %9s\n", "# collective", "size(B)", "time(us)", "algbw",
                "busbw");
  }
}

std::vector<size_t> Sizes(size_t min_bytes, size_t max_bytes) {
  std::vector<size_t> v;
  for (size_t s = min_bytes; s <= max_bytes; s *= 4) v.push_back(s);
  if (v.empty() || v.back() != max_bytes) v.push_back(max_bytes);
  return v;
}

int RunMpi(int argc, char** argv, size_t min_bytes, size_t max_bytes, int rounds) {
  if (Status s = MpiInit(&argc, &argv); !s.ok()) Die(s);
  {
    auto world = MakeMpiWorldGroup();
    if (!world.ok()) Die(world.status());
    ProcessGroup& g = **world;
    const int n = g.size();
    if (g.rank() == 0) PrintHeader(n, "MPI backend vs blocking MPI", true);
    for (Coll c : {Coll::kAllReduce, Coll::kReduceScatter, Coll::kAllGather}) {
      for (size_t size : Sizes(min_bytes, max_bytes)) {
        Buffers b = MakeBuffers(c, size, n);
        const int iters = ItersFor(b.bytes);
        const int warmup = std::max(2, iters / 10);
        const int cnt = static_cast<int>(b.count);
        auto raw = [&] {
          int rc = MPI_SUCCESS;
          if (c == Coll::kAllReduce) {
            rc = MPI_Allreduce(MPI_IN_PLACE, b.in.data(), cnt, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
          } else if (c == Coll::kReduceScatter) {
            rc = MPI_Reduce_scatter_block(b.in.data(), b.out.data(), cnt, MPI_FLOAT, MPI_SUM,
                                          MPI_COMM_WORLD);
          } else {
            rc = MPI_Allgather(b.in.data(), cnt, MPI_FLOAT, b.out.data(), cnt, MPI_FLOAT,
                               MPI_COMM_WORLD);
          }
          if (rc != MPI_SUCCESS) Die(Internal("raw MPI call failed"));
        };
        auto nb = [&] {
          MPI_Request req;
          int rc = MPI_SUCCESS;
          if (c == Coll::kAllReduce) {
            rc = MPI_Iallreduce(MPI_IN_PLACE, b.in.data(), cnt, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD,
                                &req);
          } else if (c == Coll::kReduceScatter) {
            rc = MPI_Ireduce_scatter_block(b.in.data(), b.out.data(), cnt, MPI_FLOAT, MPI_SUM,
                                           MPI_COMM_WORLD, &req);
          } else {
            rc = MPI_Iallgather(b.in.data(), cnt, MPI_FLOAT, b.out.data(), cnt, MPI_FLOAT,
                                MPI_COMM_WORLD, &req);
          }
          if (rc != MPI_SUCCESS || MPI_Wait(&req, MPI_STATUS_IGNORE) != MPI_SUCCESS) {
            Die(Internal("raw non-blocking MPI call failed"));
          }
        };
        auto ours = [&] {
          Status s = Issue(g, c, b)->Wait(std::chrono::milliseconds(60000));
          if (!s.ok()) Die(s);
        };
        // Alternate the three; keep each one's best round.
        double best[3] = {1e30, 1e30, 1e30};
        const std::function<void()> variants[3] = {raw, nb, ours};
        for (int round = 0; round < rounds; ++round) {
          for (int v = 0; v < 3; ++v) {
            MPI_Barrier(MPI_COMM_WORLD);
            double t = TimeOps(warmup, iters, variants[v]);
            MPI_Allreduce(MPI_IN_PLACE, &t, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
            best[v] = std::min(best[v], t);
          }
        }
        const double t_raw = best[0], t_nb = best[1], t_ours = best[2];
        if (g.rank() == 0) {
          const double f = BusFactor(c, n);
          const double a_raw = b.bytes / t_raw / 1e9, a_ours = b.bytes / t_ours / 1e9;
          std::printf("%-15s %10zu %10.2f %9.3f %9.3f %10.2f %10.2f %9.3f %9.3f %8.2f\n",
                      CollName(c), b.bytes, t_raw * 1e6, a_raw, a_raw * f, t_nb * 1e6, t_ours * 1e6,
                      a_ours, a_ours * f, t_ours / t_raw);
          std::fflush(stdout);
        }
      }
    }
  }
  if (Status s = MpiFinalize(); !s.ok()) Die(s);
  return 0;
}

// About `ms` milliseconds of arithmetic (calibrated once), identical on every rank.
class Compute {
 public:
  explicit Compute(double ms) : data_(1 << 14, 1.f) {
    iters_ = 1;
    double t = 0;
    while ((t = Run()) < 2e-3) iters_ *= 2;
    iters_ = std::max<int64_t>(1, static_cast<int64_t>(iters_ * ms * 1e-3 / t));
  }
  // Seconds it took.
  double Run() {
    const auto t0 = Clock::now();
    for (int64_t k = 0; k < iters_; ++k) {
      for (float& x : data_) x = x * 0.999f + 0.001f;
    }
    sink_ = data_[static_cast<size_t>(iters_) % data_.size()];
    return std::chrono::duration<double>(Clock::now() - t0).count();
  }
  int64_t iters() const { return iters_; }
  void set_iters(int64_t n) { iters_ = n; }

 private:
  std::vector<float> data_;
  int64_t iters_;
  volatile float sink_ = 0;
};

double MaxOverRanks(double t) {
  MPI_Allreduce(MPI_IN_PLACE, &t, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return t;
}

int RunOverlap(int argc, char** argv, size_t min_bytes, size_t max_bytes, int rounds,
               double compute_ms) {
  if (Status s = MpiInit(&argc, &argv); !s.ok()) Die(s);
  {
    auto world = MakeMpiWorldGroup();
    if (!world.ok()) Die(world.status());
    ProcessGroup& g = **world;
    Compute compute(compute_ms);
    // Every rank runs the same number of iterations: rank 0's calibration.
    int64_t iters = compute.iters();
    MPI_Bcast(&iters, 1, MPI_INT64_T, 0, MPI_COMM_WORLD);
    compute.set_iters(iters);
    const char* env = std::getenv("STRATA_MPI_PROGRESS_US");
    if (g.rank() == 0) {
      std::printf(
          "# overlap: all-reduce issued, ~%.0f ms of computation, then Wait; %d ranks, fp32 sum;"
          "\n# STRATA_MPI_PROGRESS_US=%s; times = best of %d rounds of the slowest rank, in us\n",
          compute_ms, g.size(), env ? env : "(default)", rounds);
      std::printf("%-12s %10s %12s %12s %12s %10s %8s\n", "# size(B)", "alone(us)", "compute(us)",
                  "+op(us)", "exposed(us)", "hidden", "slower");
    }
    for (size_t size : Sizes(min_bytes, max_bytes)) {
      Buffers b = MakeBuffers(Coll::kAllReduce, size, g.size());
      auto wait = [&](std::unique_ptr<Work> w) {
        if (Status s = w->Wait(std::chrono::milliseconds(60000)); !s.ok()) Die(s);
      };
      double alone = 1e30, comp = 1e30, comp_op = 1e30, exposed = 1e30;
      for (int round = 0; round < rounds; ++round) {
        MPI_Barrier(MPI_COMM_WORLD);
        auto t0 = Clock::now();
        wait(Issue(g, Coll::kAllReduce, b));
        alone =
            std::min(alone, MaxOverRanks(std::chrono::duration<double>(Clock::now() - t0).count()));
        MPI_Barrier(MPI_COMM_WORLD);
        comp = std::min(comp, MaxOverRanks(compute.Run()));
        MPI_Barrier(MPI_COMM_WORLD);
        auto w = Issue(g, Coll::kAllReduce, b);
        const double c = compute.Run();
        t0 = Clock::now();
        wait(std::move(w));
        const double e = std::chrono::duration<double>(Clock::now() - t0).count();
        comp_op = std::min(comp_op, MaxOverRanks(c));
        exposed = std::min(exposed, MaxOverRanks(e));
      }
      if (g.rank() == 0) {
        std::printf("%-12zu %10.1f %12.1f %12.1f %12.1f %9.0f%% %7.1f%%\n", b.bytes, alone * 1e6,
                    comp * 1e6, comp_op * 1e6, exposed * 1e6, 100 * (1 - exposed / alone),
                    100 * (comp_op / comp - 1));
        std::fflush(stdout);
      }
    }
  }
  if (Status s = MpiFinalize(); !s.ok()) Die(s);
  return 0;
}

// Raw Gloo: one context per thread, the collective called directly (no worker thread).
void RawGloo(const std::shared_ptr<gloo::Context>& ctx, Coll c, Buffers& b) {
  if (c == Coll::kAllReduce) {
    gloo::AllreduceOptions o(ctx);
    o.setOutput(b.in.data(), b.count);
    o.setReduceFunction(
        [](void* out, const void* x, const void* y, size_t k) { gloo::sum<float>(out, x, y, k); });
    gloo::allreduce(o);
  } else {
    gloo::AllgatherOptions o(ctx);
    o.setInput(b.in.data(), b.count);
    o.setOutput(b.out.data(), b.count * ctx->size);
    gloo::allgather(o);
  }
}

int RunGloo(int n, size_t min_bytes, size_t max_bytes, int rounds) {
  auto store = MakeHashStore();
  gloo::rendezvous::HashStore raw_store;
  std::vector<std::unique_ptr<ProcessGroup>> groups(n);
  std::vector<std::shared_ptr<gloo::Context>> raw(n);
  {
    std::vector<std::thread> threads;
    for (int r = 0; r < n; ++r) {
      threads.emplace_back([&, r] {
        auto g = MakeGlooGroup(store, "bench", r, n, std::chrono::milliseconds(60000));
        if (!g.ok()) Die(g.status());
        groups[r] = std::move(g).value();
        auto dev = gloo::transport::tcp::CreateDevice("127.0.0.1");
        auto ctx = std::make_shared<gloo::rendezvous::Context>(r, n);
        ctx->setTimeout(std::chrono::milliseconds(60000));
        ctx->connectFullMesh(raw_store, dev);
        raw[r] = ctx;
      });
    }
    for (auto& t : threads) t.join();
  }
  std::printf(
      "# Gloo backend vs gloo:: calls on their own contexts, %d ranks as threads, TCP loopback, "
      "fp32 sum;\n# time = slowest rank's mean per op; bw in GB/s\n",
      n);
  std::printf("%-15s %10s %10s %9s %9s %10s %9s %9s %8s\n", "# collective", "size(B)", "raw(us)",
              "algbw", "busbw", "ours(us)", "algbw", "busbw", "ours/raw");
  for (Coll c : {Coll::kAllReduce, Coll::kReduceScatter, Coll::kAllGather}) {
    for (size_t size : Sizes(min_bytes, max_bytes)) {
      std::vector<Buffers> bufs;
      for (int r = 0; r < n; ++r) bufs.push_back(MakeBuffers(c, size, n));
      const int iters = std::max(3, ItersFor(bufs[0].bytes) / 4);
      const bool has_raw = c != Coll::kReduceScatter;
      double best[2] = {1e30, 1e30};
      for (int round = 0; round < rounds; ++round) {
        for (int v = has_raw ? 0 : 1; v < 2; ++v) {
          std::vector<double> t(n);
          std::vector<std::thread> threads;
          for (int r = 0; r < n; ++r) {
            threads.emplace_back([&, r] {
              auto ours = [&] {
                Status s = Issue(*groups[r], c, bufs[r])->Wait(std::chrono::milliseconds(60000));
                if (!s.ok()) Die(s);
              };
              auto direct = [&] { RawGloo(raw[r], c, bufs[r]); };
              gloo::BarrierOptions bo(raw[r]);
              gloo::barrier(bo);
              t[r] = v == 0 ? TimeOps(2, iters, direct) : TimeOps(2, iters, ours);
            });
          }
          for (auto& th : threads) th.join();
          best[v] = std::min(best[v], *std::max_element(t.begin(), t.end()));
        }
      }
      const double f = BusFactor(c, n);
      const double bytes = static_cast<double>(bufs[0].bytes);
      const double a_ours = bytes / best[1] / 1e9;
      if (has_raw) {
        const double a_raw = bytes / best[0] / 1e9;
        std::printf("%-15s %10zu %10.2f %9.3f %9.3f %10.2f %9.3f %9.3f %8.2f\n", CollName(c),
                    bufs[0].bytes, best[0] * 1e6, a_raw, a_raw * f, best[1] * 1e6, a_ours,
                    a_ours * f, best[1] / best[0]);
      } else {
        std::printf("%-15s %10zu %10s %9s %9s %10.2f %9.3f %9.3f %8s\n", CollName(c), bufs[0].bytes,
                    "-", "-", "-", best[1] * 1e6, a_ours, a_ours * f, "-");
      }
      std::fflush(stdout);
    }
  }
  return 0;
}

size_t ParseBytes(const char* s) {
  char* end = nullptr;
  double v = std::strtod(s, &end);
  if (end && (*end == 'K' || *end == 'k')) v *= 1024;
  if (end && (*end == 'M' || *end == 'm')) v *= 1024 * 1024;
  if (end && (*end == 'G' || *end == 'g')) v *= 1024.0 * 1024 * 1024;
  return static_cast<size_t>(v);
}

}  // namespace
}  // namespace strata::comm

int main(int argc, char** argv) {
  using namespace strata::comm;
  size_t min_bytes = 8, max_bytes = 64u << 20;
  int gloo_threads = 0;
  int rounds = 2;
  double overlap_ms = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--min-bytes" && i + 1 < argc) {
      min_bytes = ParseBytes(argv[++i]);
    } else if (a == "--max-bytes" && i + 1 < argc) {
      max_bytes = ParseBytes(argv[++i]);
    } else if (a == "--rounds" && i + 1 < argc) {
      rounds = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--overlap-ms" && i + 1 < argc) {
      overlap_ms = std::atof(argv[++i]);
    } else if (a == "--gloo-threads" && i + 1 < argc) {
      gloo_threads = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr,
                   "usage: mpirun -np N %s [--min-bytes 8] [--max-bytes 64M] [--rounds 2]\n"
                   "       mpirun -np N %s --overlap-ms C [--min-bytes 8] [--max-bytes 64M]\n"
                   "       %s --gloo-threads N [--min-bytes 8] [--max-bytes 64M] [--rounds 2]\n",
                   argv[0], argv[0], argv[0]);
      return 2;
    }
  }
  if (min_bytes == 0 || max_bytes < min_bytes) {
    std::fprintf(stderr, "collectives_bench: need 0 < min-bytes <= max-bytes\n");
    return 2;
  }
  if (gloo_threads > 0) return RunGloo(gloo_threads, min_bytes, max_bytes, rounds);
  if (overlap_ms > 0) return RunOverlap(argc, argv, min_bytes, max_bytes, rounds, overlap_ms);
  return RunMpi(argc, argv, min_bytes, max_bytes, rounds);
}
