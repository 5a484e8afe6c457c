// LayerNorm over the last dimension on the GPU; CPU reference model/kernels/layernorm.h
// (eps kLayerNormEps, fp32 statistics). Conventions: model/cuda/ops_common.h.
#pragma once

#include "model/cuda/ops_common.h"

namespace strata::model {

// out[n, c] (T) = (inp - mean) * rstd * w + b; mean[n], rstd[n] fp32 are written for backward.
// inp is the fp32 residual stream; w, b are T.
Status CudaLayerNormForward(void* out, float* mean, float* rstd, const float* inp, const void* w,
                            const void* b, int64_t n, int c, DType dtype, void* stream);

// Fused residual add + LayerNorm (the pre-LN block's "x = x + branch; h = ln(x)"):
// resid_out[n, c] (fp32) = resid_in + branch (branch in T), then LayerNorm of resid_out as above.
// resid_out may alias resid_in.
Status CudaResidualLayerNormForward(float* resid_out, void* out, float* mean, float* rstd,
                                    const float* resid_in, const void* branch, const void* w,
                                    const void* b, int64_t n, int c, DType dtype, void* stream);

// dinp (fp32) += d/dinp; dw, db (fp32, [c]) += d/dw, d/db. dout, w are T. Deterministic: the
// column sums for dw/db are reduced in a fixed order (no atomics across rows).
Status CudaLayerNormBackward(float* dinp, float* dw, float* db, const void* dout, const float* inp,
                             const void* w, const float* mean, const float* rstd, int64_t n, int c,
                             DType dtype, void* stream);

}  // namespace strata::model
