// Job-spec loading. The YAML walker is generic over the protobuf descriptor, so adding a field to
// job.proto makes it a YAML key with no change here; only defaults and validation are per field.
//
// Null YAML values (`key:`, `key: ~`) mean "not given": the field keeps its default. ToYaml
// prints unset `optional` fields and unset sections as null so that ParseYaml(ToYaml(s))
// reproduces s exactly (a defaulted spec has every section set, so all fields print).
#include "proto/job_spec.h"

#include <fmt/format.h>
#include <glob.h>
#include <google/protobuf/descriptor.h>
#include <google/protobuf/message.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <set>
#include <string_view>

namespace strata::spec {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;

// ---------------------------------------------------------------------------------------------
// Scalar parsing. std::from_chars is locale-independent and must consume the whole string.

bool ParseSigned(std::string_view s, int64_t* out) {
  if (!s.empty() && s.front() == '+') s.remove_prefix(1);
  if (s.empty()) return false;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && end == s.data() + s.size();
}

bool ParseUnsigned(std::string_view s, uint64_t* out) {
  if (!s.empty() && s.front() == '+') s.remove_prefix(1);
  if (s.empty() || s.front() == '-') return false;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && end == s.data() + s.size();
}

bool ParseDouble(std::string_view s, double* out) {
  if (!s.empty() && s.front() == '+') s.remove_prefix(1);
  if (s.empty()) return false;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && end == s.data() + s.size() && std::isfinite(*out);
}

bool ParseBool(std::string_view s, bool* out) {
  std::string lower(s);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (lower == "true") {
    *out = true;
    return true;
  }
  if (lower == "false") {
    *out = false;
    return true;
  }
  return false;
}

// Shortest text that parses back to the same double; integral values keep a ".0" so they read as
// numbers of the right kind.
std::string FormatDouble(double v) {
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  if (ec != std::errc()) return fmt::format("{}", v);
  std::string s(buf, end);
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}

// ---------------------------------------------------------------------------------------------
// YAML -> message.

std::string JoinPath(const std::string& parent, const std::string& name) {
  return parent.empty() ? name : parent + "." + name;
}

std::string Where(const YAML::Node& node, const std::string& source) {
  const YAML::Mark mark = node.Mark();
  if (mark.is_null()) return fmt::format(" ({})", source);
  return fmt::format(" ({}:{}:{})", source, mark.line + 1, mark.column + 1);
}

std::string Describe(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Scalar:
      return "'" + node.Scalar() + "'";
    case YAML::NodeType::Sequence:
      return "a list";
    case YAML::NodeType::Map:
      return "a map";
    case YAML::NodeType::Null:
      return "nothing";
    case YAML::NodeType::Undefined:
      break;
  }
  return "an undefined value";
}

std::string FieldNames(const Descriptor* d) {
  std::string out;
  for (int i = 0; i < d->field_count(); ++i) {
    if (i) out += ", ";
    out += d->field(i)->name();
  }
  return out;
}

size_t EditDistance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

// " did you mean 'lr'?" when some field name is within two edits of `key`, else "".
std::string Suggestion(const Descriptor* d, const std::string& key) {
  const FieldDescriptor* best = nullptr;
  size_t best_distance = 3;
  for (int i = 0; i < d->field_count(); ++i) {
    const size_t distance = EditDistance(key, d->field(i)->name());
    if (distance < best_distance) {
      best_distance = distance;
      best = d->field(i);
    }
  }
  return best ? fmt::format(" did you mean '{}'?", best->name()) : "";
}

class YamlReader {
 public:
  explicit YamlReader(std::string source) : source_(std::move(source)) {}

