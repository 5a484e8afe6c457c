#include "model/dtype.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace strata::model {

size_t DTypeSize(DType t) { return t == DType::kF32 ? 4 : 2; }

const char* DTypeName(DType t) {
  switch (t) {
    case DType::kF32:
      return "fp32";
    case DType::kBF16:
      return "bf16";
    case DType::kF16:
      return "fp16";
  }
  return "?";
}

Result<DType> ParseDType(const std::string& name) {
  if (name == "fp32" || name == "f32") return DType::kF32;
  if (name == "bf16") return DType::kBF16;
  if (name == "fp16" || name == "f16") return DType::kF16;
  return InvalidArgument("precision '" + name + "' is not one of fp32, bf16, fp16");
}

float HalfBitsToFloat(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return BitsToFloat(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp == 0) {
    if (mant == 0) return BitsToFloat(sign);
    // subnormal: value = mant * 2^-24
    float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return BitsToFloat(sign | ((exp + 112u) << 23) | (mant << 13));
#endif
}

uint16_t FloatToHalfBits(float f) {
#if defined(__F16C__)
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  const uint32_t u = FloatToBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // overflow (>= 65520) -> inf
  if (a < 0x38800000u) {                        // subnormal or zero in f16
    // value / 2^-24 rounded to nearest even
    float v = BitsToFloat(a) * 16777216.0f;
    uint32_t r = static_cast<uint32_t>(v);
    float frac = v - static_cast<float>(r);
    if (frac > 0.5f || (frac == 0.5f && (r & 1u))) ++r;
    return sign | static_cast<uint16_t>(r);
  }
  uint32_t m = a - 0x38000000u;  // rebias exponent 127 -> 15
  m += 0xfffu + ((m >> 13) & 1u);
  return sign | static_cast<uint16_t>(m >> 13);
#endif
}

template <typename T>
void ConvertToFloat(float* dst, const T* src, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = ToFloat(src[i]);
}
template <typename T>
void ConvertFromFloat(T* dst, const float* src, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = FromFloat<T>(src[i]);
}

#if defined(__F16C__)
template <>
void ConvertToFloat<f16>(float* dst, const f16* src, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = ToFloat(src[i]);
}
template <>
void ConvertFromFloat<f16>(f16* dst, const float* src, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = FromFloat<f16>(src[i]);
}
#endif

template void ConvertToFloat<float>(float*, const float*, size_t);
template void ConvertToFloat<bf16>(float*, const bf16*, size_t);
template void ConvertFromFloat<float>(float*, const float*, size_t);
template void ConvertFromFloat<bf16>(bf16*, const float*, size_t);
#if !defined(__F16C__)
template void ConvertToFloat<f16>(float*, const f16*, size_t);
template void ConvertFromFloat<f16>(f16*, const float*, size_t);
#endif

}  // namespace strata::model
