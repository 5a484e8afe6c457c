#include "comm/device_staged.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "comm/backend_util.h"

namespace strata::comm {

namespace {

std::string CudaError(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ")";
}

// A missing driver or device is UNAVAILABLE (the environment), anything else INTERNAL.
Status CudaFailure(const std::string& label, const char* call, cudaError_t e) {
  (void)cudaGetLastError();
  const bool absent = e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver ||
                      e == cudaErrorInvalidDevice || e == cudaErrorDevicesUnavailable;
  return Status(absent ? StatusCode::kUnavailable : StatusCode::kInternal,
                label + ": " + call + ": " + CudaError(e));
}

// Makes `device` current for the scope and restores the caller's device.
class DeviceScope {
 public:
  explicit DeviceScope(int device) : device_(device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) {
      (void)cudaGetLastError();
      previous_ = -1;
    }
    if (previous_ != device_) error_ = cudaSetDevice(device_);
  }
  ~DeviceScope() {
    if (previous_ >= 0 && previous_ != device_) (void)cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
  cudaError_t error() const { return error_; }

 private:
  int device_;
  int previous_ = -1;
  cudaError_t error_ = cudaSuccess;
};

// One pinned host block (cudaMallocHost), freed with cudaFreeHost.
struct Pinned {
  void* ptr = nullptr;
  size_t bytes = 0;
};

// Shared by the group and its Works: the pinned-buffer cache and the buffers of Works destroyed
// before their op completed.
struct StagingState {
  HostStagingOptions options;
  std::mutex mu;
  std::vector<Pinned> free;  // guarded by mu
  // Work handles of unfinished inner ops, kept with their buffers until the inner group is gone.
  std::vector<std::pair<std::unique_ptr<Work>, std::vector<Pinned>>> orphans;  // guarded by mu

  ~StagingState() {
    ReleaseOrphansLocked();  // no lock needed: nothing else holds the state any more
    for (const Pinned& p : free) (void)cudaFreeHost(p.ptr);
  }

  // Once the inner group is destroyed no inner op touches the orphans' buffers: back to the
  // cache with them. Needs mu (or sole ownership).
  void ReleaseOrphansLocked() {
    for (auto& [work, blocks] : orphans) {
      work.reset();
      for (const Pinned& p : blocks) free.push_back(p);
    }
    orphans.clear();
  }

  // A pinned block of at least `bytes` (the smallest cached one that fits, else a new one).
  Result<Pinned> Take(size_t bytes, const std::string& label) {
    {
      std::lock_guard<std::mutex> lock(mu);
      auto best = free.end();
      for (auto it = free.begin(); it != free.end(); ++it) {
        if (it->bytes >= bytes && (best == free.end() || it->bytes < best->bytes)) best = it;
      }
      if (best != free.end()) {
        Pinned p = *best;
        free.erase(best);
        return p;
      }
    }
    Pinned p;
    p.bytes = bytes;
    const cudaError_t e = cudaMallocHost(&p.ptr, bytes);
    if (e != cudaSuccess) return CudaFailure(label, "cudaMallocHost", e);
    return p;
  }

  void Give(std::vector<Pinned>& blocks) {
    std::lock_guard<std::mutex> lock(mu);
    for (const Pinned& p : blocks) {
      if (p.ptr != nullptr) free.push_back(p);
    }
    blocks.clear();
  }

  // cudaMemcpyAsync on options.stream, then synchronise that stream.
  Status Copy(void* dst, const void* src, size_t bytes, const std::string& label) {
    if (bytes == 0) return Status();
    DeviceScope scope(options.device);
    if (scope.error() != cudaSuccess) return CudaFailure(label, "cudaSetDevice", scope.error());
    auto* stream = static_cast<cudaStream_t>(options.stream);
    cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream);
    if (e != cudaSuccess) return CudaFailure(label, "cudaMemcpyAsync", e);
    e = cudaStreamSynchronize(stream);
    if (e != cudaSuccess) return CudaFailure(label, "cudaStreamSynchronize", e);
    return Status();
  }
};

// The inner op plus what to copy back to the device when it completes.
class StagedWork final : public Work {
 public:
  StagedWork(std::shared_ptr<StagingState> state, std::string label, std::unique_ptr<Work> inner,
             std::vector<Pinned> blocks, void* device_out, const void* host_out, size_t out_bytes)
      : state_(std::move(state)),
        label_(std::move(label)),
        inner_(std::move(inner)),
        blocks_(std::move(blocks)),
        device_out_(device_out),
        host_out_(host_out),
        out_bytes_(out_bytes) {}

  ~StagedWork() override {
    if (!finished_) {
      // The inner op may still write the host buffers: keep them until the group is gone.
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->orphans.emplace_back(std::move(inner_), std::move(blocks_));
    } else {
      state_->Give(blocks_);
    }
  }

  Status Wait(std::chrono::milliseconds timeout) override {
    if (finished_) return status_;
    Status s = inner_->Wait(timeout);
    // DEADLINE_EXCEEDED leaves the inner op in flight: Wait may be called again.
    if (s.code() == StatusCode::kDeadlineExceeded) return s;
    if (s.ok() && device_out_ != nullptr)
      s = state_->Copy(device_out_, host_out_, out_bytes_, label_);
    finished_ = true;
    status_ = std::move(s);
    return status_;
  }

 private:
  std::shared_ptr<StagingState> state_;
  std::string label_;
  std::unique_ptr<Work> inner_;
  std::vector<Pinned> blocks_;
  void* device_out_;
  const void* host_out_;
  size_t out_bytes_;
  bool finished_ = false;
  Status status_;
};

class StagedGroup final : public ProcessGroup {
 public:
  StagedGroup(std::unique_ptr<ProcessGroup> inner, const HostStagingOptions& options)
      : inner_(std::move(inner)), state_(std::make_shared<StagingState>()) {
    state_->options = options;
  }