  Status FillMessage(const YAML::Node& node, const std::string& path, Message* msg) const {
    const Descriptor* desc = msg->GetDescriptor();
    if (node.IsNull()) return Status::Ok();
    if (!node.IsMap()) {
      return InvalidArgument(fmt::format("{}: expected a map with keys {{{}}}, got {}{}", path,
                                         FieldNames(desc), Describe(node), Where(node, source_)));
    }
    std::set<std::string> seen;
    for (const auto& entry : node) {  // entry is a by-value pair; copy no references out of it
      const YAML::Node key = entry.first;
      const YAML::Node value = entry.second;
      if (!key.IsScalar()) {
        return InvalidArgument(fmt::format("{}: keys must be plain names, got {}{}",
                                           path.empty() ? source_ : path, Describe(key),
                                           Where(key, source_)));
      }
      const std::string name = key.Scalar();
      const std::string field_path = JoinPath(path, name);
      const FieldDescriptor* field = desc->FindFieldByName(name);
      if (field == nullptr) {
        return InvalidArgument(fmt::format("{}: unknown key{};{} valid keys {}: {}", field_path,
                                           Where(key, source_), Suggestion(desc, name),
                                           path.empty() ? "at the top level" : "under " + path,
                                           FieldNames(desc)));
      }
      if (!seen.insert(name).second) {
        return InvalidArgument(fmt::format("{}: duplicate key{}; give each key once", field_path,
                                           Where(key, source_)));
      }
      RETURN_IF_ERROR(SetField(value, field_path, field, msg));
    }
    return Status::Ok();
  }

 private:
  Status TypeError(const std::string& path, const char* expected, const YAML::Node& node) const {
    return InvalidArgument(fmt::format("{}: expected {}, got {}{}", path, expected, Describe(node),
                                       Where(node, source_)));
  }

  Status RangeError(const std::string& path, const char* type, const YAML::Node& node) const {
    return InvalidArgument(fmt::format("{}: {} does not fit in {}{}", path, node.Scalar(), type,
                                       Where(node, source_)));
  }

  Status SetField(const YAML::Node& node, const std::string& path, const FieldDescriptor* field,
                  Message* msg) const {
    if (node.IsNull()) return Status::Ok();  // "key:" with no value keeps the default
    const Reflection* refl = msg->GetReflection();
    if (field->is_repeated()) {
      return Internal(
          fmt::format("{}: repeated fields are not supported by the YAML loader", path));
    }
    if (field->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
      return FillMessage(node, path, refl->MutableMessage(msg, field));
    }
    const bool auto_allowed = field->containing_type()->name() == "ParallelSpec";
    const std::string text = node.IsScalar() ? node.Scalar() : "";
    switch (field->cpp_type()) {
      case FieldDescriptor::CPPTYPE_INT32:
      case FieldDescriptor::CPPTYPE_INT64: {
        const char* expected = auto_allowed ? "an integer or 'auto'" : "an integer";
        if (!node.IsScalar()) return TypeError(path, expected, node);
        int64_t v = 0;
        if (!(auto_allowed && text == "auto") && !ParseSigned(text, &v)) {
          return TypeError(path, expected, node);
        }
        if (field->cpp_type() == FieldDescriptor::CPPTYPE_INT64) {
          refl->SetInt64(msg, field, v);
        } else {
          if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max()) {
            return RangeError(path, "a 32-bit integer", node);
          }
          refl->SetInt32(msg, field, static_cast<int32_t>(v));
        }
        return Status::Ok();
      }
      case FieldDescriptor::CPPTYPE_UINT32:
      case FieldDescriptor::CPPTYPE_UINT64: {
        const char* expected = "a non-negative integer";
        if (!node.IsScalar()) return TypeError(path, expected, node);
        uint64_t v = 0;
        if (!(auto_allowed && text == "auto") && !ParseUnsigned(text, &v)) {
          return TypeError(path, expected, node);
        }
        if (field->cpp_type() == FieldDescriptor::CPPTYPE_UINT64) {
          refl->SetUInt64(msg, field, v);
        } else {
          if (v > std::numeric_limits<uint32_t>::max()) {
            return RangeError(path, "a 32-bit unsigned integer", node);
          }
          refl->SetUInt32(msg, field, static_cast<uint32_t>(v));
        }
        return Status::Ok();
      }
      case FieldDescriptor::CPPTYPE_DOUBLE:
      case FieldDescriptor::CPPTYPE_FLOAT: {
        double v = 0;
        if (!node.IsScalar() || !ParseDouble(text, &v)) return TypeError(path, "a number", node);
        if (field->cpp_type() == FieldDescriptor::CPPTYPE_DOUBLE) {
          refl->SetDouble(msg, field, v);
        } else {
          refl->SetFloat(msg, field, static_cast<float>(v));
        }
        return Status::Ok();
      }
      case FieldDescriptor::CPPTYPE_BOOL: {
        bool v = false;
        if (!node.IsScalar() || !ParseBool(text, &v)) return TypeError(path, "true or false", node);
        refl->SetBool(msg, field, v);
        return Status::Ok();
      }
      case FieldDescriptor::CPPTYPE_STRING:
        if (!node.IsScalar()) return TypeError(path, "a string", node);
        refl->SetString(msg, field, text);
        return Status::Ok();
      case FieldDescriptor::CPPTYPE_ENUM: {
        if (!node.IsScalar()) return TypeError(path, "a name", node);
        const auto* value = field->enum_type()->FindValueByName(text);
        if (value == nullptr) return TypeError(path, "a known enum name", node);
        refl->SetEnum(msg, field, value);
        return Status::Ok();
      }
      case FieldDescriptor::CPPTYPE_MESSAGE:
        break;  // handled above
    }
    return Internal(fmt::format("{}: unsupported field type", path));
  }

  std::string source_;
};

