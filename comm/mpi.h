// MPI backend: the CPU collectives of an `mpirun -np N strata-worker` run (architecture mode 2).
//
// Two paths, chosen from the group size and the message size alone (so every rank picks the
// same one):
//  * direct: groups of at most 8 ranks where one message (the all-reduce or broadcast buffer,
//    the reduce-scatter or all-gather block) times (ranks - 1) is at most
//    kMpiDirectReduceMaxBytes (all-reduce, reduce-scatter) or kMpiDirectCopyMaxBytes
//    (all-gather, broadcast). These collectives become point-to-point messages
//    (MPI_Isend/MPI_Irecv to every peer on a second communicator of the group) and reductions
//    run locally in rank order, so every rank gets the same bits. Open MPI's non-blocking
//    collectives cost 1.5-4x its blocking ones at these sizes; this path is on par with them.
//  * MPI's non-blocking collectives (MPI_Iallreduce, ...) for everything larger.
// bf16/f16 reductions happen in fp32 and round once (as every backend does); kAvg is a sum
// followed by a division.
//
// Progress: Open MPI moves a non-blocking op only inside MPI calls. Ops are issued on the
// calling thread (which keeps a small op's latency at raw MPI's), and a progress thread per
// process (started with the first op it has to watch) calls MPI_Test every 100 us on the ops
// that need the receiver's or both sides' help to move: MPI's collectives, point-to-point and
// direct-path messages above 4 KB, and ops whose Work was destroyed in flight. So gradient
// buckets launched during backward move while backward computes. A thread in Wait drives MPI
// itself (polling, then backing off to 50 us sleeps after 2 ms); meanwhile, and whenever
// another thread holds the MPI lock, the progress thread skips its round. It sleeps once
// nothing has been in flight for 50 ms. Cost: its wake-ups, and the copies and reductions
// MPI performs inside its MPI_Test, take CPU time from computation where no core is idle.
// STRATA_MPI_PROGRESS_US sets the interval; 0 turns the thread off (Wait alone drives MPI).
//
// Threading: every MPI call Strata makes, the progress thread's included, goes through one
// process-wide mutex, so MPI only needs MPI_THREAD_SERIALIZED (requested by MpiInit) even when
// several threads use groups. Code that calls MPI directly besides Strata must not do so while
// a Strata op is in flight (the progress thread may be inside MPI), or must use
// MPI_THREAD_MULTIPLE.
//
// Limits: count <= INT_MAX elements per op; Split is MPI_Comm_split, which blocks until every
// rank of the parent group calls it (no timeout); MPI cannot cancel a collective, so Abort only
// fails the local Works (in MPI mode a failure ends the run).
#pragma once

#include <cstddef>
#include <memory>

#include "comm/process_group.h"
#include "common/status.h"

namespace strata::comm {

// The direct path's limits on one message's bytes times (ranks - 1), see above. Reductions
// gain up to 32 KB (they also skip MPI's reduction schedule); copies gain only while the
// messages are eager in Open MPI's shared-memory transport (about 4 KB).
inline constexpr size_t kMpiDirectReduceMaxBytes = 32 << 10;
inline constexpr size_t kMpiDirectCopyMaxBytes = 4000;

// Initialises MPI with MPI_THREAD_SERIALIZED; a no-op if MPI is already initialised with at
// least that level. Before MPI_Init it defaults Open MPI's non-blocking all-reduce to the ring
// algorithm (OMPI_MCA_coll_libnbc_iallreduce_algorithm=1) unless the variable is already set.
// FAILED_PRECONDITION if MPI offers less, UNIMPLEMENTED without MPI.
Status MpiInit(int* argc, char*** argv);
// Stops the progress thread, waits (bounded) for abandoned ops, then finalises MPI. A no-op if MPI
// is not initialised. FAILED_PRECONDITION (without finalising) if ops are still in flight: the
// caller should end the process, as MPI_Finalize would hang.
Status MpiFinalize();
// This process's rank and the world size (0 and 1 when MPI is not initialised).
int MpiWorldRank();
int MpiWorldSize();

// A group over a duplicate of MPI_COMM_WORLD (our traffic never mixes with the caller's),
// named "world". FAILED_PRECONDITION if MPI is not initialised.
Result<std::unique_ptr<ProcessGroup>> MakeMpiWorldGroup();

}  // namespace strata::comm
