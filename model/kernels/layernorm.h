// LayerNorm over the last dimension (eps 1e-5), fp32 statistics.
// Input is the fp32 residual stream; output is in the compute type T.
// Backward: dinp accumulates (+=) into the residual-stream gradient, dw/db accumulate (+=).
#pragma once

#include <cstdint>

namespace strata::model {

inline constexpr float kLayerNormEps = 1e-5f;

template <typename T>
void LayerNormForward(T* out, float* mean, float* rstd, const float* inp, const T* w, const T* b,
                      int64_t n, int c);

template <typename T>
void LayerNormBackward(float* dinp, float* dw, float* db, const T* dout, const float* inp,
                       const T* w, const float* mean, const float* rstd, int64_t n, int c);

}  // namespace strata::model
