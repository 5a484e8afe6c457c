#include "model/gpt.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "model/gpt_layout.h"
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

LayerRange StageLayers(int layers, const PipelineStage& stage) {
  CHECK(stage.count >= 1 && stage.count <= layers && stage.index >= 0 && stage.index < stage.count);
  const int base = layers / stage.count, extra = layers % stage.count;
  LayerRange r;
  r.begin = stage.index * base + std::min(stage.index, extra);
  r.end = r.begin + base + (stage.index < extra ? 1 : 0);
  return r;
}

namespace {

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
  GptImpl(const GptConfig& cfg, int max_batch, int max_seq, TensorParallelComm* tp,
          const PipelineStage& stage, int num_slots)
      : cfg_(cfg),
        max_b_(max_batch),
        max_t_(max_seq),
        tp_(tp),
        shard_(MakeTpShape(cfg, tp)),
        stage_(stage),
        range_(StageLayers(cfg.layers, stage)),
        nl_(range_.end - range_.begin),
        layout_(BuildGptLayout(cfg, shard_, stage, &streams_)),
        ix_(IndexGptLayout(stage, nl_, layout_)),
        c_(cfg.channels),
        cl_(cfg.channels / shard_.size),
        nhl_(cfg.heads / shard_.size),
        fcl_(4 * cfg.channels / shard_.size),
        vl_(static_cast<int>(shard_.vocab_rows)) {
    n_params_ = ix_.num_params;
    master_ = Tensor::Empty({n_params_}, DType::kF32);
    grads_ = Tensor::Empty({n_params_}, DType::kF32);
    if constexpr (!std::is_same_v<T, float>) {
      compute_ = Tensor::Empty({n_params_}, DTypeOf<T>::value);
    }
    AllocateActivations(num_slots);
  }

  const GptConfig& config() const override { return cfg_; }
  DType compute_dtype() const override { return DTypeOf<T>::value; }
  const PipelineStage& stage() const override { return stage_; }
  LayerRange layers() const override { return range_; }
  int num_slots() const override { return static_cast<int>(slots_.size()); }
  const std::vector<ParamTensor>& tensors() const override { return layout_; }
  int64_t num_params() const override { return n_params_; }
  float* params() override { return master_.data<float>(); }
  float* grads() override { return grads_.data<float>(); }
  int64_t activation_bytes() const override { return act_bytes_; }
  int64_t slot_activation_bytes() const override { return slot_bytes_; }

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
      // Each tensor draws from its own stream (seed, index of the tensor in the pp = 1 model):
      // adding a tensor elsewhere does not change the others, and a pipeline stage (both of
      // its wte copies included) gets the pp = 1 weights. Under tensor parallelism every rank
      // walks the whole global stream and keeps its slice, so that each rank holds exactly
      // what the tp = 1 model holds there. Cost: every rank draws all O(global elements)
      // samples of its tensors (about 4 s per rank for GPT-2 124M, once per run), with no
      // extra memory. A skip-ahead in NormalRng would make it O(local elements).
      NormalRng rng(seed, static_cast<uint64_t>(streams_[i]));
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

