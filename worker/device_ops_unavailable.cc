// DeviceOps for builds without CUDA (nvcc not found at configure time, or -DSTRATA_CUDA=OFF):
// every entry point answers that this build cannot run `device: cuda`. Contract in device_ops.h.
#include "worker/device_ops.h"

namespace strata::worker {

Status CudaUsable() {
  return InvalidArgument(
      "resources.device: cuda, but this build has no CUDA (nvcc not found at configure time)");
}

int VisibleCudaDevices() { return 0; }

Result<std::unique_ptr<model::Gpt>> CreateCudaModel(const model::GptConfig&, model::DType, int, int,
                                                    model::TensorParallelComm*,
                                                    const model::PipelineStage&, int, int) {
  return CudaUsable();
}

Result<std::unique_ptr<DeviceOps>> CreateDeviceOps(model::Gpt&) { return CudaUsable(); }

}  // namespace strata::worker
