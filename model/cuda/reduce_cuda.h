// Reductions and small vector ops on the GPU: global-norm sum of squares, loss sums, the fp16
// loss-scale overflow check, scaling, dtype conversions. CPU references model/optimizer.h
// (SumOfSquares, Scale) and model/kernels/elementwise.h (CastFromFloat). Conventions: ops_common.h.
#pragma once

#include "model/cuda/ops_common.h"

namespace strata::model {

// Bytes of device workspace the reductions below need for n elements.
size_t CudaReduceWorkspace(int64_t n);

// *out (device double) = sum of x[i]^2, accumulated in double in a fixed tree order
// (deterministic). Inf/NaN propagate. `accumulate`: *out += instead of =.
Status CudaSumOfSquares(double* out, const float* x, int64_t n, bool accumulate, void* workspace,
                        size_t workspace_bytes, void* stream);
// *out (device double) = sum of x[i], fixed order.
Status CudaSum(double* out, const float* x, int64_t n, void* workspace, size_t workspace_bytes,
               void* stream);
// *flag (device int) |= 1 when any x[i] is Inf or NaN (never cleared here).
Status CudaFlagNonFinite(int* flag, const float* x, int64_t n, void* stream);
// x[i] *= s.
Status CudaScale(float* x, int64_t n, float s, void* stream);
// dst (T) = T(src) (round to nearest even, as FromFloat), and its inverse.
Status CudaCastFromFloat(void* dst, const float* src, int64_t n, DType dtype, void* stream);
Status CudaCastToFloat(float* dst, const void* src, int64_t n, DType dtype, void* stream);

}  // namespace strata::model
