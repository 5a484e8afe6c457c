#include "model/gpt.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "model/kernels/attention.h"
#include "model/kernels/elementwise.h"
#include "model/kernels/layernorm.h"
#include "model/kernels/matmul.h"
#include "model/kernels/softmax_xent.h"
#include "model/kernels/vocab_parallel.h"
#include "model/random.h"
#include "model/tensor.h"
#include "model/tensor_parallel.h"

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

int64_t ParamTensor::GlobalIndex(int64_t i) const {
  if (replicated()) return i;
  const size_t d = static_cast<size_t>(shard_dim);
  int64_t inner = 1;
  for (size_t k = d + 1; k < shape.size(); ++k) inner *= shape[k];
  const int64_t gdim = global_shape[d], ldim = shape[d];
  const int64_t gblock = gdim / shard_blocks, lblock = ldim / shard_blocks;
  const int64_t outer = i / (inner * ldim), j = (i / inner) % ldim, in = i % inner;
  const int64_t within = j % lblock;
  if (within >= shard_extent) return -1;
  return (outer * gdim + (j / lblock) * gblock + shard_offset + within) * inner + in;
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

// How this rank's tensors relate to the unsharded model's.
struct TpShape {
  int size = 1;
  int rank = 0;
  int64_t vocab_rows = 0;   // local wte rows, padding included
  int64_t vocab_lo = 0;     // first global token of this rank's rows
  int64_t vocab_valid = 0;  // rows that are real tokens (the rest is padding)
};

TpShape MakeTpShape(const GptConfig& cfg, int size, int rank) {
  TpShape s;
  s.size = size;
  s.rank = rank;
  s.vocab_rows = (cfg.vocab_size + size - 1) / size;
  s.vocab_lo = s.vocab_rows * rank;
  s.vocab_valid = std::clamp<int64_t>(cfg.vocab_size - s.vocab_lo, 0, s.vocab_rows);
  return s;
}

std::vector<ParamTensor> BuildLayout(const GptConfig& cfg, const TpShape& tp) {
  std::vector<ParamTensor> ts;
  int64_t off = 0;
  auto push = [&](ParamTensor p) {
    p.numel = NumElements(p.shape);
    p.offset = off;
    off += p.numel;
    ts.push_back(std::move(p));
  };
  auto replicated = [&](std::string name, std::vector<int64_t> shape, bool decay) {
    ParamTensor p;
    p.name = std::move(name);
    p.shape = shape;
    p.global_shape = std::move(shape);
    p.decay = decay;
    push(std::move(p));
  };
  // Split dimension `dim` of `shape` (made of `blocks` equal blocks) evenly over the TP group.
  auto split = [&](std::string name, std::vector<int64_t> shape, int dim, int blocks, bool decay) {
    ParamTensor p;
    p.name = std::move(name);
    p.global_shape = shape;
    p.shard_dim = dim;
    p.shard_blocks = blocks;
    p.shard_extent = shape[static_cast<size_t>(dim)] / blocks / tp.size;
    p.shard_offset = p.shard_extent * tp.rank;
    shape[static_cast<size_t>(dim)] = p.shard_extent * blocks;
    p.shape = std::move(shape);
    p.decay = decay;
    push(std::move(p));
  };
  const int64_t c = cfg.channels;
  {
    ParamTensor wte;  // vocabulary-parallel, padded
    wte.name = "wte.weight";
    wte.shape = {tp.vocab_rows, c};
    wte.global_shape = {cfg.vocab_size, c};
    wte.shard_dim = 0;
    wte.shard_offset = tp.vocab_lo;
    wte.shard_extent = tp.vocab_valid;
    wte.decay = true;
    push(std::move(wte));
  }
  replicated("wpe.weight", {cfg.max_seq_len, c}, true);
  for (int l = 0; l < cfg.layers; ++l) {
    const std::string h = "h." + std::to_string(l) + ".";
    replicated(h + "ln_1.weight", {c}, false);
    replicated(h + "ln_1.bias", {c}, false);
    split(h + "attn.c_attn.weight", {3 * c, c}, 0, 3, true);  // column-parallel, q | k | v
    split(h + "attn.c_attn.bias", {3 * c}, 0, 3, false);
    split(h + "attn.c_proj.weight", {c, c}, 1, 1, true);  // row-parallel
    replicated(h + "attn.c_proj.bias", {c}, false);
    replicated(h + "ln_2.weight", {c}, false);
    replicated(h + "ln_2.bias", {c}, false);
    split(h + "mlp.c_fc.weight", {4 * c, c}, 0, 1, true);  // column-parallel
    split(h + "mlp.c_fc.bias", {4 * c}, 0, 1, false);
    split(h + "mlp.c_proj.weight", {c, 4 * c}, 1, 1, true);  // row-parallel
    replicated(h + "mlp.c_proj.bias", {c}, false);
  }
  replicated("ln_f.weight", {c}, false);
  replicated("ln_f.bias", {c}, false);
  return ts;
}

// The local index along p.shard_dim of global index j along it, or -1 when another rank holds
// it. (Replicated tensors: j.) The inverse of ParamTensor::GlobalIndex along one dimension.
int64_t LocalSlot(const ParamTensor& p, int64_t j) {
  if (p.replicated()) return j;
  const size_t d = static_cast<size_t>(p.shard_dim);
  const int64_t gblock = p.global_shape[d] / p.shard_blocks;
  const int64_t lblock = p.shape[d] / p.shard_blocks;
  const int64_t within = j % gblock - p.shard_offset;
  if (within < 0 || within >= p.shard_extent) return -1;
  return (j / gblock) * lblock + within;
}

template <typename T>
class GptImpl final : public Gpt {
 public:
  GptImpl(const GptConfig& cfg, int max_batch, int max_seq, TensorParallelComm* tp)
      : cfg_(cfg),
        max_b_(max_batch),
        max_t_(max_seq),
        tp_(tp),
        shard_(MakeTpShape(cfg, tp ? tp->size() : 1, tp ? tp->rank() : 0)),
        layout_(BuildLayout(cfg, shard_)),
        c_(cfg.channels),
        cl_(cfg.channels / shard_.size),
        nhl_(cfg.heads / shard_.size),
        fcl_(4 * cfg.channels / shard_.size),
        vl_(static_cast<int>(shard_.vocab_rows)) {
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
      // does not change the others. Under tensor parallelism every rank walks the whole global
      // stream and keeps its slice, so that each rank holds exactly what the tp = 1 model holds
      // there. Cost: every rank draws all O(global elements) samples, as many as tp = 1 does
      // (about 4 s per rank for GPT-2 124M, once per run), with no extra memory. A skip-ahead
      // in NormalRng would make it O(local elements).
      NormalRng rng(seed, i);
      const float std = residual ? residual_std : 0.02f;
      std::fill(x, x + t.numel, 0.f);  // padding
      // The global tensor as [outer, dim, inner] around the shard dimension, in stream order.
      const size_t d = t.replicated() ? 0 : static_cast<size_t>(t.shard_dim);
      int64_t outer = 1, inner = 1;
      for (size_t k = 0; k < d; ++k) outer *= t.global_shape[k];
      for (size_t k = d + 1; k < t.global_shape.size(); ++k) inner *= t.global_shape[k];
      const int64_t gdim = t.global_shape[d], ldim = t.shape[d];
      for (int64_t o = 0; o < outer; ++o) {
        for (int64_t j = 0; j < gdim; ++j) {
          const int64_t lj = LocalSlot(t, j);
          float* dst = lj < 0 ? nullptr : x + (o * ldim + lj) * inner;
          for (int64_t k = 0; k < inner; ++k) {
            const float v = std * rng.Next();
            if (dst != nullptr) dst[k] = v;
          }
        }
      }
    }
    RefreshComputeWeights();
  }

  void RefreshComputeWeights() override {
    if constexpr (!std::is_same_v<T, float>) {
      CastFromFloat(compute_.data<T>(), master_.data<float>(), n_params_);
    }
  }

  void ZeroGrad() override { std::memset(grads_.raw(), 0, grads_.nbytes()); }

  Result<float> Forward(const int32_t* inputs, const int32_t* targets, int b, int t,
                        float dloss) override {
    CHECK(b > 0 && b <= max_b_ && t > 0 && t <= max_t_);
    const int64_t bt = static_cast<int64_t>(b) * t;
    const int c = c_;
    b_ = b;
    t_ = t;
    has_grad_ = false;  // set only when the whole forward succeeded
    std::memcpy(tokens_.data(), inputs, bt * sizeof(int32_t));
    // Vocabulary-parallel lookup: each rank contributes the rows of its tokens, zeros elsewhere.
    VocabShardEmbeddingForward(res_[0], inputs, W(0), shard_.vocab_lo,
                               static_cast<int>(shard_.vocab_valid), bt, c);
    RETURN_IF_ERROR(SumOverTp(res_[0], bt * c, DType::kF32, "token embedding", -1));
    AddPositionEmbedding(res_[0], W(1), b, t, c);
    for (int l = 0; l < cfg_.layers; ++l) RETURN_IF_ERROR(LayerForward(l));
    LayerNormForward(lnf_, lnf_mean_, lnf_rstd_, res_[cfg_.layers], W(FinalIndex()),
                     W(FinalIndex() + 1), bt, c);
    MatmulForward<T>(logits_, lnf_, W(0), nullptr, bt, c, vl_);
    double total = 0.0;
    if (tp_ == nullptr) {
      total = SoftmaxCrossEntropy(logits_, losses_, targets, bt, vl_, dloss);
    } else {
      ASSIGN_OR_RETURN(total, VocabParallelCrossEntropy(targets, bt, dloss));
    }
    has_grad_ = dloss != 0.f;
    return static_cast<float>(total / static_cast<double>(bt));
  }

  Status Backward(const GradReadyFn& on_ready) override {
    CHECK_MSG(has_grad_, "Backward() needs a Forward() with dloss != 0");
    has_grad_ = false;
    const int b = b_, t = t_, c = c_;
    const int64_t bt = static_cast<int64_t>(b) * t;
    float* g = grads();
    const int fi = FinalIndex();
    std::memset(dres_, 0, static_cast<size_t>(bt) * c * sizeof(float));
    // Tied LM head (column-parallel over the vocabulary): dX is a partial sum per rank.
    MatmulBackward<T>(dln_, g + layout_[0].offset, nullptr, logits_, lnf_, W(0), bt, c, vl_);
    RETURN_IF_ERROR(SumOverTp(dln_, bt * c, DTypeOf<T>::value, "lm_head input gradient", -1));
    LayerNormBackward(dres_, g + layout_[fi].offset, g + layout_[fi + 1].offset, dln_,
                      res_[cfg_.layers], W(fi), lnf_mean_, lnf_rstd_, bt, c);
    if (on_ready) on_ready(layout_[fi].offset, layout_[fi].numel + layout_[fi + 1].numel);
    for (int l = cfg_.layers - 1; l >= 0; --l) {
      if (cfg_.recompute) RETURN_IF_ERROR(LayerForward(l));
      const Acts& a = acts_[l];
      auto gp = [&](int k) { return g + layout_[2 + l * kNumBlockParams + k].offset; };
      // Row-parallel c_proj: dout is the full (replicated) residual gradient, so its bias
      // gradient is the same on every rank and dX is local; no collective.
      const T* branch = BranchGrad(bt * c);
      MatmulBackward<T>(dfch_, gp(kFcProjW), gp(kFcProjB), branch, a.fchg, BW(l, kFcProjW), bt,
                        fcl_, c);
      GeluBackward(dfch_, a.fch, dfch_, bt * fcl_);
      MatmulBackward<T>(dln_, gp(kFcW), gp(kFcB), dfch_, a.ln2, BW(l, kFcW), bt, c, fcl_);
      RETURN_IF_ERROR(SumOverTp(dln_, bt * c, DTypeOf<T>::value, "mlp.c_fc input gradient", l));
      LayerNormBackward(dres_, gp(kLn2W), gp(kLn2B), dln_, a.res_mid, BW(l, kLn2W), a.ln2_mean,
                        a.ln2_rstd, bt, c);
      branch = BranchGrad(bt * c);
      MatmulBackward<T>(datty_, gp(kAttProjW), gp(kAttProjB), branch, a.atty, BW(l, kAttProjW), bt,
                        cl_, c);
      AttentionBackward(dqkv_, datty_, a.qkv, a.atty, a.lse, b, t, cl_, nhl_);
      MatmulBackward<T>(dln_, gp(kQkvW), gp(kQkvB), dqkv_, a.ln1, BW(l, kQkvW), bt, c, 3 * cl_);
      RETURN_IF_ERROR(SumOverTp(dln_, bt * c, DTypeOf<T>::value, "attn.c_attn input gradient", l));
      LayerNormBackward(dres_, gp(kLn1W), gp(kLn1B), dln_, res_[l], BW(l, kLn1W), a.ln1_mean,
                        a.ln1_rstd, bt, c);
      if (on_ready) {
        const ParamTensor& first = layout_[2 + l * kNumBlockParams];
        const ParamTensor& last = layout_[2 + l * kNumBlockParams + kNumBlockParams - 1];
        on_ready(first.offset, last.offset + last.numel - first.offset);
      }
    }
    // dres_ is replicated, so wpe's gradient is too; each rank adds to its own wte rows.
    VocabShardEmbeddingBackward(g + layout_[0].offset, g + layout_[1].offset, dres_, tokens_.data(),
                                shard_.vocab_lo, static_cast<int>(shard_.vocab_valid), b, t, c);
    if (on_ready) on_ready(0, layout_[0].numel + layout_[1].numel);
    return Status::Ok();
  }

 private:
  struct Acts {
    T* ln1;
    float* ln1_mean;
    float* ln1_rstd;
    T* qkv;  // local heads: [BT, 3 * C / tp]
    T* atty;
    float* lse;
    float* res_mid;
    T* ln2;
    float* ln2_mean;
    float* ln2_rstd;
    T* fch;  // [BT, 4 * C / tp]
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

  // In-place sum over the TP group (no-op without TP). `what` and `layer` (-1: none) only
  // label an error.
  Status SumOverTp(void* buf, int64_t n, DType type, const char* what, int layer) {
    if (tp_ == nullptr) return Status::Ok();
    return TpContext(tp_->AllReduceSum(buf, n, type), what, layer);
  }
  static Status TpContext(const Status& s, const char* what, int layer) {
    if (s.ok()) return s;
    return s.WithContext(std::string("tensor-parallel all-reduce of ") +
                         (layer >= 0 ? "h." + std::to_string(layer) + "." : std::string()) + what);
  }

  // Output of a row-parallel linear: partial products summed over the group, then the
  // replicated bias. Without TP the bias is fused into the GEMM (the tp = 1 numerics).
  Status RowParallelForward(T* out, const T* inp, const T* w, const T* bias, int in_local,
                            const char* what, int layer) {
    const int64_t bt = static_cast<int64_t>(b_) * t_;
    if (tp_ == nullptr) {
      MatmulForward<T>(out, inp, w, bias, bt, in_local, c_);
      return Status::Ok();
    }
    MatmulForward<T>(out, inp, w, nullptr, bt, in_local, c_);
    RETURN_IF_ERROR(SumOverTp(out, bt * c_, DTypeOf<T>::value, what, layer));
    AddBias(out, bias, bt, c_);
    return Status::Ok();
  }

  Result<double> VocabParallelCrossEntropy(const int32_t* targets, int64_t bt, float dloss) {
    const int valid = static_cast<int>(shard_.vocab_valid);
    ShardRowMax(xent_max_, logits_, bt, vl_, valid);
    RETURN_IF_ERROR(TpContext(tp_->AllReduceMax(xent_max_, bt), "logit max", -1));
    float* sum_exp = xent_sums_;
    float* target = xent_sums_ + bt;
    ShardSumExpAndTarget(sum_exp, target, logits_, xent_max_, targets, shard_.vocab_lo, bt, vl_,
                         valid);
    // One collective for both: the softmax denominators and the target logits.
    RETURN_IF_ERROR(SumOverTp(xent_sums_, 2 * bt, DType::kF32, "softmax sums", -1));
    return ShardCrossEntropyFinish(logits_, losses_, xent_max_, sum_exp, target, targets,
                                   shard_.vocab_lo, bt, vl_, valid, dloss);
  }

  Status LayerForward(int l) {
    const int b = b_, t = t_, c = c_;
    const int64_t bt = static_cast<int64_t>(b) * t;
    const Acts& a = acts_[l];
    const float* res_in = res_[l];
    LayerNormForward(a.ln1, a.ln1_mean, a.ln1_rstd, res_in, BW(l, kLn1W), BW(l, kLn1B), bt, c);
    MatmulForward<T>(a.qkv, a.ln1, BW(l, kQkvW), BW(l, kQkvB), bt, c, 3 * cl_);
    AttentionForward(a.atty, a.lse, a.qkv, b, t, cl_, nhl_);
    RETURN_IF_ERROR(RowParallelForward(branch_out_, a.atty, BW(l, kAttProjW), BW(l, kAttProjB), cl_,
                                       "attn.c_proj output", l));
    ResidualForward(a.res_mid, res_in, branch_out_, bt * c);
    LayerNormForward(a.ln2, a.ln2_mean, a.ln2_rstd, a.res_mid, BW(l, kLn2W), BW(l, kLn2B), bt, c);
    MatmulForward<T>(a.fch, a.ln2, BW(l, kFcW), BW(l, kFcB), bt, c, fcl_);
    GeluForward(a.fchg, a.fch, bt * fcl_);
    RETURN_IF_ERROR(RowParallelForward(branch_out_, a.fchg, BW(l, kFcProjW), BW(l, kFcProjB), fcl_,
                                       "mlp.c_proj output", l));
    ResidualForward(res_[l + 1], a.res_mid, branch_out_, bt * c);
    return Status::Ok();
  }

  template <typename U>
  U* Alloc(int64_t n, bool count = true) {
    buffers_.push_back(Tensor::Empty({n}, DTypeOf<U>::value));
    if (count) act_bytes_ += static_cast<int64_t>(buffers_.back().nbytes());
    return buffers_.back().template data<U>();
  }

  // Replicated activations (residual stream, LayerNorm outputs) are full size on every rank;
  // those of the local heads and of the local MLP columns are 1/tp, the logits V/tp.
  void AllocateActivations() {
    const int64_t bt = static_cast<int64_t>(max_b_) * max_t_;
    const int64_t c = c_;
    const int layer_sets = cfg_.recompute ? 1 : cfg_.layers;
    std::vector<Acts> sets(layer_sets);
    for (Acts& a : sets) {
      a.ln1 = Alloc<T>(bt * c);
      a.ln1_mean = Alloc<float>(bt);
      a.ln1_rstd = Alloc<float>(bt);
      a.qkv = Alloc<T>(bt * 3 * cl_);
      a.atty = Alloc<T>(bt * cl_);
      a.lse = Alloc<float>(bt * nhl_);
      a.res_mid = Alloc<float>(bt * c);
      a.ln2 = Alloc<T>(bt * c);
      a.ln2_mean = Alloc<float>(bt);
      a.ln2_rstd = Alloc<float>(bt);
      a.fch = Alloc<T>(bt * fcl_);
      a.fchg = Alloc<T>(bt * fcl_);
    }
    for (int l = 0; l < cfg_.layers; ++l) acts_.push_back(sets[cfg_.recompute ? 0 : l]);
    for (int l = 0; l <= cfg_.layers; ++l) res_.push_back(Alloc<float>(bt * c));
    lnf_ = Alloc<T>(bt * c);
    lnf_mean_ = Alloc<float>(bt);
    lnf_rstd_ = Alloc<float>(bt);
    logits_ = Alloc<T>(bt * vl_);
    losses_ = Alloc<float>(bt);
    branch_out_ = Alloc<T>(bt * c);
    tokens_.resize(static_cast<size_t>(bt));
    if (tp_ != nullptr) {
      xent_max_ = Alloc<float>(bt);
      xent_sums_ = Alloc<float>(2 * bt);
    }
    // Gradient scratch (one layer at a time).
    dres_ = Alloc<float>(bt * c);
    dbranch_ = Alloc<T>(bt * c);
    dln_ = Alloc<T>(bt * c);
    dqkv_ = Alloc<T>(bt * 3 * cl_);
    datty_ = Alloc<T>(bt * cl_);
    dfch_ = Alloc<T>(bt * fcl_);
  }

  GptConfig cfg_;
  int max_b_, max_t_;
  TensorParallelComm* tp_;  // nullptr: no tensor parallelism
  TpShape shard_;
  std::vector<ParamTensor> layout_;
  // Widths: channels, local attention channels (heads * head size on this rank), local
  // attention heads, local MLP hidden units, local (padded) vocabulary rows.
  int c_, cl_, nhl_, fcl_, vl_;
  int64_t n_params_ = 0;
  Tensor master_, grads_, compute_;
  std::vector<Tensor> buffers_;
  int64_t act_bytes_ = 0;

  std::vector<Acts> acts_;
  std::vector<float*> res_;  // res_[0] = embeddings, res_[l + 1] = output of block l
  T* lnf_ = nullptr;
  float* lnf_mean_ = nullptr;
  float* lnf_rstd_ = nullptr;
  T* logits_ = nullptr;  // local [BT, V/tp]; holds dlogits after a Forward with dloss != 0
  float* losses_ = nullptr;
  T* branch_out_ = nullptr;
  float* xent_max_ = nullptr;   // TP only: row max of the logits
  float* xent_sums_ = nullptr;  // TP only: [sum of exp | target logit]
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
                                         int max_seq, TensorParallelComm* tp) {
  RETURN_IF_ERROR(config.Validate());
  if (max_batch <= 0) return InvalidArgument("micro batch must be > 0");
  if (max_seq <= 0 || max_seq > config.max_seq_len) {
    return InvalidArgument("model.seq_len: " + std::to_string(max_seq) +
                           " must be in [1, max_seq_len=" + std::to_string(config.max_seq_len) +
                           "]");
  }
  if (tp != nullptr) {
    const int n = tp->size(), r = tp->rank();
    if (n < 1 || r < 0 || r >= n) {
      return InvalidArgument("parallel.tp: rank " + std::to_string(r) + " of a group of " +
                             std::to_string(n) + " is not a tensor-parallel coordinate");
    }
    if (config.heads % n != 0) {
      return InvalidArgument("parallel.tp: " + std::to_string(n) +
                             " does not divide model.heads=" + std::to_string(config.heads) +
                             "; attention heads are split evenly over the tensor-parallel group");
    }
    if (n == 1) tp = nullptr;  // nothing to split or reduce
  }
  std::unique_ptr<Gpt> m;
  switch (compute) {
    case DType::kF32:
      m = std::make_unique<GptImpl<float>>(config, max_batch, max_seq, tp);
      break;
    case DType::kBF16:
      m = std::make_unique<GptImpl<bf16>>(config, max_batch, max_seq, tp);
      break;
    case DType::kF16:
      m = std::make_unique<GptImpl<f16>>(config, max_batch, max_seq, tp);
      break;
  }
  return m;
}

}  // namespace strata::model
