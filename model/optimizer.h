// AdamW (decoupled weight decay, as torch.optim.AdamW), the learning-rate schedule, global-norm
// gradient clipping and the fp16 dynamic loss scaler. All state is fp32.
#pragma once

#include <cstdint>
#include <vector>

#include "model/gpt.h"
#include "model/tensor.h"

namespace strata::model {

struct AdamWConfig {
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.1f;
};

class AdamW {
 public:
  // Weight decay applies to the tensors whose ParamTensor::decay is set (not biases, norms).
  // The optimizer owns state for elements [offset, offset + count) of the flat parameter buffer
  // (count < 0: to the end) — a ZeRO-1 shard, or everything.
  AdamW(const std::vector<ParamTensor>& tensors, int64_t num_params, AdamWConfig config,
        int64_t offset = 0, int64_t count = -1);

  // One update of the owned range with the given lr; `params` and `grads` point at the range's
  // first element. `step` counts updates from 1 (bias correction).
  void Update(float* params, const float* grads, float lr, int64_t step);

  int64_t offset() const { return offset_; }

  float* m() { return m_.data<float>(); }
  float* v() { return v_.data<float>(); }
  int64_t size() const { return n_; }

 private:
  AdamWConfig cfg_;
  int64_t offset_;
  int64_t n_;
  Tensor m_, v_;
  std::vector<uint8_t> decay_;  // per owned element: 1 where weight decay applies
};

// Linear warm-up over `warmup` steps to `lr`, then cosine decay to `min_lr` at `total_steps`.
// `step` counts from 0.
float LearningRate(int64_t step, int64_t total_steps, int64_t warmup, float lr, float min_lr);

// Sum of squares in double (deterministic for a given thread count). Inf/NaN propagate.
double SumOfSquares(const float* x, int64_t n);
void Scale(float* x, int64_t n, float s);

// Dynamic loss scaling for fp16 (the policy of torch.cuda.amp.GradScaler): on inf/NaN gradients
// skip the step and multiply the scale by backoff; after `growth_interval` clean steps in a row
// multiply it by growth.
class LossScaler {
 public:
  LossScaler(float initial_scale = 65536.f, float growth = 2.f, float backoff = 0.5f,
             int growth_interval = 2000)
      : scale_(initial_scale), growth_(growth), backoff_(backoff), interval_(growth_interval) {}

  float scale() const { return scale_; }
  // Records the outcome of one step; returns true when the step must be applied.
  bool Update(bool grads_finite);
  int64_t skipped() const { return skipped_; }
  // The state a checkpoint keeps (the constants come from the configuration).
  int clean_steps() const { return clean_; }
  void Restore(float scale, int clean_steps, int64_t skipped) {
    scale_ = scale;
    clean_ = clean_steps;
    skipped_ = skipped;
  }

 private:
  float scale_;
  float growth_, backoff_;
  int interval_;
  int clean_ = 0;
  int64_t skipped_ = 0;
};

}  // namespace strata::model
