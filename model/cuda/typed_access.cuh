// Private helpers for the CUDA kernels (.cu files in model/cuda): the compute type T as a CUDA
// type, fp32 <-> T conversions, vector loads/stores of N consecutive elements, warp sums, and the
// launchers' shared argument checks (launch-status / CUDA-error helpers: cuda_status.h). Not a
// public header: it includes CUDA headers and is included only from .cu files.
//
// Two sets of conversions, both round to nearest even and agree on every non-NaN value:
// - ToF / FromF on the CUDA types (__nv_bfloat16, __half): the hardware cvt instructions, used
//   by the hot kernels (elementwise, layernorm, embedding, attention). A NaN comes out as the
//   hardware's NaN, whose payload need not match the CPU's.
// - DevToFloat / DevFromFloat on model::bf16 / f16 (and the raw-bit forms FloatToBf16Bits /
//   FloatToHalfBitsDev): the bit operations of model/dtype.h (FloatToBf16, the software
//   FloatToHalfBits), bit-identical with the CPU for every non-NaN value. NaN stays NaN: bf16
//   keeps the upper payload bits (as FloatToBf16); fp16 keeps the sign and the top payload bits
//   and sets the quiet bit, as F16C (vcvtps2ph / vcvtph2ps, which the CPU build uses on x86) —
//   checked against F16C for all 2^32 floats and all 2^16 halves. The CPU's software fallback
//   (no F16C) differs only in NaN payloads. Used where the GPU must reproduce the CPU's bits
//   (casts of the master weights, AdamW's compute copy, softmax-xent).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "common/status.h"
#include "model/cuda/cuda_status.h"
#include "model/dtype.h"

namespace strata::model::cuda_util {

// ---- host side ------------------------------------------------------------------------------

// Calls f(TypeTag<T>{}) with T = float, __nv_bfloat16 or __half for `dtype` (model::bf16 / f16
// have the same size and bit layout as the CUDA types).
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
Status DispatchDType(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::kF32:
      return f(TypeTag<float>{});
    case DType::kBF16:
      return f(TypeTag<__nv_bfloat16>{});
    case DType::kF16:
      return f(TypeTag<__half>{});
  }
  return InvalidArgument(std::string(op) + ": unknown dtype");
}

inline bool Aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

inline Status NegativeSize(const char* op, const char* name, int64_t v) {
  return InvalidArgument(std::string(op) + ": " + name + " = " + std::to_string(v) + " < 0");
}

inline Status NullPointer(const char* op) {
  return InvalidArgument(std::string(op) + ": null device pointer");
}

// The checks of a launcher over n elements: n >= 0, and `ptrs_ok` (no pointer is null) when
// n > 0.
inline Status CheckCount(const char* op, int64_t n, bool ptrs_ok) {
  if (n < 0) return NegativeSize(op, "n", n);
  if (n > 0 && !ptrs_ok) return NullPointer(op);
  return Status::Ok();
}

// ---- device side ----------------------------------------------------------------------------

__device__ __forceinline__ float ToF(float x) { return x; }
__device__ __forceinline__ float ToF(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float ToF(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T FromF(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    static_assert(std::is_same_v<T, __half>);
    return __float2half_rn(x);
  }
}

// Element <-> raw bits (fp32: 32 bits; 16-bit types: the low 16 bits of a word).
__device__ __forceinline__ uint32_t ToBits(float x) { return __float_as_uint(x); }
__device__ __forceinline__ uint32_t ToBits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
__device__ __forceinline__ uint32_t ToBits(__half x) { return __half_as_ushort(x); }

template <typename T>
__device__ __forceinline__ T FromBits(uint32_t u) {
  if constexpr (std::is_same_v<T, float>) {
    return __uint_as_float(u);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __ushort_as_bfloat16(static_cast<unsigned short>(u));
  } else {
    return __ushort_as_half(static_cast<unsigned short>(u));
  }
}

// Bytes per access when moving N elements of T: up to 16 (one vector instruction per chunk).
template <int N, typename T>
constexpr int ChunkBytes() {
  return N * sizeof(T) >= 16 ? 16 : static_cast<int>(N * sizeof(T));
}

// One load / store of kBytes (4, 8 or 16) bytes as 32-bit words, kept in registers (no address
// of a local is taken, so nothing goes to the stack).
template <int kBytes>
__device__ __forceinline__ void LoadWords(const void* p, uint32_t (&w)[kBytes / 4]) {
  if constexpr (kBytes == 16) {
    const int4 r = *static_cast<const int4*>(p);
    w[0] = r.x, w[1] = r.y, w[2] = r.z, w[3] = r.w;
  } else if constexpr (kBytes == 8) {
    const uint2 r = *static_cast<const uint2*>(p);
    w[0] = r.x, w[1] = r.y;
  } else {
    static_assert(kBytes == 4);
    w[0] = *static_cast<const uint32_t*>(p);
  }
}

template <int kBytes>
__device__ __forceinline__ void StoreWords(void* p, const uint32_t (&w)[kBytes / 4]) {
  if constexpr (kBytes == 16) {
    *static_cast<int4*>(p) = make_int4(w[0], w[1], w[2], w[3]);
  } else if constexpr (kBytes == 8) {
    *static_cast<uint2*>(p) = make_uint2(w[0], w[1]);
  } else {
    static_assert(kBytes == 4);
    *static_cast<uint32_t*>(p) = w[0];
  }
}

// f[0..N) = T -> fp32 of p[0..N). For N > 1, p must be aligned to ChunkBytes<N, T>() bytes (the
// launchers check the base pointers and choose N so that every index used is a multiple of N).
template <int N, typename T>
__device__ __forceinline__ void LoadVec(const T* p, float (&f)[N]) {
  if constexpr (N == 1) {
    f[0] = ToF(p[0]);
  } else {
    constexpr int kBytes = ChunkBytes<N, T>();
    constexpr int kPer = kBytes / static_cast<int>(sizeof(T));
    constexpr int kPerWord = 4 / static_cast<int>(sizeof(T));  // 1 or 2
    static_assert(N % kPer == 0, "N elements must fill whole chunks");
#pragma unroll
    for (int k = 0; k < N / kPer; ++k) {
      uint32_t w[kBytes / 4];
      LoadWords<kBytes>(p + k * kPer, w);
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        // Little-endian: the element at the lower address is in the low half of its word.
        const uint32_t bits = w[i / kPerWord] >> (32 / kPerWord * (i % kPerWord));
        f[k * kPer + i] = ToF(FromBits<T>(bits));
      }
    }
  }
}

