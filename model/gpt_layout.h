// The device-independent half of the GPT models of model/gpt.h, shared by the CPU model
// (model/gpt.cc, the reference) and the CUDA model (model/cuda/gpt_cuda.cc) so that both have
// the same argument checks, tensor-parallel shard shape, parameter layout (names, shapes,
// offsets, init streams), positions of wte / wpe / blocks / ln_f in it, activation-slot
// structure and error context of a tensor-parallel collective.
//
// Private to model/: no public header includes it, and nothing here is part of gpt.h's contract.
#pragma once

#include <cstdint>
#include <vector>

#include "common/status.h"
#include "model/gpt.h"

namespace strata::model {

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

// The shard shape of TP rank `rank` of `size` (size 1, rank 0: no tensor parallelism).
TpShape MakeTpShape(const GptConfig& cfg, int size, int rank);
// The shard shape of the calling rank of `tp` (nullptr: no tensor parallelism).
TpShape MakeTpShape(const GptConfig& cfg, const TensorParallelComm* tp);

// Gpt::Create's argument checks, in the order Gpt::Create makes them; each returns OK or the
// INVALID_ARGUMENT documented on Gpt::Create.
// config.Validate(), then the micro-batch size and sequence length.
Status CheckGptSizes(const GptConfig& config, int max_batch, int max_seq);
// The tensor-parallel group (may be nullptr) and the pipeline stage.
Status CheckGptParallelism(const GptConfig& config, const TensorParallelComm* tp,
                           const PipelineStage& stage);
// The number of activation slots.
Status CheckGptSlots(int num_slots);

// `tp`, or nullptr for a group of size 1 (nothing to split or reduce).
TensorParallelComm* EffectiveTp(TensorParallelComm* tp);

// The stage's tensors, in buffer order (see Gpt::tensors()); `streams` (may be nullptr)
// receives each one's index in the pp = 1 layout, which is its InitWeights stream.
std::vector<ParamTensor> BuildGptLayout(const GptConfig& cfg, const TpShape& tp,
                                        const PipelineStage& stage, std::vector<int>* streams);

// Positions in a stage's layout ([wte] [wpe] blocks [ln_f]; -1: absent).
struct LayoutIndex {
  int wte = -1;
  int wpe = -1;
  int block0 = 0;  // the first local block's first tensor
  int final = -1;  // ln_f.weight (ln_f.bias follows)
  int64_t num_params = 0;
  // Position of tensor k of local block l.
  int Block(int l, int k) const { return block0 + l * kNumBlockParams + k; }
};
LayoutIndex IndexGptLayout(const PipelineStage& stage, int local_layers,
                           const std::vector<ParamTensor>& layout);

// The flat-buffer range [offset, offset + count) of local block l's tensors, as passed to a
// GradReadyFn once the block's gradients are final.
struct FlatRange {
  int64_t offset = 0;
  int64_t count = 0;
};
FlatRange BlockRange(const std::vector<ParamTensor>& layout, const LayoutIndex& index, int l);

// ForwardStage's / BackwardStage's argument contracts (CHECKed: a caller's bug).
void CheckForwardStageArgs(const PipelineStage& stage, int slot, int num_slots, int b, int t,
                           int max_b, int max_t, const int32_t* tokens, const float* input,
                           const int32_t* targets, const float* output);
void CheckBackwardStageArgs(const PipelineStage& stage, bool has_grad, const float* doutput,
                            const float* dinput);

// `s` with the context of a failed tensor-parallel all-reduce of `what` in global block `layer`
// (-1: outside the blocks); OK stays OK.
Status TpContext(const Status& s, const char* what, int layer);

// The activations one block saves for its backward. `CT` points at compute-precision data (T*
// on the CPU, void* on a device); statistics and the residual stream are fp32.
template <typename CT>
struct BlockActs {
  CT ln1 = nullptr;
  float* ln1_mean = nullptr;
  float* ln1_rstd = nullptr;
  CT qkv = nullptr;  // local heads: [BT, 3 * C / tp]
  CT atty = nullptr;
  float* lse = nullptr;
  float* res_mid = nullptr;
  CT ln2 = nullptr;
  float* ln2_mean = nullptr;
  float* ln2_rstd = nullptr;
  CT fch = nullptr;  // [BT, 4 * C / tp]
  CT fchg = nullptr;
};

// What one micro-batch in flight keeps until its backward. `Tokens` holds the first stage's
// input tokens (host or device memory).
template <typename CT, typename Tokens>
struct ActSlot {
  std::vector<BlockActs<CT>> acts;  // per local block (under recompute all alias one shared set)
  std::vector<float*> res;          // res[0] = stage input (embeddings on the first stage),
                                    // res[l + 1] = output of local block l (shared on non-last
                                    // stages)
  CT lnf = nullptr;                 // last stage: ln_f output and statistics
  float* lnf_mean = nullptr;
  float* lnf_rstd = nullptr;
  CT logits = nullptr;  // last stage: local [BT, V/tp]; dlogits after a dloss != 0 forward
  Tokens tokens{};      // first stage
  int b = 0, t = 0;
  bool has_grad = false;
};

}  // namespace strata::model
