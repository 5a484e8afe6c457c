// Built instead of device_staged.cc when Strata is configured without CUDA: there is no device
// memory to stage, so the inner group serves every buffer as it is.
#include "comm/device_staged.h"

namespace strata::comm {

std::unique_ptr<ProcessGroup> WrapWithHostStaging(std::unique_ptr<ProcessGroup> inner,
                                                  const HostStagingOptions&) {
  return inner;
}

}  // namespace strata::comm
