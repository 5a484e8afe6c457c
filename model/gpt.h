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
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "model/dtype.h"

namespace strata::model {

struct GptConfig {
  int vocab_size = 256;
  int max_seq_len = 128;
  int layers = 4;
  int heads = 4;
  int channels = 128;
  bool recompute = false;  // recompute each block's activations during backward

  Status Validate() const;
  int64_t NumParameters() const;
  std::string ToString() const;
};

struct ParamTensor {
  std::string name;  // Hugging Face GPT-2 name without the "transformer." prefix
  std::vector<int64_t> shape;
  int64_t offset = 0;  // into the flat parameter buffer, in elements
  int64_t numel = 0;
  bool decay = false;  // AdamW weight decay applies (2-D weights and embeddings)
};

class Gpt {
 public:
  virtual ~Gpt() = default;

  // Allocates parameters, gradients and activations for micro-batches of at most
  // max_batch x max_seq tokens. INVALID_ARGUMENT for a bad config.
  static Result<std::unique_ptr<Gpt>> Create(const GptConfig& config, DType compute, int max_batch,
                                             int max_seq);

  virtual const GptConfig& config() const = 0;
  virtual DType compute_dtype() const = 0;
  virtual const std::vector<ParamTensor>& tensors() const = 0;
  virtual int64_t num_params() const = 0;

  virtual float* params() = 0;  // fp32 master weights
  virtual float* grads() = 0;   // fp32 gradients, same layout
  const float* params() const { return const_cast<Gpt*>(this)->params(); }

  // GPT-2 initialisation: N(0, 0.02), residual projections N(0, 0.02/sqrt(2*layers)), biases 0,
  // LayerNorm weight 1. Deterministic in `seed` on every platform. Refreshes compute weights.
  virtual void InitWeights(uint64_t seed) = 0;
  // Re-derives the bf16/fp16 compute copy from the master weights (no-op for fp32).
  virtual void RefreshComputeWeights() = 0;
  virtual void ZeroGrad() = 0;

  // Runs the model on inputs[b, t] and returns the mean cross-entropy against targets[b, t].
  // When dloss != 0, d(loss_i)/d(logits) * dloss is kept for a following Backward() (pass
  // loss_scale / (b * t * accumulation_steps)). Requires b <= max_batch, t <= max_seq.
  virtual float Forward(const int32_t* inputs, const int32_t* targets, int b, int t,
                        float dloss) = 0;
  // Called during Backward when the gradients of parameters [offset, offset + count) (in
  // elements of the flat buffer) are final for this Backward: first ln_f, then each block from
  // the last to the first, then the embeddings (wte last: the tied head also writes it).
  // Data-parallel training starts reducing those ranges while backward goes on.
  using GradReadyFn = std::function<void(int64_t offset, int64_t count)>;

  // Accumulates parameter gradients of the last Forward (which must have had dloss != 0).
  virtual void Backward(const GradReadyFn& on_ready = nullptr) = 0;

  // Bytes of activation memory held for one micro-batch (for logs and tests of recompute).
  virtual int64_t activation_bytes() const = 0;
};

}  // namespace strata::model
