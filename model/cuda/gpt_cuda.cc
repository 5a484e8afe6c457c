// The CUDA GPT; contract in gpt_cuda.h. Structure follows model/gpt.cc (the reference) step for
// step: the same slots, the same scratch buffers, the same collectives in the same order, the
// same gradient-ready ranges. Differences, each for a reason:
//  - the GELU of mlp.c_fc is fused into its GEMM (cuBLASLt epilogue) and the bias of every
//    column-parallel GEMM too;
//  - "res_mid = res_in + attn branch; ln2 = LN(res_mid)" is one kernel
//    (CudaResidualLayerNormForward);
//  - under TP the position embedding is added after the all-reduce of the token embedding, as
//    on the CPU, through CudaEmbeddingForward with an empty vocabulary range (it writes
//    0 + wpe[t]) and a residual add;
//  - the loss is summed on the device (CudaSum) and one double comes back per micro-batch.
#include "model/cuda/gpt_cuda.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "model/cuda/attention_cuda.h"
#include "model/cuda/cuda_runtime_info.h"
#include "model/cuda/elementwise_cuda.h"
#include "model/cuda/embedding_cuda.h"
#include "model/cuda/kernel_timer.h"
#include "model/cuda/layernorm_cuda.h"
#include "model/cuda/matmul_cuda.h"
#include "model/cuda/reduce_cuda.h"
#include "model/cuda/softmax_xent_cuda.h"
#include "model/gpt_layout.h"
#include "model/tensor_parallel.h"

namespace strata::model {
namespace {

bool ProfilingRequested() {
  const char* v = std::getenv("STRATA_CUDA_PROFILE");
  return v != nullptr && std::string(v) == "1";
}

Status UnavailableError(std::string m) { return Status(StatusCode::kUnavailable, std::move(m)); }

class CudaGptImpl final : public CudaGpt {
 public:
  CudaGptImpl(const GptConfig& cfg, DType dtype, int max_batch, int max_seq, TensorParallelComm* tp,
              const PipelineStage& stage, int device, std::vector<ParamTensor> layout)
      : cfg_(cfg),
        dt_(dtype),
        es_(DTypeSize(dtype)),
        max_b_(max_batch),
        max_t_(max_seq),
        tp_(tp),
        stage_(stage),
        range_(StageLayers(cfg.layers, stage)),
        nl_(range_.end - range_.begin),
        layout_(std::move(layout)),
        ix_(IndexGptLayout(stage, nl_, layout_)),
        c_(cfg.channels),
        device_(device) {
    const TpShape shard = MakeTpShape(cfg, tp);
    cl_ = cfg.channels / shard.size;
    nhl_ = cfg.heads / shard.size;
    fcl_ = 4 * cfg.channels / shard.size;
    vl_ = static_cast<int>(shard.vocab_rows);
    vocab_lo_ = shard.vocab_lo;
    vocab_valid_ = static_cast<int>(shard.vocab_valid);
    n_params_ = ix_.num_params;
  }

  ~CudaGptImpl() override {
    if (alloc_ == nullptr) return;
    CudaSetDevice(device_).IgnoreError();
    // Nothing may still run on memory about to be freed (errors: nothing more to do).
    stream_.Synchronize().IgnoreError();
    for (void* p : blocks_) alloc_->Free(p);
  }

  // Everything that can fail: device, stream, cuBLASLt, memory.
  Status Init(int num_slots) {
    RETURN_IF_ERROR(CudaSetDevice(device_));
    ASSIGN_OR_RETURN(stream_, CudaStream::Create());
    ASSIGN_OR_RETURN(alloc_, CudaAllocator::Create(device_));
    // TF32 stays off: fp32 runs are compared tightly with the CPU model.
    ASSIGN_OR_RETURN(blas_, CudaBlas::Create(32u << 20, /*allow_tf32=*/false));
    ASSIGN_OR_RETURN(in_event_, CudaEvent::Create());
    ASSIGN_OR_RETURN(tok_event_, CudaEvent::Create());
    ASSIGN_OR_RETURN(tgt_event_, CudaEvent::Create());
    const size_t n = static_cast<size_t>(n_params_);
    ASSIGN_OR_RETURN(master_, AllocT<float>(n));
    ASSIGN_OR_RETURN(grads_, AllocT<float>(n));
    if (dt_ != DType::kF32) {
      ASSIGN_OR_RETURN(compute_, AllocBytes(n * es_));
    }
    RETURN_IF_ERROR(CudaMemsetZero(master_, n * sizeof(float), stream()));
    RETURN_IF_ERROR(CudaMemsetZero(grads_, n * sizeof(float), stream()));
    if (compute_ != nullptr) RETURN_IF_ERROR(CudaMemsetZero(compute_, n * es_, stream()));
    act_bytes_ = 0;  // parameters are not activations
    RETURN_IF_ERROR(AllocateActivations(num_slots));
    return stream_.Synchronize();
  }

