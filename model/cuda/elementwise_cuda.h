// CUDA versions of elementwise kernels from model/kernels/elementwise.h, fp32 only for now:
// GELU (GPT-2 tanh form) forward and backward, and the residual add.
//
// Pointers are device pointers; `stream` is a cudaStream_t (nullptr = the default stream). The
// launchers only queue work: an OK Status means the launch was accepted, and faults raised while
// the kernel runs surface at the next synchronisation (CudaStreamSynchronize). They return
// INVALID_ARGUMENT for n < 0 or a null pointer with n > 0 (nothing launched), INTERNAL with the
// CUDA error when the launch fails. n == 0 launches nothing and returns OK.
// Same overwrite/alias rules as the CPU kernels: activation gradients overwrite (=).
#pragma once

#include <cstdint>

#include "common/status.h"

namespace strata::model {

// out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
Status CudaGeluForward(float* out, const float* inp, int64_t n, void* stream);

// dinp = dout * gelu'(inp); dinp may alias dout.
Status CudaGeluBackward(float* dinp, const float* inp, const float* dout, int64_t n, void* stream);

// out = a + b; out may alias a.
Status CudaResidualForward(float* out, const float* a, const float* b, int64_t n, void* stream);

}  // namespace strata::model
