// GPT-2: learned token + position embeddings, pre-LN transformer blocks (causal multi-head
// attention, GELU MLP), final LayerNorm, LM head tied to the token embedding.
//
// Parameters live in one flat fp32 buffer (the master weights), in the order of `tensors()`.
// Weights are stored [out, in] like torch.nn.Linear. With precision bf16/fp16 the model keeps a
// compute copy of the weights in that type (RefreshComputeWeights after every update), runs
// GEMM operands, attention and MLP activations in it, and keeps the residual stream, LayerNorm
// statistics, the loss and all parameter gradients in fp32 (what torch.autocast does).
//
// Gradients accumulate (+=) over micro-batches until ZeroGrad().
//
// Tensor parallelism (Megatron), when Create gets a TensorParallelComm of size tp > 1: rank r
// owns heads [r*NH/tp, (r+1)*NH/tp). attn.c_attn and mlp.c_fc are column-parallel (output rows
// split, local bias), attn.c_proj and mlp.c_proj row-parallel (input columns split, the full
// bias replicated and added after the all-reduce of the output). wte is vocabulary-parallel
// (contiguous row ranges, the vocabulary padded up to a multiple of tp) for both the embedding
// and the tied LM head, whose cross-entropy is computed from local logits with all-reduces of
// the row max, the sum of exponentials and the target logit. LayerNorms and wpe are replicated.
// Backward all-reduces the input gradient of every column-parallel GEMM before the LayerNorm
// backward it feeds. Each rank's flat buffers hold only its local tensors (see ParamTensor).
//
// Pipeline parallelism (Megatron), when Create gets a PipelineStage with count pp > 1: stage p
// holds a contiguous range of blocks (StageLayers), the first stage also the embeddings (wte,
// wpe), the last stage ln_f and the LM head, tied to ITS OWN COPY of wte (both ends hold wte;
// ParamTensor::pipeline_tied marks it: the two copies' gradients must be summed before the
// update). Names stay global ("h.{global layer}..."), and InitWeights gives every stage exactly
// the pp = 1 weights of its tensors (both wte copies are equal). A stage runs ForwardStage /
// BackwardStage on the residual stream [B, T, C] fp32 it receives from / sends to its
// neighbours; worker/pipeline.h schedules them. Each stage is TP-sharded as above. Several
// micro-batches may be in flight: each of `num_slots` activation slots keeps one micro-batch's
// saved activations until its backward (with recompute only the block inputs are per slot).
// pp = 1 with one slot is the plain model, bit for bit.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "model/dtype.h"
#include "model/tensor.h"

namespace strata::model {

class TensorParallelComm;

struct GptConfig {
  int vocab_size = 256;
  int max_seq_len = 128;
  int layers = 4;
  int heads = 4;
  int channels = 128;
  bool recompute = false;  // recompute each block's activations during backward

  Status Validate() const;
  int64_t NumParameters() const;  // of the whole (unsharded) model
  std::string ToString() const;
};

struct ParamTensor {
  std::string name;            // Hugging Face GPT-2 name without the "transformer." prefix
  std::vector<int64_t> shape;  // this rank's local tensor
  int64_t offset = 0;          // into the flat parameter buffer, in elements
  int64_t numel = 0;           // of the local tensor
  bool decay = false;          // AdamW weight decay applies (2-D weights and embeddings)

  // Tensor parallelism. `global_shape` is the tensor of the unsharded model (same name).
  // shard_dim -1: replicated — every TP rank holds all of it and, after Backward, the same
  // gradient (count it on one rank only in a global norm). shard_dim 0 or 1: global dimension
  // shard_dim is made of `shard_blocks` equal blocks (3 for c_attn: q | k | v, else 1), and of
  // each block this rank holds the `shard_extent` entries starting at `shard_offset`: local
  // block g along shard_dim is global [g * global_block + shard_offset, ... + shard_extent).
  // A local block may be longer than shard_extent; the rest is padding (wte when tp does not
  // divide the vocabulary): zero, zero gradient, no counterpart in the global tensor.
  // The sharding is described the same way at tp = 1 (offset 0, extent the whole dimension).
  // (Every field has an initializer, so aggregate initialisation of the fields above still
  // compiles under -Wmissing-field-initializers.)
  std::vector<int64_t> global_shape = {};
  int shard_dim = -1;
  int shard_blocks = 1;
  int64_t shard_offset = 0;
  int64_t shard_extent = 0;