  const GptConfig& config() const override { return cfg_; }
  DType compute_dtype() const override { return dt_; }
  const PipelineStage& stage() const override { return stage_; }
  LayerRange layers() const override { return range_; }
  int num_slots() const override { return static_cast<int>(slots_.size()); }
  const std::vector<ParamTensor>& tensors() const override { return layout_; }
  int64_t num_params() const override { return n_params_; }
  float* params() override { return master_; }
  float* grads() override { return grads_; }
  int64_t activation_bytes() const override { return act_bytes_; }
  int64_t slot_activation_bytes() const override { return slot_bytes_; }

  int device_index() const override { return device_; }
  void* stream() const override { return stream_.get(); }
  void* compute_params() override { return compute_; }
  CudaAllocator& allocator() override { return *alloc_; }
  Status Synchronize() override {
    RETURN_IF_ERROR(Enter());
    RETURN_IF_ERROR(stream_.Synchronize());
    return Synced();
  }
  KernelTimer* timer() override { return timer_.enabled() ? &timer_ : nullptr; }

  Status CopyParamsToHost(float* dst) const override { return CopyOut(dst, master_, "parameters"); }
  Status CopyGradsToHost(float* dst) const override { return CopyOut(dst, grads_, "gradients"); }
  Status CopyParamsFromHost(const float* src) override {
    RETURN_IF_ERROR(Enter());
    const size_t bytes = static_cast<size_t>(n_params_) * sizeof(float);
    RETURN_IF_ERROR(CudaCopyHostToDevice(master_, src, bytes, stream()));
    // The source is the caller's (pageable) memory: done before returning.
    return stream_.Synchronize().WithContext("uploading parameters");
  }

  void InitWeights(uint64_t seed) override {
    // The CPU model's own code draws the weights (bitwise the CPU model's), then they are
    // uploaded. A one-token CPU model keeps the host memory to parameters and gradients.
    Result<std::unique_ptr<Gpt>> host = Gpt::Create(cfg_, DType::kF32, 1, 1, tp_, stage_, 1);
    if (!host.ok()) {
      Keep(host.status().WithContext("InitWeights: host model"));
      return;
    }
    (*host)->InitWeights(seed);
    Keep(CopyParamsFromHost((*host)->params()).WithContext("InitWeights"));
    RefreshComputeWeights();
  }

  void RefreshComputeWeights() override {
    if (compute_ == nullptr) return;
    Keep(CudaSetDevice(device_));
    Keep(CudaCastFromFloat(compute_, master_, n_params_, dt_, stream())
             .WithContext("RefreshComputeWeights"));
  }

  void ZeroGrad() override {
    Keep(CudaSetDevice(device_));
    Keep(CudaMemsetZero(grads_, static_cast<size_t>(n_params_) * sizeof(float), stream())
             .WithContext("ZeroGrad"));
  }

