// Per-kernel-class device time with CUDA events, for the GPU performance breakdown
// (env STRATA_CUDA_PROFILE=1; see gpt_cuda.h). Plain C++ over CudaEvent (device_cuda.h).
//
// Time(cls, stream, launch) records a timing event before and after `launch` on `stream`; the
// pairs are read by Collect(), which the owner calls only after the stream has been
// synchronised (so reading them never blocks), and their events are reused. Disabled, Time()
// just calls `launch`: no event, no cost. Event timing serialises nothing on the device, but the
// numbers are device time between the two events (including any idle gap between launches), so
// the classes add up to at most the stream's busy time plus gaps. One stream, one thread.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"
#include "model/cuda/device_cuda.h"

namespace strata::model {

class KernelTimer {
 public:
  enum Class { kGemm, kAttention, kNormAct, kXent, kEmbedding, kCopy, kOptimizer, kNumClasses };
  static const char* Name(int c) {
    static constexpr const char* kNames[kNumClasses] = {
        "gemm", "attention", "norm+act", "xent", "embedding", "copy", "optimizer"};
    return kNames[c];
  }

  explicit KernelTimer(bool enabled) : enabled_(enabled) {}
  bool enabled() const { return enabled_; }

  template <typename F>
  Status Time(Class c, void* stream, F&& launch) {
    if (!enabled_) return launch();
    Pair p;
    if (!free_.empty()) {
      p = std::move(free_.back());
      free_.pop_back();
    } else {
      ASSIGN_OR_RETURN(p.start, CudaEvent::Create(/*timing=*/true));
      ASSIGN_OR_RETURN(p.end, CudaEvent::Create(/*timing=*/true));
    }
    p.cls = c;
    RETURN_IF_ERROR(p.start.Record(stream));
    Status s = launch();
    RETURN_IF_ERROR(p.end.Record(stream));
    pending_.push_back(std::move(p));
    return s;
  }

  // Adds the recorded pairs' times; call after synchronising the stream they were recorded on.
  Status Collect() {
    Status first;
    for (Pair& p : pending_) {
      Result<float> ms = CudaEvent::ElapsedMs(p.start, p.end);
      if (ms.ok()) {
        ms_[static_cast<size_t>(p.cls)] += *ms;
        ++calls_[static_cast<size_t>(p.cls)];
      } else if (first.ok()) {
        first = ms.status();
      }
      free_.push_back(std::move(p));
    }
    pending_.clear();
    return first;
  }

  double ms(int c) const { return ms_[static_cast<size_t>(c)]; }
  int64_t calls(int c) const { return calls_[static_cast<size_t>(c)]; }

 private:
  struct Pair {
    CudaEvent start, end;
    Class cls = kGemm;
  };
  bool enabled_;
  std::vector<Pair> pending_, free_;
  std::array<double, kNumClasses> ms_{};
  std::array<int64_t, kNumClasses> calls_{};
};

}  // namespace strata::model
