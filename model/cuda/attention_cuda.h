// Causal multi-head self-attention on the GPU, flash-style (tiles of q against tiles of k/v in
// shared memory, online softmax; no T x T matrix in global memory). CPU reference
// model/kernels/attention.h: qkv[B, T, 3C] (q | k | v, heads of size C/NH), out[B, T, C] T,
// lse[B, NH, T] fp32 (natural-log log-sum-exp of each scaled score row, scale 1/sqrt(hs)).
// Conventions: ops_common.h. Head sizes supported: 32, 64, 128 (others: INVALID_ARGUMENT naming
// model.channels / model.heads).
#pragma once

#include "model/cuda/ops_common.h"

namespace strata::model {

Status CudaAttentionForward(void* out, float* lse, const void* qkv, int b, int t, int c, int nh,
                            DType dtype, void* stream);

// dqkv[B, T, 3C] (T) is overwritten. `workspace` (device) must hold
// CudaAttentionBackwardWorkspace(b, t, c, nh) bytes (e.g. fp32 dq accumulators and D =
// rowsum(dO*O)).
size_t CudaAttentionBackwardWorkspace(int b, int t, int c, int nh);
Status CudaAttentionBackward(void* dqkv, const void* dout, const void* qkv, const void* out,
                             const float* lse, int b, int t, int c, int nh, void* workspace,
                             size_t workspace_bytes, DType dtype, void* stream);

}  // namespace strata::model