  Result<float> ForwardStage(int slot, const int32_t* tokens, const float* input,
                             const int32_t* targets, int b, int t, float dloss,
                             float* output) override {
    CheckForwardStageArgs(stage_, slot, num_slots(), b, t, max_b_, max_t_, tokens, input, targets,
                          output);
    RETURN_IF_ERROR(Enter());
    const int64_t bt = static_cast<int64_t>(b) * t;
    const int c = c_;
    Slot& s = slots_[static_cast<size_t>(slot)];
    cur_ = &s;
    s.b = b_ = b;
    s.t = t_ = t;
    s.has_grad = false;  // set only when the whole forward succeeded
    void* st = stream();
    if (stage_.first()) {
      RETURN_IF_ERROR(StageIn(tokens_h_.get(), tok_event_, tokens, bt * sizeof(int32_t), s.tokens));
      if (tp_ == nullptr) {
        RETURN_IF_ERROR(Timed(KernelTimer::kEmbedding, [&] {
          return CudaEmbeddingForward(s.res[0], s.tokens, W(ix_.wte), W(ix_.wpe), vocab_lo_,
                                      vocab_valid_, b, t, c, dt_, st);
        }));
      } else {
        // Vocabulary-parallel lookup: each rank contributes the rows of its tokens, zeros
        // elsewhere; the sum over the group, then the position embedding (CPU order).
        RETURN_IF_ERROR(Timed(KernelTimer::kEmbedding, [&] {
          return CudaEmbeddingForward(s.res[0], s.tokens, W(ix_.wte), nullptr, vocab_lo_,
                                      vocab_valid_, b, t, c, dt_, st);
        }));
        RETURN_IF_ERROR(SumOverTp(s.res[0], bt * c, DType::kF32, "token embedding", -1));
        // dres_ is backward scratch, free during a forward: 0 + wpe[t] for every row.
        RETURN_IF_ERROR(Timed(KernelTimer::kEmbedding, [&] {
          return CudaEmbeddingForward(dres_, s.tokens, nullptr, W(ix_.wpe), 0, 0, b, t, c, dt_, st);
        }));
        RETURN_IF_ERROR(Timed(KernelTimer::kNormAct, [&] {
          return CudaResidualForward(s.res[0], s.res[0], dres_, bt * c, st);
        }));
      }
    } else {
      RETURN_IF_ERROR(StageIn(act_in_h_.get(), in_event_, input,
                              static_cast<size_t>(bt) * c * sizeof(float), s.res[0]));
    }
    for (int l = 0; l < nl_; ++l) RETURN_IF_ERROR(LayerForward(l));
    if (!stage_.last()) {
      RETURN_IF_ERROR(StageOut(output, s.res[static_cast<size_t>(nl_)],
                               static_cast<size_t>(bt) * c * sizeof(float)));
      s.has_grad = dloss != 0.f;
      return 0.f;
    }
    RETURN_IF_ERROR(Timed(KernelTimer::kNormAct, [&] {
      return CudaLayerNormForward(s.lnf, s.lnf_mean, s.lnf_rstd, s.res[static_cast<size_t>(nl_)],
                                  W(ix_.final), W(ix_.final + 1), bt, c, dt_, st);
    }));
    RETURN_IF_ERROR(Timed(KernelTimer::kGemm, [&] {
      return blas_->Forward(s.logits, nullptr, s.lnf, W(ix_.wte), nullptr, bt, c, vl_, dt_, st);
    }));
    RETURN_IF_ERROR(StageIn(targets_h_.get(), tgt_event_, targets, bt * sizeof(int32_t), targets_));
    if (tp_ == nullptr) {
      RETURN_IF_ERROR(Timed(KernelTimer::kXent, [&] {
        return CudaSoftmaxCrossEntropy(s.logits, losses_, targets_, bt, vl_, vocab_valid_, dloss,
                                       dt_, st);
      }));
    } else {
      RETURN_IF_ERROR(VocabParallelCrossEntropy(s.logits, bt, dloss));
    }
    RETURN_IF_ERROR(Timed(KernelTimer::kXent, [&] {
      return CudaSum(loss_sum_, losses_, bt, reduce_ws_, reduce_ws_bytes_, st);
    }));
    RETURN_IF_ERROR(Timed(KernelTimer::kCopy, [&] {
      return CudaCopyDeviceToHost(loss_h_.get(), loss_sum_, sizeof(double), st);
    }));
    RETURN_IF_ERROR(stream_.Synchronize().WithContext("forward"));
    RETURN_IF_ERROR(Synced());
    const double total = *static_cast<const double*>(loss_h_.get());
    s.has_grad = dloss != 0.f;
    return static_cast<float>(total / static_cast<double>(bt));
  }