  // Pipeline parallelism: true for wte on the first and on the last stage when pp > 1. The
  // two copies are one parameter of the model (embedding and tied LM head): after Backward
  // their gradients must be summed (worker::SumTiedEmbeddingGrads) so that both hold the
  // pp = 1 gradient, and both updated identically; a global gradient norm counts it on the
  // first stage only.
  bool pipeline_tied = false;

  bool replicated() const { return shard_dim < 0; }
  // Row-major index into the global tensor of local element `i` (in [0, numel)), or -1 when
  // the element is padding.
  int64_t GlobalIndex(int64_t i) const;
};

// This rank's place in the pipeline: stage `index` of `count` (parallel.pp).
struct PipelineStage {
  int index = 0;  // in [0, count)
  int count = 1;  // >= 1; 1: no pipeline parallelism
  bool first() const { return index == 0; }
  bool last() const { return index == count - 1; }
};

// Global blocks [begin, end) of a stage. Contiguous and balanced: every stage gets
// layers / count blocks, and the first layers % count stages one more (the last stage also
// runs the LM head, the costliest layer for real vocabularies). Requires 1 <= count <= layers
// and 0 <= index < count (CHECKed; Gpt::Create validates user input).
struct LayerRange {
  int begin = 0;
  int end = 0;
};
LayerRange StageLayers(int layers, const PipelineStage& stage);

class Gpt {
 public:
  virtual ~Gpt() = default;

  // Allocates parameters, gradients and `num_slots` sets of activations for micro-batches of
  // at most max_batch x max_seq tokens. INVALID_ARGUMENT for a bad config, (naming parallel.tp)
  // when the TP size does not divide model.heads, (naming parallel.pp and model.layers) when
  // the pipeline has more stages than the model has layers, or for a bad stage index or
  // num_slots < 1. `tp` (not owned, must outlive the model) is this rank's tensor-parallel
  // group; nullptr or a group of size 1 means no tensor parallelism. `stage` is this rank's
  // pipeline stage (default: the whole model).
  static Result<std::unique_ptr<Gpt>> Create(const GptConfig& config, DType compute, int max_batch,
                                             int max_seq, TensorParallelComm* tp = nullptr,
                                             const PipelineStage& stage = {}, int num_slots = 1);

  virtual const GptConfig& config() const = 0;
  virtual DType compute_dtype() const = 0;
  virtual const PipelineStage& stage() const = 0;
  virtual LayerRange layers() const = 0;  // global blocks held by this stage
  virtual int num_slots() const = 0;
  // Local tensors, in buffer order: [wte (first or last stage)] [wpe (first stage)] [this
  // stage's blocks] [ln_f (last stage)]. pp = 1: every tensor, in the order of HF GPT-2.
  virtual const std::vector<ParamTensor>& tensors() const = 0;
  virtual int64_t num_params() const = 0;  // local elements (padding included)

  // Where params(), grads() and the activations live. kCpu: host memory (this file's model);
  // kCuda: device memory (model/cuda/gpt_cuda.h) — params() and grads() are then DEVICE
  // pointers, never to be dereferenced on the host; use the Copy* methods below.
  virtual Device device() const { return Device::kCpu; }

  virtual float* params() = 0;  // fp32 master weights
  virtual float* grads() = 0;   // fp32 gradients, same layout
  const float* params() const { return const_cast<Gpt*>(this)->params(); }
  const float* grads() const { return const_cast<Gpt*>(this)->grads(); }

  // Host copies of the flat buffers (num_params() floats), whatever device() is. They wait
  // for the model's queued work. OK, or (device models) the first device error, with context.
  // CopyParamsFromHost does not refresh the compute copy: call RefreshComputeWeights.
  virtual Status CopyParamsToHost(float* dst) const;
  virtual Status CopyParamsFromHost(const float* src);
  virtual Status CopyGradsToHost(float* dst) const;

