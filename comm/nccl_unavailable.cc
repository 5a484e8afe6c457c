// Built instead of nccl.cc when CMake finds no CUDA toolkit or no NCCL (nccl.h + libnccl).
#include "comm/nccl.h"
#include "comm/nccl_testing.h"

namespace strata::comm {

namespace {
Status NoNccl() {
#ifdef STRATA_NCCL_NO_CUDA
  return Unimplemented(
      "nccl: this build of Strata has no NCCL backend: it was configured without the CUDA "
      "toolkit (install CUDA with nvcc, then re-run cmake)");
#else
  return Unimplemented(
      "nccl: this build of Strata has no NCCL backend: CMake found the CUDA toolkit but not "
      "NCCL (nccl.h and libnccl; install NCCL, then re-run cmake)");
#endif
}
}  // namespace

bool NcclAvailable() { return false; }
Result<std::string> NcclUniqueId() { return NoNccl(); }
Result<std::string> ShareNcclUniqueId(ProcessGroup&, std::chrono::milliseconds) { return NoNccl(); }
Result<std::unique_ptr<ProcessGroup>> CreateNcclGroup(const NcclGroupOptions&) { return NoNccl(); }
Status SetNcclComputeStream(ProcessGroup&, void*) { return NoNccl(); }
Status NcclStreamWaitForIssued(ProcessGroup&, void*) { return NoNccl(); }
Result<std::function<void()>> NcclStallNextOpForTesting(ProcessGroup&) { return NoNccl(); }

}  // namespace strata::comm
