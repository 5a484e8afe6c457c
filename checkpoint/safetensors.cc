#include "checkpoint/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <filesystem>
#include <set>
#include <tuple>
#include <utility>

namespace strata::checkpoint {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; a big-endian host would need byte swaps");

namespace {

// ---- bf16 / f16 conversions (round to nearest even; the portable paths of model/dtype.cc,
// kept here so that checkpoint does not link strata_model; tests check they agree). ----

float BitsToFloat(uint32_t u) { return std::bit_cast<float>(u); }
uint32_t FloatToBits(float f) { return std::bit_cast<uint32_t>(f); }

uint16_t FloatToBf16Bits(float f) {
  uint32_t u = FloatToBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float Bf16BitsToFloat(uint16_t h) { return BitsToFloat(static_cast<uint32_t>(h) << 16); }

uint16_t FloatToF16Bits(float f) {
  const uint32_t u = FloatToBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf
  if (a < 0x38800000u) {                        // f16 subnormal or zero: a / 2^-24, RNE
    const float v = BitsToFloat(a) * 16777216.0f;
    uint32_t r = static_cast<uint32_t>(v);
    const float frac = v - static_cast<float>(r);
    if (frac > 0.5f || (frac == 0.5f && (r & 1u))) ++r;
    return sign | static_cast<uint16_t>(r);
  }
  uint32_t m = a - 0x38000000u;  // rebias exponent 127 -> 15
  m += 0xfffu + ((m >> 13) & 1u);
  return sign | static_cast<uint16_t>(m >> 13);
}

float F16BitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return BitsToFloat(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp == 0) {
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24
    return sign ? -v : v;
  }
  return BitsToFloat(sign | ((exp + 112u) << 23) | (mant << 13));
}

// ---- UTF-8 and JSON ----

// True when s is well-formed UTF-8 (no overlong forms, surrogates or code points > U+10FFFF).
bool IsUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    int n;
    uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xc2 && c <= 0xdf) {
      n = 1, cp = c & 0x1fu;
    } else if (c >= 0xe0 && c <= 0xef) {
      n = 2, cp = c & 0x0fu;
    } else if (c >= 0xf0 && c <= 0xf4) {
      n = 3, cp = c & 0x07u;
    } else {
      return false;
    }
    if (s.size() - i <= static_cast<size_t>(n)) return false;
    for (int k = 1; k <= n; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3fu);
    }
    if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10ffff)) ||
        (cp >= 0xd800 && cp <= 0xdfff)) {
      return false;
    }
    i += static_cast<size_t>(n) + 1;
  }
  return true;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xc0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xe0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  } else {
    out->push_back(static_cast<char>(0xf0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3f)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  }
}

// A parsed JSON value. Numbers keep their text; the schema check converts the ones it needs.
// Objects keep their members in order; the parser rejects duplicate keys (a JSON library that
// silently keeps the last one would hide a duplicate tensor name; this is also why the header
// is parsed here rather than with nlohmann-json, which is not installed anyway).
struct Json {
  enum class Kind { kNull, kBool, kNumber, kString, kArray, kObject };
  Kind kind = Kind::kNull;
  std::string text;  // kString: the decoded string; kNumber: the literal; kBool: "true"/"false"
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> members;
};

const char* KindName(Json::Kind k) {
  switch (k) {
    case Json::Kind::kNull:
      return "null";
    case Json::Kind::kBool:
      return "a boolean";
    case Json::Kind::kNumber:
      return "a number";
    case Json::Kind::kString:
      return "a string";
    case Json::Kind::kArray:
      return "an array";
    case Json::Kind::kObject:
      return "an object";
  }
  return "?";
}

// Strict RFC 8259 parser, recursive with a depth bound (the safetensors header is 3 deep).
class JsonParser {
 public:
  explicit JsonParser(std::string_view s) : s_(s) {}

  // Parses the whole input as one value (surrounding whitespace allowed). On error returns
  // false and sets error() to a message with the byte offset.
  bool ParseDocument(Json* out) {
    SkipSpace();
    if (!ParseValue(out, 0)) return false;
    SkipSpace();
    if (pos_ != s_.size()) return Fail("unexpected characters after the JSON value");
    return true;
  }
  const std::string& error() const { return error_; }

 private:
  static constexpr int kMaxDepth = 32;

