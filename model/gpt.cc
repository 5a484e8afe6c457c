#include "model/gpt.h"

#include <cmath>
#include <cstring>
#include <type_traits>

#include "model/kernels/attention.h"
#include "model/kernels/elementwise.h"
#include "model/kernels/layernorm.h"
#include "model/kernels/matmul.h"
#include "model/kernels/softmax_xent.h"
#include "model/random.h"
#include "model/tensor.h"

namespace strata::model {

Status GptConfig::Validate() const {
  if (vocab_size <= 0) return InvalidArgument("model.vocab_size must be > 0");
  if (max_seq_len <= 0) return InvalidArgument("model.max_seq_len must be > 0");
  if (layers <= 0) return InvalidArgument("model.layers must be > 0");
  if (heads <= 0) return InvalidArgument("model.heads must be > 0");
  if (channels <= 0) return InvalidArgument("model.d_model must be > 0");
  if (channels % heads != 0) {
    return InvalidArgument("model.heads: " + std::to_string(heads) +
                           " does not divide model.d_model=" + std::to_string(channels));
  }
  return Status::Ok();
}

int64_t GptConfig::NumParameters() const {
  const int64_t c = channels;
  const int64_t per_layer =
      2 * c + (3 * c * c + 3 * c) + (c * c + c) + 2 * c + (4 * c * c + 4 * c) + (4 * c * c + c);
  return static_cast<int64_t>(vocab_size) * c + static_cast<int64_t>(max_seq_len) * c +
         layers * per_layer + 2 * c;
}

std::string GptConfig::ToString() const {
  return "layers=" + std::to_string(layers) + " heads=" + std::to_string(heads) +
         " d_model=" + std::to_string(channels) + " max_seq_len=" + std::to_string(max_seq_len) +
         " vocab=" + std::to_string(vocab_size) + (recompute ? " recompute" : "");
}

namespace {

// Indices of a block's tensors within ParamTensor order.
enum BlockParam {
  kLn1W,
  kLn1B,
  kQkvW,
  kQkvB,
  kAttProjW,
  kAttProjB,
  kLn2W,
  kLn2B,
  kFcW,
  kFcB,
  kFcProjW,
  kFcProjB,
  kNumBlockParams
};

std::vector<ParamTensor> BuildLayout(const GptConfig& cfg) {
  std::vector<ParamTensor> ts;
  int64_t off = 0;
  auto add = [&](std::string name, std::vector<int64_t> shape, bool decay) {
    ParamTensor p;
    p.name = std::move(name);
    p.shape = std::move(shape);
    p.numel = NumElements(p.shape);
    p.offset = off;
    p.decay = decay;
    off += p.numel;
    ts.push_back(std::move(p));
  };
  const int64_t c = cfg.channels;
  add("wte.weight", {cfg.vocab_size, c}, true);
  add("wpe.weight", {cfg.max_seq_len, c}, true);
  for (int l = 0; l < cfg.layers; ++l) {
    const std::string h = "h." + std::to_string(l) + ".";
    add(h + "ln_1.weight", {c}, false);
    add(h + "ln_1.bias", {c}, false);
    add(h + "attn.c_attn.weight", {3 * c, c}, true);
    add(h + "attn.c_attn.bias", {3 * c}, false);
    add(h + "attn.c_proj.weight", {c, c}, true);
    add(h + "attn.c_proj.bias", {c}, false);
    add(h + "ln_2.weight", {c}, false);
    add(h + "ln_2.bias", {c}, false);
    add(h + "mlp.c_fc.weight", {4 * c, c}, true);
    add(h + "mlp.c_fc.bias", {4 * c}, false);
    add(h + "mlp.c_proj.weight", {c, 4 * c}, true);
    add(h + "mlp.c_proj.bias", {c}, false);
  }
  add("ln_f.weight", {c}, false);
  add("ln_f.bias", {c}, false);
  return ts;
}

template <typename T>
class GptImpl final : public Gpt {
 public:
  GptImpl(const GptConfig& cfg, int max_batch, int max_seq)
      : cfg_(cfg), max_b_(max_batch), max_t_(max_seq), layout_(BuildLayout(cfg)) {
    n_params_ = layout_.back().offset + layout_.back().numel;
    master_ = Tensor::Empty({n_params_}, DType::kF32);
    grads_ = Tensor::Empty({n_params_}, DType::kF32);
    if constexpr (!std::is_same_v<T, float>) {
      compute_ = Tensor::Empty({n_params_}, DTypeOf<T>::value);
    }
    AllocateActivations();
  }

