// Fused softmax + cross-entropy on the GPU, whole-vocabulary and vocabulary-parallel; CPU
// references model/kernels/softmax_xent.h and model/kernels/vocab_parallel.h. Statistics fp32
// whatever T is. Conventions: ops_common.h.
#pragma once

#include "model/cuda/ops_common.h"

namespace strata::model {

// logits[n, v] (T) with only the first `valid` columns real (padding after them is treated as
// -inf and gets gradient 0). losses[i] (fp32) = -log softmax(logits[i])[targets[i]]. When dloss
// != 0 overwrites logits in place with (softmax - onehot) * dloss. One pass over the logits for
// the statistics (online max/sum), one for the gradient.
Status CudaSoftmaxCrossEntropy(void* logits, float* losses, const int32_t* targets, int64_t n,
                               int v, int valid, float dloss, DType dtype, void* stream);

// Vocabulary-parallel, three phases with the caller's all-reduces between them (see
// vocab_parallel.h for the exact contract; identical arguments and results here):
Status CudaShardRowMax(float* mx, const void* logits, int64_t n, int v, int valid, DType dtype,
                       void* stream);
Status CudaShardSumExpAndTarget(float* sum_exp, float* target, const void* logits, const float* mx,
                                const int32_t* targets, int64_t lo, int64_t n, int v, int valid,
                                DType dtype, void* stream);
// Writes losses[n]; when dloss != 0 overwrites logits with the gradient. (The CPU version
// returns the sum of losses; here reduce `losses` with CudaSum.)
Status CudaShardCrossEntropyFinish(void* logits, float* losses, const float* mx,
                                   const float* sum_exp, const float* target,
                                   const int32_t* targets, int64_t lo, int64_t n, int v, int valid,
                                   float dloss, DType dtype, void* stream);

}  // namespace strata::model