  Result<float> ForwardStage(int slot, const int32_t* tokens, const float* input,
                             const int32_t* targets, int b, int t, float dloss,
                             float* output) override {
    CheckForwardStageArgs(stage_, slot, num_slots(), b, t, max_b_, max_t_, tokens, input, targets,
                          output);
    const int64_t bt = static_cast<int64_t>(b) * t;
    const int c = c_;
    Slot& s = slots_[static_cast<size_t>(slot)];
    cur_ = &s;
    s.b = b_ = b;
    s.t = t_ = t;
    s.has_grad = false;  // set only when the whole forward succeeded
    if (stage_.first()) {
      std::memcpy(s.tokens.data(), tokens, bt * sizeof(int32_t));
      // Vocabulary-parallel lookup: each rank contributes the rows of its tokens, zeros
      // elsewhere.
      VocabShardEmbeddingForward(s.res[0], tokens, W(ix_.wte), shard_.vocab_lo,
                                 static_cast<int>(shard_.vocab_valid), bt, c);
      RETURN_IF_ERROR(SumOverTp(s.res[0], bt * c, DType::kF32, "token embedding", -1));
      AddPositionEmbedding(s.res[0], W(ix_.wpe), b, t, c);
    } else {
      std::memcpy(s.res[0], input, static_cast<size_t>(bt) * c * sizeof(float));
    }
    for (int l = 0; l < nl_; ++l) RETURN_IF_ERROR(LayerForward(l));
    if (!stage_.last()) {
      std::memcpy(output, s.res[static_cast<size_t>(nl_)],
                  static_cast<size_t>(bt) * c * sizeof(float));
      s.has_grad = dloss != 0.f;
      return 0.f;
    }
    LayerNormForward(s.lnf, s.lnf_mean, s.lnf_rstd, s.res[static_cast<size_t>(nl_)], W(ix_.final),
                     W(ix_.final + 1), bt, c);
    MatmulForward<T>(s.logits, s.lnf, W(ix_.wte), nullptr, bt, c, vl_);
    double total = 0.0;
    if (tp_ == nullptr) {
      total = SoftmaxCrossEntropy(s.logits, losses_, targets, bt, vl_, dloss);
    } else {
      ASSIGN_OR_RETURN(total, VocabParallelCrossEntropy(s.logits, targets, bt, dloss));
    }
    s.has_grad = dloss != 0.f;
    return static_cast<float>(total / static_cast<double>(bt));
  }

  Status BackwardStage(int slot, const float* doutput, float* dinput,
                       const GradReadyFn& on_ready) override {
    CHECK(slot >= 0 && slot < num_slots());
    Slot& s = slots_[static_cast<size_t>(slot)];
    CheckBackwardStageArgs(stage_, s.has_grad, doutput, dinput);
    s.has_grad = false;
    cur_ = &s;
    b_ = s.b;
    t_ = s.t;
    const int b = b_, t = t_, c = c_;
    const int64_t bt = static_cast<int64_t>(b) * t;
    float* g = grads();
    if (stage_.last()) {
      const int fi = ix_.final;
      std::memset(dres_, 0, static_cast<size_t>(bt) * c * sizeof(float));
      // Tied LM head (column-parallel over the vocabulary): dX is a partial sum per rank.
      MatmulBackward<T>(dln_, g + layout_[ix_.wte].offset, nullptr, s.logits, s.lnf, W(ix_.wte), bt,
                        c, vl_);
      RETURN_IF_ERROR(SumOverTp(dln_, bt * c, DTypeOf<T>::value, "lm_head input gradient", -1));
      LayerNormBackward(dres_, g + layout_[fi].offset, g + layout_[fi + 1].offset, dln_,
                        s.res[static_cast<size_t>(nl_)], W(fi), s.lnf_mean, s.lnf_rstd, bt, c);
      if (on_ready) on_ready(layout_[fi].offset, layout_[fi].numel + layout_[fi + 1].numel);
    } else {
      std::memcpy(dres_, doutput, static_cast<size_t>(bt) * c * sizeof(float));
    }
    for (int l = nl_ - 1; l >= 0; --l) {
      const int gl = range_.begin + l;  // global index, for error messages
      if (cfg_.recompute) RETURN_IF_ERROR(LayerForward(l));
      const Acts& a = s.acts[static_cast<size_t>(l)];
      auto gp = [&](int k) { return g + layout_[ix_.Block(l, k)].offset; };
      // Row-parallel c_proj: dout is the full (replicated) residual gradient, so its bias
      // gradient is the same on every rank and dX is local; no collective.
      const T* branch = BranchGrad(bt * c);
      MatmulBackward<T>(dfch_, gp(kFcProjW), gp(kFcProjB), branch, a.fchg, BW(l, kFcProjW), bt,
                        fcl_, c);
      GeluBackward(dfch_, a.fch, dfch_, bt * fcl_);
      MatmulBackward<T>(dln_, gp(kFcW), gp(kFcB), dfch_, a.ln2, BW(l, kFcW), bt, c, fcl_);
      RETURN_IF_ERROR(SumOverTp(dln_, bt * c, DTypeOf<T>::value, "mlp.c_fc input gradient", gl));
      LayerNormBackward(dres_, gp(kLn2W), gp(kLn2B), dln_, a.res_mid, BW(l, kLn2W), a.ln2_mean,
                        a.ln2_rstd, bt, c);
      branch = BranchGrad(bt * c);
      MatmulBackward<T>(datty_, gp(kAttProjW), gp(kAttProjB), branch, a.atty, BW(l, kAttProjW), bt,
                        cl_, c);
      AttentionBackward(dqkv_, datty_, a.qkv, a.atty, a.lse, b, t, cl_, nhl_);
      MatmulBackward<T>(dln_, gp(kQkvW), gp(kQkvB), dqkv_, a.ln1, BW(l, kQkvW), bt, c, 3 * cl_);
      RETURN_IF_ERROR(SumOverTp(dln_, bt * c, DTypeOf<T>::value, "attn.c_attn input gradient", gl));
      LayerNormBackward(dres_, gp(kLn1W), gp(kLn1B), dln_, s.res[static_cast<size_t>(l)],
                        BW(l, kLn1W), a.ln1_mean, a.ln1_rstd, bt, c);
      if (on_ready) {
        const FlatRange r = BlockRange(layout_, ix_, l);
        on_ready(r.offset, r.count);
      }
    }
    if (stage_.first()) {
      // dres_ is replicated, so wpe's gradient is too; each rank adds to its own wte rows.
      VocabShardEmbeddingBackward(g + layout_[ix_.wte].offset, g + layout_[ix_.wpe].offset, dres_,
                                  s.tokens.data(), shard_.vocab_lo,
                                  static_cast<int>(shard_.vocab_valid), b, t, c);
      if (on_ready) on_ready(0, layout_[ix_.wte].numel + layout_[ix_.wpe].numel);
      return Status::Ok();
    }
    std::memcpy(dinput, dres_, static_cast<size_t>(bt) * c * sizeof(float));
    // The LM head's wte gradient was final since the start; reported last to keep the ranges
    // in buffer order from the end.
    if (on_ready && stage_.last()) on_ready(0, layout_[ix_.wte].numel);
    return Status::Ok();
  }

