// Per-kernel micro-benchmarks of the CUDA launchers in model/cuda at GPT-2 124M shapes
// (B*T = 8*1024 tokens, C = 768, 12 heads, vocabulary 50304 padded / 50257 real, 124M parameters
// for AdamW), timed with CUDA events on one non-blocking stream.
//
// Two ceilings are measured first, on the same GPU, and every row is reported against them:
//   copy   a 1 GiB device-to-device copy (CudaCopyDeviceToDevice), counting bytes read + written:
//          the memory roofline for the memory-bound kernels (column "%copy");
//   gemm   an 8192^3 GEMM in the compute dtype through CudaBlas::Gemm: the tensor-core ceiling
//          for the matrix-bound rows (column "%gemm").
//
// Bytes are the fewest a kernel must move (each input read once, each output written once; a
// read-modify-write (+=) output counts twice); a kernel that makes two passes over its input
// therefore shows under 100% even when each pass runs at full bandwidth. s = sizeof(T):
//   layernorm fwd     N*C*(4 + s) + 8N                    (fp32 in, T out, mean/rstd)
//   resid+layernorm   N*C*(4 + s + 4 + s) + 8N            (resid_in, branch, resid_out, out)
//   layernorm bwd     N*C*(s + 4 + 8) + 8N                (dout, inp, dinp +=)
//   gelu fwd / bwd    n*2s / n*3s
//   residual          n*(4 + s + 4)
//   add bias / dbias  n*2s / n*s                          (n = rows * columns)
//   softmax-xent      N*V*s (loss only) or N*V*2s (loss + gradient in place), + 8N
//   adamw             n*(16 + 12 + 1 + s)                 (p, g, m, v in; p, m, v out; decay;
//                                                         the refreshed compute copy)
//   embedding fwd     N*C*(s + 4) + T*C*s + 4N
//   embedding bwd     4*N*C + 8*C*(distinct tokens) + 8*T*C + 4N
//   sum of squares    4n;  cast fp32 -> T  n*(4 + s)
// FLOPs:
//   linear fwd        2*n*c*oc;  bwd 4*n*c*oc (dinp and dw)
//   attention fwd     2*B*T*T*C (QK^T and PV, causal half);  bwd 2.5x that (S recomputed, dV,
//                     dP, dQ, dK)
//
// Each row: 3 warm-up launches, then `--reps` repetitions of `--iters` back-to-back launches
// between two events; the median repetition is reported. In-place kernels (softmax-xent with a
// gradient, AdamW, the += gradients) see their own output as the next input: the cost per
// launch is the same, the values are not checked here (tests/cuda checks them).
//
// Run: cuda_kernels_bench [--filter SUBSTR] [--iters 20] [--reps 5] [--dtype bf16|fp16|fp32]
//                         [--json FILE]
// Exit status 0 when every selected row ran; 1 on the first failed launch or CUDA error, 2 on a
// bad flag, 77 when no CUDA device is visible (nothing to measure).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "common/status.h"
#include "model/cuda/adamw_cuda.h"
#include "model/cuda/attention_cuda.h"
#include "model/cuda/cuda_runtime_info.h"
#include "model/cuda/device_cuda.h"
#include "model/cuda/elementwise_cuda.h"
#include "model/cuda/embedding_cuda.h"
#include "model/cuda/layernorm_cuda.h"
#include "model/cuda/matmul_cuda.h"
#include "model/cuda/reduce_cuda.h"
#include "model/cuda/softmax_xent_cuda.h"
#include "model/dtype.h"

namespace strata::model {
namespace {

struct Options {
  int b = 8, t = 1024, c = 768, nh = 12, layers = 12;
  int vocab = 50304;  // padded, as the logits buffer is laid out
  int valid = 50257;  // real GPT-2 vocabulary
  int iters = 20, reps = 5;
  DType dtype = DType::kBF16;
  std::string filter;
  std::string json;
};

struct Row {
  std::string name;
  std::string shape;
  double ms = 0;
  double bytes = 0;  // 0: not a memory-bound row
  double flops = 0;  // 0: not a matrix row
};

// Deterministic, fast fill (a 64-bit LCG): the buffers here reach hundreds of millions of
// elements, and std::mt19937 would dominate the run time.
class Lcg {
 public:
  explicit Lcg(uint64_t seed) : s_(seed * 6364136223846793005ull + 1442695040888963407ull) {}
  float Uniform(float lo, float hi) {  // [lo, hi)
    s_ = s_ * 6364136223846793005ull + 1442695040888963407ull;
    return lo + (hi - lo) * static_cast<float>(s_ >> 40) * (1.0f / 16777216.0f);
  }
  uint32_t Below(uint32_t n) {
    s_ = s_ * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<uint32_t>((s_ >> 33) % n);
  }

