// Strata's GPT-2 tensors <-> Hugging Face GPT-2 safetensors files (GPT2LMHeadModel names).
//
// Strata names its parameters like HF GPT-2 without the "transformer." prefix and stores every
// Linear weight [out, in] (torch.nn.Linear). HF GPT-2 uses Conv1D, whose weight is [in, out]:
// attn.c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj are transposed on the way out and back.
// Embeddings, biases and LayerNorms keep their layout. The LM head is tied to wte in both, so
// no "lm_head.weight" is written (as save_pretrained does for tied weights).
//
// Tensors are full (unsharded, unpadded) global tensors in fp32, row-major in Strata's shapes
// (model::ParamTensor::global_shape), keyed by Strata name.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/safetensors.h"
#include "common/status.h"

namespace strata::checkpoint {

// The shape of a GPT-2 (model::GptConfig's fields, without a model/ dependency).
struct Gpt2Config {
  int layers = 0;       // HF n_layer
  int heads = 0;        // HF n_head
  int channels = 0;     // HF n_embd
  int vocab_size = 0;   // HF vocab_size
  int max_seq_len = 0;  // HF n_positions

  // INVALID_ARGUMENT unless every field is >= 1 and heads divides channels.
  Status Validate() const;
};

// Strata tensor name -> fp32 values of the global tensor.
using TensorMap = std::map<std::string, std::vector<float>>;

// Every tensor of a GPT-2 of this config: Strata name and global Strata shape, in the order of
// HF GPT-2 (wte, wpe, h.0.ln_1.weight, ..., ln_f.bias).
std::vector<std::pair<std::string, std::vector<int64_t>>> Gpt2TensorShapes(const Gpt2Config& c);

// The safetensors metadata of an export: {"format": "pt"} (what transformers expects) and the
// config as decimal strings under HF's config names (n_layer, n_head, n_embd, vocab_size,
// n_positions).
std::map<std::string, std::string> HfGpt2Metadata(const Gpt2Config& config);

// HF GPT-2 tensors ("transformer.wte.weight", ..., "transformer.h.0.attn.c_attn.weight" [C, 3C],
// ..., "transformer.ln_f.bias") from Strata's, stored as `dtype`. INVALID_ARGUMENT for a bad
// config, a missing tensor or one of the wrong size (naming it, with the expected shape), or a
// name that is not a parameter of this GPT-2.
Result<std::vector<NamedTensor>> ToHfGpt2(const Gpt2Config& config, const TensorMap& tensors,
                                          TensorDType dtype = TensorDType::kF32);

// ToHfGpt2 + HfGpt2Metadata + WriteSafetensors (atomic; errors as those).
Status WriteHfGpt2(const std::string& path, const Gpt2Config& config, const TensorMap& tensors,
                   TensorDType dtype = TensorDType::kF32);

// Strata's tensors (fp32, Strata layout) from an HF GPT-2 file of the `expected` config, for
// initialising a model. Names are accepted with or without the "transformer." prefix. Ignored:
// the HF attention buffers "h.{l}.attn.bias" / "h.{l}.attn.masked_bias" (l < layers), and
// "lm_head.weight" when it has wte's shape and values (a tied head saved twice). BF16/F16 are
// converted exactly to fp32. INVALID_ARGUMENT (naming the file and the HF tensor) when a
// tensor is missing, has another shape than expected (both shapes given), appears twice (with
// and without prefix), is unknown, or lm_head.weight is not wte (Strata ties the head).
Result<TensorMap> FromHfGpt2(const SafetensorsFile& file, const Gpt2Config& expected);

}  // namespace strata::checkpoint
