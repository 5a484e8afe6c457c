#include "model/gpt_layout.h"

#include <algorithm>
#include <string>
#include <utility>

#include "model/tensor_parallel.h"

namespace strata::model {

TpShape MakeTpShape(const GptConfig& cfg, int size, int rank) {
  TpShape s;
  s.size = size;
  s.rank = rank;
  s.vocab_rows = (cfg.vocab_size + size - 1) / size;
  s.vocab_lo = s.vocab_rows * rank;
  s.vocab_valid = std::clamp<int64_t>(cfg.vocab_size - s.vocab_lo, 0, s.vocab_rows);
  return s;
}

TpShape MakeTpShape(const GptConfig& cfg, const TensorParallelComm* tp) {
  return MakeTpShape(cfg, tp ? tp->size() : 1, tp ? tp->rank() : 0);
}

Status CheckGptSizes(const GptConfig& config, int max_batch, int max_seq) {
  RETURN_IF_ERROR(config.Validate());
  if (max_batch <= 0) return InvalidArgument("micro batch must be > 0");
  if (max_seq <= 0 || max_seq > config.max_seq_len) {
    return InvalidArgument("model.seq_len: " + std::to_string(max_seq) +
                           " must be in [1, max_seq_len=" + std::to_string(config.max_seq_len) +
                           "]");
  }
  return Status::Ok();
}

Status CheckGptParallelism(const GptConfig& config, const TensorParallelComm* tp,
                           const PipelineStage& stage) {
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
  }
  if (stage.count < 1 || stage.index < 0 || stage.index >= stage.count) {
    return InvalidArgument("parallel.pp: stage " + std::to_string(stage.index) + " of " +
                           std::to_string(stage.count) + " is not a pipeline coordinate");
  }
  if (stage.count > config.layers) {
    return InvalidArgument("parallel.pp: " + std::to_string(stage.count) +
                           " pipeline stages exceed model.layers=" + std::to_string(config.layers) +
                           "; every stage needs a block");
  }
  return Status::Ok();
}

TensorParallelComm* EffectiveTp(TensorParallelComm* tp) {
  return tp != nullptr && tp->size() == 1 ? nullptr : tp;
}

Status CheckGptSlots(int num_slots) {
  if (num_slots < 1) {
    return InvalidArgument("activation slots: " + std::to_string(num_slots) + " must be >= 1");
  }
  return Status::Ok();
}

namespace {

// Index of each tensor in the pp = 1 layout: InitWeights draws tensor i from stream i, so a
// stage's tensors get the pp = 1 weights.
constexpr int kWteStream = 0, kWpeStream = 1, kFirstBlockStream = 2;

}  // namespace

std::vector<ParamTensor> BuildGptLayout(const GptConfig& cfg, const TpShape& tp,
                                        const PipelineStage& stage, std::vector<int>* streams) {
  std::vector<ParamTensor> ts;
  int64_t off = 0;
  int stream = 0;
  auto push = [&](ParamTensor p) {
    p.numel = NumElements(p.shape);
    p.offset = off;
    off += p.numel;
    ts.push_back(std::move(p));
    if (streams != nullptr) streams->push_back(stream);
    ++stream;
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
  const LayerRange range = StageLayers(cfg.layers, stage);
  if (stage.first() || stage.last()) {
    ParamTensor wte;  // vocabulary-parallel, padded
    wte.name = "wte.weight";
    wte.shape = {tp.vocab_rows, c};
    wte.global_shape = {cfg.vocab_size, c};
    wte.shard_dim = 0;
    wte.shard_offset = tp.vocab_lo;
    wte.shard_extent = tp.vocab_valid;
    wte.decay = true;
    wte.pipeline_tied = stage.count > 1;
    stream = kWteStream;
    push(std::move(wte));
  }
  if (stage.first()) {
    stream = kWpeStream;
    replicated("wpe.weight", {cfg.max_seq_len, c}, true);
  }
  for (int l = range.begin; l < range.end; ++l) {
    stream = kFirstBlockStream + l * kNumBlockParams;
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
  if (stage.last()) {
    stream = kFirstBlockStream + cfg.layers * kNumBlockParams;
    replicated("ln_f.weight", {c}, false);
    replicated("ln_f.bias", {c}, false);
  }
  return ts;
}

LayoutIndex IndexGptLayout(const PipelineStage& stage, int local_layers,
                           const std::vector<ParamTensor>& layout) {
  LayoutIndex x;
  const bool has_wte = stage.first() || stage.last();
  x.wte = has_wte ? 0 : -1;
  x.wpe = stage.first() ? 1 : -1;
  x.block0 = (has_wte ? 1 : 0) + (stage.first() ? 1 : 0);
  x.final = stage.last() ? x.block0 + local_layers * kNumBlockParams : -1;
  x.num_params = layout.back().offset + layout.back().numel;
  return x;
}

FlatRange BlockRange(const std::vector<ParamTensor>& layout, const LayoutIndex& index, int l) {
  const ParamTensor& first = layout[static_cast<size_t>(index.Block(l, 0))];
  const ParamTensor& last = layout[static_cast<size_t>(index.Block(l, kNumBlockParams - 1))];
  return {first.offset, last.offset + last.numel - first.offset};
}

void CheckForwardStageArgs(const PipelineStage& stage, int slot, int num_slots, int b, int t,
                           int max_b, int max_t, const int32_t* tokens, const float* input,
                           const int32_t* targets, const float* output) {
  CHECK(b > 0 && b <= max_b && t > 0 && t <= max_t);
  CHECK(slot >= 0 && slot < num_slots);
  CHECK_MSG(stage.first() ? tokens != nullptr : input != nullptr,
            "ForwardStage: the first stage takes tokens, the others an input activation");
  CHECK_MSG(stage.last() ? targets != nullptr : output != nullptr,
            "ForwardStage: the last stage takes targets, the others an output buffer");
}

void CheckBackwardStageArgs(const PipelineStage& stage, bool has_grad, const float* doutput,
                            const float* dinput) {
  CHECK_MSG(has_grad, "Backward() needs a Forward() with dloss != 0");
  CHECK_MSG(stage.last() || doutput != nullptr, "BackwardStage: a non-last stage needs doutput");
  CHECK_MSG(stage.first() || dinput != nullptr, "BackwardStage: a non-first stage needs dinput");
}

Status TpContext(const Status& s, const char* what, int layer) {
  if (s.ok()) return s;
  return s.WithContext(std::string("tensor-parallel all-reduce of ") +
                       (layer >= 0 ? "h." + std::to_string(layer) + "." : std::string()) + what);
}

}  // namespace strata::model