 private:
  uint64_t s_;
};

// A device buffer of `count` elements of `dtype` holding uniform values in [lo, hi).
Result<DeviceBuffer> RandomBuffer(int64_t count, DType dtype, float lo, float hi, uint64_t seed) {
  const size_t bytes = static_cast<size_t>(count) * DTypeSize(dtype);
  ASSIGN_OR_RETURN(DeviceBuffer buf, DeviceBuffer::Allocate(bytes));
  // Filled and copied in chunks so the host never holds more than 64 Mi elements at once.
  constexpr int64_t kChunk = int64_t{1} << 26;
  std::vector<float> f(static_cast<size_t>(std::min(count, kChunk)));
  std::vector<uint16_t> h(dtype == DType::kF32 ? 0 : f.size());
  Lcg rng(seed);
  for (int64_t off = 0; off < count; off += kChunk) {
    const int64_t n = std::min(kChunk, count - off);
    for (int64_t i = 0; i < n; ++i) f[i] = rng.Uniform(lo, hi);
    const void* src = f.data();
    if (dtype == DType::kBF16) {
      for (int64_t i = 0; i < n; ++i) h[i] = FloatToBf16(f[i]).bits;
      src = h.data();
    } else if (dtype == DType::kF16) {
      for (int64_t i = 0; i < n; ++i) h[i] = FloatToHalfBits(f[i]);
      src = h.data();
    }
    const size_t es = DTypeSize(dtype);
    RETURN_IF_ERROR(CudaCopyHostToDevice(static_cast<char*>(buf.data()) + off * es, src,
                                         static_cast<size_t>(n) * es, nullptr));
    RETURN_IF_ERROR(CudaStreamSynchronize(nullptr));  // `f`/`h` are reused by the next chunk
  }
  return buf;
}

Result<DeviceBuffer> Upload(const void* src, size_t bytes) {
  ASSIGN_OR_RETURN(DeviceBuffer buf, DeviceBuffer::Allocate(bytes));
  RETURN_IF_ERROR(buf.CopyFromHost(src, bytes));
  return buf;
}

class Bench {
 public:
  static Result<std::unique_ptr<Bench>> Create(const Options& o) {
    auto b = std::unique_ptr<Bench>(new Bench(o));
    ASSIGN_OR_RETURN(b->stream_, CudaStream::Create());
    ASSIGN_OR_RETURN(b->start_, CudaEvent::Create(/*timing=*/true));
    ASSIGN_OR_RETURN(b->stop_, CudaEvent::Create(/*timing=*/true));
    ASSIGN_OR_RETURN(b->blas_, CudaBlas::Create());
    return b;
  }

  Status RunAll();
  Status WriteJson(const std::string& path) const;
  void PrintTable() const;

 private:
  explicit Bench(const Options& o) : o_(o), s_(DTypeSize(o.dtype)) {}

  bool Selected(const std::string& name) const {
    return o_.filter.empty() || name.find(o_.filter) != std::string::npos || name == "copy" ||
           name == "gemm";  // the ceilings always run
  }

  // Times `fn` (one launch) as described in the file comment and appends a row.
  Status Time(const std::string& name, const std::string& shape, double bytes, double flops,
              const std::function<Status()>& fn);

  Status Ceilings();
  Status LayerNorms();
  Status Elementwise();
  Status SoftmaxXent();
  Status AdamW();
  Status Embedding();
  Status Attention();
  Status Linears();
  Status Reductions();

  void* stream() const { return stream_.get(); }
  int64_t tokens() const { return int64_t{o_.b} * o_.t; }

