#include "checkpoint/hf_gpt2.h"

#include <cstring>
#include <set>

namespace strata::checkpoint {
namespace {

constexpr const char kPrefix[] = "transformer.";

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

int64_t Numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// The four Linear weights of a block (every 2-D tensor but the embeddings) are Conv1D in HF.
bool IsConv1DWeight(const std::string& name, const std::vector<int64_t>& shape) {
  return shape.size() == 2 && name != "wte.weight" && name != "wpe.weight";
}

std::vector<int64_t> HfShape(const std::string& name, const std::vector<int64_t>& shape) {
  return IsConv1DWeight(name, shape) ? std::vector<int64_t>{shape[1], shape[0]} : shape;
}

// dst[c, r] = src[r, c] for src [rows, cols].
std::vector<float> Transpose(const std::vector<float>& src, int64_t rows, int64_t cols) {
  std::vector<float> dst(src.size());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
  }
  return dst;
}

// "h.{l}.attn.bias" / "h.{l}.attn.masked_bias" with l < layers: HF's causal-mask buffers.
bool IsAttentionBuffer(const std::string& name, int layers) {
  if (name.rfind("h.", 0) != 0) return false;
  const size_t dot = name.find('.', 2);
  if (dot == std::string::npos) return false;
  const std::string rest = name.substr(dot + 1);
  if (rest != "attn.bias" && rest != "attn.masked_bias") return false;
  for (int l = 0; l < layers; ++l) {
    if (name.compare(2, dot - 2, std::to_string(l)) == 0) return true;
  }
  return false;
}

}  // namespace

Status Gpt2Config::Validate() const {
  if (layers < 1 || heads < 1 || channels < 1 || vocab_size < 1 || max_seq_len < 1) {
    return InvalidArgument("GPT-2 config: layers " + std::to_string(layers) + ", heads " +
                           std::to_string(heads) + ", channels " + std::to_string(channels) +
                           ", vocab_size " + std::to_string(vocab_size) + ", max_seq_len " +
                           std::to_string(max_seq_len) + ": every field must be >= 1");
  }
  if (channels % heads != 0) {
    return InvalidArgument("GPT-2 config: heads " + std::to_string(heads) +
                           " does not divide channels " + std::to_string(channels));
  }
  return Status::Ok();
}

std::vector<std::pair<std::string, std::vector<int64_t>>> Gpt2TensorShapes(const Gpt2Config& c) {
  const int64_t C = c.channels;
  std::vector<std::pair<std::string, std::vector<int64_t>>> out = {
      {"wte.weight", {c.vocab_size, C}}, {"wpe.weight", {c.max_seq_len, C}}};
  for (int l = 0; l < c.layers; ++l) {
    const std::string h = "h." + std::to_string(l) + ".";
    out.push_back({h + "ln_1.weight", {C}});
    out.push_back({h + "ln_1.bias", {C}});
    out.push_back({h + "attn.c_attn.weight", {3 * C, C}});
    out.push_back({h + "attn.c_attn.bias", {3 * C}});
    out.push_back({h + "attn.c_proj.weight", {C, C}});
    out.push_back({h + "attn.c_proj.bias", {C}});
    out.push_back({h + "ln_2.weight", {C}});
    out.push_back({h + "ln_2.bias", {C}});
    out.push_back({h + "mlp.c_fc.weight", {4 * C, C}});
    out.push_back({h + "mlp.c_fc.bias", {4 * C}});
    out.push_back({h + "mlp.c_proj.weight", {C, 4 * C}});
    out.push_back({h + "mlp.c_proj.bias", {C}});
  }
  out.push_back({"ln_f.weight", {C}});
  out.push_back({"ln_f.bias", {C}});
  return out;
}

std::map<std::string, std::string> HfGpt2Metadata(const Gpt2Config& config) {
  return {{"format", "pt"},
          {"n_layer", std::to_string(config.layers)},
          {"n_head", std::to_string(config.heads)},
          {"n_embd", std::to_string(config.channels)},
          {"vocab_size", std::to_string(config.vocab_size)},
          {"n_positions", std::to_string(config.max_seq_len)}};
}

