// Micro-benchmarks of the CPU kernels in model/kernels, reporting achieved FLOP/s (and bytes/s
// for the memory-bound LayerNorm) as Google Benchmark rate counters.
//
// Threads: STRATA_BENCH_THREADS=N (default: all cores) goes to model::SetNumThreads before any
// benchmark runs; the count in effect is printed in the context header as "strata_threads".
// Every benchmark uses wall-clock time (UseRealTime): the kernels run on an OpenMP pool, so the
// main thread's CPU time would undercount.
//
// FLOP counts are those of the work the kernel actually does, not the minimal algebraic count:
//   matmul forward   2*n*c*oc                  (bias add ignored)
//   matmul backward  4*n*c*oc                  (dinp and dw; dbias ignored)
//   attention fwd    4*b*t*t*c                 (QK^T and PV over the full square, as computed)
//   attention bwd    10*b*t*t*c                (recomputed QK^T, dV, dP, dQ, dK)
//   layernorm fwd    8*n*c, bwd 12*n*c         (rough per-element op counts; bytes are the
//                                               better measure for these)
//
// Run: kernels_bench --benchmark_min_time=0.2 [--benchmark_filter=Matmul]
#include <benchmark/benchmark.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "model/cpu_info.h"
#include "model/dtype.h"
#include "model/kernels/attention.h"
#include "model/kernels/layernorm.h"
#include "model/kernels/matmul.h"

namespace strata::model {
namespace {

// Values in [-scale, scale), fixed seed so every run times the same data.
template <typename T>
std::vector<T> RandomVector(size_t n, float scale = 1.f, uint32_t seed = 1234) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<T> v(n);
  for (auto& x : v) x = FromFloat<T>(dist(rng));
  return v;
}

// Reports `flops_per_iter` and (if non-zero) `bytes_per_iter` as rates over the measured time.
void ReportRates(benchmark::State& state, double flops_per_iter, double bytes_per_iter = 0.0) {
  const double iters = static_cast<double>(state.iterations());
  state.counters["FLOP"] = benchmark::Counter(flops_per_iter * iters, benchmark::Counter::kIsRate);
  if (bytes_per_iter > 0.0) {
    state.SetBytesProcessed(static_cast<int64_t>(bytes_per_iter * iters));
  }
}

// ---- GEMM ----------------------------------------------------------------------------------
// Args: n, c, oc.

template <typename T>
void BM_MatmulForward(benchmark::State& state) {
  const int64_t n = state.range(0);
  const int c = static_cast<int>(state.range(1));
  const int oc = static_cast<int>(state.range(2));
  auto inp = RandomVector<T>(static_cast<size_t>(n) * c);
  auto w = RandomVector<T>(static_cast<size_t>(oc) * c, 0.05f, 7);
  auto bias = RandomVector<T>(static_cast<size_t>(oc), 0.05f, 8);
  std::vector<T> out(static_cast<size_t>(n) * oc);
  for (auto _ : state) {
    MatmulForward<T>(out.data(), inp.data(), w.data(), bias.data(), n, c, oc);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  ReportRates(state, 2.0 * static_cast<double>(n) * c * oc);
}

void BM_MatmulBackward(benchmark::State& state) {
  const int64_t n = state.range(0);
  const int c = static_cast<int>(state.range(1));
  const int oc = static_cast<int>(state.range(2));
  auto inp = RandomVector<float>(static_cast<size_t>(n) * c);
  auto w = RandomVector<float>(static_cast<size_t>(oc) * c, 0.05f, 7);
  auto dout = RandomVector<float>(static_cast<size_t>(n) * oc, 0.01f, 9);
  std::vector<float> dinp(static_cast<size_t>(n) * c);
  std::vector<float> dw(static_cast<size_t>(oc) * c, 0.f);
  std::vector<float> dbias(static_cast<size_t>(oc), 0.f);
  for (auto _ : state) {
    MatmulBackward<float>(dinp.data(), dw.data(), dbias.data(), dout.data(), inp.data(), w.data(),
                          n, c, oc);
    benchmark::DoNotOptimize(dinp.data());
    benchmark::DoNotOptimize(dw.data());
    benchmark::ClobberMemory();
  }
  ReportRates(state, 4.0 * static_cast<double>(n) * c * oc);
}

// Tiny preset (seq 128 x batch 16 = 2048 tokens, d_model 128): qkv (3c) and MLP up (4c).
// Mid-size (4096 tokens, d_model 384): the same two projections.
void MatmulShapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "c", "oc"});
  b->Args({2048, 128, 384});
  b->Args({2048, 128, 512});
  b->Args({4096, 384, 1152});
  b->Args({4096, 384, 1536});
}

BENCHMARK_TEMPLATE(BM_MatmulForward, float)->Apply(MatmulShapes)->UseRealTime();
BENCHMARK(BM_MatmulBackward)->Apply(MatmulShapes)->UseRealTime();
// bf16 operands: converted to fp32 in row tiles, so this shows the conversion overhead against
// the fp32 row of the same shape.
BENCHMARK_TEMPLATE(BM_MatmulForward, bf16)
    ->ArgNames({"n", "c", "oc"})
    ->Args({4096, 384, 1536})
    ->UseRealTime();

// ---- Attention ----------------------------------------------------------------------------
// Args: b, t, c, nh.

struct AttentionData {
  AttentionData(int b, int t, int c, int nh)
      : qkv(RandomVector<float>(static_cast<size_t>(b) * t * 3 * c, 1.f, 11)),
        out(static_cast<size_t>(b) * t * c),
        lse(static_cast<size_t>(b) * nh * t),
        dout(RandomVector<float>(static_cast<size_t>(b) * t * c, 0.01f, 12)),
        dqkv(static_cast<size_t>(b) * t * 3 * c) {}
  std::vector<float> qkv, out, lse, dout, dqkv;
};

