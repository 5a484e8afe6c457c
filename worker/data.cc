// Training data loading and the sample order. See data.h for the sample layout.
//
// Files are read once into memory as uint16 tokens. The llmc format is little-endian on disk and
// is decoded byte by byte, so a shard reads the same on any host.
#include "worker/data.h"

#include <fmt/format.h>

#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>

#include "proto/job_spec.h"

namespace strata::worker {
namespace {

constexpr int32_t kLlmcMagic = 20240520;
constexpr int32_t kLlmcVersion = 1;
constexpr size_t kLlmcHeaderInts = 256;
constexpr size_t kLlmcHeaderBytes = kLlmcHeaderInts * sizeof(int32_t);

// ---- the permutation ----

// splitmix64's finalizer: a full-avalanche 64-bit mix.
uint64_t Mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

constexpr int kFeistelRounds = 4;

// One Feistel pass over [0, 2^(2*half_bits)), half_bits in [1, 32]. Each round is invertible
// whatever the round function is, so the pass is a bijection on that domain.
uint64_t FeistelEncrypt(uint64_t x, int half_bits, const uint64_t (&keys)[kFeistelRounds]) {
  const uint64_t mask = (1ULL << half_bits) - 1;
  uint64_t left = (x >> half_bits) & mask;
  uint64_t right = x & mask;
  for (int r = 0; r < kFeistelRounds; ++r) {
    const uint64_t f = Mix64(right ^ keys[r]) & mask;
    const uint64_t next = left ^ f;
    left = right;
    right = next;
  }
  return (left << half_bits) | right;
}

// ---- file reading ----

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};
using File = std::unique_ptr<std::FILE, FileCloser>;

Result<File> OpenForRead(const std::string& path) {
  File f(std::fopen(path.c_str(), "rb"));
  if (!f) return IoError(fmt::format("{}: cannot open: {}", path, std::strerror(errno)));
  return f;
}

int32_t LoadLe32(const unsigned char* p) {
  return static_cast<int32_t>(static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
                              static_cast<uint32_t>(p[2]) << 16 |
                              static_cast<uint32_t>(p[3]) << 24);
}

// Appends the bytes of a text file, one token per byte.
Status AppendText(const std::string& path, int vocab_size, std::vector<uint16_t>* tokens) {
  ASSIGN_OR_RETURN(File f, OpenForRead(path));
  if (std::fseek(f.get(), 0, SEEK_END) == 0) {
    const long size = std::ftell(f.get());
    if (size > 0) tokens->reserve(tokens->size() + static_cast<size_t>(size));
  }
  std::rewind(f.get());
  unsigned char buf[1 << 16];
  int64_t offset = 0;
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f.get())) > 0) {
    for (size_t i = 0; i < n; ++i) {
      if (buf[i] >= vocab_size) {
        return InvalidArgument(
            fmt::format("{}: byte {} at offset {} is outside model.vocab_size={}; text data needs "
                        "vocab_size >= 256",
                        path, buf[i], offset + static_cast<int64_t>(i), vocab_size));
      }
      tokens->push_back(buf[i]);
    }
    offset += static_cast<int64_t>(n);
  }
  if (std::ferror(f.get())) return IoError(fmt::format("{}: read error", path));
  return Status::Ok();
}