// ---------------------------------------------------------------------------------------------
// Message -> YAML.

void EmitMessage(const Message& msg, YAML::Emitter* out) {
  const Descriptor* desc = msg.GetDescriptor();
  const Reflection* refl = msg.GetReflection();
  *out << YAML::BeginMap;
  for (int i = 0; i < desc->field_count(); ++i) {
    const FieldDescriptor* f = desc->field(i);
    *out << YAML::Key << f->name() << YAML::Value;
    if (f->is_repeated()) {
      *out << YAML::Null;  // none in job.proto; ParseYaml rejects them too
      continue;
    }
    if (f->has_presence() && !refl->HasField(msg, f)) {  // not given: null, read back as unset
      *out << YAML::Null;
      continue;
    }
    if (f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
      EmitMessage(refl->GetMessage(msg, f), out);
      continue;
    }
    switch (f->cpp_type()) {
      case FieldDescriptor::CPPTYPE_INT32:
        *out << static_cast<long long>(refl->GetInt32(msg, f));
        break;
      case FieldDescriptor::CPPTYPE_INT64:
        *out << static_cast<long long>(refl->GetInt64(msg, f));
        break;
      case FieldDescriptor::CPPTYPE_UINT32:
        *out << static_cast<unsigned long long>(refl->GetUInt32(msg, f));
        break;
      case FieldDescriptor::CPPTYPE_UINT64:
        *out << static_cast<unsigned long long>(refl->GetUInt64(msg, f));
        break;
      case FieldDescriptor::CPPTYPE_DOUBLE:
        *out << FormatDouble(refl->GetDouble(msg, f));
        break;
      case FieldDescriptor::CPPTYPE_FLOAT:
        *out << FormatDouble(refl->GetFloat(msg, f));
        break;
      case FieldDescriptor::CPPTYPE_BOOL:
        *out << refl->GetBool(msg, f);
        break;
      case FieldDescriptor::CPPTYPE_STRING:
        *out << YAML::DoubleQuoted << refl->GetString(msg, f);
        break;
      case FieldDescriptor::CPPTYPE_ENUM:
        *out << refl->GetEnum(msg, f)->name();
        break;
      case FieldDescriptor::CPPTYPE_MESSAGE:
        break;  // handled above
    }
  }
  *out << YAML::EndMap;
}

// ---------------------------------------------------------------------------------------------
// Presets and defaults.

struct Preset {
  const char* name;
  int layers, heads, d_model, seq_len;
  int max_seq_len;  // 0: same as seq_len
};

constexpr Preset kPresets[] = {
    {"tiny", 4, 4, 128, 128, 0},
    {"small", 6, 6, 384, 256, 0},
    {"gpt2", 12, 12, 768, 1024, 1024},
    {"gpt2-medium", 24, 16, 1024, 1024, 1024},
    {"gpt2-large", 36, 20, 1280, 1024, 1024},
    {"gpt2-xl", 48, 25, 1600, 1024, 1024},
};

const Preset* FindPreset(const std::string& name) {
  for (const Preset& p : kPresets) {
    if (name == p.name) return &p;
  }
  return nullptr;
}

std::string PresetNames() {
  std::string out;
  for (const Preset& p : kPresets) {
    if (!out.empty()) out += ", ";
    out += p.name;
  }
  return out;
}

// "{1, 2, 4, 8, ...}": the positive divisors of n, the first dozen.
std::string Divisors(int64_t n) {
  std::string out = "{";
  int shown = 0;
  for (int64_t d = 1; d <= n; ++d) {
    if (n % d != 0) continue;
    if (shown == 12) {
      out += ", ...";
      break;
    }
    if (shown++) out += ", ";
    out += std::to_string(d);
  }
  return out + "}";
}