  Status BackwardStage(int slot, const float* doutput, float* dinput,
                       const GradReadyFn& on_ready) override {
    CHECK(slot >= 0 && slot < num_slots());
    Slot& s = slots_[static_cast<size_t>(slot)];
    CheckBackwardStageArgs(stage_, s.has_grad, doutput, dinput);
    s.has_grad = false;
    RETURN_IF_ERROR(Enter());
    cur_ = &s;
    b_ = s.b;
    t_ = s.t;
    const int b = b_, t = t_, c = c_;
    const int64_t bt = static_cast<int64_t>(b) * t;
    const size_t res_bytes = static_cast<size_t>(bt) * c * sizeof(float);
    void* st = stream();
    float* g = grads_;
    if (stage_.last()) {
      const int fi = ix_.final;
      RETURN_IF_ERROR(
          Timed(KernelTimer::kCopy, [&] { return CudaMemsetZero(dres_, res_bytes, st); }));
      // Tied LM head (column-parallel over the vocabulary): dX is a partial sum per rank.
      RETURN_IF_ERROR(Timed(KernelTimer::kGemm, [&] {
        return blas_->Backward(dln_, g + layout_[ix_.wte].offset, nullptr, s.logits, s.lnf,
                               W(ix_.wte), bt, c, vl_, dt_, st);
      }));
      RETURN_IF_ERROR(SumOverTp(dln_, bt * c, dt_, "lm_head input gradient", -1));
      RETURN_IF_ERROR(Timed(KernelTimer::kNormAct, [&] {
        return CudaLayerNormBackward(dres_, g + layout_[fi].offset, g + layout_[fi + 1].offset,
                                     dln_, s.res[static_cast<size_t>(nl_)], W(fi), s.lnf_mean,
                                     s.lnf_rstd, bt, c, dt_, st);
      }));
      if (on_ready) on_ready(layout_[fi].offset, layout_[fi].numel + layout_[fi + 1].numel);
    } else {
      RETURN_IF_ERROR(StageIn(act_in_h_.get(), in_event_, doutput, res_bytes, dres_));
    }
    for (int l = nl_ - 1; l >= 0; --l) {
      const int gl = range_.begin + l;  // global index, for error messages
      if (cfg_.recompute) RETURN_IF_ERROR(LayerForward(l));
      const Acts& a = s.acts[static_cast<size_t>(l)];
      auto gp = [&](int k) { return g + layout_[ix_.Block(l, k)].offset; };
      // Row-parallel c_proj: dout is the full (replicated) residual gradient, so its bias
      // gradient is the same on every rank and dX is local; no collective.
      ASSIGN_OR_RETURN(const void* branch, BranchGrad(bt * c));
      RETURN_IF_ERROR(Timed(KernelTimer::kGemm, [&] {
        return blas_->Backward(dfch_, gp(kFcProjW), gp(kFcProjB), branch, a.fchg, BW(l, kFcProjW),
                               bt, fcl_, c, dt_, st);
      }));
      RETURN_IF_ERROR(Timed(KernelTimer::kNormAct, [&] {
        return CudaGeluBackwardT(dfch_, a.fch, dfch_, bt * fcl_, dt_, st);
      }));
      RETURN_IF_ERROR(Timed(KernelTimer::kGemm, [&] {
        return blas_->Backward(dln_, gp(kFcW), gp(kFcB), dfch_, a.ln2, BW(l, kFcW), bt, c, fcl_,
                               dt_, st);
      }));
      RETURN_IF_ERROR(SumOverTp(dln_, bt * c, dt_, "mlp.c_fc input gradient", gl));
      RETURN_IF_ERROR(Timed(KernelTimer::kNormAct, [&] {
        return CudaLayerNormBackward(dres_, gp(kLn2W), gp(kLn2B), dln_, a.res_mid, BW(l, kLn2W),
                                     a.ln2_mean, a.ln2_rstd, bt, c, dt_, st);
      }));
      ASSIGN_OR_RETURN(branch, BranchGrad(bt * c));
      RETURN_IF_ERROR(Timed(KernelTimer::kGemm, [&] {
        return blas_->Backward(datty_, gp(kAttProjW), gp(kAttProjB), branch, a.atty,
                               BW(l, kAttProjW), bt, cl_, c, dt_, st);
      }));
      RETURN_IF_ERROR(Timed(KernelTimer::kAttention, [&] {
        return CudaAttentionBackward(dqkv_, datty_, a.qkv, a.atty, a.lse, b, t, cl_, nhl_, attn_ws_,
                                     attn_ws_bytes_, dt_, st);
      }));
      RETURN_IF_ERROR(Timed(KernelTimer::kGemm, [&] {
        return blas_->Backward(dln_, gp(kQkvW), gp(kQkvB), dqkv_, a.ln1, BW(l, kQkvW), bt, c,
                               3 * cl_, dt_, st);
      }));
      RETURN_IF_ERROR(SumOverTp(dln_, bt * c, dt_, "attn.c_attn input gradient", gl));
      RETURN_IF_ERROR(Timed(KernelTimer::kNormAct, [&] {
        return CudaLayerNormBackward(dres_, gp(kLn1W), gp(kLn1B), dln_,
                                     s.res[static_cast<size_t>(l)], BW(l, kLn1W), a.ln1_mean,
                                     a.ln1_rstd, bt, c, dt_, st);
      }));
      if (on_ready) {
        const FlatRange r = BlockRange(layout_, ix_, l);
        on_ready(r.offset, r.count);
      }
    }
    if (stage_.first()) {
      // dres_ is replicated, so wpe's gradient is too; each rank adds to its own wte rows.
      RETURN_IF_ERROR(Timed(KernelTimer::kEmbedding, [&] {
        return CudaEmbeddingBackward(g + layout_[ix_.wte].offset, g + layout_[ix_.wpe].offset,
                                     dres_, s.tokens, vocab_lo_, vocab_valid_, b, t, c, emb_ws_,
                                     emb_ws_bytes_, st);
      }));
      if (on_ready) on_ready(0, layout_[ix_.wte].numel + layout_[ix_.wpe].numel);
      return Status::Ok();
    }
    RETURN_IF_ERROR(StageOut(dinput, dres_, res_bytes));
    // The LM head's wte gradient was final since the start; reported last to keep the ranges
    // in buffer order from the end.
    if (on_ready && stage_.last()) on_ready(0, layout_[ix_.wte].numel);
    return Status::Ok();
  }

 private:
  using Acts = BlockActs<void*>;          // compute-precision pointers: void*
  using Slot = ActSlot<void*, int32_t*>;  // tokens: device memory (first stage)

  // Queues `launch` (a launcher call) timed under class `c` when profiling is on.
  template <typename F>
  Status Timed(KernelTimer::Class c, F&& launch) {
    return timer_.Time(c, stream(), std::forward<F>(launch));
  }
  // After a synchronisation of the stream: folds the recorded times in.
  Status Synced() { return timer_.Collect(); }

