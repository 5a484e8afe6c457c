// Elementwise kernels: token + position embedding, GELU (GPT-2 tanh form), residual add,
// precision casts. Gradients of weights accumulate (+=); gradients of activations overwrite (=).
#pragma once

#include <cstdint>

namespace strata::model {

// out[b, t, :] = wte[tokens[b, t], :] + wpe[t, :]   (out is the fp32 residual stream)
template <typename T>
void EmbeddingForward(float* out, const int32_t* tokens, const T* wte, const T* wpe, int b, int t,
                      int c);
// dwte[tok] += dout, dwpe[t] += dout. Deterministic (no atomics).
void EmbeddingBackward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, int b,
                       int t, int c, int vocab);

template <typename T>
void GeluForward(T* out, const T* inp, int64_t n);
// dinp = dout * gelu'(inp); dinp may alias dout.
template <typename T>
void GeluBackward(T* dinp, const T* inp, const T* dout, int64_t n);

// out = a + b (out may alias a).
template <typename T>
void ResidualForward(float* out, const float* a, const T* b, int64_t n);

// dst = T(src); for T = float a copy.
template <typename T>
void CastFromFloat(T* dst, const float* src, int64_t n);

// Adds bias[c] to every row of x[n, c].
template <typename T>
void AddBias(T* x, const T* bias, int64_t n, int c);

}  // namespace strata::model
