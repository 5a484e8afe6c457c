// MPI backend: the CPU collectives of an `mpirun -np N strata-worker` run (architecture mode 2).
// Collectives are MPI's non-blocking ones (MPI_Iallreduce, ...); Work::Wait polls MPI_Test
// until the op completes or the deadline passes, so a peer that never joins becomes
// DEADLINE_EXCEEDED instead of a hang. bf16/f16 reductions convert to fp32, reduce, and round
// once on the way back (as every backend does); kAvg is a sum followed by a division.
//
// Threading: every MPI call Strata makes goes through one process-wide mutex, so MPI only
// needs MPI_THREAD_SERIALIZED (requested by MpiInit) even when several threads use groups.
// Code that calls MPI directly besides Strata must do so from one thread at a time as well.
//
// Limits: count <= INT_MAX elements per op; Split is MPI_Comm_split, which blocks until every
// rank of the parent group calls it (no timeout); MPI cannot cancel a collective, so Abort only
// fails the local Works (in MPI mode a failure ends the run).
#pragma once

#include <memory>

#include "comm/process_group.h"
#include "common/status.h"

namespace strata::comm {

// Initialises MPI with MPI_THREAD_SERIALIZED; a no-op if MPI is already initialised with at
// least that level. Before MPI_Init it defaults Open MPI's non-blocking all-reduce to the ring
// algorithm (OMPI_MCA_coll_libnbc_iallreduce_algorithm=1) unless the variable is already set.
// FAILED_PRECONDITION if MPI offers less, UNIMPLEMENTED without MPI.
Status MpiInit(int* argc, char*** argv);
// Waits (bounded) for abandoned ops, then finalises MPI. A no-op if MPI is not initialised.
// FAILED_PRECONDITION (without finalising) if ops are still in flight: the caller should end
// the process, as MPI_Finalize would hang.
Status MpiFinalize();
// This process's rank and the world size (0 and 1 when MPI is not initialised).
int MpiWorldRank();
int MpiWorldSize();

// A group over a duplicate of MPI_COMM_WORLD (our traffic never mixes with the caller's),
// named "world". FAILED_PRECONDITION if MPI is not initialised.
Result<std::unique_ptr<ProcessGroup>> MakeMpiWorldGroup();

}  // namespace strata::comm