Result<std::vector<NamedTensor>> ToHfGpt2(const Gpt2Config& config, const TensorMap& tensors,
                                          TensorDType dtype) {
  RETURN_IF_ERROR(config.Validate());
  const auto shapes = Gpt2TensorShapes(config);
  std::set<std::string> expected;
  for (const auto& [name, shape] : shapes) expected.insert(name);
  for (const auto& [name, values] : tensors) {
    if (!expected.count(name)) {
      return InvalidArgument("HF GPT-2 export: tensor '" + name +
                             "' is not a parameter of a GPT-2 with " +
                             std::to_string(config.layers) + " layers");
    }
  }
  std::vector<NamedTensor> out;
  out.reserve(shapes.size());
  for (const auto& [name, shape] : shapes) {
    auto it = tensors.find(name);
    if (it == tensors.end())
      return InvalidArgument("HF GPT-2 export: missing tensor '" + name + "'");
    const std::vector<float>& v = it->second;
    if (static_cast<int64_t>(v.size()) != Numel(shape)) {
      return InvalidArgument("HF GPT-2 export: tensor '" + name + "' has " +
                             std::to_string(v.size()) + " values, expected shape " +
                             ShapeString(shape) + " (" + std::to_string(Numel(shape)) + ")");
    }
    NamedTensor t;
    t.name = kPrefix + name;
    t.shape = HfShape(name, shape);
    t.dtype = dtype;
    t.values = IsConv1DWeight(name, shape) ? Transpose(v, shape[0], shape[1]) : v;
    out.push_back(std::move(t));
  }
  return out;
}

Status WriteHfGpt2(const std::string& path, const Gpt2Config& config, const TensorMap& tensors,
                   TensorDType dtype) {
  ASSIGN_OR_RETURN(std::vector<NamedTensor> hf, ToHfGpt2(config, tensors, dtype));
  return WriteSafetensors(path, hf, HfGpt2Metadata(config));
}

Result<TensorMap> FromHfGpt2(const SafetensorsFile& file, const Gpt2Config& expected) {
  RETURN_IF_ERROR(expected.Validate());
  const auto bad = [&](const std::string& m) { return InvalidArgument(file.path() + ": " + m); };
  const auto shapes = Gpt2TensorShapes(expected);
  std::map<std::string, const std::vector<int64_t>*> shape_of;  // Strata name -> Strata shape
  for (const auto& [name, shape] : shapes) shape_of[name] = &shape;

  TensorMap out;
  std::map<std::string, std::string> found_as;  // Strata name -> name in the file
  const SafetensorsEntry* lm_head = nullptr;
  for (const SafetensorsEntry& e : file.tensors()) {
    if (e.name == "lm_head.weight") {
      lm_head = &e;
      continue;
    }
    const bool prefixed = e.name.rfind(kPrefix, 0) == 0;
    const std::string name = prefixed ? e.name.substr(std::strlen(kPrefix)) : e.name;
    if (IsAttentionBuffer(name, expected.layers)) continue;
    auto it = shape_of.find(name);
    if (it == shape_of.end()) {
      return bad("unknown tensor '" + e.name + "': not a parameter of a GPT-2 with n_layer " +
                 std::to_string(expected.layers));
    }
    if (auto [pos, inserted] = found_as.emplace(name, e.name); !inserted) {
      return bad("tensor '" + name + "' appears twice, as '" + pos->second + "' and '" + e.name +
                 "'");
    }
    const std::vector<int64_t>& shape = *it->second;
    const std::vector<int64_t> hf_shape = HfShape(name, shape);
    if (e.shape != hf_shape) {
      std::string hint;
      if (IsConv1DWeight(name, shape) && e.shape == shape) {
        hint = " (an [out, in] Linear layout? HF GPT-2 stores Conv1D weights [in, out])";
      }
      return bad("tensor '" + e.name + "': expected shape " + ShapeString(hf_shape) + ", found " +
                 ShapeString(e.shape) + hint);
    }
    std::vector<float> v = file.ToFloat(e);
    out[name] = IsConv1DWeight(name, shape) ? Transpose(v, shape[1], shape[0]) : std::move(v);
  }
  std::vector<std::string> missing;
  for (const auto& [name, shape] : shapes) {
    if (!out.count(name)) missing.push_back(kPrefix + name);
  }
  if (!missing.empty()) {
    std::string m = "missing tensor '" + missing[0] + "'";
    if (missing.size() > 1) m += " (and " + std::to_string(missing.size() - 1) + " more)";
    return bad(m + " for a GPT-2 with n_layer " + std::to_string(expected.layers));
  }
  if (lm_head != nullptr) {
    const std::vector<float>& wte = out["wte.weight"];
    const std::vector<int64_t> wte_shape = {expected.vocab_size, expected.channels};
    if (lm_head->shape != wte_shape) {
      return bad("tensor 'lm_head.weight': expected shape " + ShapeString(wte_shape) +
                 " (tied to wte), found " + ShapeString(lm_head->shape));
    }
    const std::vector<float> head = file.ToFloat(*lm_head);
    if (std::memcmp(head.data(), wte.data(), wte.size() * sizeof(float)) != 0) {
      return bad(
          "tensor 'lm_head.weight' differs from wte.weight; Strata ties the LM head to the token "
          "embedding and cannot load an untied head");
    }
  }
  return out;
}

}  // namespace strata::checkpoint