  const GptConfig& config() const override { return cfg_; }
  DType compute_dtype() const override { return DTypeOf<T>::value; }
  const std::vector<ParamTensor>& tensors() const override { return layout_; }
  int64_t num_params() const override { return n_params_; }
  float* params() override { return master_.data<float>(); }
  float* grads() override { return grads_.data<float>(); }
  int64_t activation_bytes() const override { return act_bytes_; }

  void InitWeights(uint64_t seed) override {
    float* p = params();
    const float residual_std = 0.02f / std::sqrt(2.f * static_cast<float>(cfg_.layers));
    for (size_t i = 0; i < layout_.size(); ++i) {
      const ParamTensor& t = layout_[i];
      float* x = p + t.offset;
      const bool is_ln_weight =
          t.name.find("ln_") != std::string::npos && t.name.ends_with(".weight");
      if (t.shape.size() == 1) {
        std::fill(x, x + t.numel, is_ln_weight ? 1.f : 0.f);
        continue;
      }
      const bool residual = t.name.ends_with("c_proj.weight");
      // Each tensor draws from its own stream (seed, tensor index): adding a tensor elsewhere
      // does not change the others.
      NormalRng rng(seed, i);
      const float std = residual ? residual_std : 0.02f;
      for (int64_t k = 0; k < t.numel; ++k) x[k] = std * rng.Next();
    }
    RefreshComputeWeights();
  }

  void RefreshComputeWeights() override {
    if constexpr (!std::is_same_v<T, float>) {
      CastFromFloat(compute_.data<T>(), master_.data<float>(), n_params_);
    }
  }

  void ZeroGrad() override { std::memset(grads_.raw(), 0, grads_.nbytes()); }

  float Forward(const int32_t* inputs, const int32_t* targets, int b, int t, float dloss) override {
    CHECK(b > 0 && b <= max_b_ && t > 0 && t <= max_t_);
    const int64_t bt = static_cast<int64_t>(b) * t;
    const int c = cfg_.channels, v = cfg_.vocab_size;
    b_ = b;
    t_ = t;
    std::memcpy(tokens_.data(), inputs, bt * sizeof(int32_t));
    has_grad_ = dloss != 0.f;
    EmbeddingForward(res_[0], inputs, W(0), W(1), b, t, c);
    for (int l = 0; l < cfg_.layers; ++l) LayerForward(l);
    LayerNormForward(lnf_, lnf_mean_, lnf_rstd_, res_[cfg_.layers], W(FinalIndex()),
                     W(FinalIndex() + 1), bt, c);
    MatmulForward<T>(logits_, lnf_, W(0), nullptr, bt, c, v);
    const double total = SoftmaxCrossEntropy(logits_, losses_, targets, bt, v, dloss);
    return static_cast<float>(total / static_cast<double>(bt));
  }

