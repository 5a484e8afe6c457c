// Vocabulary-parallel token embedding and cross-entropy (Megatron): each tensor-parallel rank
// holds the embedding rows [lo, lo + rows) of the tied wte and the matching logit columns. The
// caller runs the all-reduces between the phases; no rank ever holds the full logits.
//
// A shard may carry padding rows/columns after its `valid` real ones (a vocabulary that the TP
// size does not divide): padded logit columns are treated as -inf (no probability mass, never a
// target) and get zero gradient.
//
// Forward outputs overwrite (=). Weight gradients accumulate (+=), deterministically (no
// atomics). All statistics are fp32 whatever T is.
#pragma once

#include <cstdint>

namespace strata::model {

// out[r, :] = wte_shard[tokens[r] - lo, :] when lo <= tokens[r] < lo + valid, else 0 (n rows,
// fp32). Summed over the TP group this is the full lookup.
template <typename T>
void VocabShardEmbeddingForward(float* out, const int32_t* tokens, const T* wte_shard, int64_t lo,
                                int valid, int64_t n, int c);
// out[b, t, :] += wpe[t, :]
template <typename T>
void AddPositionEmbedding(float* out, const T* wpe, int b, int t, int c);
// dwte_shard[tokens[r] - lo] += dout[r] for the tokens of this shard; dwpe[r % t] += dout[r].
void VocabShardEmbeddingBackward(float* dwte_shard, float* dwpe, const float* dout,
                                 const int32_t* tokens, int64_t lo, int valid, int b, int t, int c);

// Cross-entropy over logits[n, v] whose first `valid` columns are the vocabulary entries
// [lo, lo + valid), in three phases:
//   1. ShardRowMax                     -> all-reduce max of mx[n]
//   2. ShardSumExpAndTarget            -> all-reduce sum of sum_exp[n] and target[n]
//   3. ShardCrossEntropyFinish
// mx[i] = max of row i's valid columns (-inf when valid == 0).
template <typename T>
void ShardRowMax(float* mx, const T* logits, int64_t n, int v, int valid);
// sum_exp[i] = sum over valid j of exp(logits[i, j] - mx[i]); target[i] = logits[i, targets[i] -
// lo] - mx[i] when the target lies in this shard, else 0. mx is the group-wide maximum.
template <typename T>
void ShardSumExpAndTarget(float* sum_exp, float* target, const T* logits, const float* mx,
                          const int32_t* targets, int64_t lo, int64_t n, int v, int valid);
// losses[i] = log(sum_exp[i]) - target[i] (group-wide values in). When dloss != 0 overwrites the
// logits in place with (softmax - onehot(target)) * dloss, 0 in padded columns. Returns the sum
// of the losses.
template <typename T>
double ShardCrossEntropyFinish(T* logits, float* losses, const float* mx, const float* sum_exp,
                               const float* target, const int32_t* targets, int64_t lo, int64_t n,
                               int v, int valid, float dloss);

}  // namespace strata::model
