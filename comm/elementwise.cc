#include "comm/elementwise.h"

#include <algorithm>
#include <cstring>

namespace strata::comm {

size_t ElemSize(ElemType t) {
  switch (t) {
    case ElemType::kF32:
    case ElemType::kI32:
      return 4;
    case ElemType::kF64:
    case ElemType::kI64:
      return 8;
    case ElemType::kU8:
      return 1;
    case ElemType::kBF16:
    case ElemType::kF16:
      return 2;
  }
  return 0;
}

namespace internal {

const char* ElemTypeName(ElemType t) {
  switch (t) {
    case ElemType::kF32:
      return "f32";
    case ElemType::kF64:
      return "f64";
    case ElemType::kI32:
      return "i32";
    case ElemType::kI64:
      return "i64";
    case ElemType::kU8:
      return "u8";
    case ElemType::kBF16:
      return "bf16";
    case ElemType::kF16:
      return "f16";
  }
  return "?";
}

const char* ReduceOpName(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return "sum";
    case ReduceOp::kAvg:
      return "avg";
    case ReduceOp::kMax:
      return "max";
  }
  return "?";
}

namespace {

template <typename T>
void CombineT(void* out_v, const void* a_v, const void* b_v, size_t n, ReduceOp op) {
  T* out = static_cast<T*>(out_v);
  const T* a = static_cast<const T*>(a_v);
  const T* b = static_cast<const T*>(b_v);
  if (op == ReduceOp::kMax) {
    for (size_t i = 0; i < n; ++i) out[i] = std::max(a[i], b[i]);
  } else {
    // u8 sums wrap modulo 256, as in MPI.
    for (size_t i = 0; i < n; ++i) out[i] = static_cast<T>(a[i] + b[i]);
  }
}

template <typename T>
void DivideT(void* buf_v, size_t n, int d) {
  T* buf = static_cast<T*>(buf_v);
  const T div = static_cast<T>(d);
  for (size_t i = 0; i < n; ++i) buf[i] = static_cast<T>(buf[i] / div);
}

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace

void Combine(void* out, const void* a, const void* b, size_t count, ElemType t, ReduceOp op) {
  switch (t) {
    case ElemType::kF32:
      return CombineT<float>(out, a, b, count, op);
    case ElemType::kF64:
      return CombineT<double>(out, a, b, count, op);
    case ElemType::kI32:
      return CombineT<int32_t>(out, a, b, count, op);
    case ElemType::kI64:
      return CombineT<int64_t>(out, a, b, count, op);
    case ElemType::kU8:
      return CombineT<uint8_t>(out, a, b, count, op);
    case ElemType::kBF16:
    case ElemType::kF16:
      CHECK_MSG(false, "Combine: convert bf16/f16 to f32 first");
  }
}

void DivideBy(void* buf, size_t count, ElemType t, int n) {
  if (n == 1) return;
  switch (t) {
    case ElemType::kF32:
      return DivideT<float>(buf, count, n);
    case ElemType::kF64:
      return DivideT<double>(buf, count, n);
    case ElemType::kI32:
      return DivideT<int32_t>(buf, count, n);
    case ElemType::kI64:
      return DivideT<int64_t>(buf, count, n);
    case ElemType::kU8:
      return DivideT<uint8_t>(buf, count, n);
    case ElemType::kBF16:
    case ElemType::kF16:
      CHECK_MSG(false, "DivideBy: convert bf16/f16 to f32 first");
  }
}

float Bf16BitsToFloat(uint16_t h) { return FromBits(static_cast<uint32_t>(h) << 16); }

uint16_t FloatToBf16Bits(float f) {
  uint32_t u = Bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

float F16BitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return FromBits(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp == 0) {
    if (mant == 0) return FromBits(sign);
    // Subnormal: value = mant * 2^-24.
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return FromBits(sign | ((exp + 112) << 23) | (mant << 13));
}

uint16_t FloatToF16Bits(float f) {
  const uint32_t u = Bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero) in f16: quantum 2^-24; the fp32 add rounds to nearest
    // even for us (0.5 is exact in the sum's ulp at this magnitude).
    const float a = FromBits(abs);
    const float shifted = a + 0.5f;  // 0.5 = 2^-1; ulp of values in [0.5, 1) is 2^-24
    const uint32_t m = Bits(shifted) - Bits(0.5f);
    return static_cast<uint16_t>(sign | m);
  }
  // Normal: rebias the exponent and round the mantissa to 10 bits, nearest even.
  uint32_t v = abs - 0x38000000u;  // exponent bias 127 -> 15
  v += 0xfffu + ((v >> 13) & 1u);
  return static_cast<uint16_t>(sign | (v >> 13));
}

void HalfToFloat(float* dst, const void* src, size_t count, ElemType t) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  if (t == ElemType::kBF16) {
    for (size_t i = 0; i < count; ++i) dst[i] = Bf16BitsToFloat(s[i]);
  } else {
    for (size_t i = 0; i < count; ++i) dst[i] = F16BitsToFloat(s[i]);
  }
}

void FloatToHalf(void* dst, const float* src, size_t count, ElemType t) {
  uint16_t* d = static_cast<uint16_t*>(dst);
  if (t == ElemType::kBF16) {
    for (size_t i = 0; i < count; ++i) d[i] = FloatToBf16Bits(src[i]);
  } else {
    for (size_t i = 0; i < count; ++i) d[i] = FloatToF16Bits(src[i]);
  }
}

}  // namespace internal
}  // namespace strata::comm
