// The safetensors file format (https://github.com/huggingface/safetensors), data only:
//
//   [8 bytes: N, little-endian u64] [N bytes: JSON header] [data]
//   header: {"<name>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
//            "__metadata__": {"<key>": "<value>", ...}}   (metadata optional, strings only)
//
// Offsets are relative to the start of the data; the tensors cover the data exactly (no holes,
// no overlap), each tensor row-major little-endian. Only F32, BF16 and F16 are supported.
//
// The reader trusts nothing in the file: every size, offset and shape is checked against the
// limits and the actual file before any allocation that depends on it, so a corrupt or hostile
// file gives a Status, never a crash or a huge allocation. Nothing in the file is executed
// (unlike pickle-based .bin/.pt checkpoints).
//
// I/O goes straight to POSIX (open/pread/write/fsync/rename): one file written or read whole.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"

namespace strata::checkpoint {

// Element types a safetensors file may hold here. (The checkpoint module keeps its own enum
// rather than model::DType so that it does not depend on strata_model.)
enum class TensorDType { kF32, kBF16, kF16 };

size_t TensorDTypeSize(TensorDType t);       // 4 | 2 | 2
const char* TensorDTypeName(TensorDType t);  // "F32" | "BF16" | "F16" (the safetensors names)

// One tensor to write. The values are always fp32; `dtype` is how they are stored (bf16/f16
// are rounded to nearest even on write).
struct NamedTensor {
  std::string name;
  std::vector<int64_t> shape;  // row-major; {} is a scalar (one element)
  TensorDType dtype = TensorDType::kF32;
  std::vector<float> values;  // product(shape) elements
};

// Writes `tensors` (in this order, contiguous) and `metadata` to `path` atomically: a temporary
// file in the same directory, fsync, rename over `path`, fsync of the directory. On success
// `path` holds the complete file. On failure `path` is untouched (an older file stays intact),
// the temporary file is removed, and the error is INVALID_ARGUMENT (naming the tensor) for a
// bad tensor (empty, duplicate or reserved name, negative dimension, values that do not match
// the shape, invalid UTF-8) or IO_ERROR (with errno text) for a failed write.
Status WriteSafetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                        const std::map<std::string, std::string>& metadata = {});

// Bounds on what ReadSafetensors accepts before reading the bytes in.
struct SafetensorsLimits {
  uint64_t max_header_bytes = 100'000'000;  // as the reference implementation
  uint64_t max_file_bytes = uint64_t{64} << 30;
};

// One tensor of a file that has been read: where its bytes are in the data section.
struct SafetensorsEntry {
  std::string name;
  TensorDType dtype = TensorDType::kF32;
  std::vector<int64_t> shape;
  int64_t numel = 0;
  uint64_t begin = 0;  // data_offsets, relative to the data section
  uint64_t end = 0;
};

// A whole safetensors file in memory, validated. Copies are deep (they copy the data).
class SafetensorsFile {
 public:
  const std::string& path() const { return path_; }
  // Every tensor, in the order of their data (by offset).
  const std::vector<SafetensorsEntry>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // nullptr when there is no tensor of that name.
  const SafetensorsEntry* Find(const std::string& name) const;
  // The raw little-endian bytes of `e` (an entry of this file).
  std::span<const uint8_t> Bytes(const SafetensorsEntry& e) const;
  // The values of `e` (an entry of this file) converted to fp32 (exactly: every bf16/f16 value
  // is representable).
  std::vector<float> ToFloat(const SafetensorsEntry& e) const;

 private:
  friend Result<SafetensorsFile> ReadSafetensors(const std::string& path,
                                                 const SafetensorsLimits& limits);
  std::string path_;
  std::vector<SafetensorsEntry> tensors_;
  std::map<std::string, size_t> index_;  // name -> position in tensors_
  std::map<std::string, std::string> metadata_;
  std::vector<uint8_t> data_;  // the data section
};

// Reads and validates the whole file at `path`. Errors (each message names the file and, where
// there is one, the tensor):
//   NOT_FOUND / IO_ERROR   the file cannot be opened / read;
//   DATA_LOSS              the file is truncated: shorter than 8 bytes, than its header length
//                          says, or than the end of a tensor's data;
//   INVALID_ARGUMENT       header or file over the limits; header that is not UTF-8 JSON of the
//                          layout above (unknown or missing fields, duplicate names, metadata
//                          values that are not strings); unsupported dtype; a shape whose byte
//                          size differs from its data_offsets span; offsets that overlap,
//                          leave a hole or are reversed; bytes after the last tensor.
Result<SafetensorsFile> ReadSafetensors(const std::string& path,
                                        const SafetensorsLimits& limits = {});

}  // namespace strata::checkpoint