// Appends the tokens of an llm.c shard after checking its header against the file size.
Status AppendLlmc(const std::string& path, int vocab_size, std::vector<uint16_t>* tokens) {
  ASSIGN_OR_RETURN(File f, OpenForRead(path));
  if (std::fseek(f.get(), 0, SEEK_END) != 0) return IoError(fmt::format("{}: cannot seek", path));
  const long size = std::ftell(f.get());
  std::rewind(f.get());
  if (size < 0) return IoError(fmt::format("{}: cannot determine the file size", path));
  if (static_cast<size_t>(size) < kLlmcHeaderBytes) {
    return InvalidArgument(fmt::format(
        "{}: {} bytes is shorter than the 1024-byte llmc header; not an llm.c token shard "
        "(set data.format: text for plain text)",
        path, size));
  }
  unsigned char header[kLlmcHeaderBytes];
  if (std::fread(header, 1, sizeof(header), f.get()) != sizeof(header)) {
    return IoError(fmt::format("{}: cannot read the llmc header", path));
  }
  const int32_t magic = LoadLe32(header);
  const int32_t version = LoadLe32(header + 4);
  const int32_t count = LoadLe32(header + 8);
  if (magic != kLlmcMagic) {
    return InvalidArgument(fmt::format(
        "{}: bad llmc magic {} (expected {}); not an llm.c token shard (set data.format: text "
        "for plain text)",
        path, magic, kLlmcMagic));
  }
  if (version != kLlmcVersion) {
    return InvalidArgument(
        fmt::format("{}: unsupported llmc version {} (expected {}: uint16 tokens)", path, version,
                    kLlmcVersion));
  }
  const int64_t expected_size =
      static_cast<int64_t>(kLlmcHeaderBytes) + 2 * static_cast<int64_t>(count);
  if (count < 0 || expected_size != size) {
    return InvalidArgument(fmt::format(
        "{}: header says {} tokens ({} bytes with the header) but the file has {} bytes; the "
        "shard is truncated or corrupt",
        path, count, expected_size, size));
  }
  const size_t base = tokens->size();
  tokens->resize(base + static_cast<size_t>(count));
  std::vector<unsigned char> buf(1 << 16);
  size_t done = 0;
  while (done < static_cast<size_t>(count)) {
    const size_t want = std::min(buf.size() / 2, static_cast<size_t>(count) - done);
    if (std::fread(buf.data(), 2, want, f.get()) != want) {
      return IoError(fmt::format("{}: read error after {} tokens", path, done));
    }
    for (size_t i = 0; i < want; ++i) {
      const uint16_t token = static_cast<uint16_t>(buf[2 * i] | buf[2 * i + 1] << 8);
      if (token >= vocab_size) {
        return InvalidArgument(fmt::format(
            "{}: token {} at position {} is >= model.vocab_size={}; raise vocab_size to the "
            "tokenizer's size",
            path, token, done + i, vocab_size));
      }
      (*tokens)[base + done + i] = token;
    }
    done += want;
  }
  return Status::Ok();
}

Result<std::vector<uint16_t>> LoadSplit(const std::string& field, const std::string& pattern,
                                        const std::string& format, int vocab_size) {
  ASSIGN_OR_RETURN(std::vector<std::string> files, spec::MatchDataFiles(field, pattern));
  std::vector<uint16_t> tokens;
  for (const std::string& file : files) {
    RETURN_IF_ERROR(format == "llmc" ? AppendLlmc(file, vocab_size, &tokens)
                                     : AppendText(file, vocab_size, &tokens));
  }
  return tokens;
}

void CopySample(const std::vector<uint16_t>& tokens, int64_t sample, int seq_len, int32_t* inputs,
                int32_t* targets) {
  const uint16_t* src = tokens.data() + sample * seq_len;
  for (int t = 0; t < seq_len; ++t) {
    inputs[t] = src[t];
    targets[t] = src[t + 1];
  }
}

}  // namespace

uint64_t PermuteIndex(uint64_t seed, uint64_t epoch, uint64_t index, uint64_t n) {
  CHECK_MSG(n > 0 && index < n, "PermuteIndex needs index < n");
  if (n == 1) return 0;
  // Smallest even bit count 2h with 2^(2h) >= n, so each half has h bits.
  int bits = std::bit_width(n - 1);
  if (bits % 2) ++bits;
  const int half_bits = bits / 2;
  uint64_t keys[kFeistelRounds];
  const uint64_t base = Mix64(seed ^ 0x5374726174614461ULL) ^ Mix64(epoch + 0x9e3779b97f4a7c15ULL);
  for (int r = 0; r < kFeistelRounds; ++r) {
    keys[r] = Mix64(base + 0x9e3779b97f4a7c15ULL * static_cast<uint64_t>(r + 1));
  }
  // Cycle walking: the domain is < 4n, so on average fewer than 4 passes land inside [0, n).
  uint64_t x = index;
  do {
    x = FeistelEncrypt(x, half_bits, keys);
  } while (x >= n);
  return x;
}