  // Makes the device current for this thread; returns a kept error.
  Status Enter() const {
    RETURN_IF_ERROR(deferred_);
    return CudaSetDevice(device_);
  }
  void Keep(const Status& s) {
    if (!s.ok() && deferred_.ok()) deferred_ = s;
  }

  Status CopyOut(float* dst, const float* src, const char* what) const {
    RETURN_IF_ERROR(Enter());
    const size_t bytes = static_cast<size_t>(n_params_) * sizeof(float);
    RETURN_IF_ERROR(CudaCopyDeviceToHost(dst, src, bytes, stream()));
    return stream_.Synchronize().WithContext(std::string("copying ") + what + " to the host");
  }

  // Host `src` -> device `dst` through the pinned buffer `pinned`, asynchronously. `done` marks
  // the end of the previous copy out of `pinned`, which must finish before it is overwritten.
  Status StageIn(void* pinned, CudaEvent& done, const void* src, size_t bytes, void* dst) {
    RETURN_IF_ERROR(done.Synchronize());
    std::memcpy(pinned, src, bytes);
    RETURN_IF_ERROR(Timed(KernelTimer::kCopy,
                          [&] { return CudaCopyHostToDevice(dst, pinned, bytes, stream()); }));
    return done.Record(stream());
  }
  // Device `src` -> host `dst` (waits for the stream).
  Status StageOut(void* dst, const void* src, size_t bytes) {
    RETURN_IF_ERROR(Timed(KernelTimer::kCopy, [&] {
      return CudaCopyDeviceToHost(out_h_.get(), src, bytes, stream());
    }));
    RETURN_IF_ERROR(stream_.Synchronize());
    RETURN_IF_ERROR(Synced());
    std::memcpy(dst, out_h_.get(), bytes);
    return Status::Ok();
  }

  // Compute-precision view of parameter tensor i.
  const void* W(int i) const {
    const int64_t off = layout_[static_cast<size_t>(i)].offset;
    if (compute_ == nullptr) return master_ + off;
    return static_cast<const char*>(compute_) + static_cast<size_t>(off) * es_;
  }
  const void* BW(int l, int k) const { return W(ix_.Block(l, k)); }

  // The residual-stream gradient in compute precision, as the dout of a branch's last GEMM.
  Result<const void*> BranchGrad(int64_t n) {
    if (dt_ == DType::kF32) return static_cast<const void*>(dres_);
    RETURN_IF_ERROR(Timed(KernelTimer::kNormAct,
                          [&] { return CudaCastFromFloat(dbranch_, dres_, n, dt_, stream()); }));
    return static_cast<const void*>(dbranch_);
  }

  // In-place sum over the TP group (no-op without TP). The stream is drained first, so the
  // group sees the buffer's final contents whatever stream it runs on (NCCL or host staging);
  // the call returns only when the sum is complete (TensorParallelComm is synchronous).
  Status SumOverTp(void* buf, int64_t n, DType type, const char* what, int layer) {
    if (tp_ == nullptr) return Status::Ok();
    RETURN_IF_ERROR(stream_.Synchronize());
    RETURN_IF_ERROR(Synced());
    return TpContext(tp_->AllReduceSum(buf, n, type), what, layer);
  }

  Status RowParallelForward(void* out, const void* inp, const void* w, const void* bias,
                            int in_local, const char* what, int layer) {
    const int64_t bt = static_cast<int64_t>(b_) * t_;
    if (tp_ == nullptr) {
      return Timed(KernelTimer::kGemm, [&] {
        return blas_->Forward(out, nullptr, inp, w, bias, bt, in_local, c_, dt_, stream());
      });
    }
    RETURN_IF_ERROR(Timed(KernelTimer::kGemm, [&] {
      return blas_->Forward(out, nullptr, inp, w, nullptr, bt, in_local, c_, dt_, stream());
    }));
    RETURN_IF_ERROR(SumOverTp(out, bt * c_, dt_, what, layer));
    return Timed(KernelTimer::kNormAct,
                 [&] { return CudaAddBias(out, bias, bt, c_, dt_, stream()); });
  }