void BM_AttentionForward(benchmark::State& state) {
  const int b = static_cast<int>(state.range(0)), t = static_cast<int>(state.range(1));
  const int c = static_cast<int>(state.range(2)), nh = static_cast<int>(state.range(3));
  AttentionData d(b, t, c, nh);
  for (auto _ : state) {
    AttentionForward<float>(d.out.data(), d.lse.data(), d.qkv.data(), b, t, c, nh);
    benchmark::DoNotOptimize(d.out.data());
    benchmark::ClobberMemory();
  }
  ReportRates(state, 4.0 * b * static_cast<double>(t) * t * c);
}

void BM_AttentionBackward(benchmark::State& state) {
  const int b = static_cast<int>(state.range(0)), t = static_cast<int>(state.range(1));
  const int c = static_cast<int>(state.range(2)), nh = static_cast<int>(state.range(3));
  AttentionData d(b, t, c, nh);
  AttentionForward<float>(d.out.data(), d.lse.data(), d.qkv.data(), b, t, c, nh);
  for (auto _ : state) {
    AttentionBackward<float>(d.dqkv.data(), d.dout.data(), d.qkv.data(), d.out.data(), d.lse.data(),
                             b, t, c, nh);
    benchmark::DoNotOptimize(d.dqkv.data());
    benchmark::ClobberMemory();
  }
  ReportRates(state, 10.0 * b * static_cast<double>(t) * t * c);
}

void AttentionShapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"b", "t", "c", "nh"});
  b->Args({16, 128, 128, 4});
  b->Args({16, 256, 384, 6});
}

BENCHMARK(BM_AttentionForward)->Apply(AttentionShapes)->UseRealTime();
BENCHMARK(BM_AttentionBackward)->Apply(AttentionShapes)->UseRealTime();

// ---- LayerNorm ----------------------------------------------------------------------------
// Args: n, c. Bytes count each array once per pass (w, b, mean, rstd included).

void BM_LayerNormForward(benchmark::State& state) {
  const int64_t n = state.range(0);
  const int c = static_cast<int>(state.range(1));
  const size_t nc = static_cast<size_t>(n) * c;
  auto inp = RandomVector<float>(nc);
  auto w = RandomVector<float>(static_cast<size_t>(c), 1.f, 21);
  auto bias = RandomVector<float>(static_cast<size_t>(c), 0.1f, 22);
  std::vector<float> out(nc), mean(static_cast<size_t>(n)), rstd(static_cast<size_t>(n));
  for (auto _ : state) {
    LayerNormForward<float>(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), bias.data(),
                            n, c);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  // Read inp, write out; write mean and rstd; read w and b.
  const double bytes = 4.0 * (2.0 * nc + 2.0 * n + 2.0 * c);
  ReportRates(state, 8.0 * static_cast<double>(nc), bytes);
}

void BM_LayerNormBackward(benchmark::State& state) {
  const int64_t n = state.range(0);
  const int c = static_cast<int>(state.range(1));
  const size_t nc = static_cast<size_t>(n) * c;
  auto inp = RandomVector<float>(nc);
  auto w = RandomVector<float>(static_cast<size_t>(c), 1.f, 21);
  auto bias = RandomVector<float>(static_cast<size_t>(c), 0.1f, 22);
  auto dout = RandomVector<float>(nc, 0.01f, 23);
  std::vector<float> out(nc), mean(static_cast<size_t>(n)), rstd(static_cast<size_t>(n));
  std::vector<float> dinp(nc, 0.f), dw(static_cast<size_t>(c), 0.f),
      db(static_cast<size_t>(c), 0.f);
  LayerNormForward<float>(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), bias.data(),
                          n, c);
  for (auto _ : state) {
    LayerNormBackward<float>(dinp.data(), dw.data(), db.data(), dout.data(), inp.data(), w.data(),
                             mean.data(), rstd.data(), n, c);
    benchmark::DoNotOptimize(dinp.data());
    benchmark::ClobberMemory();
  }
  // Read dout and inp, read-modify-write dinp (+=); read mean, rstd, w; dw and db (+=).
  const double bytes = 4.0 * (4.0 * nc + 2.0 * n + 5.0 * c);
  ReportRates(state, 12.0 * static_cast<double>(nc), bytes);
}

void LayerNormShapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "c"});
  b->Args({2048, 128});
  b->Args({4096, 384});
}

BENCHMARK(BM_LayerNormForward)->Apply(LayerNormShapes)->UseRealTime();
BENCHMARK(BM_LayerNormBackward)->Apply(LayerNormShapes)->UseRealTime();

// STRATA_BENCH_THREADS, or 0 (all cores) when unset. Returns -1 when set but not a positive
// integer.
int ThreadsFromEnv() {
  const char* s = std::getenv("STRATA_BENCH_THREADS");
  if (s == nullptr || *s == '\0') return 0;
  errno = 0;
  char* end = nullptr;
  const long v = std::strtol(s, &end, 10);
  if (errno != 0 || end == s || *end != '\0' || v <= 0 || v > 4096) return -1;
  return static_cast<int>(v);
}

}  // namespace
}  // namespace strata::model

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  const int requested = strata::model::ThreadsFromEnv();
  if (requested < 0) {
    std::fprintf(stderr, "STRATA_BENCH_THREADS must be a positive integer, got '%s'\n",
                 std::getenv("STRATA_BENCH_THREADS"));
    return 2;
  }
  const int threads = strata::model::SetNumThreads(requested);
  benchmark::AddCustomContext("strata_threads", std::to_string(threads));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