// p[0..N) = T(f[0..N)), same alignment rule as LoadVec.
template <int N, typename T>
__device__ __forceinline__ void StoreVec(T* p, const float (&f)[N]) {
  if constexpr (N == 1) {
    p[0] = FromF<T>(f[0]);
  } else {
    constexpr int kBytes = ChunkBytes<N, T>();
    constexpr int kPer = kBytes / static_cast<int>(sizeof(T));
    constexpr int kPerWord = 4 / static_cast<int>(sizeof(T));
    static_assert(N % kPer == 0, "N elements must fill whole chunks");
#pragma unroll
    for (int k = 0; k < N / kPer; ++k) {
      uint32_t w[kBytes / 4] = {};
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        w[i / kPerWord] |= ToBits(FromF<T>(f[k * kPer + i])) << (32 / kPerWord * (i % kPerWord));
      }
      StoreWords<kBytes>(p + k * kPer, w);
    }
  }
}

// Butterfly sum over the 32 lanes. Every lane ends with the same bits: at each level the two
// partners add the same pair of values (addition commutes exactly), so the result is a fixed
// tree over lanes whatever the data.
__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// ---- device side, bit-exact with model/dtype.h (see the file comment) ------------------------

__device__ __forceinline__ uint16_t FloatToBf16Bits(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

// Round to nearest even, overflow to inf, subnormals — the software FloatToHalfBits; a NaN keeps
// its sign and top payload bits and is made quiet, as F16C's vcvtps2ph.
__device__ __forceinline__ uint16_t FloatToHalfBitsDev(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (a < 0x38800000u) {
    // fp16 subnormal or zero: value / 2^-24 (exact, < 2^11) rounded to nearest even by the FPU.
    const float scaled = __uint_as_float(a) * 16777216.0f;
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(__float2uint_rn(scaled)));
  }
  uint32_t m = a - 0x38000000u;  // rebias the exponent 127 -> 15
  m += 0xfffu + ((m >> 13) & 1u);
  return static_cast<uint16_t>(sign | static_cast<uint16_t>(m >> 13));
}

__device__ __forceinline__ float DevToFloat(float x) { return x; }
__device__ __forceinline__ float DevToFloat(bf16 x) {
  return __uint_as_float(static_cast<uint32_t>(x.bits) << 16);
}
__device__ __forceinline__ float DevToFloat(f16 x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (e == 0x1fu) {  // inf, or NaN made quiet (as F16C's vcvtph2ps)
    return __uint_as_float(sign | 0x7f800000u | (mant << 13) | (mant ? 0x400000u : 0u));
  }
  if (e == 0) {                                                           // zero, subnormal
    const float val = static_cast<float>(mant) * 5.9604644775390625e-8f;  // exact: mant * 2^-24
    return sign ? -val : val;
  }
  return __uint_as_float(sign | ((e + 112u) << 23) | (mant << 13));
}

template <typename T>
__device__ __forceinline__ T DevFromFloat(float f);
template <>
__device__ __forceinline__ float DevFromFloat<float>(float f) {
  return f;
}
template <>
__device__ __forceinline__ bf16 DevFromFloat<bf16>(float f) {
  return bf16{FloatToBf16Bits(f)};
}
template <>
__device__ __forceinline__ f16 DevFromFloat<f16>(float f) {
  return f16{FloatToHalfBitsDev(f)};
}

}  // namespace strata::model::cuda_util
