// Conventions shared by every CUDA kernel launcher in model/cuda (plain C++: no CUDA type leaks).
//
// - Pointers are device pointers. Tensors typed "T" are in the model's compute type, passed as
//   `void*` with a DType (kF32, kBF16, kF16); everything named fp32 is float.
// - `stream` is a cudaStream_t (nullptr = the legacy default stream). Launchers only queue work:
//   an OK Status means the launch was accepted; faults raised while a kernel runs surface at the
//   next synchronisation (CudaStreamSynchronize).
// - INVALID_ARGUMENT (nothing launched) for negative sizes or null pointers where data is
//   needed; INTERNAL with the CUDA error name when a launch fails. Empty work returns OK.
// - Same accumulate/overwrite rules as the CPU kernels in model/kernels: activation gradients
//   overwrite (=) unless stated, weight gradients accumulate (+=) in fp32.
// - Deterministic: the same inputs give bitwise the same outputs on the same GPU (no
//   floating-point atomics whose order varies) — elastic recovery is sample-exact only then.
#pragma once

#include <cstdint>

#include "common/status.h"
#include "model/dtype.h"
