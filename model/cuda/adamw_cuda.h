// Fused AdamW over a flat fp32 parameter range on the GPU; CPU reference model::AdamW
// (model/optimizer.h, torch.optim.AdamW semantics). Conventions: ops_common.h.
#pragma once

#include "model/cuda/ops_common.h"

namespace strata::model {

struct CudaAdamWArgs {
  float lr = 0;
  float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.1f;
  int64_t step = 1;         // counts updates from 1 (bias correction)
  float grad_scale = 1.0f;  // g = grads[i] * grad_scale (1/loss scale times the clip factor)
};

// For i in [0, n): g = grads[i] * grad_scale; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// params[i] -= lr * (mhat / (sqrt(vhat) + eps) + (decay[i] ? wd * params[i] : 0)), in the same
// order of operations as the CPU AdamW. decay is one byte per element (1: weight decay applies).
// When compute != nullptr, compute[i] (in `compute_dtype`, bf16/fp16) = the updated params[i],
// rounded to nearest even — the compute copy refreshed in the same pass. All of params, grads,
// m, v, decay, compute are device pointers at the range's first element.
Status CudaAdamWUpdate(float* params, const float* grads, float* m, float* v, const uint8_t* decay,
                       void* compute, DType compute_dtype, const CudaAdamWArgs& args, int64_t n,
                       void* stream);

}  // namespace strata::model