  bool Fail(const std::string& what) {
    if (error_.empty()) error_ = what + " at byte " + std::to_string(pos_) + " of the header";
    return false;
  }
  void SkipSpace() {
    while (pos_ < s_.size() &&
           (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) {
      ++pos_;
    }
  }
  bool Consume(char c) {
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  bool Literal(std::string_view word) {
    if (s_.substr(pos_, word.size()) != word) return Fail("invalid literal");
    pos_ += word.size();
    return true;
  }

  bool ParseValue(Json* out, int depth) {
    if (depth > kMaxDepth) return Fail("JSON nested deeper than " + std::to_string(kMaxDepth));
    if (pos_ >= s_.size()) return Fail("unexpected end of JSON");
    const char c = s_[pos_];
    if (c == '{') return ParseObject(out, depth);
    if (c == '[') return ParseArray(out, depth);
    if (c == '"') {
      out->kind = Json::Kind::kString;
      return ParseString(&out->text);
    }
    if (c == 't' || c == 'f') {
      out->kind = Json::Kind::kBool;
      out->text = c == 't' ? "true" : "false";
      return Literal(out->text);
    }
    if (c == 'n') {
      out->kind = Json::Kind::kNull;
      return Literal("null");
    }
    if (c == '-' || (c >= '0' && c <= '9')) return ParseNumber(out);
    return Fail(std::string("unexpected character '") + c + "'");
  }

  bool ParseObject(Json* out, int depth) {
    out->kind = Json::Kind::kObject;
    ++pos_;  // '{'
    SkipSpace();
    if (Consume('}')) return true;
    std::set<std::string> keys;
    while (true) {
      SkipSpace();
      if (pos_ >= s_.size() || s_[pos_] != '"') return Fail("expected a string key");
      std::string key;
      if (!ParseString(&key)) return false;
      if (!keys.insert(key).second) {
        return Fail(std::string(depth == 0 ? "duplicate tensor name" : "duplicate key") + " \"" +
                    key + "\"");
      }
      SkipSpace();
      if (!Consume(':')) return Fail("expected ':'");
      SkipSpace();
      out->members.emplace_back(std::move(key), Json());
      if (!ParseValue(&out->members.back().second, depth + 1)) return false;
      SkipSpace();
      if (Consume('}')) return true;
      if (!Consume(',')) return Fail("expected ',' or '}'");
    }
  }

  bool ParseArray(Json* out, int depth) {
    out->kind = Json::Kind::kArray;
    ++pos_;  // '['
    SkipSpace();
    if (Consume(']')) return true;
    while (true) {
      SkipSpace();
      out->items.emplace_back();
      if (!ParseValue(&out->items.back(), depth + 1)) return false;
      SkipSpace();
      if (Consume(']')) return true;
      if (!Consume(',')) return Fail("expected ',' or ']'");
    }
  }

  bool Hex4(uint32_t* v) {
    if (s_.size() - pos_ < 4) return Fail("truncated \\u escape");
    *v = 0;
    for (int k = 0; k < 4; ++k) {
      const char h = s_[pos_++];
      *v <<= 4;
      if (h >= '0' && h <= '9') {
        *v |= static_cast<uint32_t>(h - '0');
      } else if (h >= 'a' && h <= 'f') {
        *v |= static_cast<uint32_t>(h - 'a' + 10);
      } else if (h >= 'A' && h <= 'F') {
        *v |= static_cast<uint32_t>(h - 'A' + 10);
      } else {
        return Fail("bad hex digit in \\u escape");
      }
    }
    return true;
  }

  bool ParseString(std::string* out) {
    ++pos_;  // '"'
    out->clear();
    while (true) {
      if (pos_ >= s_.size()) return Fail("unterminated string");
      const char c = s_[pos_++];
      if (c == '"') return true;
      if (static_cast<unsigned char>(c) < 0x20) return Fail("control character in a string");
      if (c != '\\') {
        out->push_back(c);  // raw bytes: the whole header was checked to be UTF-8
        continue;
      }
      if (pos_ >= s_.size()) return Fail("unterminated string");
      const char e = s_[pos_++];
      switch (e) {
        case '"':
        case '\\':
        case '/':
          out->push_back(e);
          break;
        case 'b':
          out->push_back('\b');
          break;
        case 'f':
          out->push_back('\f');
          break;
        case 'n':
          out->push_back('\n');
          break;
        case 'r':
          out->push_back('\r');
          break;
        case 't':
          out->push_back('\t');
          break;
        case 'u': {
          uint32_t cp;
          if (!Hex4(&cp)) return false;
          if (cp >= 0xdc00 && cp <= 0xdfff) return Fail("unpaired low surrogate");
          if (cp >= 0xd800 && cp <= 0xdbff) {
            uint32_t lo;
            if (!Consume('\\') || !Consume('u')) return Fail("unpaired high surrogate");
            if (!Hex4(&lo)) return false;
            if (lo < 0xdc00 || lo > 0xdfff) return Fail("unpaired high surrogate");
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
          }
          AppendUtf8(cp, out);
          break;
        }
        default:
          return Fail(std::string("bad escape '\\") + e + "'");
      }
    }
  }

  bool ParseNumber(Json* out) {
    out->kind = Json::Kind::kNumber;
    const size_t start = pos_;
    auto digits = [&] {
      const size_t d = pos_;
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
      return pos_ > d;
    };
    Consume('-');
    if (Consume('0')) {
      // no leading zeros
    } else if (!digits()) {
      return Fail("bad number");
    }
    if (Consume('.') && !digits()) return Fail("bad number");
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      ++pos_;
      if (!Consume('+')) Consume('-');
      if (!digits()) return Fail("bad number");
    }
    out->text = std::string(s_.substr(start, pos_ - start));
    return true;
  }

  std::string_view s_;
  size_t pos_ = 0;
  std::string error_;
};

// A non-negative integer literal (at most 2^63 - 1), or false.
bool JsonToU63(const Json& v, uint64_t* out) {
  if (v.kind != Json::Kind::kNumber || v.text.empty() || v.text.size() > 19) return false;
  uint64_t x = 0;
  for (char c : v.text) {
    if (c < '0' || c > '9') return false;  // negative, fraction or exponent
    x = x * 10 + static_cast<uint64_t>(c - '0');
  }
  if (x > static_cast<uint64_t>(INT64_MAX)) return false;
  *out = x;
  return true;
}

void AppendJsonString(std::string_view s, std::string* out) {
  static const char kHex[] = "0123456789abcdef";
  out->push_back('"');
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out->push_back('\\');
      out->push_back(c);
    } else if (u < 0x20) {
      *out += "\\u00";
      out->push_back(kHex[u >> 4]);
      out->push_back(kHex[u & 15]);
    } else {
      out->push_back(c);
    }
  }
  out->push_back('"');
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

