#include "model/optimizer.h"

#include <omp.h>

#include <algorithm>
#include <cmath>

namespace strata::model {

AdamW::AdamW(const std::vector<ParamTensor>& tensors, int64_t num_params, AdamWConfig config,
             int64_t offset, int64_t count)
    : cfg_(config),
      offset_(offset),
      n_(count < 0 ? num_params - offset : count),
      m_(Tensor::Empty({n_}, DType::kF32)),
      v_(Tensor::Empty({n_}, DType::kF32)),
      decay_(static_cast<size_t>(n_), 0) {
  CHECK(offset_ >= 0 && offset_ + n_ <= num_params);
  for (const ParamTensor& t : tensors) {
    if (!t.decay) continue;
    const int64_t lo = std::max(t.offset, offset_), hi = std::min(t.offset + t.numel, offset_ + n_);
    if (lo < hi) std::fill(decay_.begin() + (lo - offset_), decay_.begin() + (hi - offset_), 1);
  }
}

void AdamW::Update(float* params, const float* grads, float lr, int64_t step) {
  const float b1 = cfg_.beta1, b2 = cfg_.beta2;
  const float bc1 = 1.f - std::pow(b1, static_cast<float>(step));
  const float bc2 = 1.f - std::pow(b2, static_cast<float>(step));
  const float step_size = lr / bc1;
  const float bc2_sqrt = std::sqrt(bc2);
  const float decay_factor = 1.f - lr * cfg_.weight_decay;
  float* m = m_.data<float>();
  float* v = v_.data<float>();
  const uint8_t* decay = decay_.data();
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n_; ++i) {
    const float g = grads[i];
    float p = params[i];
    if (decay[i]) p *= decay_factor;
    const float mi = b1 * m[i] + (1.f - b1) * g;
    const float vi = b2 * v[i] + (1.f - b2) * g * g;
    m[i] = mi;
    v[i] = vi;
    params[i] = p - step_size * mi / (std::sqrt(vi) / bc2_sqrt + cfg_.eps);
  }
}

float LearningRate(int64_t step, int64_t total_steps, int64_t warmup, float lr, float min_lr) {
  if (step < warmup) return lr * static_cast<float>(step + 1) / static_cast<float>(warmup);
  if (total_steps <= warmup) return lr;
  double ratio = static_cast<double>(step - warmup) / static_cast<double>(total_steps - warmup);
  if (ratio > 1.0) ratio = 1.0;
  const double coeff = 0.5 * (1.0 + std::cos(M_PI * ratio));
  return static_cast<float>(min_lr + coeff * (lr - min_lr));
}

double SumOfSquares(const float* x, int64_t n) {
  const int nt = omp_get_max_threads();
  std::vector<double> partial(static_cast<size_t>(nt), 0.0);
#pragma omp parallel
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t i0 = n * tid / nth, i1 = n * (tid + 1) / nth;
    double s = 0.0;
    for (int64_t i = i0; i < i1; ++i) s += static_cast<double>(x[i]) * x[i];
    partial[static_cast<size_t>(tid)] = s;
  }
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

void Scale(float* x, int64_t n, float s) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) x[i] *= s;
}

bool LossScaler::Update(bool grads_finite) {
  if (!grads_finite) {
    scale_ *= backoff_;
    clean_ = 0;
    ++skipped_;
    return false;
  }
  if (++clean_ >= interval_) {
    scale_ *= growth_;
    clean_ = 0;
  }
  return true;
}

}  // namespace strata::model