  void Backward(const GradReadyFn& on_ready) override {
    CHECK_MSG(has_grad_, "Backward() needs a Forward() with dloss != 0");
    has_grad_ = false;
    const int b = b_, t = t_, c = cfg_.channels, v = cfg_.vocab_size;
    const int64_t bt = static_cast<int64_t>(b) * t;
    float* g = grads();
    const int fi = FinalIndex();
    std::memset(dres_, 0, static_cast<size_t>(bt) * c * sizeof(float));
    MatmulBackward<T>(dln_, g + layout_[0].offset, nullptr, logits_, lnf_, W(0), bt, c, v);
    LayerNormBackward(dres_, g + layout_[fi].offset, g + layout_[fi + 1].offset, dln_,
                      res_[cfg_.layers], W(fi), lnf_mean_, lnf_rstd_, bt, c);
    if (on_ready) on_ready(layout_[fi].offset, layout_[fi].numel + layout_[fi + 1].numel);
    for (int l = cfg_.layers - 1; l >= 0; --l) {
      if (cfg_.recompute) LayerForward(l);
      const Acts& a = acts_[l];
      auto gp = [&](int k) { return g + layout_[2 + l * kNumBlockParams + k].offset; };
      const T* branch = BranchGrad(bt * c);
      MatmulBackward<T>(dfch_, gp(kFcProjW), gp(kFcProjB), branch, a.fchg, BW(l, kFcProjW), bt,
                        4 * c, c);
      GeluBackward(dfch_, a.fch, dfch_, bt * 4 * c);
      MatmulBackward<T>(dln_, gp(kFcW), gp(kFcB), dfch_, a.ln2, BW(l, kFcW), bt, c, 4 * c);
      LayerNormBackward(dres_, gp(kLn2W), gp(kLn2B), dln_, a.res_mid, BW(l, kLn2W), a.ln2_mean,
                        a.ln2_rstd, bt, c);
      branch = BranchGrad(bt * c);
      MatmulBackward<T>(datty_, gp(kAttProjW), gp(kAttProjB), branch, a.atty, BW(l, kAttProjW), bt,
                        c, c);
      AttentionBackward(dqkv_, datty_, a.qkv, a.atty, a.lse, b, t, c, cfg_.heads);
      MatmulBackward<T>(dln_, gp(kQkvW), gp(kQkvB), dqkv_, a.ln1, BW(l, kQkvW), bt, c, 3 * c);
      LayerNormBackward(dres_, gp(kLn1W), gp(kLn1B), dln_, res_[l], BW(l, kLn1W), a.ln1_mean,
                        a.ln1_rstd, bt, c);
      if (on_ready) {
        const ParamTensor& first = layout_[2 + l * kNumBlockParams];
        const ParamTensor& last = layout_[2 + l * kNumBlockParams + kNumBlockParams - 1];
        on_ready(first.offset, last.offset + last.numel - first.offset);
      }
    }
    EmbeddingBackward(g + layout_[0].offset, g + layout_[1].offset, dres_, tokens_.data(), b, t, c,
                      v);
    if (on_ready) on_ready(0, layout_[0].numel + layout_[1].numel);
  }

 private:
  struct Acts {
    T* ln1;
    float* ln1_mean;
    float* ln1_rstd;
    T* qkv;
    T* atty;
    float* lse;
    float* res_mid;
    T* ln2;
    float* ln2_mean;
    float* ln2_rstd;
    T* fch;
    T* fchg;
  };

  int FinalIndex() const { return 2 + cfg_.layers * kNumBlockParams; }

  // Compute-precision view of parameter tensor i.
  const T* W(int i) const {
    const int64_t off = layout_[static_cast<size_t>(i)].offset;
    if constexpr (std::is_same_v<T, float>) {
      return master_.data<float>() + off;
    } else {
      return compute_.data<T>() + off;
    }
  }
  const T* BW(int l, int k) const { return W(2 + l * kNumBlockParams + k); }

  // The residual-stream gradient in compute precision, as the dout of a branch's last GEMM.
  const T* BranchGrad(int64_t n) {
    if constexpr (std::is_same_v<T, float>) {
      return dres_;
    } else {
      CastFromFloat(dbranch_, dres_, n);
      return dbranch_;
    }
  }

  void LayerForward(int l) {
    const int b = b_, t = t_, c = cfg_.channels;
    const int64_t bt = static_cast<int64_t>(b) * t;
    const Acts& a = acts_[l];
    const float* res_in = res_[l];
    LayerNormForward(a.ln1, a.ln1_mean, a.ln1_rstd, res_in, BW(l, kLn1W), BW(l, kLn1B), bt, c);
    MatmulForward<T>(a.qkv, a.ln1, BW(l, kQkvW), BW(l, kQkvB), bt, c, 3 * c);
    AttentionForward(a.atty, a.lse, a.qkv, b, t, c, cfg_.heads);
    MatmulForward<T>(branch_out_, a.atty, BW(l, kAttProjW), BW(l, kAttProjB), bt, c, c);
    ResidualForward(a.res_mid, res_in, branch_out_, bt * c);
    LayerNormForward(a.ln2, a.ln2_mean, a.ln2_rstd, a.res_mid, BW(l, kLn2W), BW(l, kLn2B), bt, c);
    MatmulForward<T>(a.fch, a.ln2, BW(l, kFcW), BW(l, kFcB), bt, c, 4 * c);
    GeluForward(a.fchg, a.fch, bt * 4 * c);
    MatmulForward<T>(branch_out_, a.fchg, BW(l, kFcProjW), BW(l, kFcProjB), bt, 4 * c, c);
    ResidualForward(res_[l + 1], a.res_mid, branch_out_, bt * c);
  }

