#include "model/cpu_info.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <thread>
#include <vector>

#include "model/kernels/matmul.h"

namespace strata::model {

int SetNumThreads(int n) {
  if (n <= 0) n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  omp_set_num_threads(n);
  openblas_set_num_threads(n);
  return n;
}

int NumThreads() { return omp_get_max_threads(); }

double MeasuredGemmFlops() {
  static double cached = 0.0;
  static int cached_threads = -1;
  if (cached_threads == NumThreads()) return cached;
  constexpr int kN = 1024;
  std::vector<float> a(kN * kN, 0.5f), b(kN * kN, 0.25f), c(kN * kN, 0.f);
  double best = 1e30;
  for (int rep = 0; rep < 4; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    Sgemm(false, false, kN, kN, kN, 1.f, a.data(), kN, b.data(), kN, 0.f, c.data(), kN);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, s);
  }
  cached = 2.0 * kN * kN * kN / best;
  cached_threads = NumThreads();
  return cached;
}

}  // namespace strata::model
