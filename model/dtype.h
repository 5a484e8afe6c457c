// Element types: f32, bf16, f16. Low-precision values are stored as their bit patterns; all
// arithmetic is done in f32 after conversion (round-to-nearest-even on the way down).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "common/status.h"

namespace strata::model {

enum class DType { kF32, kBF16, kF16 };

struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

size_t DTypeSize(DType t);
const char* DTypeName(DType t);  // "fp32" | "bf16" | "fp16"
// Accepts fp32|f32, bf16, fp16|f16. INVALID_ARGUMENT otherwise.
Result<DType> ParseDType(const std::string& name);

template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr DType value = DType::kF32;
};
template <>
struct DTypeOf<bf16> {
  static constexpr DType value = DType::kBF16;
};
template <>
struct DTypeOf<f16> {
  static constexpr DType value = DType::kF16;
};

inline float BitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t FloatToBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float ToFloat(float x) { return x; }
inline float ToFloat(bf16 x) { return BitsToFloat(static_cast<uint32_t>(x.bits) << 16); }
float HalfBitsToFloat(uint16_t h);
inline float ToFloat(f16 x) { return HalfBitsToFloat(x.bits); }

inline bf16 FloatToBf16(float f) {
  uint32_t u = FloatToBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16{static_cast<uint16_t>(u >> 16)};
}
uint16_t FloatToHalfBits(float f);

template <typename T>
inline T FromFloat(float f);
template <>
inline float FromFloat<float>(float f) {
  return f;
}
template <>
inline bf16 FromFloat<bf16>(float f) {
  return FloatToBf16(f);
}
template <>
inline f16 FromFloat<f16>(float f) {
  return f16{FloatToHalfBits(f)};
}

// Bulk conversions (vectorised where the CPU allows). dst and src must not overlap.
template <typename T>
void ConvertToFloat(float* dst, const T* src, size_t n);
template <typename T>
void ConvertFromFloat(T* dst, const float* src, size_t n);

}  // namespace strata::model
