// Fused softmax + cross-entropy over logits[N, V] (computed in fp32 whatever T is).
// Writes losses[i] = -log softmax(logits[i])[targets[i]]. When dloss != 0 it then overwrites the
// logits in place with dlogits = (softmax - onehot(target)) * dloss. Returns the sum of losses.
#pragma once

#include <cstdint>

namespace strata::model {

template <typename T>
double SoftmaxCrossEntropy(T* logits, float* losses, const int32_t* targets, int64_t n, int v,
                           float dloss);

}  // namespace strata::model