bool ParseDTypeName(const std::string& s, TensorDType* t) {
  if (s == "F32") {
    *t = TensorDType::kF32;
  } else if (s == "BF16") {
    *t = TensorDType::kBF16;
  } else if (s == "F16") {
    *t = TensorDType::kF16;
  } else {
    return false;
  }
  return true;
}

// ---- file I/O ----

std::string Errno(const std::string& what, const std::string& path) {
  return path + ": " + what + ": " + std::strerror(errno);
}

// Closes a descriptor on scope exit.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  int Release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

Status WriteAll(int fd, const void* data, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return IoError(Errno("write", path));
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return Status::Ok();
}

Status ReadAt(int fd, void* data, size_t n, uint64_t offset, const std::string& path) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    const ssize_t r = ::pread(fd, p, n, static_cast<off_t>(offset));
    if (r < 0) {
      if (errno == EINTR) continue;
      return IoError(Errno("read", path));
    }
    if (r == 0) return DataLoss(path + ": file shrank while being read (truncated)");
    p += r;
    n -= static_cast<size_t>(r);
    offset += static_cast<uint64_t>(r);
  }
  return Status::Ok();
}

// Writes the file body (header length, header, data) to fd.
Status WriteBody(int fd, const std::string& header, const std::vector<NamedTensor>& tensors,
                 const std::string& path) {
  uint64_t n = header.size();
  uint8_t len[8];
  for (int k = 0; k < 8; ++k) len[k] = static_cast<uint8_t>(n >> (8 * k));
  RETURN_IF_ERROR(WriteAll(fd, len, 8, path));
  RETURN_IF_ERROR(WriteAll(fd, header.data(), header.size(), path));
  constexpr size_t kChunk = 1 << 16;  // elements converted per write
  std::vector<uint16_t> half;
  for (const NamedTensor& t : tensors) {
    if (t.dtype == TensorDType::kF32) {
      RETURN_IF_ERROR(WriteAll(fd, t.values.data(), t.values.size() * 4, path));
      continue;
    }
    for (size_t i = 0; i < t.values.size(); i += kChunk) {
      const size_t m = std::min(kChunk, t.values.size() - i);
      half.resize(m);
      for (size_t k = 0; k < m; ++k) {
        half[k] = t.dtype == TensorDType::kBF16 ? FloatToBf16Bits(t.values[i + k])
                                                : FloatToF16Bits(t.values[i + k]);
      }
      RETURN_IF_ERROR(WriteAll(fd, half.data(), m * 2, path));
    }
  }
  return Status::Ok();
}

}  // namespace