  // Writes losses_ (and dlogits into `logits` when dloss != 0).
  Status VocabParallelCrossEntropy(void* logits, int64_t bt, float dloss) {
    void* st = stream();
    RETURN_IF_ERROR(Timed(KernelTimer::kXent, [&] {
      return CudaShardRowMax(xent_max_, logits, bt, vl_, vocab_valid_, dt_, st);
    }));
    RETURN_IF_ERROR(stream_.Synchronize());
    RETURN_IF_ERROR(TpContext(tp_->AllReduceMax(xent_max_, bt), "logit max", -1));
    float* sum_exp = xent_sums_;
    float* target = xent_sums_ + bt;
    RETURN_IF_ERROR(Timed(KernelTimer::kXent, [&] {
      return CudaShardSumExpAndTarget(sum_exp, target, logits, xent_max_, targets_, vocab_lo_, bt,
                                      vl_, vocab_valid_, dt_, st);
    }));
    // One collective for both: the softmax denominators and the target logits.
    RETURN_IF_ERROR(SumOverTp(xent_sums_, 2 * bt, DType::kF32, "softmax sums", -1));
    return Timed(KernelTimer::kXent, [&] {
      return CudaShardCrossEntropyFinish(logits, losses_, xent_max_, sum_exp, target, targets_,
                                         vocab_lo_, bt, vl_, vocab_valid_, dloss, dt_, st);
    });
  }

  // Local block l of the current slot: res[l] -> res[l + 1], saving its activations.
  Status LayerForward(int l) {
    const int b = b_, t = t_, c = c_;
    const int gl = range_.begin + l;
    const int64_t bt = static_cast<int64_t>(b) * t;
    const Acts& a = cur_->acts[static_cast<size_t>(l)];
    const float* res_in = cur_->res[static_cast<size_t>(l)];
    void* st = stream();
    RETURN_IF_ERROR(Timed(KernelTimer::kNormAct, [&] {
      return CudaLayerNormForward(a.ln1, a.ln1_mean, a.ln1_rstd, res_in, BW(l, kLn1W), BW(l, kLn1B),
                                  bt, c, dt_, st);
    }));
    RETURN_IF_ERROR(Timed(KernelTimer::kGemm, [&] {
      return blas_->Forward(a.qkv, nullptr, a.ln1, BW(l, kQkvW), BW(l, kQkvB), bt, c, 3 * cl_, dt_,
                            st);
    }));
    RETURN_IF_ERROR(Timed(KernelTimer::kAttention, [&] {
      return CudaAttentionForward(a.atty, a.lse, a.qkv, b, t, cl_, nhl_, dt_, st);
    }));
    RETURN_IF_ERROR(RowParallelForward(branch_out_, a.atty, BW(l, kAttProjW), BW(l, kAttProjB), cl_,
                                       "attn.c_proj output", gl));
    RETURN_IF_ERROR(Timed(KernelTimer::kNormAct, [&] {
      return CudaResidualLayerNormForward(a.res_mid, a.ln2, a.ln2_mean, a.ln2_rstd, res_in,
                                          branch_out_, BW(l, kLn2W), BW(l, kLn2B), bt, c, dt_, st);
    }));
    // GELU fused into the GEMM's epilogue: fch = pre-activation, fchg = gelu(fch).
    RETURN_IF_ERROR(Timed(KernelTimer::kGemm, [&] {
      return blas_->Forward(a.fch, a.fchg, a.ln2, BW(l, kFcW), BW(l, kFcB), bt, c, fcl_, dt_, st);
    }));
    RETURN_IF_ERROR(RowParallelForward(branch_out_, a.fchg, BW(l, kFcProjW), BW(l, kFcProjB), fcl_,
                                       "mlp.c_proj output", gl));
    return Timed(KernelTimer::kNormAct, [&] {
      return CudaResidualForwardT(cur_->res[static_cast<size_t>(l) + 1], a.res_mid, branch_out_,
                                  bt * c, dt_, st);
    });
  }

  Result<void*> AllocBytes(size_t bytes, bool per_slot = false, bool activation = false) {
    ASSIGN_OR_RETURN(void* p, alloc_->Allocate(bytes));
    blocks_.push_back(p);
    if (activation) act_bytes_ += static_cast<int64_t>(bytes);
    if (per_slot) slot_bytes_ += static_cast<int64_t>(bytes);
    return p;
  }
  template <typename U>
  Result<U*> AllocT(size_t n, bool per_slot = false, bool activation = false) {
    ASSIGN_OR_RETURN(void* p, AllocBytes(n * sizeof(U), per_slot, activation));
    return static_cast<U*>(p);
  }
  // Activation memory (counted in activation_bytes()).
  Result<float*> ActF(int64_t n, bool per_slot = false) {
    return AllocT<float>(static_cast<size_t>(n), per_slot, true);
  }
  Result<void*> ActT(int64_t n, bool per_slot = false) {
    return AllocBytes(static_cast<size_t>(n) * es_, per_slot, true);
  }

