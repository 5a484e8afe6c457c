// CUDA versions of elementwise kernels from model/kernels/elementwise.h: GELU (GPT-2 tanh form)
// forward and backward, the residual add, bias add and bias gradient; fp32 and typed (T).
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
#include "model/dtype.h"

namespace strata::model {

// out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
Status CudaGeluForward(float* out, const float* inp, int64_t n, void* stream);

// dinp = dout * gelu'(inp); dinp may alias dout.
Status CudaGeluBackward(float* dinp, const float* inp, const float* dout, int64_t n, void* stream);

// out = a + b; out may alias a.
Status CudaResidualForward(float* out, const float* a, const float* b, int64_t n, void* stream);

// Typed versions (T = `dtype`, computed in fp32, rounded to nearest even on store); the same
// contracts as the CPU templates in model/kernels/elementwise.h.
Status CudaGeluForwardT(void* out, const void* inp, int64_t n, DType dtype, void* stream);
Status CudaGeluBackwardT(void* dinp, const void* inp, const void* dout, int64_t n, DType dtype,
                         void* stream);
// out (fp32) = a (fp32) + b (T); out may alias a.
Status CudaResidualForwardT(float* out, const float* a, const void* b, int64_t n, DType dtype,
                            void* stream);
// x[r, :] (T) += bias (T), rows r in [0, n), c columns.
Status CudaAddBias(void* x, const void* bias, int64_t n, int c, DType dtype, void* stream);
// dbias[j] (fp32) += sum over rows r of dout[r, j] (T), rows summed in a fixed order.
Status CudaBiasBackward(float* dbias, const void* dout, int64_t n, int c, DType dtype,
                        void* stream);

}  // namespace strata::model