bool EndsWith(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool OneOf(const std::string& s, std::initializer_list<const char*> options) {
  for (const char* o : options) {
    if (s == o) return true;
  }
  return false;
}

Status Bad(const std::string& message) { return InvalidArgument(message); }

std::string ReadWholeFile(std::FILE* f, bool* ok) {
  std::string text;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) text.append(buf, n);
  *ok = !std::ferror(f);
  return text;
}

// Resolves a relative data path (or glob) against the job file's directory.
std::string ResolveAgainst(const std::filesystem::path& dir, const std::string& p) {
  if (p.empty() || p.front() == '/') return p;
  return (dir / p).lexically_normal().string();
}

}  // namespace

Result<proto::JobSpec> ParseYaml(const std::string& yaml_text, const std::string& source) {
  proto::JobSpec spec;
  try {
    const YAML::Node root = YAML::Load(yaml_text);
    if (root.IsNull() || !root.IsDefined()) {
      return InvalidArgument(
          fmt::format("{}: the job spec is empty; expected a map with keys {{{}}}", source,
                      FieldNames(proto::JobSpec::descriptor())));
    }
    if (!root.IsMap()) {
      return InvalidArgument(fmt::format(
          "{}: the job spec must be a map with keys {{{}}}, got {}{}", source,
          FieldNames(proto::JobSpec::descriptor()), Describe(root), Where(root, source)));
    }
    RETURN_IF_ERROR(YamlReader(source).FillMessage(root, "", &spec));
  } catch (const YAML::Exception& e) {
    if (e.mark.is_null()) {
      return InvalidArgument(fmt::format("{}: malformed YAML: {}", source, e.msg));
    }
    return InvalidArgument(
        fmt::format("{}:{}:{}: malformed YAML: {}; check indentation and quoting", source,
                    e.mark.line + 1, e.mark.column + 1, e.msg));
  } catch (const std::exception& e) {
    return Internal(fmt::format("{}: unexpected error while reading YAML: {}", source, e.what()));
  }
  return spec;
}

void ApplyDefaults(proto::JobSpec* spec) {
  if (spec->name().empty()) spec->set_name("job");

  // model: preset first, then explicit fields win.
  proto::ModelSpec* m = spec->mutable_model();
  const bool any_explicit =
      m->has_layers() || m->has_heads() || m->has_d_model() || m->has_seq_len();
  if (m->preset().empty() && !any_explicit) m->set_preset("tiny");
  // An unknown preset is left for Validate; a custom model with no preset borrows from tiny.
  const Preset* p = m->preset().empty() ? FindPreset("tiny") : FindPreset(m->preset());
  if (p != nullptr) {
    if (!m->has_layers()) m->set_layers(p->layers);
    if (!m->has_heads()) m->set_heads(p->heads);
    if (!m->has_d_model()) m->set_d_model(p->d_model);
    if (!m->has_seq_len()) m->set_seq_len(p->seq_len);
  }
  if (!m->has_max_seq_len()) {
    m->set_max_seq_len(p != nullptr && p->max_seq_len ? p->max_seq_len : m->seq_len());
  }

  proto::DataSpec* d = spec->mutable_data();
  if (d->format().empty()) d->set_format(EndsWith(d->train(), ".bin") ? "llmc" : "text");
  if (!d->has_val_fraction()) d->set_val_fraction(0.05);
  if (!m->has_vocab_size()) m->set_vocab_size(d->format() == "llmc" ? 50257 : 256);

  proto::TrainSpec* t = spec->mutable_train();
  if (!t->has_steps()) t->set_steps(1000);
  if (!t->has_global_batch()) t->set_global_batch(8);
  if (!t->has_micro_batch()) t->set_micro_batch(t->global_batch());
  if (!t->has_lr()) t->set_lr(1e-3);
  if (!t->has_min_lr()) t->set_min_lr(t->lr() / 10);
  if (!t->has_weight_decay()) t->set_weight_decay(0.1);
  if (!t->has_grad_clip()) t->set_grad_clip(1.0);
  if (t->precision().empty()) t->set_precision("fp32");
  if (!t->has_seed()) t->set_seed(1337);
  if (!t->has_beta1()) t->set_beta1(0.9);
  if (!t->has_beta2()) t->set_beta2(0.95);
  if (!t->has_eps()) t->set_eps(1e-8);
  if (!t->has_log_every()) t->set_log_every(1);

  proto::ParallelSpec* par = spec->mutable_parallel();
  if (par->schedule().empty()) par->set_schedule("1f1b");

  proto::ResourceSpec* r = spec->mutable_resources();
  if (r->device().empty()) r->set_device("cpu");
  if (!r->has_workers()) r->set_workers(1);
  if (!r->has_min_workers()) r->set_min_workers(1);

  proto::CheckpointSpec* c = spec->mutable_checkpoint();
  if (!c->has_keep()) c->set_keep(3);
  if (!c->has_commit_timeout_s()) c->set_commit_timeout_s(600);

  proto::EvalSpec* e = spec->mutable_eval();
  if (!e->has_every()) e->set_every(100);
  if (!e->has_batches()) e->set_batches(10);
}

