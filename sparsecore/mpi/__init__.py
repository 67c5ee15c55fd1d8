"""Training on several MPI ranks: N processes compute what one process computes.

One module per job: runtime.py (the world, ending every rank, threads per rank, small
collectives), launcher.py (``--nprocs``: mpiexec), traffic.py (the byte model, 32-bit count
limits), ranks.py (what every mode shares: the guard, the watchdog, memory per rank),
data_parallel.py (``DataParallel`` and its grow), select.py (``RowShard``: the exact distributed
selection), sharded.py (``ShardedSparseLinear``, ``ShardedParallel`` and their updates), and
here ``World`` and ``parallel()``, which set a trainer up. The engine below (layers,
optimizers, updaters, the trainer, checkpoints, the plan) never imports this package: an
updater is given its selection strategy (sparsecore/rigl/selection.py), and the trainer is
given one parallelism object (sparsecore/parallel.py): ``Trainer(cfg,
parallel=mpi.parallel())``.

Launch: ``mpiexec -n N python -m sparsecore train ...`` (or ``sparsecore train --nprocs N``,
which starts exactly that under the ``[mpi]`` extra's mpiexec). A process started by an MPI
launcher with more than one rank finds the world here; anything else (no launcher, one rank)
trains as before, and importing sparsecore never imports mpi4py. A script of its own under
mpiexec passes ``parallel=sparsecore.mpi.parallel()``; a trainer given none there refuses to
start (each rank would train alone and write the same files).

What each rank holds and does, step by step (``DataParallel``):

- the whole sparse model, built from the same seed (checked bit for bit at start-up), and a
  contiguous slice of every global mini-batch: rank r of N takes rows [r·B//N, (r+1)·B//N)
  (uneven splits allowed: 128 over 3 ranks is 42 + 43 + 43);
- after backward, ONE allreduce (sum) of every parameter's gradient — the nnz-sized arrays of
  the sparse layers, the biases (and a dense layer's weights, if any) — plus the loss and the
  number of correct predictions, packed in one float32 buffer. Each rank's loss is the mean over
  its B_r rows, so its contribution is scaled by B_r/B before the sum: the result is the
  gradient of the global batch's mean loss. Payload: 4·(Σ nnz + Σ biases + 2) bytes, never a
  dense size;
- the optimizer step then runs on identical weights with identical gradients on every rank.

A topology update is identical on every rank without ever forming a dense gradient:

- drop: the K smallest |w| of identical weights (deterministic; nothing to communicate);
- RigL's exact grow: the rows of W are split into N blocks. Every rank receives the global
  batch's input X (n × B, an allgather of the ranks' columns) and the output gradient dY of its
  block of rows (rows × B, an all-to-all of the ranks' columns, scaled by B_r/B as the gradient
  is). Rank r runs the fused top-k kernel on its rows only (the row-slice CSR, indptr rebased)
  and keeps its best min(K, absent in its rows) candidates; the candidates (score float32 +
  flat index int64: 12 bytes each) are allgathered and merged into the global top-K by the
  kernel's own order (score descending, flat index ascending). The union of the blocks' top-K
  holds the global top-K, so the merge is exact. Grow work per rank: (m/N)·n·B;
- RigL's sampled grow: every rank draws the same C candidates (same seeded generator as one
  process), scores them on its own columns of the batch (signed partial sums Σ_b dY·X over its
  B_r columns) and one allreduce of the C partial sums gives the exact scores: 4·C bytes;
- SET and static: seeded or no draws, nothing to communicate.

Guard: after every topology update (and at start-up, and after loading a checkpoint) each rank
hashes (crc32) every layer's pattern (indptr, indices) and its values; one allgather of these
integers compares them, and any difference raises ``RanksDiverged`` naming the layer. An
uncaught exception in any rank calls ``MPI_Abort`` (``sys.excepthook``), so the other ranks stop
instead of waiting forever in a collective; mpiexec also ends the job when a rank dies.

Only rank 0 prints progress, writes metrics, the plot and checkpoints (written to a temporary
file and renamed, so a job killed mid-write keeps the last checkpoint); every rank reads a
checkpoint to resume, on any number of ranks.

Bytes are counted by each mode (``DataParallel.stats()``): the payload of each collective, i.e. the
size of its result on one rank.
"""

from __future__ import annotations

import dataclasses
import warnings