Result<Dataset> Dataset::Open(const proto::DataSpec& data, int vocab_size, int seq_len) {
  if (seq_len <= 0) {
    return InvalidArgument(fmt::format("model.seq_len: must be positive, got {}", seq_len));
  }
  if (vocab_size <= 0 || vocab_size > 65536) {
    return InvalidArgument(
        fmt::format("model.vocab_size: {} is outside [1, 65536] (uint16 tokens)", vocab_size));
  }
  if (data.format() != "text" && data.format() != "llmc") {
    return InvalidArgument(
        fmt::format("data.format: unknown format '{}'; use text or llmc", data.format()));
  }
  Dataset ds;
  ds.seq_len_ = seq_len;
  ASSIGN_OR_RETURN(ds.train_, LoadSplit("data.train", data.train(), data.format(), vocab_size));
  const size_t need = static_cast<size_t>(seq_len) + 1;
  if (!data.val().empty()) {
    ASSIGN_OR_RETURN(ds.val_, LoadSplit("data.val", data.val(), data.format(), vocab_size));
    if (ds.val_.size() < need) {
      return InvalidArgument(fmt::format(
          "data.val: '{}' holds {} tokens, fewer than seq_len+1={}; add validation data or "
          "lower model.seq_len",
          data.val(), ds.val_.size(), need));
    }
  } else {
    const size_t total = ds.train_.size();
    const size_t held = static_cast<size_t>(static_cast<double>(total) * data.val_fraction());
    if (held < need || total - held < need) {
      return InvalidArgument(fmt::format(
          "data.val_fraction: holding out {} of the {} tokens of '{}' leaves {} for validation "
          "and {} for training, but each split needs at least seq_len+1={}; add data, set "
          "data.val, adjust data.val_fraction or lower model.seq_len",
          data.val_fraction(), total, data.train(), held, total - held, need));
    }
    ds.val_.assign(ds.train_.end() - static_cast<std::ptrdiff_t>(held), ds.train_.end());
    ds.train_.resize(total - held);
    ds.train_.shrink_to_fit();
  }
  if (ds.train_.size() < need) {
    return InvalidArgument(
        fmt::format("data.train: '{}' holds {} tokens, fewer than seq_len+1={}; add data or lower "
                    "model.seq_len",
                    data.train(), ds.train_.size(), need));
  }
  return ds;
}

int64_t Dataset::train_samples() const {
  return train_.empty() ? 0 : (static_cast<int64_t>(train_.size()) - 1) / seq_len_;
}

int64_t Dataset::val_samples() const {
  return val_.empty() ? 0 : (static_cast<int64_t>(val_.size()) - 1) / seq_len_;
}

void Dataset::TrainBatch(uint64_t seed, int64_t first, int count, int32_t* inputs,
                         int32_t* targets) const {
  CHECK(first >= 0 && count >= 0);
  const uint64_t per_epoch = static_cast<uint64_t>(train_samples());
  CHECK(per_epoch > 0);
  for (int i = 0; i < count; ++i) {
    const uint64_t g = static_cast<uint64_t>(first) + static_cast<uint64_t>(i);
    const uint64_t sample = PermuteIndex(seed, g / per_epoch, g % per_epoch, per_epoch);
    const size_t offset = static_cast<size_t>(i) * static_cast<size_t>(seq_len_);
    CopySample(train_, static_cast<int64_t>(sample), seq_len_, inputs + offset, targets + offset);
  }
}

void Dataset::ValBatch(int64_t first, int count, int32_t* inputs, int32_t* targets) const {
  CHECK(count >= 0);
  const int64_t n = val_samples();
  CHECK(n > 0);
  for (int i = 0; i < count; ++i) {
    const int64_t sample = ((first + i) % n + n) % n;
    const size_t offset = static_cast<size_t>(i) * static_cast<size_t>(seq_len_);
    CopySample(val_, sample, seq_len_, inputs + offset, targets + offset);
  }
}

Status WriteLlmcShard(const std::string& path, const std::vector<uint16_t>& tokens) {
  if (tokens.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    return InvalidArgument(
        fmt::format("{}: {} tokens exceed the int32 count of the llmc header; split into shards",
                    path, tokens.size()));
  }
  std::vector<unsigned char> bytes(kLlmcHeaderBytes + 2 * tokens.size(), 0);
  const uint32_t header[3] = {static_cast<uint32_t>(kLlmcMagic),
                              static_cast<uint32_t>(kLlmcVersion),
                              static_cast<uint32_t>(tokens.size())};
  for (int i = 0; i < 3; ++i) {
    for (int b = 0; b < 4; ++b) bytes[4 * i + b] = static_cast<unsigned char>(header[i] >> (8 * b));
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    bytes[kLlmcHeaderBytes + 2 * i] = static_cast<unsigned char>(tokens[i] & 0xff);
    bytes[kLlmcHeaderBytes + 2 * i + 1] = static_cast<unsigned char>(tokens[i] >> 8);
  }
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr)
    return IoError(fmt::format("{}: cannot create: {}", path, std::strerror(errno)));
  const bool wrote = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  const int write_errno = errno;
  if (std::fclose(f) != 0 || !wrote) {
    return IoError(
        fmt::format("{}: write failed: {}", path, std::strerror(wrote ? errno : write_errno)));
  }
  return Status::Ok();
}

}  // namespace strata::worker
