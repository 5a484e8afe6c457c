// CPU threading and the measured GEMM rate (the "peak" that MFU is reported against).
#pragma once

namespace strata::model {

// Sets the threads used by our OpenMP kernels and by OpenBLAS. n <= 0 means all cores.
// Returns the number now in effect.
int SetNumThreads(int n);
int NumThreads();

// fp32 GEMM rate of this machine at the current thread count, in FLOP/s: the best of a few
// 1024^3 cblas_sgemm calls (about 0.1 s on two cores). Cached after the first call.
double MeasuredGemmFlops();

}  // namespace strata::model