size_t TensorDTypeSize(TensorDType t) { return t == TensorDType::kF32 ? 4 : 2; }

const char* TensorDTypeName(TensorDType t) {
  switch (t) {
    case TensorDType::kF32:
      return "F32";
    case TensorDType::kBF16:
      return "BF16";
    case TensorDType::kF16:
      return "F16";
  }
  return "?";
}

// ---- writer ----

Status WriteSafetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                        const std::map<std::string, std::string>& metadata) {
  // Validate everything and build the header before touching the file system.
  std::string header = "{";
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [k, v] : metadata) {
      if (!IsUtf8(k) || !IsUtf8(v)) {
        return InvalidArgument(path + ": metadata \"" + k + "\" is not valid UTF-8");
      }
      if (!first) header += ",";
      first = false;
      AppendJsonString(k, &header);
      header += ":";
      AppendJsonString(v, &header);
    }
    header += "}";
  }
  std::set<std::string> names;
  uint64_t offset = 0;
  for (const NamedTensor& t : tensors) {
    const std::string where = path + ": tensor '" + t.name + "'";
    if (t.name.empty()) return InvalidArgument(path + ": a tensor has an empty name");
    if (t.name == "__metadata__") return InvalidArgument(where + ": the name is reserved");
    if (!IsUtf8(t.name)) return InvalidArgument(where + ": the name is not valid UTF-8");
    if (!names.insert(t.name).second) return InvalidArgument(where + ": duplicate name");
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0) {
        return InvalidArgument(where + ": negative dimension in shape " + ShapeString(t.shape));
      }
      if (__builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel)) {
        return InvalidArgument(where + ": shape " + ShapeString(t.shape) + " overflows");
      }
    }
    if (numel != t.values.size()) {
      return InvalidArgument(where + ": shape " + ShapeString(t.shape) + " has " +
                             std::to_string(numel) + " elements but " +
                             std::to_string(t.values.size()) + " values were given");
    }
    const uint64_t bytes = numel * TensorDTypeSize(t.dtype);
    if (header.size() > 1) header += ",";  // after the metadata or the previous tensor
    AppendJsonString(t.name, &header);
    header += ":{\"dtype\":\"";
    header += TensorDTypeName(t.dtype);
    header += "\",\"shape\":[";
    for (size_t i = 0; i < t.shape.size(); ++i) {
      header += (i ? "," : "") + std::to_string(t.shape[i]);
    }
    header += "],\"data_offsets\":[" + std::to_string(offset) + "," +
              std::to_string(offset + bytes) + "]}";
    offset += bytes;
  }
  header += "}";
  // Pad with spaces so that the data starts 8-byte aligned (what the reference writer does).
  while ((8 + header.size()) % 8 != 0) header.push_back(' ');

  std::filesystem::path target(path);
  const std::string dir =
      target.has_parent_path() ? target.parent_path().string() : std::string(".");
  std::string tmp = path + ".tmp-XXXXXX";
  Fd fd(::mkostemp(tmp.data(), O_CLOEXEC));
  if (fd.get() < 0) return IoError(Errno("cannot create a temporary file", tmp));
  Status st = WriteBody(fd.get(), header, tensors, tmp);
  if (st.ok() && ::fchmod(fd.get(), 0644) != 0) st = IoError(Errno("fchmod", tmp));
  if (st.ok() && ::fsync(fd.get()) != 0) st = IoError(Errno("fsync", tmp));
  if (st.ok() && ::close(fd.Release()) != 0) st = IoError(Errno("close", tmp));
  if (st.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) {
    st = IoError(Errno("rename to " + path, tmp));
  }
  if (!st.ok()) {
    ::unlink(tmp.c_str());
    return st;
  }
  // Make the rename itself durable.
  Fd dfd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dfd.get() < 0) return IoError(Errno("open directory", dir));
  if (::fsync(dfd.get()) != 0) return IoError(Errno("fsync directory", dir));
  return Status::Ok();
}