Status Validate(const proto::JobSpec& spec) {
  // Conditions are written as "not in the valid range" so that NaN fails them too.
  if (spec.name().empty()) return Bad("name: must not be empty; give the job a name");

  const proto::ModelSpec& m = spec.model();
  if (!m.preset().empty() && FindPreset(m.preset()) == nullptr) {
    return Bad(fmt::format("model.preset: unknown preset '{}'; valid presets: {}", m.preset(),
                           PresetNames()));
  }
  const struct {
    const char* name;
    int value;
  } positive_model[] = {{"layers", m.layers()},           {"heads", m.heads()},
                        {"d_model", m.d_model()},         {"seq_len", m.seq_len()},
                        {"max_seq_len", m.max_seq_len()}, {"vocab_size", m.vocab_size()}};
  for (const auto& [name, value] : positive_model) {
    if (value <= 0) {
      return Bad(fmt::format("model.{}: must be positive, got {}; set it or pick a model.preset",
                             name, value));
    }
  }
  if (m.d_model() % m.heads() != 0) {
    return Bad(fmt::format("model.heads: {} does not divide model.d_model={}; choose heads in {}",
                           m.heads(), m.d_model(), Divisors(m.d_model())));
  }
  if (m.seq_len() > m.max_seq_len()) {
    return Bad(fmt::format(
        "model.seq_len: {} exceeds the model's context model.max_seq_len={}; lower seq_len or "
        "raise max_seq_len",
        m.seq_len(), m.max_seq_len()));
  }

  const proto::DataSpec& d = spec.data();
  if (d.train().empty()) {
    return Bad("data.train: required; set it to a file path or glob, e.g. data/*.txt");
  }
  if (!OneOf(d.format(), {"text", "llmc"})) {
    return Bad(fmt::format("data.format: unknown format '{}'; use text or llmc", d.format()));
  }
  if (!(d.val_fraction() >= 0 && d.val_fraction() < 1)) {
    return Bad(
        fmt::format("data.val_fraction: {} is outside [0, 1); use e.g. 0.05", d.val_fraction()));
  }
  if (d.format() == "text" && m.vocab_size() < 256) {
    return Bad(
        fmt::format("model.vocab_size: {} is too small for text data (byte tokens 0..255); use "
                    "vocab_size >= 256",
                    m.vocab_size()));
  }
  if (d.format() == "llmc" && m.vocab_size() > 65536) {
    return Bad(fmt::format(
        "model.vocab_size: {} exceeds 65536, the most that llmc uint16 token shards can address; "
        "lower vocab_size",
        m.vocab_size()));
  }

  const proto::TrainSpec& t = spec.train();
  if (t.steps() <= 0) {
    return Bad(fmt::format("train.steps: must be positive, got {}", t.steps()));
  }
  if (t.global_batch() <= 0) {
    return Bad(fmt::format("train.global_batch: must be positive, got {}", t.global_batch()));
  }
  if (t.micro_batch() <= 0) {
    return Bad(fmt::format("train.micro_batch: must be positive, got {}", t.micro_batch()));
  }
  if (t.global_batch() % t.micro_batch() != 0) {
    return Bad(fmt::format(
        "train.micro_batch: {} does not divide train.global_batch={}; choose micro_batch in {}",
        t.micro_batch(), t.global_batch(), Divisors(t.global_batch())));
  }
  if (!(t.lr() > 0)) return Bad(fmt::format("train.lr: must be positive, got {}", t.lr()));
  if (!(t.min_lr() >= 0)) {
    return Bad(fmt::format("train.min_lr: must be >= 0, got {}", t.min_lr()));
  }
  if (t.min_lr() > t.lr()) {
    return Bad(fmt::format("train.min_lr: {} exceeds train.lr={}; min_lr must be in [0, lr]",
                           t.min_lr(), t.lr()));
  }
  if (t.warmup() < 0) {
    return Bad(fmt::format("train.warmup: must be >= 0 steps, got {}", t.warmup()));
  }
  if (!(t.weight_decay() >= 0)) {
    return Bad(
        fmt::format("train.weight_decay: must be >= 0 (0 disables it), got {}", t.weight_decay()));
  }
  if (!(t.grad_clip() >= 0)) {
    return Bad(
        fmt::format("train.grad_clip: must be >= 0 (0 disables clipping), got {}", t.grad_clip()));
  }
  if (!OneOf(t.precision(), {"fp32", "bf16", "fp16"})) {
    return Bad(fmt::format("train.precision: unknown precision '{}'; use fp32, bf16 or fp16",
                           t.precision()));
  }
  if (!(t.beta1() >= 0 && t.beta1() < 1)) {
    return Bad(fmt::format("train.beta1: {} is outside [0, 1); the usual value is 0.9", t.beta1()));
  }
  if (!(t.beta2() >= 0 && t.beta2() < 1)) {
    return Bad(
        fmt::format("train.beta2: {} is outside [0, 1); the usual value is 0.95", t.beta2()));
  }
  if (!(t.eps() > 0)) {
    return Bad(
        fmt::format("train.eps: must be positive, got {}; the usual value is 1e-8", t.eps()));
  }
  if (t.log_every() <= 0) {
    return Bad(fmt::format("train.log_every: must be positive, got {}", t.log_every()));
  }

  const proto::ParallelSpec& par = spec.parallel();
  const struct {
    const char* name;
    int value;
  } degrees[] = {{"dp", par.dp()}, {"tp", par.tp()}, {"pp", par.pp()}};
  for (const auto& [name, value] : degrees) {
    if (value < 0) {
      return Bad(fmt::format(
          "parallel.{}: must be >= 0 (0 or auto lets the planner choose), got {}", name, value));
    }
  }
  if (!OneOf(par.schedule(), {"1f1b", "gpipe"})) {
    return Bad(
        fmt::format("parallel.schedule: unknown schedule '{}'; use 1f1b or gpipe", par.schedule()));
  }

  const proto::ResourceSpec& r = spec.resources();
  if (!OneOf(r.device(), {"cpu", "cuda"})) {
    return Bad(fmt::format("resources.device: unknown device '{}'; use cpu or cuda", r.device()));
  }
  if (r.workers() < 1) {
    return Bad(fmt::format("resources.workers: must be at least 1, got {}", r.workers()));
  }
  if (r.min_workers() < 1 || r.min_workers() > r.workers()) {
    return Bad(fmt::format("resources.min_workers: {} is outside [1, resources.workers={}]",
                           r.min_workers(), r.workers()));
  }
  if (r.max_restarts() < 0) {
    return Bad(fmt::format("resources.max_restarts: must be >= 0, got {}", r.max_restarts()));
  }
  if (r.threads() < 0) {
    return Bad(fmt::format("resources.threads: must be >= 0 (0 = all cores), got {}", r.threads()));
  }
  if (r.has_collective_timeout_s() && r.collective_timeout_s() < 1) {
    return Bad(fmt::format("resources.collective_timeout_s: must be at least 1 second, got {}",
                           r.collective_timeout_s()));
  }

  const proto::CheckpointSpec& c = spec.checkpoint();
  if (c.every() < 0) {
    return Bad(fmt::format("checkpoint.every: must be >= 0 steps (0 = only at the end), got {}",
                           c.every()));
  }
  if (c.keep() < 1) {
    return Bad(fmt::format("checkpoint.keep: must be at least 1, got {}", c.keep()));
  }
  if (c.keep_every() < 0) {
    return Bad(
        fmt::format("checkpoint.keep_every: must be >= 0 (0 = none), got {}", c.keep_every()));
  }
  if (c.commit_timeout_s() < 1) {
    return Bad(fmt::format("checkpoint.commit_timeout_s: must be at least 1 second, got {}",
                           c.commit_timeout_s()));
  }

  const proto::EvalSpec& e = spec.eval();
  if (e.every() < 0) {
    return Bad(
        fmt::format("eval.every: must be >= 0 steps (0 disables evaluation), got {}", e.every()));
  }
  if (e.every() > 0 && e.batches() <= 0) {
    return Bad(fmt::format(
        "eval.batches: must be positive when eval.every > 0, got {}; or set eval.every: 0",
        e.batches()));
  }
  return Status::Ok();
}