  Result<Acts> AllocActs(int64_t bt, bool per_slot) {
    const int64_t c = c_;
    Acts a;
    ASSIGN_OR_RETURN(a.ln1, ActT(bt * c, per_slot));
    ASSIGN_OR_RETURN(a.ln1_mean, ActF(bt, per_slot));
    ASSIGN_OR_RETURN(a.ln1_rstd, ActF(bt, per_slot));
    ASSIGN_OR_RETURN(a.qkv, ActT(bt * 3 * cl_, per_slot));
    ASSIGN_OR_RETURN(a.atty, ActT(bt * cl_, per_slot));
    ASSIGN_OR_RETURN(a.lse, ActF(bt * nhl_, per_slot));
    ASSIGN_OR_RETURN(a.res_mid, ActF(bt * c, per_slot));
    ASSIGN_OR_RETURN(a.ln2, ActT(bt * c, per_slot));
    ASSIGN_OR_RETURN(a.ln2_mean, ActF(bt, per_slot));
    ASSIGN_OR_RETURN(a.ln2_rstd, ActF(bt, per_slot));
    ASSIGN_OR_RETURN(a.fch, ActT(bt * fcl_, per_slot));
    ASSIGN_OR_RETURN(a.fchg, ActT(bt * fcl_, per_slot));
    return a;
  }

  // The CPU model's activation plan (model/gpt.cc AllocateActivations), plus device scratch
  // for the kernels' workspaces and pinned host staging for the host-side interface.
  Status AllocateActivations(int num_slots) {
    const int64_t bt = static_cast<int64_t>(max_b_) * max_t_;
    const int64_t c = c_;
    slot_bytes_ = 0;
    Acts shared{};
    if (cfg_.recompute) {
      ASSIGN_OR_RETURN(shared, AllocActs(bt, false));
    }
    float* shared_out = nullptr;
    if (!stage_.last()) {
      ASSIGN_OR_RETURN(shared_out, ActF(bt * c));
    }
    slots_.resize(static_cast<size_t>(num_slots));
    for (size_t i = 0; i < slots_.size(); ++i) {
      Slot& s = slots_[i];
      const bool count = i == 0;  // slot_bytes_ is the size of one slot
      for (int l = 0; l < nl_; ++l) {
        if (cfg_.recompute) {
          s.acts.push_back(shared);
        } else {
          ASSIGN_OR_RETURN(Acts a, AllocActs(bt, count));
          s.acts.push_back(a);
        }
      }
      for (int l = 0; l < nl_; ++l) {
        ASSIGN_OR_RETURN(float* r, ActF(bt * c, count));
        s.res.push_back(r);
      }
      if (stage_.last()) {
        ASSIGN_OR_RETURN(float* r, ActF(bt * c, count));
        s.res.push_back(r);
        ASSIGN_OR_RETURN(s.lnf, ActT(bt * c, count));
        ASSIGN_OR_RETURN(s.lnf_mean, ActF(bt, count));
        ASSIGN_OR_RETURN(s.lnf_rstd, ActF(bt, count));
        ASSIGN_OR_RETURN(s.logits, ActT(bt * vl_, count));
      } else {
        s.res.push_back(shared_out);
      }
      if (stage_.first()) {
        ASSIGN_OR_RETURN(s.tokens, AllocT<int32_t>(static_cast<size_t>(bt), count, true));
      }
    }
    cur_ = &slots_[0];
    if (stage_.last()) {
      ASSIGN_OR_RETURN(losses_, ActF(bt));
      ASSIGN_OR_RETURN(targets_, AllocT<int32_t>(static_cast<size_t>(bt), false, true));
      ASSIGN_OR_RETURN(loss_sum_, AllocT<double>(1));
      reduce_ws_bytes_ = CudaReduceWorkspace(bt);
      ASSIGN_OR_RETURN(reduce_ws_, AllocBytes(reduce_ws_bytes_));
    }
    ASSIGN_OR_RETURN(branch_out_, ActT(bt * c));
    if (tp_ != nullptr && stage_.last()) {
      ASSIGN_OR_RETURN(xent_max_, ActF(bt));
      ASSIGN_OR_RETURN(xent_sums_, ActF(2 * bt));
    }
    // Gradient scratch (one layer at a time).
    ASSIGN_OR_RETURN(dres_, ActF(bt * c));
    if (dt_ != DType::kF32) {
      ASSIGN_OR_RETURN(dbranch_, ActT(bt * c));
    }
    ASSIGN_OR_RETURN(dln_, ActT(bt * c));
    ASSIGN_OR_RETURN(dqkv_, ActT(bt * 3 * cl_));
    ASSIGN_OR_RETURN(datty_, ActT(bt * cl_));
    ASSIGN_OR_RETURN(dfch_, ActT(bt * fcl_));
    // Kernel workspaces, sized for the largest micro-batch.
    attn_ws_bytes_ = CudaAttentionBackwardWorkspace(max_b_, max_t_, cl_, nhl_);
    ASSIGN_OR_RETURN(attn_ws_, AllocBytes(attn_ws_bytes_));
    if (stage_.first()) {
      emb_ws_bytes_ = CudaEmbeddingBackwardWorkspace(bt);
      ASSIGN_OR_RETURN(emb_ws_, AllocBytes(emb_ws_bytes_));
    }
    // Pinned host staging for the host-side interface.
    const size_t res_bytes = static_cast<size_t>(bt * c) * sizeof(float);
    if (stage_.first()) {
      ASSIGN_OR_RETURN(tokens_h_, CudaAllocPinnedHost(static_cast<size_t>(bt) * sizeof(int32_t)));
    }
    if (stage_.last()) {
      ASSIGN_OR_RETURN(targets_h_, CudaAllocPinnedHost(static_cast<size_t>(bt) * sizeof(int32_t)));
    }
    if (stage_.count > 1) {
      ASSIGN_OR_RETURN(act_in_h_, CudaAllocPinnedHost(res_bytes));
      ASSIGN_OR_RETURN(out_h_, CudaAllocPinnedHost(res_bytes));
    }
    ASSIGN_OR_RETURN(loss_h_, CudaAllocPinnedHost(sizeof(double)));
    return Status::Ok();
  }