from sparsecore.mpi.data_parallel import DataParallel, DataParallelSelection
from sparsecore.mpi.launcher import launch, mpiexec, strip_nprocs
from sparsecore.mpi.ranks import Ranks
from sparsecore.mpi.runtime import (
    INSTALL_HINT,
    SIZE_VARS,
    THREAD_VARS,
    MPIUnavailableError,
    RanksDiverged,
    abort,
    abort_on_uncaught_exceptions,
    allgather_records,
    is_root,
    launched_size,
    limit_threads,
    split,
    world,
)
from sparsecore.mpi.select import RowShard  # (its tunables: kernels/config.py, MPI_OFFER_*)
from sparsecore.mpi.sharded import (
    RowShardedSelection,
    ShardedParallel,
    ShardedSparseLinear,
    shard_builder,
)
from sparsecore.mpi.traffic import MAX_COUNT, check_counts, step_bytes, update_bytes
from sparsecore.parallel import SINGLE, Single


class World(Single):
    """The MPI world (several ranks) as a trainer's parallelism, before the trainer binds it:
    which layers are split by rows (``--shard-layers``) and how their rows are built; then
    ``bind(trainer)`` returns ``DataParallel``, or ``ShardedParallel`` when the trainer built
    sharded layers. The trainer talks to that one object: it builds its updater with
    ``selection=par.selection``, runs topology updates through ``par.update`` (the guard after
    each), checks a loaded checkpoint with ``par.check_same`` and adds ``par.callbacks()`` (the
    watchdog) to its run."""

    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def sharded_layers(self, cfg) -> list[int]:
        return cfg.sharded_layers(self.size) if cfg.shard_layers is not None else []

    def layer_builder(self, cfg, sharded):
        if not sharded:
            return None
        return shard_builder(self.comm, sharded, cfg.seed, cfg.fan_in)

    def bind(self, trainer):
        comm, cfg = self.comm, trainer.cfg
        if trainer.device.on_device:
            raise ValueError(
                f"MPI training runs on the CPU; device={cfg.device!r} with "
                f"{comm.Get_size()} ranks is not supported yet"
            )
        restore = [abort_on_uncaught_exceptions()]  # (undone when the run has ended well)
        check_counts(trainer, comm.Get_size())
        limit_threads(comm)
        if trainer.sharded:
            par = ShardedParallel(comm, cfg.rank_timeout)
            par.model = trainer.model
        else:
            if cfg.batch_size < comm.Get_size():
                raise ValueError(
                    f"batch_size {cfg.batch_size} is smaller than the {comm.Get_size()} MPI "
                    "ranks: every rank needs at least one row of each mini-batch"
                )
            par = DataParallel(comm, cfg.batch_size, cfg.rank_timeout)
        if par.rank != 0:  # rank 0 alone prints and writes (the others' warnings would repeat it)
            trainer.cfg = dataclasses.replace(cfg, progress=False)
            trainer.out = None
            filters = warnings.filters[:]
            warnings.simplefilter("ignore")
            restore.append(lambda: warnings.filters.__setitem__(slice(None), filters))
        par.undo_at_exit = restore
        par.check_same(trainer.model, "building the model", data=trainer.data)
        return par


def sharding(cfg) -> tuple:
    """(communicator, indices of the weighted layers to split by rows) for a config with
    ``shard_layers`` run on several MPI ranks; (None, []) otherwise (one process, or
    data-parallel training). What ``World.sharded_layers`` gives a trainer."""
    comm = world() if cfg.shard_layers is not None else None
    if comm is None:
        return None, []
    return comm, cfg.sharded_layers(comm.Get_size())


def parallel(trainer=None):
    """This process's parallelism for a Trainer (``Trainer(cfg, parallel=mpi.parallel())``):
    the MPI world's ``World`` when an MPI launcher started several ranks, else
    ``sparsecore.parallel.SINGLE`` (one process: nothing changes).

    ``parallel(trainer)``, the form before step 4 of the house, binds a trainer built without
    sharded layers to the world and returns its side, or None for a single process."""
    comm = world()
    if trainer is not None:
        return None if comm is None else World(comm).bind(trainer)
    return SINGLE if comm is None else World(comm)


__all__ = [
    "DataParallel",
    "DataParallelSelection",
    "INSTALL_HINT",
    "MAX_COUNT",
    "MPIUnavailableError",
    "Ranks",
    "RanksDiverged",
    "RowShard",
    "RowShardedSelection",
    "SIZE_VARS",
    "THREAD_VARS",
    "ShardedParallel",
    "World",
    "ShardedSparseLinear",
    "abort",
    "allgather_records",
    "check_counts",
    "is_root",
    "launch",
    "launched_size",
    "mpiexec",
    "parallel",
    "shard_builder",
    "sharding",
    "split",
    "step_bytes",
    "strip_nprocs",
    "update_bytes",
    "world",
]
