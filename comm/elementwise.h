// Element-wise helpers shared by the comm backends (private to comm/): names for messages,
// the reduction kernels, and the bf16/f16 <-> fp32 conversions used to "reduce in fp32 and
// round once". Every backend reduces through these, so a sum means the same thing everywhere.
#pragma once

#include <cstddef>
#include <cstdint>

#include "comm/process_group.h"

namespace strata::comm::internal {

const char* ElemTypeName(ElemType t);   // "f32", "bf16", ...
const char* ReduceOpName(ReduceOp op);  // "sum", "avg", "max"

// bf16 and f16 travel as 16-bit patterns and are reduced in fp32.
inline bool IsHalf(ElemType t) { return t == ElemType::kBF16 || t == ElemType::kF16; }

// out[i] = a[i] (op) b[i] for i < count; kAvg combines as kSum (divide once at the end with
// DivideBy). out may alias a or b. Not for bf16/f16: convert to fp32 first.
void Combine(void* out, const void* a, const void* b, size_t count, ElemType t, ReduceOp op);

// buf[i] /= n (integers: truncating division). Not for bf16/f16.
void DivideBy(void* buf, size_t count, ElemType t, int n);

// dst and src must not overlap. Round to nearest even on the way down; NaN stays NaN.
void HalfToFloat(float* dst, const void* src, size_t count, ElemType t);
void FloatToHalf(void* dst, const float* src, size_t count, ElemType t);

float Bf16BitsToFloat(uint16_t h);
uint16_t FloatToBf16Bits(float f);
float F16BitsToFloat(uint16_t h);
uint16_t FloatToF16Bits(float f);

}  // namespace strata::comm::internal
