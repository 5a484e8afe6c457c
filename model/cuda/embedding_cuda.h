// Token + position embedding on the GPU, vocabulary-parallel aware; CPU references
// model/kernels/elementwise.h (EmbeddingForward/Backward) and model/kernels/vocab_parallel.h
// (VocabShardEmbeddingForward/Backward, AddPositionEmbedding). Conventions: ops_common.h.
#pragma once

#include "model/cuda/ops_common.h"

namespace strata::model {

// out[r, :] (fp32, r = bi * t + ti) = wte_shard[tokens[r] - lo, :] if lo <= tokens[r] < lo + valid
// else 0, plus wpe[ti, :] when wpe != nullptr. wte_shard, wpe are T. The full table is lo = 0,
// valid = vocab. Tokens outside [0, 2^31) never index memory outside the shard.
Status CudaEmbeddingForward(float* out, const int32_t* tokens, const void* wte_shard,
                            const void* wpe, int64_t lo, int valid, int b, int t, int c,
                            DType dtype, void* stream);

// dwte_shard[tokens[r] - lo, :] += dout[r, :] for tokens of this shard (fp32), and, when dwpe !=
// nullptr, dwpe[ti, :] += dout[r, :]. Deterministic: contributions to one row are summed in
// increasing r (e.g. a stable sort of r by token, then a segmented sum), so repeated tokens give
// the same bits as the CPU's sequential order up to fp32 rounding of that same order.
// `workspace` must hold CudaEmbeddingBackwardWorkspace(b * t) bytes (device memory).
size_t CudaEmbeddingBackwardWorkspace(int64_t rows);
Status CudaEmbeddingBackward(float* dwte_shard, float* dwpe, const float* dout,
                             const int32_t* tokens, int64_t lo, int valid, int b, int t, int c,
                             void* workspace, size_t workspace_bytes, void* stream);

}  // namespace strata::model
