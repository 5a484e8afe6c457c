// CUDA fused AdamW; contract in adamw_cuda.h, CPU reference AdamW::Update (model/optimizer.cc).
//
// Same order of operations as the CPU, term for term:
//   bc1 = 1 - b1^step, bc2 = 1 - b2^step (float std::pow, computed here on the host exactly as the
//   CPU does), step_size = lr / bc1, bc2_sqrt = sqrt(bc2), decay_factor = 1 - lr * wd;
//   p = params[i]; if decay[i]: p *= decay_factor
//   m = b1 * m + (1 - b1) * g;  v = b2 * v + ((1 - b2) * g) * g
//   params[i] = p - (step_size * m) / (sqrt(v) / bc2_sqrt + eps)
// with g = grads[i] * grad_scale (what the CPU path gets from Scale() before Update: one float
// multiply, exact when grad_scale == 1). Every operation is an explicitly rounded intrinsic
// (__fmul_rn, ...), so nvcc cannot fuse a multiply-add; the CPU build (-march=native, GCC's
// default -ffp-contract=fast) may fuse some, which is where the ~1 ulp differences come from.
//
// Elementwise, so deterministic. Chunks of 4 elements: float4 / uchar4 / 8- or 16-byte compute
// stores when every pointer is aligned for them (a ZeRO-1 shard may start anywhere), else scalar
// accesses; the arithmetic is the same either way.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "common/status.h"
#include "model/cuda/adamw_cuda.h"
#include "model/cuda/typed_access.cuh"

namespace strata::model {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 4;
constexpr int64_t kMaxBlocks = 1 << 14;

struct AdamWConsts {
  float b1, b2, one_minus_b1, one_minus_b2;
  float step_size, bc2_sqrt, decay_factor, eps, grad_scale;
};

// bf16 / fp16 rounding, bit-exact with model/dtype.h's FloatToBf16 / FloatToHalfBits for every
// non-NaN value (NaN: see typed_access.cuh).
using cuda_util::Aligned;
using cuda_util::FloatToBf16Bits;
using cuda_util::FloatToHalfBitsDev;

// Compute-copy element types: 0 none, 1 fp32, 2 bf16, 3 fp16.
enum ComputeKind { kNone = 0, kCopyF32 = 1, kCopyBF16 = 2, kCopyF16 = 3 };

__device__ __forceinline__ float AdamWElement(float p, float graw, float& m, float& v,
                                              uint8_t decay, const AdamWConsts& c) {
  const float g = __fmul_rn(graw, c.grad_scale);
  if (decay) p = __fmul_rn(p, c.decay_factor);
  const float mi = __fadd_rn(__fmul_rn(c.b1, m), __fmul_rn(c.one_minus_b1, g));
  const float vi = __fadd_rn(__fmul_rn(c.b2, v), __fmul_rn(__fmul_rn(c.one_minus_b2, g), g));
  m = mi;
  v = vi;
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), c.bc2_sqrt), c.eps);
  return __fsub_rn(p, __fdiv_rn(__fmul_rn(c.step_size, mi), denom));
}

template <int kCompute>
__device__ __forceinline__ void StoreCompute(void* compute, int64_t i, float p) {
  if constexpr (kCompute == kCopyF32) {
    static_cast<float*>(compute)[i] = p;
  } else if constexpr (kCompute == kCopyBF16) {
    static_cast<uint16_t*>(compute)[i] = FloatToBf16Bits(p);
  } else if constexpr (kCompute == kCopyF16) {
    static_cast<uint16_t*>(compute)[i] = FloatToHalfBitsDev(p);
  }
}

struct alignas(8) Half4 {
  uint16_t v[4];
};