  Options o_;
  size_t s_;  // bytes per element of T
  CudaStream stream_;
  CudaEvent start_, stop_;
  std::unique_ptr<CudaBlas> blas_;
  std::vector<Row> rows_;
  double copy_gbps_ = 0, gemm_tflops_ = 0;
};

Status Bench::Time(const std::string& name, const std::string& shape, double bytes, double flops,
                   const std::function<Status()>& fn) {
  if (!Selected(name)) return Status::Ok();
  auto ctx = [&](const Status& st) { return st.WithContext(name); };
  for (int i = 0; i < 3; ++i) {
    Status st = fn();
    if (!st.ok()) return ctx(st);
  }
  Status st = stream_.Synchronize();
  if (!st.ok()) return ctx(st);
  std::vector<double> per_launch;
  for (int r = 0; r < o_.reps; ++r) {
    RETURN_IF_ERROR(ctx(start_.Record(stream())));
    for (int i = 0; i < o_.iters; ++i) {
      st = fn();
      if (!st.ok()) return ctx(st);
    }
    RETURN_IF_ERROR(ctx(stop_.Record(stream())));
    RETURN_IF_ERROR(ctx(stop_.Synchronize()));
    auto ms = CudaEvent::ElapsedMs(start_, stop_);
    if (!ms.ok()) return ctx(ms.status());
    per_launch.push_back(*ms / o_.iters);
  }
  std::sort(per_launch.begin(), per_launch.end());
  Row row{name, shape, per_launch[per_launch.size() / 2], bytes, flops};
  rows_.push_back(row);
  std::fprintf(stderr, "  %-22s %10.4f ms\n", name.c_str(), row.ms);
  return Status::Ok();
}

Status Bench::Ceilings() {
  // Copy: 1 GiB each way, well beyond the 50 MB L2.
  const size_t bytes = size_t{1} << 30;
  ASSIGN_OR_RETURN(DeviceBuffer src, RandomBuffer(bytes / 4, DType::kF32, -1, 1, 1));
  ASSIGN_OR_RETURN(DeviceBuffer dst, DeviceBuffer::Allocate(bytes));
  RETURN_IF_ERROR(Time("copy", "1 GiB d2d", 2.0 * bytes, 0, [&] {
    return CudaCopyDeviceToDevice(dst.data(), src.data(), bytes, stream());
  }));
  copy_gbps_ = 2.0 * bytes / (rows_.back().ms * 1e6);

  const int m = 8192;
  const int64_t mm = int64_t{m} * m;
  ASSIGN_OR_RETURN(DeviceBuffer a, RandomBuffer(mm, o_.dtype, -1, 1, 2));
  ASSIGN_OR_RETURN(DeviceBuffer b, RandomBuffer(mm, o_.dtype, -1, 1, 3));
  ASSIGN_OR_RETURN(DeviceBuffer c, DeviceBuffer::Allocate(mm * s_));
  RETURN_IF_ERROR(Time("gemm", "8192^3 " + std::string(DTypeName(o_.dtype)), 0, 2.0 * m * mm, [&] {
    return blas_->Gemm(false, false, m, m, m, 1.f, a.data(), m, b.data(), m, 0.f, c.data(), m,
                       o_.dtype, stream());
  }));
  gemm_tflops_ = 2.0 * m * mm / (rows_.back().ms * 1e9);
  return Status::Ok();
}

Status Bench::LayerNorms() {
  const int64_t n = tokens();
  const int c = o_.c;
  const std::string shape = std::to_string(n) + "x" + std::to_string(c);
  ASSIGN_OR_RETURN(DeviceBuffer inp, RandomBuffer(n * c, DType::kF32, -2, 2, 10));
  ASSIGN_OR_RETURN(DeviceBuffer branch, RandomBuffer(n * c, o_.dtype, -1, 1, 11));
  ASSIGN_OR_RETURN(DeviceBuffer w, RandomBuffer(c, o_.dtype, 0.5, 1.5, 12));
  ASSIGN_OR_RETURN(DeviceBuffer bias, RandomBuffer(c, o_.dtype, -0.1, 0.1, 13));
  ASSIGN_OR_RETURN(DeviceBuffer out, DeviceBuffer::Allocate(n * c * s_));
  ASSIGN_OR_RETURN(DeviceBuffer resid_out, DeviceBuffer::Allocate(n * c * 4));
  ASSIGN_OR_RETURN(DeviceBuffer mean, DeviceBuffer::Allocate(n * 4));
  ASSIGN_OR_RETURN(DeviceBuffer rstd, DeviceBuffer::Allocate(n * 4));
  ASSIGN_OR_RETURN(DeviceBuffer dout, RandomBuffer(n * c, o_.dtype, -1, 1, 14));
  ASSIGN_OR_RETURN(DeviceBuffer dinp, RandomBuffer(n * c, DType::kF32, -1, 1, 15));
  ASSIGN_OR_RETURN(DeviceBuffer dw, RandomBuffer(c, DType::kF32, -1, 1, 16));
  ASSIGN_OR_RETURN(DeviceBuffer db, RandomBuffer(c, DType::kF32, -1, 1, 17));
  const double nc = static_cast<double>(n) * c;
  RETURN_IF_ERROR(Time("layernorm_fwd", shape, nc * (4 + s_) + 8.0 * n, 0, [&] {
    return CudaLayerNormForward(out.data(), mean.as<float>(), rstd.as<float>(), inp.as<float>(),
                                w.data(), bias.data(), n, c, o_.dtype, stream());
  }));
  RETURN_IF_ERROR(Time("resid_layernorm_fwd", shape, nc * (8 + 2 * s_) + 8.0 * n, 0, [&] {
    return CudaResidualLayerNormForward(resid_out.as<float>(), out.data(), mean.as<float>(),
                                        rstd.as<float>(), inp.as<float>(), branch.data(), w.data(),
                                        bias.data(), n, c, o_.dtype, stream());
  }));
  // mean/rstd must be real statistics of `inp` for the backward pass.
  RETURN_IF_ERROR(CudaLayerNormForward(out.data(), mean.as<float>(), rstd.as<float>(),
                                       inp.as<float>(), w.data(), bias.data(), n, c, o_.dtype,
                                       stream()));
  return Time("layernorm_bwd", shape, nc * (s_ + 12) + 8.0 * n, 0, [&] {
    return CudaLayerNormBackward(dinp.as<float>(), dw.as<float>(), db.as<float>(), dout.data(),
                                 inp.as<float>(), w.data(), mean.as<float>(), rstd.as<float>(), n,
                                 c, o_.dtype, stream());
  });
}

Status Bench::Elementwise() {
  const int64_t rows = tokens();
  const int c4 = 4 * o_.c;
  const int64_t n = rows * c4;  // the MLP hidden activation
  const std::string shape = std::to_string(rows) + "x" + std::to_string(c4);
  ASSIGN_OR_RETURN(DeviceBuffer inp, RandomBuffer(n, o_.dtype, -3, 3, 20));
  ASSIGN_OR_RETURN(DeviceBuffer dout, RandomBuffer(n, o_.dtype, -1, 1, 21));
  ASSIGN_OR_RETURN(DeviceBuffer out, DeviceBuffer::Allocate(n * s_));
  ASSIGN_OR_RETURN(DeviceBuffer bias, RandomBuffer(c4, o_.dtype, -0.1, 0.1, 22));
  ASSIGN_OR_RETURN(DeviceBuffer dbias, RandomBuffer(c4, DType::kF32, -1, 1, 23));
  const double dn = static_cast<double>(n);
  RETURN_IF_ERROR(Time("gelu_fwd", shape, dn * 2 * s_, 0, [&] {
    return CudaGeluForwardT(out.data(), inp.data(), n, o_.dtype, stream());
  }));
  RETURN_IF_ERROR(Time("gelu_bwd", shape, dn * 3 * s_, 0, [&] {
    return CudaGeluBackwardT(out.data(), inp.data(), dout.data(), n, o_.dtype, stream());
  }));
  RETURN_IF_ERROR(Time("add_bias", shape, dn * 2 * s_, 0, [&] {
    return CudaAddBias(out.data(), bias.data(), rows, c4, o_.dtype, stream());
  }));
  RETURN_IF_ERROR(Time("bias_bwd", shape, dn * s_, 0, [&] {
    return CudaBiasBackward(dbias.as<float>(), dout.data(), rows, c4, o_.dtype, stream());
  }));
  // The residual stream: fp32 [N, C] += branch (T).
  const int64_t rn = rows * o_.c;
  ASSIGN_OR_RETURN(DeviceBuffer a, RandomBuffer(rn, DType::kF32, -1, 1, 24));
  ASSIGN_OR_RETURN(DeviceBuffer resid, DeviceBuffer::Allocate(rn * 4));
  return Time("residual_fwd", std::to_string(rows) + "x" + std::to_string(o_.c),
              static_cast<double>(rn) * (8 + s_), 0, [&] {
                return CudaResidualForwardT(resid.as<float>(), a.as<float>(), inp.data(), rn,
                                            o_.dtype, stream());
              });
}

Status Bench::SoftmaxXent() {
  const int64_t n = tokens();
  const std::string shape = std::to_string(n) + "x" + std::to_string(o_.vocab);
  ASSIGN_OR_RETURN(DeviceBuffer logits, RandomBuffer(n * o_.vocab, o_.dtype, -4, 4, 30));
  std::vector<int32_t> targets(static_cast<size_t>(n));
  Lcg rng(31);
  for (auto& x : targets) x = static_cast<int32_t>(rng.Below(static_cast<uint32_t>(o_.valid)));
  ASSIGN_OR_RETURN(DeviceBuffer dtargets, Upload(targets.data(), targets.size() * 4));
  ASSIGN_OR_RETURN(DeviceBuffer losses, DeviceBuffer::Allocate(n * 4));
  const double nv = static_cast<double>(n) * o_.vocab;
  RETURN_IF_ERROR(Time("softmax_xent_loss", shape, nv * s_ + 8.0 * n, 0, [&] {
    return CudaSoftmaxCrossEntropy(logits.data(), losses.as<float>(), dtargets.as<int32_t>(), n,
                                   o_.vocab, o_.valid, 0.f, o_.dtype, stream());
  }));
  return Time("softmax_xent_grad", shape, nv * 2 * s_ + 8.0 * n, 0, [&] {
    return CudaSoftmaxCrossEntropy(logits.data(), losses.as<float>(), dtargets.as<int32_t>(), n,
                                   o_.vocab, o_.valid, 1.0f / static_cast<float>(n), o_.dtype,
                                   stream());
  });
}

Status Bench::AdamW() {
  // GPT-2 124M with the padded vocabulary: wte + wpe + 12 blocks + final LayerNorm.
  const int64_t c = o_.c;
  const int64_t n =
      int64_t{o_.vocab} * c + int64_t{o_.t} * c + o_.layers * (12 * c * c + 13 * c) + 2 * c;
  ASSIGN_OR_RETURN(DeviceBuffer params, RandomBuffer(n, DType::kF32, -0.1, 0.1, 40));
  ASSIGN_OR_RETURN(DeviceBuffer grads, RandomBuffer(n, DType::kF32, -0.01, 0.01, 41));
  ASSIGN_OR_RETURN(DeviceBuffer m, RandomBuffer(n, DType::kF32, -0.01, 0.01, 42));
  ASSIGN_OR_RETURN(DeviceBuffer v, RandomBuffer(n, DType::kF32, 0, 1e-4, 43));
  std::vector<uint8_t> decay(static_cast<size_t>(n), 1);
  ASSIGN_OR_RETURN(DeviceBuffer ddecay, Upload(decay.data(), decay.size()));
  ASSIGN_OR_RETURN(DeviceBuffer compute, DeviceBuffer::Allocate(n * s_));
  CudaAdamWArgs args;
  args.lr = 6e-4f;
  args.step = 10;
  void* cp = o_.dtype == DType::kF32 ? nullptr : compute.data();
  const double bytes = static_cast<double>(n) * (28 + 1 + (cp ? s_ : 0));
  return Time("adamw", std::to_string(n) + " params", bytes, 0, [&] {
    return CudaAdamWUpdate(params.as<float>(), grads.as<float>(), m.as<float>(), v.as<float>(),
                           ddecay.as<uint8_t>(), cp, o_.dtype, args, n, stream());
  });
}

Status Bench::Embedding() {
  const int64_t n = tokens();
  const int c = o_.c;
  std::vector<int32_t> tok(static_cast<size_t>(n));
  Lcg rng(50);
  for (auto& x : tok) x = static_cast<int32_t>(rng.Below(static_cast<uint32_t>(o_.valid)));
  const size_t distinct = std::unordered_set<int32_t>(tok.begin(), tok.end()).size();
  ASSIGN_OR_RETURN(DeviceBuffer dtok, Upload(tok.data(), tok.size() * 4));
  ASSIGN_OR_RETURN(DeviceBuffer wte, RandomBuffer(int64_t{o_.vocab} * c, o_.dtype, -0.1, 0.1, 51));
  ASSIGN_OR_RETURN(DeviceBuffer wpe, RandomBuffer(int64_t{o_.t} * c, o_.dtype, -0.1, 0.1, 52));
  ASSIGN_OR_RETURN(DeviceBuffer out, DeviceBuffer::Allocate(n * c * 4));
  const std::string shape = std::to_string(n) + "x" + std::to_string(c);
  const double nc = static_cast<double>(n) * c;
  RETURN_IF_ERROR(
      Time("embedding_fwd", shape, nc * (s_ + 4) + double(o_.t) * c * s_ + 4.0 * n, 0, [&] {
        return CudaEmbeddingForward(out.as<float>(), dtok.as<int32_t>(), wte.data(), wpe.data(), 0,
                                    o_.vocab, o_.b, o_.t, c, o_.dtype, stream());
      }));
  ASSIGN_OR_RETURN(DeviceBuffer dout, RandomBuffer(n * c, DType::kF32, -1, 1, 53));
  ASSIGN_OR_RETURN(DeviceBuffer dwte, RandomBuffer(int64_t{o_.vocab} * c, DType::kF32, 0, 0, 54));
  ASSIGN_OR_RETURN(DeviceBuffer dwpe, RandomBuffer(int64_t{o_.t} * c, DType::kF32, 0, 0, 55));
  const size_t ws_bytes = CudaEmbeddingBackwardWorkspace(n);
  ASSIGN_OR_RETURN(DeviceBuffer ws, DeviceBuffer::Allocate(ws_bytes));
  const double bytes =
      4.0 * nc + 8.0 * c * static_cast<double>(distinct) + 8.0 * o_.t * c + 4.0 * n;
  return Time("embedding_bwd", shape, bytes, 0, [&] {
    return CudaEmbeddingBackward(dwte.as<float>(), dwpe.as<float>(), dout.as<float>(),
                                 dtok.as<int32_t>(), 0, o_.vocab, o_.b, o_.t, c, ws.data(),
                                 ws_bytes, stream());
  });
}

Status Bench::Attention() {
  const int64_t n = tokens();
  const int c = o_.c;
  const std::string shape = "B" + std::to_string(o_.b) + " T" + std::to_string(o_.t) + " NH" +
                            std::to_string(o_.nh) + " hs" + std::to_string(c / o_.nh);
  ASSIGN_OR_RETURN(DeviceBuffer qkv, RandomBuffer(n * 3 * c, o_.dtype, -1, 1, 60));
  ASSIGN_OR_RETURN(DeviceBuffer out, DeviceBuffer::Allocate(n * c * s_));
  ASSIGN_OR_RETURN(DeviceBuffer lse, DeviceBuffer::Allocate(int64_t{o_.b} * o_.nh * o_.t * 4));
  const double fwd_flops = 2.0 * o_.b * double(o_.t) * o_.t * c;
  const double io = static_cast<double>(n) * 4 * c * s_ + 4.0 * o_.b * o_.nh * o_.t;
  RETURN_IF_ERROR(Time("attention_fwd", shape, io, fwd_flops, [&] {
    return CudaAttentionForward(out.data(), lse.as<float>(), qkv.data(), o_.b, o_.t, c, o_.nh,
                                o_.dtype, stream());
  }));
  // `out` and `lse` now hold the real forward results the backward pass needs.
  RETURN_IF_ERROR(CudaAttentionForward(out.data(), lse.as<float>(), qkv.data(), o_.b, o_.t, c,
                                       o_.nh, o_.dtype, stream()));
  ASSIGN_OR_RETURN(DeviceBuffer dout, RandomBuffer(n * c, o_.dtype, -1, 1, 61));
  ASSIGN_OR_RETURN(DeviceBuffer dqkv, DeviceBuffer::Allocate(n * 3 * c * s_));
  const size_t ws_bytes = CudaAttentionBackwardWorkspace(o_.b, o_.t, c, o_.nh);
  ASSIGN_OR_RETURN(DeviceBuffer ws, DeviceBuffer::Allocate(ws_bytes));
  return Time("attention_bwd", shape, 0, 2.5 * fwd_flops, [&] {
    return CudaAttentionBackward(dqkv.data(), dout.data(), qkv.data(), out.data(), lse.as<float>(),
                                 o_.b, o_.t, c, o_.nh, ws.data(), ws_bytes, o_.dtype, stream());
  });
}

Status Bench::Linears() {
  const int64_t n = tokens();
  const int c = o_.c;
  struct Shape {
    const char* name;
    int in, out;
    bool bias, gelu;
  };
  const Shape shapes[] = {
      {"qkv", c, 3 * c, true, false},         {"attn_proj", c, c, true, false},
      {"fc", c, 4 * c, true, true},           {"fc_proj", 4 * c, c, true, false},
      {"lm_head", c, o_.vocab, false, false},
  };
  for (const Shape& sh : shapes) {
    const std::string tag = std::string("linear_") + sh.name;
    if (!Selected(tag + "_fwd") && !Selected(tag + "_bwd")) continue;
    const std::string shape =
        std::to_string(n) + "x" + std::to_string(sh.in) + " -> " + std::to_string(sh.out);
    ASSIGN_OR_RETURN(DeviceBuffer inp, RandomBuffer(n * sh.in, o_.dtype, -1, 1, 70));
    ASSIGN_OR_RETURN(DeviceBuffer w,
                     RandomBuffer(int64_t{sh.out} * sh.in, o_.dtype, -0.05, 0.05, 71));
    ASSIGN_OR_RETURN(DeviceBuffer bias, RandomBuffer(sh.out, o_.dtype, -0.1, 0.1, 72));
    ASSIGN_OR_RETURN(DeviceBuffer out, DeviceBuffer::Allocate(n * sh.out * s_));
    ASSIGN_OR_RETURN(DeviceBuffer gelu_out, DeviceBuffer::Allocate(sh.gelu ? n * sh.out * s_ : 0));
    const double f = 2.0 * n * sh.in * double(sh.out);
    RETURN_IF_ERROR(Time(tag + "_fwd", shape + (sh.gelu ? " +gelu" : ""), 0, f, [&] {
      return blas_->Forward(out.data(), sh.gelu ? gelu_out.data() : nullptr, inp.data(), w.data(),
                            sh.bias ? bias.data() : nullptr, n, sh.in, sh.out, o_.dtype, stream());
    }));
    // Backward: out now plays dout.
    ASSIGN_OR_RETURN(DeviceBuffer dinp, DeviceBuffer::Allocate(n * sh.in * s_));
    ASSIGN_OR_RETURN(DeviceBuffer dw, RandomBuffer(int64_t{sh.out} * sh.in, DType::kF32, 0, 0, 73));
    ASSIGN_OR_RETURN(DeviceBuffer dbias, RandomBuffer(sh.out, DType::kF32, 0, 0, 74));
    RETURN_IF_ERROR(Time(tag + "_bwd", shape, 0, 2 * f, [&] {
      return blas_->Backward(dinp.data(), dw.as<float>(), sh.bias ? dbias.as<float>() : nullptr,
                             out.data(), inp.data(), w.data(), n, sh.in, sh.out, o_.dtype,
                             stream());
    }));
  }
  return Status::Ok();
}

Status Bench::Reductions() {
  const int64_t c = o_.c;
  const int64_t n =
      int64_t{o_.vocab} * c + int64_t{o_.t} * c + o_.layers * (12 * c * c + 13 * c) + 2 * c;
  ASSIGN_OR_RETURN(DeviceBuffer x, RandomBuffer(n, DType::kF32, -1, 1, 80));
  ASSIGN_OR_RETURN(DeviceBuffer out, DeviceBuffer::Allocate(8));
  const size_t ws_bytes = CudaReduceWorkspace(n);
  ASSIGN_OR_RETURN(DeviceBuffer ws, DeviceBuffer::Allocate(ws_bytes));
  const std::string shape = std::to_string(n) + " fp32";
  RETURN_IF_ERROR(Time("sum_of_squares", shape, 4.0 * n, 0, [&] {
    return CudaSumOfSquares(out.as<double>(), x.as<float>(), n, false, ws.data(), ws_bytes,
                            stream());
  }));
  if (o_.dtype == DType::kF32) return Status::Ok();
  ASSIGN_OR_RETURN(DeviceBuffer y, DeviceBuffer::Allocate(n * s_));
  return Time("cast_from_fp32", shape, double(n) * (4 + s_), 0,
              [&] { return CudaCastFromFloat(y.data(), x.as<float>(), n, o_.dtype, stream()); });
}

Status Bench::RunAll() {
  // Each group frees its buffers before the next allocates (the logits alone are 0.8 GB).
  RETURN_IF_ERROR(Ceilings());
  RETURN_IF_ERROR(LayerNorms());
  RETURN_IF_ERROR(Elementwise());
  RETURN_IF_ERROR(SoftmaxXent());
  RETURN_IF_ERROR(AdamW());
  RETURN_IF_ERROR(Embedding());
  RETURN_IF_ERROR(Attention());
  RETURN_IF_ERROR(Linears());
  return Reductions();
}

void Bench::PrintTable() const {
  std::printf("device: %s | dtype %s | B=%d T=%d C=%d NH=%d V=%d | median of %d x %d launches\n",
              CudaDeviceName(0).c_str(), DTypeName(o_.dtype), o_.b, o_.t, o_.c, o_.nh, o_.vocab,
              o_.reps, o_.iters);
  std::printf("ceilings: copy %.0f GB/s (read+write), gemm %.1f TFLOP/s\n", copy_gbps_,
              gemm_tflops_);
  std::printf("| %-22s | %-28s | %9s | %8s | %6s | %8s | %6s |\n", "kernel", "shape", "ms", "GB/s",
              "%copy", "TFLOP/s", "%gemm");
  std::printf("|%s|%s|%s|%s|%s|%s|%s|\n", std::string(24, '-').c_str(),
              std::string(30, '-').c_str(), std::string(11, '-').c_str(),
              std::string(10, '-').c_str(), std::string(8, '-').c_str(),
              std::string(10, '-').c_str(), std::string(8, '-').c_str());
  for (const Row& r : rows_) {
    char gbs[32] = "", pc[32] = "", tf[32] = "", pg[32] = "";
    if (r.bytes > 0) {
      const double g = r.bytes / (r.ms * 1e6);
      std::snprintf(gbs, sizeof(gbs), "%.0f", g);
      std::snprintf(pc, sizeof(pc), "%.0f%%", 100.0 * g / copy_gbps_);
    }
    if (r.flops > 0) {
      const double t = r.flops / (r.ms * 1e9);
      std::snprintf(tf, sizeof(tf), "%.1f", t);
      std::snprintf(pg, sizeof(pg), "%.0f%%", 100.0 * t / gemm_tflops_);
    }
    std::printf("| %-22s | %-28s | %9.4f | %8s | %6s | %8s | %6s |\n", r.name.c_str(),
                r.shape.c_str(), r.ms, gbs, pc, tf, pg);
  }
}

Status Bench::WriteJson(const std::string& path) const {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) return IoError("cannot write " + path);
  std::fprintf(f,
               "{\"device\":\"%s\",\"dtype\":\"%s\",\"b\":%d,\"t\":%d,\"c\":%d,\"nh\":%d,"
               "\"vocab\":%d,\"copy_gbps\":%.3f,\"gemm_tflops\":%.3f,\"rows\":[",
               CudaDeviceName(0).c_str(), DTypeName(o_.dtype), o_.b, o_.t, o_.c, o_.nh, o_.vocab,
               copy_gbps_, gemm_tflops_);
  for (size_t i = 0; i < rows_.size(); ++i) {
    const Row& r = rows_[i];
    const double gbps = r.bytes > 0 ? r.bytes / (r.ms * 1e6) : 0;
    const double tflops = r.flops > 0 ? r.flops / (r.ms * 1e9) : 0;
    std::fprintf(f,
                 "%s{\"name\":\"%s\",\"shape\":\"%s\",\"ms\":%.6f,\"bytes\":%.0f,\"flops\":%.0f,"
                 "\"gbps\":%.3f,\"frac_copy\":%.4f,\"tflops\":%.3f,\"frac_gemm\":%.4f}",
                 i ? "," : "", r.name.c_str(), r.shape.c_str(), r.ms, r.bytes, r.flops, gbps,
                 copy_gbps_ > 0 ? gbps / copy_gbps_ : 0, tflops,
                 gemm_tflops_ > 0 ? tflops / gemm_tflops_ : 0);
  }
  std::fprintf(f, "]}\n");
  return std::fclose(f) == 0 ? Status::Ok() : IoError("cannot write " + path);
}

int Usage(const char* msg) {
  std::fprintf(stderr,
               "cuda_kernels_bench: %s\nusage: cuda_kernels_bench [--filter SUBSTR] [--iters N] "
               "[--reps N] [--dtype bf16|fp16|fp32] [--json FILE]\n",
               msg);
  return 2;
}

int Main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      Usage("per-kernel GPU benchmarks at GPT-2 124M shapes");
      return 0;
    }
    if (i + 1 >= argc) return Usage(("missing value for " + a).c_str());
    const std::string v = argv[++i];
    if (a == "--filter") {
      o.filter = v;
    } else if (a == "--json") {
      o.json = v;
    } else if (a == "--iters" || a == "--reps") {
      const int n = std::atoi(v.c_str());
      if (n <= 0) return Usage((a + " needs a positive integer").c_str());
      (a == "--iters" ? o.iters : o.reps) = n;
    } else if (a == "--dtype") {
      auto d = ParseDType(v);
      if (!d.ok()) return Usage(d.status().ToString().c_str());
      o.dtype = *d;
    } else {
      return Usage(("unknown flag " + a).c_str());
    }
  }
  if (CudaDeviceCount() == 0) {
    std::fprintf(stderr, "cuda_kernels_bench: no CUDA device visible; nothing to measure\n");
    return 77;
  }
  auto bench = Bench::Create(o);
  if (!bench.ok()) {
    std::fprintf(stderr, "cuda_kernels_bench: %s\n", bench.status().ToString().c_str());
    return 1;
  }
  Status st = (*bench)->RunAll();
  (*bench)->PrintTable();  // what ran before a failure is still worth seeing
  if (st.ok() && !o.json.empty()) st = (*bench)->WriteJson(o.json);
  if (!st.ok()) {
    std::fprintf(stderr, "cuda_kernels_bench: FAILED: %s\n", st.ToString().c_str());
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace strata::model

int main(int argc, char** argv) { return strata::model::Main(argc, argv); }