 private:
  using Acts = BlockActs<T*>;
  using Slot = ActSlot<T*, std::vector<int32_t>>;

  // Compute-precision view of parameter tensor i.
  const T* W(int i) const {
    const int64_t off = layout_[static_cast<size_t>(i)].offset;
    if constexpr (std::is_same_v<T, float>) {
      return master_.data<float>() + off;
    } else {
      return compute_.data<T>() + off;
    }
  }
  // Tensor k of local block l.
  const T* BW(int l, int k) const { return W(ix_.Block(l, k)); }

  // The residual-stream gradient in compute precision, as the dout of a branch's last GEMM.
  const T* BranchGrad(int64_t n) {
    if constexpr (std::is_same_v<T, float>) {
      return dres_;
    } else {
      CastFromFloat(dbranch_, dres_, n);
      return dbranch_;
    }
  }

  // In-place sum over the TP group (no-op without TP). `what` and `layer` (global index; -1:
  // none) only label an error.
  Status SumOverTp(void* buf, int64_t n, DType type, const char* what, int layer) {
    if (tp_ == nullptr) return Status::Ok();
    return TpContext(tp_->AllReduceSum(buf, n, type), what, layer);
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

  Result<double> VocabParallelCrossEntropy(T* logits, const int32_t* targets, int64_t bt,
                                           float dloss) {
    const int valid = static_cast<int>(shard_.vocab_valid);
    ShardRowMax(xent_max_, logits, bt, vl_, valid);
    RETURN_IF_ERROR(TpContext(tp_->AllReduceMax(xent_max_, bt), "logit max", -1));
    float* sum_exp = xent_sums_;
    float* target = xent_sums_ + bt;
    ShardSumExpAndTarget(sum_exp, target, logits, xent_max_, targets, shard_.vocab_lo, bt, vl_,
                         valid);
    // One collective for both: the softmax denominators and the target logits.
    RETURN_IF_ERROR(SumOverTp(xent_sums_, 2 * bt, DType::kF32, "softmax sums", -1));
    return ShardCrossEntropyFinish(logits, losses_, xent_max_, sum_exp, target, targets,
                                   shard_.vocab_lo, bt, vl_, valid, dloss);
  }

  // Local block l of the current slot: res[l] -> res[l + 1], saving its activations.
  Status LayerForward(int l) {
    const int b = b_, t = t_, c = c_;
    const int gl = range_.begin + l;
    const int64_t bt = static_cast<int64_t>(b) * t;
    const Acts& a = cur_->acts[static_cast<size_t>(l)];
    const float* res_in = cur_->res[static_cast<size_t>(l)];
    LayerNormForward(a.ln1, a.ln1_mean, a.ln1_rstd, res_in, BW(l, kLn1W), BW(l, kLn1B), bt, c);
    MatmulForward<T>(a.qkv, a.ln1, BW(l, kQkvW), BW(l, kQkvB), bt, c, 3 * cl_);
    AttentionForward(a.atty, a.lse, a.qkv, b, t, cl_, nhl_);
    RETURN_IF_ERROR(RowParallelForward(branch_out_, a.atty, BW(l, kAttProjW), BW(l, kAttProjB), cl_,
                                       "attn.c_proj output", gl));
    ResidualForward(a.res_mid, res_in, branch_out_, bt * c);
    LayerNormForward(a.ln2, a.ln2_mean, a.ln2_rstd, a.res_mid, BW(l, kLn2W), BW(l, kLn2B), bt, c);
    MatmulForward<T>(a.fch, a.ln2, BW(l, kFcW), BW(l, kFcB), bt, c, fcl_);
    GeluForward(a.fchg, a.fch, bt * fcl_);
    RETURN_IF_ERROR(RowParallelForward(branch_out_, a.fchg, BW(l, kFcProjW), BW(l, kFcProjB), fcl_,
                                       "mlp.c_proj output", gl));
    ResidualForward(cur_->res[static_cast<size_t>(l) + 1], a.res_mid, branch_out_, bt * c);
    return Status::Ok();
  }

  template <typename U>
  U* Alloc(int64_t n, bool per_slot = false) {
    buffers_.push_back(Tensor::Empty({n}, DTypeOf<U>::value));
    const auto bytes = static_cast<int64_t>(buffers_.back().nbytes());
    act_bytes_ += bytes;
    if (per_slot) slot_bytes_ += bytes;
    return buffers_.back().template data<U>();
  }

  Acts AllocActs(int64_t bt, bool per_slot) {
    const int64_t c = c_;
    Acts a;
    a.ln1 = Alloc<T>(bt * c, per_slot);
    a.ln1_mean = Alloc<float>(bt, per_slot);
    a.ln1_rstd = Alloc<float>(bt, per_slot);
    a.qkv = Alloc<T>(bt * 3 * cl_, per_slot);
    a.atty = Alloc<T>(bt * cl_, per_slot);
    a.lse = Alloc<float>(bt * nhl_, per_slot);
    a.res_mid = Alloc<float>(bt * c, per_slot);
    a.ln2 = Alloc<T>(bt * c, per_slot);
    a.ln2_mean = Alloc<float>(bt, per_slot);
    a.ln2_rstd = Alloc<float>(bt, per_slot);
    a.fch = Alloc<T>(bt * fcl_, per_slot);
    a.fchg = Alloc<T>(bt * fcl_, per_slot);
    return a;
  }

  // Replicated activations (residual stream, LayerNorm outputs) are full size on every rank;
  // those of the local heads and of the local MLP columns are 1/tp, the logits V/tp.
  // Per slot: what backward reads (block inputs, block activations unless recomputed, the
  // head's input and dlogits on the last stage, the tokens on the first). Shared: the
  // recompute set, the output of a non-last stage (copied out by ForwardStage; rewritten by a
  // recompute, never read by backward) and all scratch.
  void AllocateActivations(int num_slots) {
    const int64_t bt = static_cast<int64_t>(max_b_) * max_t_;
    const int64_t c = c_;
    slot_bytes_ = 0;
    Acts shared{};
    if (cfg_.recompute) shared = AllocActs(bt, false);
    float* shared_out = stage_.last() ? nullptr : Alloc<float>(bt * c);
    slots_.resize(static_cast<size_t>(num_slots));
    for (size_t i = 0; i < slots_.size(); ++i) {
      Slot& s = slots_[i];
      const bool count = i == 0;  // slot_bytes_ is the size of one slot
      auto alloc_f = [&](int64_t n) { return Alloc<float>(n, count); };
      for (int l = 0; l < nl_; ++l)
        s.acts.push_back(cfg_.recompute ? shared : AllocActs(bt, count));
      for (int l = 0; l < nl_; ++l) s.res.push_back(alloc_f(bt * c));
      s.res.push_back(stage_.last() ? alloc_f(bt * c) : shared_out);
      if (stage_.last()) {
        s.lnf = Alloc<T>(bt * c, count);
        s.lnf_mean = alloc_f(bt);
        s.lnf_rstd = alloc_f(bt);
        s.logits = Alloc<T>(bt * vl_, count);
      }
      if (stage_.first()) s.tokens.resize(static_cast<size_t>(bt));
    }
    cur_ = &slots_[0];
    if (stage_.last()) losses_ = Alloc<float>(bt);
    branch_out_ = Alloc<T>(bt * c);
    if (tp_ != nullptr && stage_.last()) {
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
  PipelineStage stage_;
  LayerRange range_;          // global blocks of this stage
  int nl_;                    // local blocks
  std::vector<int> streams_;  // per layout_ entry: its index in the pp = 1 layout
  std::vector<ParamTensor> layout_;
  LayoutIndex ix_;  // positions in layout_ of wte, wpe, the blocks, ln_f
  // Widths: channels, local attention channels (heads * head size on this rank), local
  // attention heads, local MLP hidden units, local (padded) vocabulary rows.
  int c_, cl_, nhl_, fcl_, vl_;
  int64_t n_params_ = 0;
  Tensor master_, grads_, compute_;
  std::vector<Tensor> buffers_;
  int64_t act_bytes_ = 0, slot_bytes_ = 0;

  std::vector<Slot> slots_;
  Slot* cur_ = nullptr;  // the slot LayerForward works on
  float* losses_ = nullptr;
  T* branch_out_ = nullptr;
  float* xent_max_ = nullptr;   // TP only: row max of the logits
  float* xent_sums_ = nullptr;  // TP only: [sum of exp | target logit]
  float* dres_ = nullptr;
  T* dbranch_ = nullptr;
  T* dln_ = nullptr;
  T* dqkv_ = nullptr;
  T* datty_ = nullptr;
  T* dfch_ = nullptr;

  int b_ = 0, t_ = 0;  // of the micro-batch being run
};

}  // namespace

Status Gpt::CopyParamsToHost(float* dst) const {
  std::memcpy(dst, params(), static_cast<size_t>(num_params()) * sizeof(float));
  return Status::Ok();
}

Status Gpt::CopyParamsFromHost(const float* src) {
  std::memcpy(params(), src, static_cast<size_t>(num_params()) * sizeof(float));
  return Status::Ok();
}

Status Gpt::CopyGradsToHost(float* dst) const {
  std::memcpy(dst, grads(), static_cast<size_t>(num_params()) * sizeof(float));
  return Status::Ok();
}

Result<float> Gpt::Forward(const int32_t* inputs, const int32_t* targets, int b, int t,
                           float dloss) {
  CHECK_MSG(stage().count == 1, "Gpt::Forward runs the whole model; use ForwardStage");
  return ForwardStage(0, inputs, nullptr, targets, b, t, dloss, nullptr);
}

Status Gpt::Backward(const GradReadyFn& on_ready) {
  CHECK_MSG(stage().count == 1, "Gpt::Backward runs the whole model; use BackwardStage");
  return BackwardStage(0, nullptr, nullptr, on_ready);
}

Result<std::unique_ptr<Gpt>> Gpt::Create(const GptConfig& config, DType compute, int max_batch,
                                         int max_seq, TensorParallelComm* tp,
                                         const PipelineStage& stage, int num_slots) {
  RETURN_IF_ERROR(CheckGptSizes(config, max_batch, max_seq));
  RETURN_IF_ERROR(CheckGptParallelism(config, tp, stage));
  RETURN_IF_ERROR(CheckGptSlots(num_slots));
  tp = EffectiveTp(tp);
  std::unique_ptr<Gpt> m;
  switch (compute) {
    case DType::kF32:
      m = std::make_unique<GptImpl<float>>(config, max_batch, max_seq, tp, stage, num_slots);
      break;
    case DType::kBF16:
      m = std::make_unique<GptImpl<bf16>>(config, max_batch, max_seq, tp, stage, num_slots);
      break;
    case DType::kF16:
      m = std::make_unique<GptImpl<f16>>(config, max_batch, max_seq, tp, stage, num_slots);
      break;
  }
  return m;
}

}  // namespace strata::model