  GptConfig cfg_;
  DType dt_;
  size_t es_;  // bytes per compute element
  int max_b_, max_t_;
  TensorParallelComm* tp_;  // nullptr: no tensor parallelism
  PipelineStage stage_;
  LayerRange range_;
  int nl_;
  std::vector<ParamTensor> layout_;
  LayoutIndex ix_;
  int c_, cl_ = 0, nhl_ = 0, fcl_ = 0, vl_ = 0;
  int64_t vocab_lo_ = 0;
  int vocab_valid_ = 0;
  int64_t n_params_ = 0;
  int device_;
  Status deferred_;  // first error of a void method, returned by the next call that can

  // Declared before every buffer: destroyed after them (the destructor frees the blocks).
  CudaStream stream_;
  std::unique_ptr<CudaAllocator> alloc_;
  std::unique_ptr<CudaBlas> blas_;
  CudaEvent in_event_, tok_event_, tgt_event_;
  KernelTimer timer_{ProfilingRequested()};
  std::vector<void*> blocks_;  // every allocation, freed by the destructor
  int64_t act_bytes_ = 0, slot_bytes_ = 0;

  float* master_ = nullptr;
  float* grads_ = nullptr;
  void* compute_ = nullptr;

  std::vector<Slot> slots_;
  Slot* cur_ = nullptr;
  float* losses_ = nullptr;
  int32_t* targets_ = nullptr;
  double* loss_sum_ = nullptr;
  void* reduce_ws_ = nullptr;
  size_t reduce_ws_bytes_ = 0;
  void* branch_out_ = nullptr;
  float* xent_max_ = nullptr;
  float* xent_sums_ = nullptr;
  float* dres_ = nullptr;
  void* dbranch_ = nullptr;
  void* dln_ = nullptr;
  void* dqkv_ = nullptr;
  void* datty_ = nullptr;
  void* dfch_ = nullptr;
  void* attn_ws_ = nullptr;
  size_t attn_ws_bytes_ = 0;
  void* emb_ws_ = nullptr;
  size_t emb_ws_bytes_ = 0;
  std::shared_ptr<void> tokens_h_, targets_h_, act_in_h_, out_h_, loss_h_;

  int b_ = 0, t_ = 0;
};

}  // namespace

Result<std::unique_ptr<Gpt>> CreateCudaGpt(const GptConfig& config, DType compute, int max_batch,
                                           int max_seq, TensorParallelComm* tp,
                                           const PipelineStage& stage, int num_slots,
                                           int device_index) {
  RETURN_IF_ERROR(CheckGptSizes(config, max_batch, max_seq));
  RETURN_IF_ERROR(CheckGptSlots(num_slots));
  const int hs = config.channels / config.heads;
  if (hs != 32 && hs != 64 && hs != 128) {
    return InvalidArgument("model.d_model / model.heads: head size " + std::to_string(hs) +
                           " is not supported by the CUDA attention kernels (32, 64 or 128)");
  }
  const int devices = CudaDeviceCount();
  if (devices == 0) return UnavailableError("CUDA model: no CUDA device is visible");
  if (device_index < 0 || device_index >= devices) {
    return InvalidArgument("CUDA model: device " + std::to_string(device_index) +
                           " out of range [0, " + std::to_string(devices) + ")");
  }
  // The CPU model's tp and pipeline checks and parameter layout.
  RETURN_IF_ERROR(CheckGptParallelism(config, tp, stage));
  tp = EffectiveTp(tp);
  std::vector<ParamTensor> layout = BuildGptLayout(config, MakeTpShape(config, tp), stage, nullptr);
  auto m = std::make_unique<CudaGptImpl>(config, compute, max_batch, max_seq, tp, stage,
                                         device_index, std::move(layout));
  RETURN_IF_ERROR(
      m->Init(num_slots).WithContext("CUDA model on device " + std::to_string(device_index)));
  return std::unique_ptr<Gpt>(std::move(m));
}

}  // namespace strata::model