  // GPT-2 initialisation: N(0, 0.02), residual projections N(0, 0.02/sqrt(2*layers)), biases 0,
  // LayerNorm weight 1. Deterministic in `seed` on every platform. Refreshes compute weights.
  // Under tensor parallelism every rank gets exactly its slice of the weights of the tp = 1
  // model with the same seed (padding rows 0).
  virtual void InitWeights(uint64_t seed) = 0;
  // Re-derives the bf16/fp16 compute copy from the master weights (no-op for fp32).
  virtual void RefreshComputeWeights() = 0;
  virtual void ZeroGrad() = 0;

  // Runs the model on inputs[b, t] and returns the mean cross-entropy against targets[b, t]
  // (the same value on every TP rank). When dloss != 0, d(loss_i)/d(logits) * dloss is kept for
  // a following Backward() (pass loss_scale / (b * t * accumulation_steps)). Requires
  // b <= max_batch, t <= max_seq. Under tensor parallelism every rank of the group must call it
  // with the same arguments. Fails only when a TP collective fails: returns that error with
  // context; activations are then unspecified and no Backward may follow.
  // The whole model only (pp = 1; CHECKed); uses activation slot 0.
  Result<float> Forward(const int32_t* inputs, const int32_t* targets, int b, int t, float dloss);
  // Called during Backward when the gradients of parameters [offset, offset + count) (in
  // elements of this rank's flat buffer) are final for this Backward (no TP reduction is
  // pending on them): first ln_f, then each block from the last to the first, then the
  // embeddings (wte last: the tied head also writes it). The ranges are contiguous and cover
  // the local buffer from its end to its start. Data-parallel training starts reducing those
  // ranges while backward goes on. (On the last stage of a pipeline wte is reported last, and
  // is final for this stage only: the tied sum with the first stage comes after.)
  using GradReadyFn = std::function<void(int64_t offset, int64_t count)>;

  // Accumulates parameter gradients of the last Forward (which must have had dloss != 0).
  // Under tensor parallelism every rank of the group must call it. Returns OK, or the error of
  // a failed TP collective with context; the gradients are then partially accumulated: discard
  // the step (ZeroGrad) — on_ready was called only for ranges that were final.
  // The whole model only (pp = 1; CHECKed); uses activation slot 0.
  Status Backward(const GradReadyFn& on_ready = nullptr);

  // One pipeline stage's forward of one micro-batch of b x t tokens, saving its activations in
  // slot `slot` (in [0, num_slots()); a slot's previous contents are dropped).
  //   tokens   first stage: the inputs [b, t]; ignored (may be null) elsewhere.
  //   input    other stages: the residual stream [b, t, C] fp32 entering this stage's first
  //            block (the previous stage's `output`); ignored (may be null) on the first.
  //   targets  last stage: as Forward; ignored elsewhere.
  //   dloss    as Forward; on every stage, dloss != 0 allows a BackwardStage of this slot
  //            (pass the same value on all stages).
  //   output   non-last stages: receives the residual stream [b, t, C] fp32 leaving this
  //            stage's last block; ignored (may be null) on the last stage.
  // Returns the mean cross-entropy on the last stage and 0 on the others. Errors as Forward.
  // With pp = 1, ForwardStage(0, inputs, nullptr, targets, b, t, dloss, nullptr) is Forward.
  virtual Result<float> ForwardStage(int slot, const int32_t* tokens, const float* input,
                                     const int32_t* targets, int b, int t, float dloss,
                                     float* output) = 0;
  // Backward of the micro-batch in slot `slot` (whose ForwardStage had dloss != 0; the slot is
  // then free). Accumulates this stage's parameter gradients.
  //   doutput  non-last stages: d(loss)/d(output) [b, t, C] fp32, already scaled by dloss (the
  //            next stage's `dinput`); ignored (may be null) on the last stage, which starts
  //            from the loss.
  //   dinput   non-first stages: receives d(loss)/d(input) [b, t, C] fp32; ignored (may be
  //            null) on the first stage.
  // on_ready and errors as Backward.
  virtual Status BackwardStage(int slot, const float* doutput, float* dinput,
                               const GradReadyFn& on_ready = nullptr) = 0;

  // Bytes of activation memory held: all slots' saved activations plus the shared scratch
  // (for logs and tests of recompute).
  virtual int64_t activation_bytes() const = 0;
  // Of those, the bytes saved per slot (what one more micro-batch in flight costs).
  virtual int64_t slot_activation_bytes() const = 0;
};

}  // namespace strata::model