  template <typename U>
  U* Alloc(int64_t n, bool count = true) {
    buffers_.push_back(Tensor::Empty({n}, DTypeOf<U>::value));
    if (count) act_bytes_ += static_cast<int64_t>(buffers_.back().nbytes());
    return buffers_.back().template data<U>();
  }

  void AllocateActivations() {
    const int64_t bt = static_cast<int64_t>(max_b_) * max_t_;
    const int64_t c = cfg_.channels;
    const int layer_sets = cfg_.recompute ? 1 : cfg_.layers;
    std::vector<Acts> sets(layer_sets);
    for (Acts& a : sets) {
      a.ln1 = Alloc<T>(bt * c);
      a.ln1_mean = Alloc<float>(bt);
      a.ln1_rstd = Alloc<float>(bt);
      a.qkv = Alloc<T>(bt * 3 * c);
      a.atty = Alloc<T>(bt * c);
      a.lse = Alloc<float>(bt * cfg_.heads);
      a.res_mid = Alloc<float>(bt * c);
      a.ln2 = Alloc<T>(bt * c);
      a.ln2_mean = Alloc<float>(bt);
      a.ln2_rstd = Alloc<float>(bt);
      a.fch = Alloc<T>(bt * 4 * c);
      a.fchg = Alloc<T>(bt * 4 * c);
    }
    for (int l = 0; l < cfg_.layers; ++l) acts_.push_back(sets[cfg_.recompute ? 0 : l]);
    for (int l = 0; l <= cfg_.layers; ++l) res_.push_back(Alloc<float>(bt * c));
    lnf_ = Alloc<T>(bt * c);
    lnf_mean_ = Alloc<float>(bt);
    lnf_rstd_ = Alloc<float>(bt);
    logits_ = Alloc<T>(bt * cfg_.vocab_size);
    losses_ = Alloc<float>(bt);
    branch_out_ = Alloc<T>(bt * c);
    tokens_.resize(static_cast<size_t>(bt));
    // Gradient scratch (one layer at a time).
    dres_ = Alloc<float>(bt * c);
    dbranch_ = Alloc<T>(bt * c);
    dln_ = Alloc<T>(bt * c);
    dqkv_ = Alloc<T>(bt * 3 * c);
    datty_ = Alloc<T>(bt * c);
    dfch_ = Alloc<T>(bt * 4 * c);
  }

  GptConfig cfg_;
  int max_b_, max_t_;
  std::vector<ParamTensor> layout_;
  int64_t n_params_ = 0;
  Tensor master_, grads_, compute_;
  std::vector<Tensor> buffers_;
  int64_t act_bytes_ = 0;

  std::vector<Acts> acts_;
  std::vector<float*> res_;  // res_[0] = embeddings, res_[l + 1] = output of block l
  T* lnf_ = nullptr;
  float* lnf_mean_ = nullptr;
  float* lnf_rstd_ = nullptr;
  T* logits_ = nullptr;  // holds dlogits after a Forward with dloss != 0
  float* losses_ = nullptr;
  T* branch_out_ = nullptr;
  std::vector<int32_t> tokens_;
  float* dres_ = nullptr;
  T* dbranch_ = nullptr;
  T* dln_ = nullptr;
  T* dqkv_ = nullptr;
  T* datty_ = nullptr;
  T* dfch_ = nullptr;

  int b_ = 0, t_ = 0;
  bool has_grad_ = false;
};

}  // namespace

Result<std::unique_ptr<Gpt>> Gpt::Create(const GptConfig& config, DType compute, int max_batch,
                                         int max_seq) {
  RETURN_IF_ERROR(config.Validate());
  if (max_batch <= 0) return InvalidArgument("micro batch must be > 0");
  if (max_seq <= 0 || max_seq > config.max_seq_len) {
    return InvalidArgument("model.seq_len: " + std::to_string(max_seq) +
                           " must be in [1, max_seq_len=" + std::to_string(config.max_seq_len) +
                           "]");
  }
  std::unique_ptr<Gpt> m;
  switch (compute) {
    case DType::kF32:
      m = std::make_unique<GptImpl<float>>(config, max_batch, max_seq);
      break;
    case DType::kBF16:
      m = std::make_unique<GptImpl<bf16>>(config, max_batch, max_seq);
      break;
    case DType::kF16:
      m = std::make_unique<GptImpl<f16>>(config, max_batch, max_seq);
      break;
  }
  return m;
}

}  // namespace strata::model