// ---- reader ----

const SafetensorsEntry* SafetensorsFile::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

std::span<const uint8_t> SafetensorsFile::Bytes(const SafetensorsEntry& e) const {
  CHECK_MSG(e.end <= data_.size() && e.begin <= e.end, "entry of another file: " + e.name);
  return {data_.data() + e.begin, static_cast<size_t>(e.end - e.begin)};
}

std::vector<float> SafetensorsFile::ToFloat(const SafetensorsEntry& e) const {
  const std::span<const uint8_t> b = Bytes(e);
  std::vector<float> out(static_cast<size_t>(e.numel));
  if (e.dtype == TensorDType::kF32) {
    if (!out.empty()) std::memcpy(out.data(), b.data(), b.size());
    return out;
  }
  for (size_t i = 0; i < out.size(); ++i) {
    const uint16_t h = static_cast<uint16_t>(b[2 * i] | (b[2 * i + 1] << 8));
    out[i] = e.dtype == TensorDType::kBF16 ? Bf16BitsToFloat(h) : F16BitsToFloat(h);
  }
  return out;
}

Result<SafetensorsFile> ReadSafetensors(const std::string& path, const SafetensorsLimits& limits) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    return errno == ENOENT ? NotFound(path + ": no such file") : IoError(Errno("open", path));
  }
  struct stat sb;
  if (::fstat(fd.get(), &sb) != 0) return IoError(Errno("stat", path));
  if (!S_ISREG(sb.st_mode)) return InvalidArgument(path + ": not a regular file");
  const auto file_size = static_cast<uint64_t>(sb.st_size);
  if (file_size > limits.max_file_bytes) {
    return InvalidArgument(path + ": file of " + std::to_string(file_size) +
                           " bytes exceeds the limit of " + std::to_string(limits.max_file_bytes));
  }
  if (file_size < 8) {
    return DataLoss(path + ": truncated: " + std::to_string(file_size) +
                    " bytes, shorter than the 8-byte header length");
  }
  uint8_t len[8];
  RETURN_IF_ERROR(ReadAt(fd.get(), len, 8, 0, path));
  uint64_t n = 0;
  for (int k = 7; k >= 0; --k) n = (n << 8) | len[k];
  if (n > limits.max_header_bytes) {
    return InvalidArgument(path + ": header length " + std::to_string(n) +
                           " exceeds the limit of " + std::to_string(limits.max_header_bytes) +
                           " bytes (not a safetensors file?)");
  }
  if (n > file_size - 8) {
    return DataLoss(path + ": truncated: header length " + std::to_string(n) +
                    " but the file has only " + std::to_string(file_size - 8) +
                    " bytes after the length");
  }
  std::string header(static_cast<size_t>(n), '\0');
  RETURN_IF_ERROR(ReadAt(fd.get(), header.data(), header.size(), 8, path));

  const auto bad = [&](const std::string& m) { return InvalidArgument(path + ": " + m); };
  if (header.empty() || header[0] != '{') return bad("header does not start with '{'");
  if (!IsUtf8(header)) return bad("header is not valid UTF-8");
  Json root;
  JsonParser parser(header);
  if (!parser.ParseDocument(&root)) return bad("malformed JSON header: " + parser.error());
  if (root.kind != Json::Kind::kObject) return bad("header is not a JSON object");

  SafetensorsFile file;
  file.path_ = path;
  const uint64_t data_size = file_size - 8 - n;
  for (const auto& [name, v] : root.members) {
    if (name == "__metadata__") {
      if (v.kind != Json::Kind::kObject) return bad("__metadata__ is not an object");
      for (const auto& [k, mv] : v.members) {
        if (mv.kind != Json::Kind::kString) {
          return bad("__metadata__ \"" + k + "\" is " + KindName(mv.kind) + ", not a string");
        }
        file.metadata_[k] = mv.text;
      }
      continue;
    }
    const auto tbad = [&](const std::string& m) {
      return InvalidArgument(path + ": tensor '" + name + "': " + m);
    };
    if (name.empty()) return bad("a tensor has an empty name");
    if (v.kind != Json::Kind::kObject) return tbad(std::string("is ") + KindName(v.kind));
    SafetensorsEntry e;
    e.name = name;
    const Json* dtype = nullptr;
    const Json* shape = nullptr;
    const Json* offsets = nullptr;
    for (const auto& [k, fv] : v.members) {
      if (k == "dtype") {
        dtype = &fv;
      } else if (k == "shape") {
        shape = &fv;
      } else if (k == "data_offsets") {
        offsets = &fv;
      } else {
        return tbad("unknown field \"" + k + "\"");
      }
    }
    if (!dtype || !shape || !offsets) {
      return tbad(std::string("missing field \"") +
                  (!dtype   ? "dtype"
                   : !shape ? "shape"
                            : "data_offsets") +
                  "\"");
    }
    if (dtype->kind != Json::Kind::kString) return tbad("dtype is not a string");
    if (!ParseDTypeName(dtype->text, &e.dtype)) {
      return tbad("unsupported dtype \"" + dtype->text + "\" (supported: F32, BF16, F16)");
    }
    if (shape->kind != Json::Kind::kArray) return tbad("shape is not an array");
    uint64_t numel = 1;
    for (const Json& d : shape->items) {
      uint64_t x;
      if (!JsonToU63(d, &x)) return tbad("shape entry '" + d.text + "' is not an integer >= 0");
      if (__builtin_mul_overflow(numel, x, &numel) || numel > static_cast<uint64_t>(INT64_MAX)) {
        return tbad("shape overflows");
      }
      e.shape.push_back(static_cast<int64_t>(x));
    }
    if (offsets->kind != Json::Kind::kArray || offsets->items.size() != 2 ||
        !JsonToU63(offsets->items[0], &e.begin) || !JsonToU63(offsets->items[1], &e.end)) {
      return tbad("data_offsets is not [begin, end] with integers >= 0");
    }
    if (e.begin > e.end) {
      return tbad("data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
                  ") end before they begin");
    }
    uint64_t bytes;
    if (__builtin_mul_overflow(numel, TensorDTypeSize(e.dtype), &bytes)) {
      return tbad("shape overflows");
    }
    if (bytes != e.end - e.begin) {
      return tbad("shape " + ShapeString(e.shape) + " of " + dtype->text + " is " +
                  std::to_string(bytes) + " bytes but data_offsets [" + std::to_string(e.begin) +
                  ", " + std::to_string(e.end) + ") span " + std::to_string(e.end - e.begin));
    }
    if (e.end > data_size) {
      return DataLoss(path + ": tensor '" + name + "': truncated: its data ends at byte " +
                      std::to_string(e.end) + " of the data section, which has only " +
                      std::to_string(data_size) + " bytes");
    }
    e.numel = static_cast<int64_t>(numel);
    file.tensors_.push_back(std::move(e));
  }

  // The tensors must tile the data section exactly.
  std::sort(file.tensors_.begin(), file.tensors_.end(),
            [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
              return std::tie(a.begin, a.end) < std::tie(b.begin, b.end);
            });
  uint64_t covered = 0;
  for (size_t i = 0; i < file.tensors_.size(); ++i) {
    const SafetensorsEntry& e = file.tensors_[i];
    const auto span = [](const SafetensorsEntry& t) {
      return "'" + t.name + "' [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + ")";
    };
    if (e.begin < covered) {
      return bad("data of tensors " + span(file.tensors_[i - 1]) + " and " + span(e) + " overlap");
    }
    if (e.begin > covered) {
      return bad("hole in the data: bytes [" + std::to_string(covered) + ", " +
                 std::to_string(e.begin) + ") before tensor " + span(e) + " belong to no tensor");
    }
    covered = e.end;
    file.index_[e.name] = i;
  }
  if (covered != data_size) {
    return bad("the data section has " + std::to_string(data_size) +
               " bytes but the tensors cover only " + std::to_string(covered) +
               " (trailing bytes)");
  }
  file.data_.resize(static_cast<size_t>(data_size));
  RETURN_IF_ERROR(ReadAt(fd.get(), file.data_.data(), file.data_.size(), 8 + n, path));
  return file;
}

}  // namespace strata::checkpoint