  ~StagedGroup() override {
    // The inner group first: destroying it aborts its ops in flight, after which none touches
    // the staging buffers, which the state (shared with surviving Works) then frees.
    inner_.reset();
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->ReleaseOrphansLocked();
  }

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  const std::string& name() const override { return inner_->name(); }

  std::unique_ptr<Work> AllReduce(void* buf, size_t count, ElemType type, ReduceOp op) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "all_reduce", buf, count));
    const size_t bytes = count * ElemSize(type);
    return Staged("all_reduce", buf, bytes, bytes, buf, bytes, false,
                  [&](void* hin, void*) { return inner_->AllReduce(hin, count, type, op); });
  }

  std::unique_ptr<Work> ReduceScatter(const void* in, void* out, size_t count, ElemType type,
                                      ReduceOp op) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "reduce_scatter", in, count));
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "reduce_scatter", out, count));
    const size_t block = count * ElemSize(type);
    const size_t all = block * static_cast<size_t>(size());
    return Staged("reduce_scatter", in, all, all, out, block, true, [&](void* hin, void* hout) {
      return inner_->ReduceScatter(hin, hout, count, type, op);
    });
  }

  std::unique_ptr<Work> AllGather(const void* in, void* out, size_t count, ElemType type) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "all_gather", in, count));
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "all_gather", out, count));
    const size_t block = count * ElemSize(type);
    const size_t all = block * static_cast<size_t>(size());
    return Staged("all_gather", in, block, block, out, all, true,
                  [&](void* hin, void* hout) { return inner_->AllGather(hin, hout, count, type); });
  }

  std::unique_ptr<Work> Broadcast(void* buf, size_t count, ElemType type, int root) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "broadcast", buf, count));
    RETURN_WORK_IF_ERROR(
        internal::CheckPeer(name(), "broadcast", "root", root, rank(), size(), true));
    const size_t bytes = count * ElemSize(type);
    const bool is_root = root == rank();
    // Only the root's data travels; only the others' buffers change.
    return Staged("broadcast", is_root ? buf : nullptr, bytes, bytes, is_root ? nullptr : buf,
                  bytes, false,
                  [&](void* hin, void*) { return inner_->Broadcast(hin, count, type, root); });
  }

  std::unique_ptr<Work> Send(const void* buf, size_t count, ElemType type, int dst,
                             int tag) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "send", buf, count));
    const size_t bytes = count * ElemSize(type);
    return Staged("send", buf, bytes, bytes, nullptr, 0, false,
                  [&](void* hin, void*) { return inner_->Send(hin, count, type, dst, tag); });
  }

  std::unique_ptr<Work> Recv(void* buf, size_t count, ElemType type, int src, int tag) override {
    RETURN_WORK_IF_ERROR(internal::CheckBuffer(name(), "recv", buf, count));
    const size_t bytes = count * ElemSize(type);
    return Staged("recv", nullptr, bytes, bytes, buf, bytes, false,
                  [&](void* hin, void*) { return inner_->Recv(hin, count, type, src, tag); });
  }

  std::unique_ptr<Work> Barrier() override { return inner_->Barrier(); }

  Result<std::unique_ptr<ProcessGroup>> Split(const std::vector<int>& ranks,
                                              const std::string& new_name) override {
    ASSIGN_OR_RETURN(std::unique_ptr<ProcessGroup> sub, inner_->Split(ranks, new_name));
    return WrapWithHostStaging(std::move(sub), state_->options);
  }

  void Abort() override { inner_->Abort(); }

 private:
  // Stages one op. The first host block (in_block bytes) receives `dev_in` (in_bytes of it,
  // when dev_in is set); with separate_out a second block (out_bytes) is the host output,
  // else the output is the first block (in place). `issue(host_in, host_out)` issues the
  // inner op; its result is copied to `dev_out` (out_bytes) in Wait, when dev_out is set.
  template <typename Issue>
  std::unique_ptr<Work> Staged(const char* what, const void* dev_in, size_t in_bytes,
                               size_t in_block, void* dev_out, size_t out_bytes, bool separate_out,
                               Issue issue) {
    const std::string label = internal::OpLabel(name(), what);
    std::vector<Pinned> blocks;
    void* hin = nullptr;
    void* hout = nullptr;
    if (in_block > 0) {
      Result<Pinned> p = state_->Take(in_block, label);
      if (!p.ok()) return internal::Done(p.status());
      hin = p->ptr;
      blocks.push_back(*p);
    }
    if (separate_out && out_bytes > 0) {
      Result<Pinned> p = state_->Take(out_bytes, label);
      if (!p.ok()) {
        state_->Give(blocks);
        return internal::Done(p.status());
      }
      hout = p->ptr;
      blocks.push_back(*p);
    }
    if (dev_in != nullptr) {
      Status s = state_->Copy(hin, dev_in, in_bytes, label);
      if (!s.ok()) {
        state_->Give(blocks);
        return internal::Done(std::move(s));
      }
    }
    std::unique_ptr<Work> inner = issue(hin, hout);
    const void* host_result = separate_out ? hout : hin;
    return std::make_unique<StagedWork>(state_, label, std::move(inner), std::move(blocks), dev_out,
                                        host_result, out_bytes);
  }

  std::unique_ptr<ProcessGroup> inner_;
  std::shared_ptr<StagingState> state_;
};

}  // namespace

std::unique_ptr<ProcessGroup> WrapWithHostStaging(std::unique_ptr<ProcessGroup> inner,
                                                  const HostStagingOptions& options) {
  return std::make_unique<StagedGroup>(std::move(inner), options);
}

}  // namespace strata::comm
