// Built instead of mpi.cc when CMake finds no MPI.
#include "comm/mpi.h"

namespace strata::comm {

namespace {
Status NoMpi() {
  return Unimplemented(
      "mpi: this build of Strata has no MPI backend (install an MPI "
      "implementation and re-run cmake)");
}
}  // namespace

Status MpiInit(int*, char***) { return NoMpi(); }
Status MpiFinalize() { return Status(); }
int MpiWorldRank() { return 0; }
int MpiWorldSize() { return 1; }
Result<std::unique_ptr<ProcessGroup>> MakeMpiWorldGroup() { return NoMpi(); }

}  // namespace strata::comm