Result<std::vector<std::string>> MatchDataFiles(const std::string& field,
                                                const std::string& pattern) {
  if (pattern.empty()) {
    return InvalidArgument(fmt::format("{}: empty path; set it to a file path or glob", field));
  }
  glob_t g{};
  const int rc = glob(pattern.c_str(), 0, nullptr, &g);
  if (rc == GLOB_NOMATCH) {
    globfree(&g);
    return NotFound(fmt::format(
        "{}: no file matches '{}'; check the path (relative paths are resolved against the job "
        "file's directory)",
        field, pattern));
  }
  if (rc != 0) {
    globfree(&g);
    return IoError(fmt::format("{}: cannot expand '{}' (glob error {})", field, pattern, rc));
  }
  std::vector<std::string> files(g.gl_pathv, g.gl_pathv + g.gl_pathc);
  globfree(&g);
  std::sort(files.begin(), files.end());  // glob sorts by locale; we want a fixed byte order
  for (const std::string& file : files) {
    struct stat st;
    if (::stat(file.c_str(), &st) != 0) {
      return NotFound(fmt::format("{}: '{}' (matched by '{}') cannot be opened: {}", field, file,
                                  pattern, std::strerror(errno)));
    }
    if (!S_ISREG(st.st_mode)) {
      return InvalidArgument(
          fmt::format("{}: '{}' (matched by '{}') is not a regular file; narrow the pattern", field,
                      file, pattern));
    }
    if (::access(file.c_str(), R_OK) != 0) {
      return InvalidArgument(fmt::format("{}: '{}' (matched by '{}') is not readable: {}", field,
                                         file, pattern, std::strerror(errno)));
    }
  }
  return files;
}

