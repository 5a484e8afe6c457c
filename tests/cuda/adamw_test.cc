// CUDA fused AdamW (model/cuda/adamw_cuda.h) against the CPU.
//
// Two references:
//  - UnfusedReference below: AdamW::Update's order of operations with every operation rounded
//    to float on its own (volatile temporaries keep the compiler from fusing multiply-adds).
//    The kernel uses explicitly rounded intrinsics, so the two must agree bit for bit.
//  - model::AdamW itself (compiled with -march=native, so GCC may fuse some multiply-adds into
//    FMAs). Each fused operation moves a result by at most half an ulp of the terms involved, so
//    the tolerances are a few ulps of the terms' magnitudes: m within 2 ulp of b1|m| + (1-b1)|g|,
//    v within 2 ulp of b2 v + (1-b2) g^2, params within 3 ulp of |p| + |update| (the decay
//    product, the update's own ~4 roundings sharing the one subtraction).
// The state is re-synchronised from the CPU before every step, so errors do not compound.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "model/cuda/adamw_cuda.h"
#include "model/cuda/cuda_runtime_info.h"
#include "model/dtype.h"
#include "model/gpt.h"
#include "model/optimizer.h"
#include "tests/cuda/cuda_test_util.h"

namespace strata::model {
namespace {

using testing::SameBits;
using testing::ToDevice;
using testing::ToHost;
using testing::UniformFloats;

constexpr double kUlp = 1.1920928955078125e-7;  // 2^-23

float R(float x) {
  volatile float kept = x;
  return kept;
}

struct State {
  std::vector<float> params, m, v;
};

// AdamW::Update's arithmetic, each operation rounded separately; g = grads * grad_scale.
void UnfusedReference(State& s, const std::vector<float>& grads, const std::vector<uint8_t>& decay,
                      const CudaAdamWArgs& a) {
  const float b1 = a.beta1, b2 = a.beta2;
  const float bc1 = 1.f - std::pow(b1, static_cast<float>(a.step));
  const float bc2 = 1.f - std::pow(b2, static_cast<float>(a.step));
  const float step_size = a.lr / bc1;
  const float bc2_sqrt = std::sqrt(bc2);
  const float decay_factor = 1.f - R(a.lr * a.weight_decay);
  const float omb1 = 1.f - b1, omb2 = 1.f - b2;
  for (size_t i = 0; i < grads.size(); ++i) {
    const float g = R(grads[i] * a.grad_scale);
    float p = s.params[i];
    if (decay[i]) p = R(p * decay_factor);
    const float mi = R(R(b1 * s.m[i]) + R(omb1 * g));
    const float vi = R(R(b2 * s.v[i]) + R(R(omb2 * g) * g));
    s.m[i] = mi;
    s.v[i] = vi;
    const float den = R(R(std::sqrt(vi) / bc2_sqrt) + a.eps);
    s.params[i] = R(p - R(R(step_size * mi) / den));
  }
}

// Gradients with a spread of magnitudes (1e-6 .. 1e2) and some exact zeros.
std::vector<float> MakeGrads(size_t n, uint32_t seed) {
  auto g = UniformFloats(n, -1.f, 1.f, seed);
  for (size_t i = 0; i < n; ++i) {
    g[i] *= std::pow(10.f, static_cast<float>(static_cast<int>(i % 9) - 6));
    if (i % 13 == 5) g[i] = 0.f;
  }
  return g;
}

std::vector<uint8_t> MakeDecay(size_t n) {
  std::vector<uint8_t> d(n);
  for (size_t i = 0; i < n; ++i) d[i] = (i / 7) % 3 != 0;  // runs of both kinds
  return d;
}

// Runs one GPU update of `s` (in place) with every device pointer `misalign` elements past a
// 256-byte-aligned allocation (0: the packed path; 1..3: the scalar path). Returns the compute
// copy's raw bytes when compute_dtype is given.
void RunGpu(State& s, const std::vector<float>& grads, const std::vector<uint8_t>& decay,
            const CudaAdamWArgs& args, DType compute_dtype, bool with_compute, size_t misalign,
            std::vector<uint8_t>* compute_bytes) {
  const size_t n = grads.size();
  auto pad = [&](const auto& v) {
    std::remove_cv_t<std::remove_reference_t<decltype(v)>> out(misalign);
    out.insert(out.end(), v.begin(), v.end());
    return out;
  };
  auto p_dev = ToDevice(pad(s.params));
  auto g_dev = ToDevice(pad(grads));
  auto m_dev = ToDevice(pad(s.m));
  auto v_dev = ToDevice(pad(s.v));
  auto d_dev = ToDevice(pad(decay));
  const size_t esize = DTypeSize(compute_dtype);
  auto c_dev = DeviceBuffer::Allocate((n + misalign) * esize);
  ASSERT_TRUE(p_dev.ok() && g_dev.ok() && m_dev.ok() && v_dev.ok() && d_dev.ok() && c_dev.ok());
  void* compute =
      with_compute ? static_cast<void*>(c_dev->as<uint8_t>() + misalign * esize) : nullptr;
  const Status st = CudaAdamWUpdate(p_dev->as<float>() + misalign, g_dev->as<float>() + misalign,
                                    m_dev->as<float>() + misalign, v_dev->as<float>() + misalign,
                                    d_dev->as<uint8_t>() + misalign, compute, compute_dtype, args,
                                    static_cast<int64_t>(n), nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  for (auto [buf, host] :
       {std::pair{&*p_dev, &s.params}, std::pair{&*m_dev, &s.m}, std::pair{&*v_dev, &s.v}}) {
    auto got = ToHost<float>(*buf, n + misalign);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    host->assign(got->begin() + static_cast<std::ptrdiff_t>(misalign), got->end());
  }
  if (with_compute && compute_bytes) {
    auto got = ToHost<uint8_t>(*c_dev, (n + misalign) * esize);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    compute_bytes->assign(got->begin() + static_cast<std::ptrdiff_t>(misalign * esize), got->end());
  }
}

// The compute copy must be the updated params rounded to T (bit-exact FromFloat).
template <typename T>
void ExpectComputeCopy(const std::vector<uint8_t>& bytes, const std::vector<float>& params) {
  ASSERT_EQ(bytes.size(), params.size() * sizeof(T));
  size_t bad = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const T want = FromFloat<T>(params[i]);
    if (std::memcmp(bytes.data() + i * sizeof(T), &want, sizeof(T)) != 0 && bad++ < 5) {
      ADD_FAILURE() << "compute[" << i << "] is not FromFloat(" << params[i] << ")";
    }
  }
  EXPECT_EQ(bad, 0u);
}

void ExpectComputeCopy(DType dt, const std::vector<uint8_t>& bytes,
                       const std::vector<float>& params) {
  switch (dt) {
    case DType::kF32:
      return ExpectComputeCopy<float>(bytes, params);
    case DType::kBF16:
      return ExpectComputeCopy<bf16>(bytes, params);
    case DType::kF16:
      return ExpectComputeCopy<f16>(bytes, params);
  }
}

CudaAdamWArgs Args(int64_t step) {
  CudaAdamWArgs a;
  a.lr = 3e-3f;
  a.beta1 = 0.9f;
  a.beta2 = 0.95f;
  a.eps = 1e-8f;
  a.weight_decay = 0.1f;
  a.step = step;
  a.grad_scale = 0.37f;
  return a;
}

// ---- runs everywhere ------------------------------------------------------------------------

TEST(CudaAdamWArgsTest, RejectsBadArgumentsBeforeLaunching) {
  float f[4] = {};
  uint8_t d[4] = {};
  const auto kBad = StatusCode::kInvalidArgument;
  const CudaAdamWArgs ok_args = Args(1);
  EXPECT_EQ(CudaAdamWUpdate(f, f, f, f, d, nullptr, DType::kBF16, ok_args, -1, nullptr).code(),
            kBad);
  CudaAdamWArgs step0 = ok_args;
  step0.step = 0;  // bias correction would divide by 0
  EXPECT_EQ(CudaAdamWUpdate(f, f, f, f, d, nullptr, DType::kBF16, step0, 4, nullptr).code(), kBad);
  EXPECT_EQ(CudaAdamWUpdate(nullptr, f, f, f, d, nullptr, DType::kBF16, ok_args, 4, nullptr).code(),
            kBad);
  EXPECT_EQ(CudaAdamWUpdate(f, nullptr, f, f, d, nullptr, DType::kBF16, ok_args, 4, nullptr).code(),
            kBad);
  EXPECT_EQ(CudaAdamWUpdate(f, f, nullptr, f, d, nullptr, DType::kBF16, ok_args, 4, nullptr).code(),
            kBad);
  EXPECT_EQ(CudaAdamWUpdate(f, f, f, nullptr, d, nullptr, DType::kBF16, ok_args, 4, nullptr).code(),
            kBad);
  EXPECT_EQ(CudaAdamWUpdate(f, f, f, f, nullptr, nullptr, DType::kBF16, ok_args, 4, nullptr).code(),
            kBad);
  EXPECT_EQ(CudaAdamWUpdate(f, f, f, f, d, f, static_cast<DType>(42), ok_args, 4, nullptr).code(),
            kBad);
  // Empty range: nothing to do, no device touched.
  EXPECT_TRUE(CudaAdamWUpdate(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, DType::kBF16,
                              ok_args, 0, nullptr)
                  .ok());
}

// ---- needs a GPU ----------------------------------------------------------------------------

const int64_t kSizes[] = {1, 3, 4, 7, 1027, 262147, (int64_t{1} << 20) + 5};

TEST(CudaAdamWTest, MatchesUnfusedReferenceBitwise) {
  STRATA_REQUIRE_GPU();
  for (int64_t n : kSizes) {
    for (size_t misalign : {0, 1}) {
      const DType dt = n % 2 ? DType::kBF16 : DType::kF16;
      SCOPED_TRACE("n = " + std::to_string(n) + " misalign " + std::to_string(misalign) + " " +
                   DTypeName(dt));
      const size_t un = static_cast<size_t>(n);
      const auto decay = MakeDecay(un);
      State want{UniformFloats(un, -1.f, 1.f, 1), std::vector<float>(un, 0.f),
                 std::vector<float>(un, 0.f)};
      for (int64_t step = 1; step <= 3; ++step) {
        SCOPED_TRACE("step " + std::to_string(step));
        const auto grads = MakeGrads(un, static_cast<uint32_t>(10 + step));
        State got = want;
        std::vector<uint8_t> compute;
        RunGpu(got, grads, decay, Args(step), dt, true, misalign, &compute);
        if (HasFatalFailure()) return;
        UnfusedReference(want, grads, decay, Args(step));
        EXPECT_TRUE(SameBits(got.params, want.params));
        EXPECT_TRUE(SameBits(got.m, want.m));
        EXPECT_TRUE(SameBits(got.v, want.v));
        ExpectComputeCopy(dt, compute, got.params);
      }
    }
  }
}

TEST(CudaAdamWTest, MatchesCpuAdamW) {
  STRATA_REQUIRE_GPU();
  for (int64_t n : kSizes) {
    // A ZeRO-1 style shard: the owned range starts 5 elements into the flat buffer and cuts
    // through a decayed and an undecayed tensor.
    const int64_t offset = 5, total = n + 11;
    std::vector<ParamTensor> tensors(3);
    tensors[0].numel = total / 3 + 1;
    tensors[0].decay = true;
    tensors[1].offset = tensors[0].numel;
    tensors[1].numel = total / 3;
    tensors[1].decay = false;
    tensors[2].offset = tensors[1].offset + tensors[1].numel;
    tensors[2].numel = total - tensors[2].offset;
    tensors[2].decay = true;
    AdamW opt(tensors, total, AdamWConfig{0.9f, 0.95f, 1e-8f, 0.1f}, offset, n);
    const size_t un = static_cast<size_t>(n);
    std::vector<uint8_t> decay(un);
    for (size_t i = 0; i < un; ++i) {
      const int64_t flat = offset + static_cast<int64_t>(i);
      decay[i] = (flat < tensors[1].offset || flat >= tensors[2].offset) ? 1 : 0;
    }
    std::vector<float> params = UniformFloats(un, -2.f, 2.f, 3);
    for (int64_t step = 1; step <= 4; ++step) {
      SCOPED_TRACE("n = " + std::to_string(n) + " step " + std::to_string(step));
      const CudaAdamWArgs args = Args(step);
      const auto grads = MakeGrads(un, static_cast<uint32_t>(20 + step));
      State before{params, std::vector<float>(opt.m(), opt.m() + n),
                   std::vector<float>(opt.v(), opt.v() + n)};
      // CPU: the caller scales the gradients (Scale), then updates.
      std::vector<float> scaled = grads;
      Scale(scaled.data(), n, args.grad_scale);
      opt.Update(params.data(), scaled.data(), args.lr, step);

      State got = before;
      RunGpu(got, grads, decay, args, DType::kBF16, false, 0, nullptr);
      if (HasFatalFailure()) return;

      const float bc1 = 1.f - std::pow(args.beta1, static_cast<float>(step));
      const float bc2 = 1.f - std::pow(args.beta2, static_cast<float>(step));
      size_t bad = 0;
      for (size_t i = 0; i < un; ++i) {
        const double g = static_cast<double>(scaled[i]);
        const double m_scale =
            args.beta1 * std::fabs(before.m[i]) + (1 - args.beta1) * std::fabs(g);
        const double v_scale = args.beta2 * before.v[i] + (1 - args.beta2) * g * g;
        const double mi = opt.m()[i], vi = opt.v()[i];
        const double update =
            args.lr / bc1 * std::fabs(mi) / (std::sqrt(vi) / std::sqrt(bc2) + args.eps);
        const double p_scale = std::fabs(before.params[i]) + update;
        const bool ok = std::fabs(got.m[i] - mi) <= 2 * kUlp * m_scale &&
                        std::fabs(got.v[i] - vi) <= 2 * kUlp * v_scale &&
                        std::fabs(got.params[i] - params[i]) <= 3 * kUlp * p_scale;
        if (!ok && bad++ < 5) {
          ADD_FAILURE() << "[" << i << "] params " << got.params[i] << " vs " << params[i] << ", m "
                        << got.m[i] << " vs " << mi << ", v " << got.v[i] << " vs " << vi;
        }
      }
      EXPECT_EQ(bad, 0u);
    }
  }
}

TEST(CudaAdamWTest, DeterministicAndIndependentOfAlignment) {
  STRATA_REQUIRE_GPU();
  const size_t n = 300007;
  const auto decay = MakeDecay(n);
  const auto grads = MakeGrads(n, 7);
  const State start{UniformFloats(n, -1.f, 1.f, 8), UniformFloats(n, -0.1f, 0.1f, 9),
                    UniformFloats(n, 0.f, 0.01f, 10)};
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    SCOPED_TRACE(DTypeName(dt));
    State a = start, b = start;
    std::vector<uint8_t> ca, cb;
    RunGpu(a, grads, decay, Args(3), dt, true, 0, &ca);
    RunGpu(b, grads, decay, Args(3), dt, true, 0, &cb);
    if (HasFatalFailure()) return;
    EXPECT_TRUE(SameBits(a.params, b.params) && SameBits(a.m, b.m) && SameBits(a.v, b.v));
    EXPECT_EQ(ca, cb);
    ExpectComputeCopy(dt, ca, a.params);
    for (size_t misalign : {1, 2, 3}) {
      State c = start;
      std::vector<uint8_t> cc;
      RunGpu(c, grads, decay, Args(3), dt, true, misalign, &cc);
      if (HasFatalFailure()) return;
      EXPECT_TRUE(SameBits(a.params, c.params) && SameBits(a.m, c.m) && SameBits(a.v, c.v))
          << "misalign " << misalign;
      EXPECT_EQ(ca, cc) << "misalign " << misalign;
    }
  }
  // Without a compute copy the fp32 state is the same as with one.
  State d = start, e = start;
  RunGpu(d, grads, decay, Args(3), DType::kBF16, true, 0, nullptr);
  RunGpu(e, grads, decay, Args(3), DType::kBF16, false, 0, nullptr);
  EXPECT_TRUE(SameBits(d.params, e.params));
}

TEST(CudaAdamWTest, UnitGradScaleIsTheCpuPathExactly) {
  STRATA_REQUIRE_GPU();
  // grad_scale = 1 multiplies exactly: the update equals the unfused reference on raw grads.
  const size_t n = 4099;
  const auto decay = MakeDecay(n);
  const auto grads = MakeGrads(n, 17);
  CudaAdamWArgs args = Args(1);
  args.grad_scale = 1.f;
  State want{UniformFloats(n, -1.f, 1.f, 18), std::vector<float>(n, 0.f),
             std::vector<float>(n, 0.f)};
  State got = want;
  RunGpu(got, grads, decay, args, DType::kF32, false, 0, nullptr);
  if (HasFatalFailure()) return;
  UnfusedReference(want, grads, decay, args);
  EXPECT_TRUE(SameBits(got.params, want.params));
}

}  // namespace
}  // namespace strata::model
