// Fault hooks of the NCCL backend, for tests only (a hung peer without a second GPU or process).
#pragma once

#include <functional>

#include "comm/process_group.h"
#include "common/status.h"

namespace strata::comm {

// The next op launched on `group` (an NCCL group) first waits on its comm stream, on the
// device, until the returned function is called: from the group's point of view the op never
// completes, as with a peer that never arrives. Call the function before the process exits
// (a blocked stream stalls CUDA's teardown). INVALID_ARGUMENT for a non-NCCL group,
// UNIMPLEMENTED without NCCL.
Result<std::function<void()>> NcclStallNextOpForTesting(ProcessGroup& group);

}  // namespace strata::comm