Status ValidateDataFiles(const proto::JobSpec& spec) {
  {
    auto files = MatchDataFiles("data.train", spec.data().train());
    if (!files.ok()) return files.status();
  }
  if (!spec.data().val().empty()) {
    auto files = MatchDataFiles("data.val", spec.data().val());
    if (!files.ok()) return files.status();
  }
  return Status::Ok();
}

Result<proto::JobSpec> LoadJobFile(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    const int err = errno;
    const std::string message =
        fmt::format("{}: cannot read job file: {}", path, std::strerror(err));
    return err == ENOENT ? NotFound(message) : IoError(message);
  }
  if (S_ISDIR(st.st_mode)) {
    return InvalidArgument(fmt::format("{}: is a directory; pass a job .yaml file", path));
  }
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    return IoError(fmt::format("{}: cannot open job file: {}", path, std::strerror(errno)));
  }
  bool read_ok = false;
  const std::string text = ReadWholeFile(f, &read_ok);
  std::fclose(f);
  if (!read_ok) return IoError(fmt::format("{}: error while reading the job file", path));

  ASSIGN_OR_RETURN(proto::JobSpec spec, ParseYaml(text, path));

  std::error_code ec;
  std::filesystem::path dir = std::filesystem::path(path).parent_path();
  if (dir.empty()) dir = ".";
  dir = std::filesystem::absolute(dir, ec);
  if (ec) {
    return IoError(fmt::format("{}: cannot resolve its directory: {}", path, ec.message()));
  }
  proto::DataSpec* d = spec.mutable_data();
  d->set_train(ResolveAgainst(dir, d->train()));
  d->set_val(ResolveAgainst(dir, d->val()));
  if (!spec.model().init_from().empty()) {
    spec.mutable_model()->set_init_from(ResolveAgainst(dir, spec.model().init_from()));
  }
  proto::CheckpointSpec* ck = spec.mutable_checkpoint();
  if (!ck->dir().empty()) ck->set_dir(ResolveAgainst(dir, ck->dir()));
  if (spec.name().empty()) spec.set_name(std::filesystem::path(path).stem().string());

  ApplyDefaults(&spec);
  RETURN_IF_ERROR(Validate(spec));
  RETURN_IF_ERROR(ValidateDataFiles(spec));
  return spec;
}

std::string ToYaml(const proto::JobSpec& spec) {
  YAML::Emitter out;
  out.SetIndent(2);
  EmitMessage(spec, &out);
  return std::string(out.c_str()) + "\n";
}

}  // namespace strata::spec
