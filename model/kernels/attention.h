// Causal multi-head self-attention on a fused qkv[B, T, 3C] (q | k | v, heads of size C/NH).
//
// Forward keeps only the output and the log-sum-exp of each score row (lse[B, NH, T]); backward
// recomputes the probabilities from q, k and lse. No B*NH*T*T buffer is ever held: each thread
// uses one T*T fp32 scratch for the (b, h) pair it works on.
// Backward overwrites (=) dqkv.
#pragma once

#include <cstdint>

namespace strata::model {

template <typename T>
void AttentionForward(T* out, float* lse, const T* qkv, int b, int t, int c, int nh);

template <typename T>
void AttentionBackward(T* dqkv, const T* dout, const T* qkv, const T* out, const float* lse, int b,
                       int t, int c, int nh);

}  // namespace strata::model