template <int kCompute>
__global__ void AdamWKernel(float* __restrict__ params, const float* __restrict__ grads,
                            float* __restrict__ m, float* __restrict__ v,
                            const uint8_t* __restrict__ decay, void* __restrict__ compute,
                            AdamWConsts c, int64_t n, bool aligned) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t ch = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; ch < chunks;
       ch += stride) {
    const int64_t i = ch * kChunk;
    if (aligned && i + kChunk <= n) {
      float4 p = reinterpret_cast<const float4*>(params)[ch];
      const float4 g = reinterpret_cast<const float4*>(grads)[ch];
      float4 mm = reinterpret_cast<const float4*>(m)[ch];
      float4 vv = reinterpret_cast<const float4*>(v)[ch];
      const uchar4 d = reinterpret_cast<const uchar4*>(decay)[ch];
      p.x = AdamWElement(p.x, g.x, mm.x, vv.x, d.x, c);
      p.y = AdamWElement(p.y, g.y, mm.y, vv.y, d.y, c);
      p.z = AdamWElement(p.z, g.z, mm.z, vv.z, d.z, c);
      p.w = AdamWElement(p.w, g.w, mm.w, vv.w, d.w, c);
      reinterpret_cast<float4*>(params)[ch] = p;
      reinterpret_cast<float4*>(m)[ch] = mm;
      reinterpret_cast<float4*>(v)[ch] = vv;
      if constexpr (kCompute == kCopyF32) {
        reinterpret_cast<float4*>(compute)[ch] = p;
      } else if constexpr (kCompute == kCopyBF16 || kCompute == kCopyF16) {
        Half4 h;
        const float ps[kChunk] = {p.x, p.y, p.z, p.w};
#pragma unroll
        for (int e = 0; e < kChunk; ++e) {
          h.v[e] = kCompute == kCopyBF16 ? FloatToBf16Bits(ps[e]) : FloatToHalfBitsDev(ps[e]);
        }
        reinterpret_cast<Half4*>(compute)[ch] = h;
      }
    } else {
      for (int64_t j = i; j < n && j < i + kChunk; ++j) {
        float mj = m[j], vj = v[j];
        const float p = AdamWElement(params[j], grads[j], mj, vj, decay[j], c);
        params[j] = p;
        m[j] = mj;
        v[j] = vj;
        StoreCompute<kCompute>(compute, j, p);
      }
    }
  }
}

// The value of x rounded to float and kept apart from its neighbours: the host compiler may not
// fuse a multiply into the add that follows it (GCC's -ffp-contract=fast would with FMA enabled).
float Unfused(float x) {
  volatile float kept = x;
  return kept;
}

}  // namespace

Status CudaAdamWUpdate(float* params, const float* grads, float* m, float* v, const uint8_t* decay,
                       void* compute, DType compute_dtype, const CudaAdamWArgs& args, int64_t n,
                       void* stream) {
  constexpr const char* kOp = "CudaAdamWUpdate";
  if (n < 0) return cuda_util::NegativeSize(kOp, "n", n);
  if (args.step < 1) {
    return InvalidArgument(std::string(kOp) + ": step = " + std::to_string(args.step) +
                           " (counts from 1)");
  }
  int kind = kNone;
  if (compute != nullptr) {
    switch (compute_dtype) {
      case DType::kF32:
        kind = kCopyF32;
        break;
      case DType::kBF16:
        kind = kCopyBF16;
        break;
      case DType::kF16:
        kind = kCopyF16;
        break;
      default:
        return InvalidArgument(std::string(kOp) + ": unsupported compute dtype");
    }
  }
  if (n == 0) return Status::Ok();
  if (!params || !grads || !m || !v || !decay) return cuda_util::NullPointer(kOp);

  // Host scalars as AdamW::Update computes them, every operation rounded on its own.
  const float b1 = args.beta1, b2 = args.beta2;
  const float bc1 = 1.f - std::pow(b1, static_cast<float>(args.step));
  const float bc2 = 1.f - std::pow(b2, static_cast<float>(args.step));
  AdamWConsts c;
  c.b1 = b1;
  c.b2 = b2;
  c.one_minus_b1 = 1.f - b1;
  c.one_minus_b2 = 1.f - b2;
  c.step_size = args.lr / bc1;
  c.bc2_sqrt = std::sqrt(bc2);
  c.decay_factor = 1.f - Unfused(args.lr * args.weight_decay);
  c.eps = args.eps;
  c.grad_scale = args.grad_scale;

  const size_t compute_pack = kind == kCopyF32 ? 16 : 8;
  const bool aligned = Aligned(params, 16) && Aligned(grads, 16) && Aligned(m, 16) &&
                       Aligned(v, 16) && Aligned(decay, 4) &&
                       (kind == kNone || Aligned(compute, compute_pack));
  const unsigned grid = static_cast<unsigned>(
      std::clamp<int64_t>((n + kChunk * kThreads - 1) / (kChunk * kThreads), 1, kMaxBlocks));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (kind) {
    case kNone:
      AdamWKernel<kNone>
          <<<grid, kThreads, 0, s>>>(params, grads, m, v, decay, compute, c, n, aligned);
      break;
    case kCopyF32:
      AdamWKernel<kCopyF32>
          <<<grid, kThreads, 0, s>>>(params, grads, m, v, decay, compute, c, n, aligned);
      break;
    case kCopyBF16:
      AdamWKernel<kCopyBF16>
          <<<grid, kThreads, 0, s>>>(params, grads, m, v, decay, compute, c, n, aligned);
      break;
    default:
      AdamWKernel<kCopyF16>
          <<<grid, kThreads, 0, s>>>(params, grads, m, v, decay, compute, c, n, aligned);
      break;
  }
  return cuda_util::LaunchStatus(kOp);
}

}  // namespace strata::model
