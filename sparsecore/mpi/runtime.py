"""The MPI world of this process: finding it, ending every rank, the ranks' threads, and the
small collectives every mode uses (contiguous splits, record allgathers, checksums).

A process started by an MPI launcher with more than one rank finds the world here; anything else
(no launcher, one rank) is a single process, and mpi4py is never imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import zlib

import numpy as np

from kernels import config
from kernels.validation import coords_dtype
from sparsecore.parallel import SIZE_VARS, launched_size, split  # noqa: F401 (re-exported)

# Thread variables a user may set; when none is, each rank gets cores // ranks on its node.
THREAD_VARS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
INSTALL_HINT = "install the [mpi] extra: pip install 'sparsecore-rigl[mpi]' (mpi4py and mpich)"

_world: dict = {}  # the MPI world of this process, once found (MPI is initialised once)


class MPIUnavailableError(RuntimeError):
    """Several ranks were asked for, but mpi4py or mpiexec is missing."""


class RanksDiverged(RuntimeError):
    """Ranks that must hold identical models do not; the run stops."""


def world():
    """The MPI communicator of all ranks, or None for a single process (no launcher, or one
    rank). mpi4py is imported (and MPI initialised) only when a launcher started several ranks.
    """
    if "comm" in _world:
        return _world["comm"]
    comm = None
    if launched_size() > 1:
        if importlib.util.find_spec("mpi4py") is None:
            raise MPIUnavailableError(
                f"started by an MPI launcher with {launched_size()} ranks, but mpi4py is not "
                f"installed: {INSTALL_HINT}"
            )
        from mpi4py import MPI

        comm = MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None
    _world["comm"] = comm
    return comm


def is_root() -> bool:
    """True on rank 0, and in a single process."""
    comm = world()
    return comm is None or comm.Get_rank() == 0


def abort(code: int = 1):
    """End every rank now (MPI_Abort) when several run; a single process just returns. For an
    error raised in one rank: the others would otherwise wait in their next collective."""
    try:
        comm = world()
    except MPIUnavailableError:
        return
    if comm is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(config.MPI_ABORT_GRACE_S)  # let mpiexec forward what this rank said
        comm.Abort(code)


def abort_on_uncaught_exceptions():
    """From now on an exception that escapes this rank prints its one-line reason and its
    traceback, then stops every rank (MPI_Abort): the others would otherwise wait forever in
    their next collective. Returns the function that puts the previous sys.excepthook back (a
    run that ended well calls it: the hook does not outlive the run that needed it)."""
    previous = sys.excepthook
    if getattr(previous, "sparsecore_abort", False):
        return lambda: None  # (already in place: the outer caller restores)

    def hook(kind, value, tb):
        # the error in one line first (the launcher may drop the rest of a rank's output once
        # the abort starts), then the traceback; a moment to forward them; then every rank stops
        rank = world().Get_rank()
        sys.stderr.write(f"sparsecore: MPI rank {rank} failed: {kind.__name__}: {value}\n")
        sys.stderr.flush()
        previous(kind, value, tb)
        sys.stderr.flush()
        time.sleep(0.5)
        abort(1)

    hook.sparsecore_abort = True
    sys.excepthook = hook

    def restore():
        if sys.excepthook is hook:
            sys.excepthook = previous

    return restore


def limit_threads(comm):
    """Unless the user chose thread counts: cores // (ranks on this node) threads per rank for
    Numba and the BLAS (N ranks each running all cores' threads would fight over them)."""
    if any(v in os.environ for v in THREAD_VARS):
        return
    local = os.environ.get("MPI_LOCALNRANKS")
    if local and local.isdigit():
        n_local = int(local)
    else:
        from mpi4py import MPI

        n_local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
    threads = max(1, (os.cpu_count() or 1) // max(1, n_local))
    import numba
    from threadpoolctl import threadpool_limits

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    _world["blas_limits"] = threadpool_limits(limits=threads, user_api="blas")


def rows_cols(flat: np.ndarray, m: int, n: int):
    """(rows, cols) of flat indices i·n + j of an m × n layer, in the kernels' index dtype
    (int32 unless m or n needs int64)."""
    idx = coords_dtype(m, n)
    rows = flat // n
    return rows.astype(idx), (flat - rows * n).astype(idx)


def allgather_records(comm, fields: dict) -> np.ndarray:
    """Every rank's records (equal-length arrays per field: score float32 + flat int64 are 12
    bytes a record), concatenated in rank order on every rank: one count allgather (8 bytes a
    rank) and one allgatherv of the packed records."""
    from mpi4py import MPI

    dtype = [(name, "<f4" if a.dtype.kind == "f" else "<i8") for name, a in fields.items()]
    n = len(next(iter(fields.values())))
    mine = np.empty(n, dtype=dtype)
    for name, a in fields.items():
        mine[name] = a
    counts = np.empty(comm.Get_size(), np.int64)
    comm.Allgather(np.array([n], np.int64), counts)
    every = np.empty(int(counts.sum()), dtype=dtype)
    nbytes = counts * mine.dtype.itemsize
    displs = np.concatenate(([0], np.cumsum(nbytes)[:-1]))
    comm.Allgatherv(
        [mine.view(np.uint8), MPI.BYTE],
        [every.view(np.uint8), nbytes.tolist(), displs.tolist(), MPI.BYTE],
    )
    return every


def crc(*arrays) -> int:
    c = 0
    for a in arrays:
        c = zlib.crc32(np.ascontiguousarray(a).view(np.uint8), c)
    return c
