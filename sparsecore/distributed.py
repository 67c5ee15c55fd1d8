"""Data-parallel training on MPI: N processes compute what one process computes.

Launch: ``mpiexec -n N python -m sparsecore train ...`` (or ``sparsecore train --nprocs N``,
which starts exactly that under the ``[mpi]`` extra's mpiexec). A process started by an MPI
launcher with more than one rank finds the world here; anything else (no launcher, one rank)
trains as before, and importing sparsecore never imports mpi4py.

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

Bytes are counted here (``DataParallel.stats()``): the payload of each collective, i.e. the
size of its result on one rank.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np

from sparsecore.layers import SparseLinear

# Environment variables that MPI launchers set to the number of ranks (MPICH/Hydra, Intel MPI,
# Slurm's PMI: PMI_SIZE; Open MPI: OMPI_COMM_WORLD_SIZE).
SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
# Thread variables a user may set; when none is, each rank gets cores // ranks on its node.
THREAD_VARS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
INSTALL_HINT = "install the [mpi] extra: pip install 'sparsecore-rigl[mpi]' (mpi4py and mpich)"

_world: dict = {}  # the MPI world of this process, once found (MPI is initialised once)


class MPIUnavailableError(RuntimeError):
    """Several ranks were asked for, but mpi4py or mpiexec is missing."""


class RanksDiverged(RuntimeError):
    """Ranks that must hold identical models do not; the run stops."""


# ---------------------------------------------------------------------- the world
def launched_size() -> int:
    """Number of ranks an MPI launcher started this process with (1 without a launcher)."""
    for var in SIZE_VARS:
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 1


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
        comm.Abort(code)


def _abort_on_uncaught_exceptions():
    if _world.get("hooked"):
        return
    previous = sys.excepthook

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

    sys.excepthook = hook
    _world["hooked"] = True


def _limit_threads(comm):
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


# ---------------------------------------------------------------------- the launcher
def mpiexec() -> str:
    """The mpiexec beside this Python (the mpich wheel's, in a venv's bin), else on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    found = shutil.which("mpiexec")
    if found:
        return found
    raise MPIUnavailableError(
        f"no mpiexec found beside {sys.executable} or on PATH: {INSTALL_HINT}"
    )


def strip_nprocs(argv: list[str]) -> list[str]:
    """argv without ``--nprocs N`` / ``--nprocs=N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nprocs":
            skip = True
        elif not a.startswith("--nprocs="):
            out.append(a)
    return out


def launch(nprocs: int, argv: list[str]) -> int:
    """Run ``python -m sparsecore <argv without --nprocs>`` on ``nprocs`` ranks under mpiexec;
    returns its exit status. Each rank gets cores // nprocs threads unless the user set them."""
    if importlib.util.find_spec("mpi4py") is None:
        raise MPIUnavailableError(f"--nprocs {nprocs} needs mpi4py: {INSTALL_HINT}")
    env = dict(os.environ)
    if not any(v in env for v in THREAD_VARS):
        threads = str(max(1, (os.cpu_count() or 1) // nprocs))
        env.update({v: threads for v in THREAD_VARS})
    cmd = [mpiexec(), "-n", str(nprocs), sys.executable, "-m", "sparsecore", *strip_nprocs(argv)]
    return subprocess.call(cmd, env=env)


# ---------------------------------------------------------------------- the cost model
def step_bytes(n_params: int) -> int:
    """Bytes of the per-step allreduce: every parameter's gradient (nnz per sparse weight, the
    biases, a dense layer's weights), the loss and the correct count, float32."""
    return 4 * (n_params + 2)


def update_bytes(shapes, ks, batch_size: int, ranks: int, rank: int = 0, candidates=None) -> int:
    """Bytes rank ``rank`` receives in one exact-RigL topology update of weighted layers of
    ``shapes`` [(m, n)] growing ``ks`` connections each: per layer the global batch's X
    (4·B·n, allgather), its block of dY's rows (4·B·m/N, all-to-all), the candidate counts
    (8·N) and the candidates (12 bytes each, at most k per rank: ``candidates`` gives the true
    total where a rank's block holds fewer than k absent entries); then the guard's two int64
    hashes per layer and rank (16·N·layers). Independent of nnz; never m·n."""
    total = 0
    for l, ((m, n), k) in enumerate(zip(shapes, ks, strict=True)):
        if k:
            r0, r1 = split(m, ranks, rank)
            c = ranks * k if candidates is None else candidates[l]
            total += 4 * batch_size * (n + r1 - r0) + 8 * ranks + 12 * c
    return total + 16 * ranks * len(shapes)


# ---------------------------------------------------------------------- data-parallel
def split(total: int, parts: int, index: int) -> tuple[int, int]:
    """[lo, hi) of part ``index`` of ``total`` items in ``parts`` contiguous, near-equal parts."""
    return index * total // parts, (index + 1) * total // parts


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


def _crc(*arrays) -> int:
    c = 0
    for a in arrays:
        c = zlib.crc32(np.ascontiguousarray(a).view(np.uint8), c)
    return c


def sharding(cfg) -> tuple:
    """(communicator, indices of the weighted layers to split by rows) for a config with
    ``shard_layers`` run on several MPI ranks; (None, []) otherwise (one process, or
    data-parallel training)."""
    if cfg.shard_layers is None:
        return None, []
    comm = world()
    if comm is None:
        return None, []
    from sparsecore.plan import sharded_layers

    chosen = sharded_layers(
        cfg.arch, cfg.sparsity, cfg.distribution, cfg.method, cfg.shard_layers, comm.Get_size()
    )
    return comm, chosen


def shard_builder(comm, sharded, seed: int, fan_in: str):
    """For layers.mlp: builds layer l (when in ``sharded``) as this rank's rows only, drawn by
    sparse_init's row blocks: the same values as those rows of the whole layer."""
    from sparsecore.layers import INIT_TAG, sparse_init

    def build(l, n_in, n_out, density):
        if l not in sharded:
            return None
        rows = split(n_out, comm.Get_size(), comm.Get_rank())
        W = sparse_init(n_in, n_out, density, [seed, INIT_TAG, l], fan_in=fan_in, rows=rows)
        return ShardedSparseLinear(W, None, f"fc{l}", comm, n_out)

    return build


def parallel(trainer):
    """Set up ``trainer`` for several MPI ranks and return its side of them: ``DataParallel``,
    or ``ShardedParallel`` when the trainer built sharded layers (None for a single process:
    nothing changes)."""
    comm = world()
    if comm is None:
        return None
    cfg = trainer.cfg
    if trainer.device.on_device:
        raise ValueError(
            f"MPI training runs on the CPU; device={cfg.device!r} with "
            f"{comm.Get_size()} ranks is not supported yet"
        )
    _abort_on_uncaught_exceptions()
    _check_counts(trainer, comm.Get_size())
    _limit_threads(comm)
    if trainer.sharded:
        par = ShardedParallel(comm, cfg.rank_timeout)
        par.model = trainer.model
    else:
        if cfg.batch_size < comm.Get_size():
            raise ValueError(
                f"batch_size {cfg.batch_size} is smaller than the {comm.Get_size()} MPI ranks: "
                "every rank needs at least one row of each mini-batch"
            )
        par = DataParallel(comm, cfg.batch_size, cfg.rank_timeout)
    if par.rank != 0:  # rank 0 alone prints and writes (the others' warnings would repeat it)
        trainer.cfg = dataclasses.replace(cfg, progress=False)
        trainer.out = None
        warnings.simplefilter("ignore")
    if trainer.updater is not None:
        par.wrap_updater(trainer.updater)
    load = trainer.load_checkpoint

    def load_checkpoint(path):
        load(path)
        par.check_same(trainer.model, f"loading checkpoint {path}")

    trainer.load_checkpoint = load_checkpoint
    par.check_same(trainer.model, "building the model", data=trainer.data)
    return par


MAX_COUNT = 2**31 - 1  # MPI's counts and displacements are C ints


def _check_counts(trainer, size: int, mpi_version=None):
    """With an MPI library older than MPI-4 (no large-count calls), refuse a run whose messages
    would exceed the C-int counts (elements) of MPI's calls: the data-parallel gradient buffer;
    a sharded layer's gathered outputs (m·B), dX (n·B) and its entries (a rank's, sent to rank
    0 in checkpoints: bounded by the layer's). Every rank computes the same limits, so all or
    none refuse. MPI-4 libraries (mpi4py uses their large-count calls) need no check."""
    if mpi_version is None:
        from mpi4py import MPI

        mpi_version = MPI.Get_version()
    if tuple(mpi_version) >= (4, 0):
        return
    B = trainer.cfg.batch_size
    checks = []
    if trainer.sharded:
        for layer in trainer.model.sparse_layers():
            if layer.shard is not None:
                m, n = layer.full_shape
                checks += [
                    (m * B, f"{layer.name}'s outputs for a batch (m·B)"),
                    (n * B, f"{layer.name}'s dX for a batch (n·B)"),
                    (layer.total_nnz(), f"{layer.name}'s entries"),
                ]
    else:
        total = sum(p.value.size for p in trainer.model.params()) + 2
        checks.append((total, "the gradients of all parameters (the per-step allreduce)"))
    for count, what in checks:
        if count > MAX_COUNT:
            raise ValueError(
                f"MPI message counts are 32-bit: {what} is {count:,} elements, above "
                f"{MAX_COUNT:,}; lower the batch size, or shard the layer over more ranks"
            )


class Ranks:
    """What both MPI modes share: the guard (identical replicated state on every rank), the
    watchdog (a rank that stops making progress stops every rank), and byte counts."""

    sharded = False

    def __init__(self, comm, timeout: float = 0.0):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.timeout = float(timeout)
        self._last = None  # time of the last progress (None: the watchdog is not running)
        self._watchdog = None  # (stop event, thread) while it runs
        self._paused = False  # during a checkpoint write
        self.other_bytes = 0  # everything not per step: topology updates, the guard
        self.update_bytes: list[int] = []  # per topology update (grow traffic + the guard)
        self.update_candidates: list[list[int]] = []  # per update: candidates merged per layer

    # -------------------------------------------------------------- the watchdog
    def beat(self):
        """Progress was made (a step, an update, an evaluation): restart the clock."""
        if self._last is not None:
            self._last = time.monotonic()

    def start_watchdog(self):
        """From now on, ``timeout`` seconds without a beat ends every rank (MPI_Abort) with a
        message: the others would otherwise wait forever in a collective for a rank that hangs
        without dying (a dead rank ends the job through mpiexec). The watchdog thread calls
        MPI_Abort while the main thread may sit in a collective, which needs an MPI library
        initialised with MPI_THREAD_MULTIPLE (mpi4py asks for it); with less, it is not started
        and a warning says so."""
        self._last = time.monotonic()
        if not self.timeout or self._watchdog is not None:
            return
        if self.MPI.Query_thread() < self.MPI.THREAD_MULTIPLE:
            warnings.warn(
                "the MPI library was not initialised with MPI_THREAD_MULTIPLE: the watchdog "
                "for hung ranks (rank_timeout) is off",
                stacklevel=2,
            )
            return
        stop = threading.Event()

        def watch():
            while not stop.wait(max(0.1, min(5.0, self.timeout / 10))):
                last = self._last
                if last is None or self._paused:
                    continue
                idle = time.monotonic() - last
                if idle > self.timeout:
                    sys.stderr.write(
                        f"sparsecore: MPI rank {self.rank} made no progress for {idle:.0f} s "
                        f"(rank_timeout {self.timeout:g} s): a rank is stuck; stopping every "
                        "rank (raise --rank-timeout if single steps or updates are this slow)\n"
                    )
                    sys.stderr.flush()
                    self.comm.Abort(3)

        thread = threading.Thread(target=watch, name="sparsecore-mpi-watchdog", daemon=True)
        thread.start()
        self._watchdog = (stop, thread)

    def pause_watchdog(self):
        """Around a checkpoint write, which takes what the filesystem takes: no clock (the
        other ranks wait for rank 0's write in resume_watchdog's barrier)."""
        self._paused = True

    def resume_watchdog(self):
        """After a checkpoint write: every rank waits until all are done (a barrier), then the
        clock restarts."""
        self.comm.Barrier()
        self._paused = False
        self.beat()

    def stop_watchdog(self):
        """No more watching: the thread ends (joined)."""
        self._last = None
        if self._watchdog is not None:
            stop, thread = self._watchdog
            stop.set()
            thread.join()
            self._watchdog = None

    # -------------------------------------------------------------- memory, per rank
    def gather_memory(self, model, optimizer):
        """Every rank's (peak RSS, bytes of training state it holds), in rank order, measured:
        the state summed from the arrays themselves (weights, indices, indptr, transpose
        structure, gradients, dX scratch, biases, optimizer moments). A collective."""
        import resource

        from sparsecore.cost import held_bytes

        held = held_bytes(model, optimizer)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        every = np.empty((self.size, 2), np.int64)
        self.comm.Allgather(np.array([rss, held], np.int64), every)
        self.memory = every.tolist()
        return self.memory

    def describe_memory(self) -> str:
        if not getattr(self, "memory", None):
            return ""
        rss, held = np.array(self.memory).T / 2**20
        return (
            f"; per rank: training state {held.min():.1f}-{held.max():.1f} MiB, peak RSS "
            f"{rss.min():.0f}-{rss.max():.0f} MiB"
        )

    # -------------------------------------------------------------- topology updates
    def wrap_updater(self, updater):
        """The guard after every topology update (instance attributes; the class is
        untouched)."""
        update = updater.update

        def checked_update(step, model, optimizer=None):
            self.beat()
            before = self.other_bytes + self._shard_update_bytes(model)
            self.update_candidates.append([])
            report = update(step, model, optimizer)
            self.check_same(model, f"the topology update at step {step}")
            self.update_bytes.append(self.other_bytes + self._shard_update_bytes(model) - before)
            self.beat()
            return report

        updater.update = checked_update

    @staticmethod
    def _shard_update_bytes(model) -> int:
        return sum(l.shard.bytes["update"] for l in model.sparse_layers() if l.shard is not None)

    # -------------------------------------------------------------- the guard
    def check_same(self, model, when: str, data=None):
        """Raise RanksDiverged unless every rank holds the same pattern and values of every
        replicated layer (crc32 of indptr, indices, data; of W and b for a dense layer). A
        sharded layer's rows are on one rank only: nothing to compare."""
        names, sums = [], []
        for layer in model.weighted():
            W = layer.W
            if getattr(layer, "shard", None) is not None:
                continue
            if isinstance(layer, SparseLinear):
                sums += [_crc(W.indptr, W.indices), _crc(W.data, layer.b)]
            else:
                sums += [0, _crc(W, layer.b)]
            names.append(layer.name)
        if data is not None:
            names.append("the training set")
            shape = np.array([len(data.x_train), data.n_features], np.int64)
            sums += [_crc(shape), _crc(np.asarray(data.y_train))]
        mine = np.array(sums, np.int64)
        every = np.empty((self.size, mine.shape[0]), np.int64)
        self.comm.Allgather(mine, every)
        self.other_bytes += every.nbytes
        differ = (every != every[0]).any(axis=0).reshape(-1, 2)
        problems = []
        for name, (pattern, values) in zip(names, differ, strict=True):
            if pattern:
                problems.append(f"the topology of {name}")
            if values:
                problems.append(f"the values of {name}")
        if problems:
            bad = [r for r in range(self.size) if (every[r] != every[0]).any()]
            raise RanksDiverged(
                f"after {when}, {', '.join(problems)} differ across MPI ranks (rank(s) {bad} "
                "differ from rank 0); every rank must hold the same replicated state, so "
                "training stops here"
            )


class ShardedParallel(Ranks):
    """One rank's side of training with sharded layers (ShardedSparseLinear): every rank runs
    every mini-batch whole; the sharded layers' collectives (forward allgather, backward
    allreduce, the updates' selections) do the exchanging, so there is nothing to reduce per
    step. Bytes per step: Σ over sharded layers of 4·m·B (forward) + 4·n·B (backward, none
    for the first layer)."""

    sharded = True

    def __init__(self, comm, timeout: float = 0.0):
        super().__init__(comm, timeout)
        self.p2p = comm.Dup()  # checkpoint traffic (point to point), apart from the world's
        self.model = None
        self.step_bytes = 0
        self.steps = 0
        self.step_bytes_total = 0
        self.eval_bytes = 0
        self._seen = 0

    def local_rows(self, idx: np.ndarray) -> np.ndarray:
        return idx  # the whole batch on every rank

    def allreduce(self, model, loss, correct):
        """Nothing to reduce (every rank computed the whole batch); counts the step's bytes."""
        total = self._step_traffic(model)
        self.step_bytes = total - self._seen
        self._seen = total
        self.steps += 1
        self.step_bytes_total += self.step_bytes
        return loss, correct

    def eval_sums(self, trainer, x, y):
        """Every rank evaluates every row (the sharded forward is a collective); its bytes are
        counted apart from the steps'."""
        self.beat()
        before = self._step_traffic(trainer.model)
        out = trainer.eval_sums(x, y)
        spent = self._step_traffic(trainer.model) - before
        self._seen += spent
        self.eval_bytes += spent
        self.beat()
        return out

    @staticmethod
    def _step_traffic(model) -> int:
        return sum(
            l.shard.bytes["forward"] + l.shard.bytes["backward"]
            for l in model.sparse_layers()
            if l.shard is not None
        )

    def describe(self) -> str:
        per_update = np.mean(self.update_bytes) if self.update_bytes else 0.0
        return (
            f"{self.size} ranks, sharded layers, {self.step_bytes / 1e3:.1f} kB per step "
            f"(forward allgathers + backward allreduces), {per_update / 1e3:.1f} kB per "
            f"topology update ({len(self.update_bytes)} updates)" + self.describe_memory()
        )

    def stats(self) -> dict:
        return {
            "ranks": self.size,
            "mode": "sharded",
            "memory": getattr(self, "memory", None),
            "step_bytes": self.step_bytes,
            "steps": self.steps,
            "step_bytes_total": self.step_bytes_total,
            "eval_bytes": self.eval_bytes,
            "update_bytes": list(self.update_bytes),
            "other_bytes": self.other_bytes,
            # selections per sharded layer (drop, grow): more than the updates when a rank's
            # first offer was saturated and it offered again
            "rounds": {
                l.name: dict(l.shard.rounds)
                for l in (self.model.sparse_layers() if self.model is not None else [])
                if l.shard is not None
            },
        }


class DataParallel(Ranks):
    """One rank's side of data-parallel training (see the module header)."""

    def __init__(self, comm, batch_size: int, timeout: float = 0.0):
        super().__init__(comm, timeout)
        self.batch_size = int(batch_size)
        self.lo, self.hi = split(self.batch_size, self.size, self.rank)
        self.local_batch = self.hi - self.lo
        self.weight = self.local_batch / self.batch_size  # of this rank's mean loss
        parts = [split(self.batch_size, self.size, r) for r in range(self.size)]
        self.col_counts = np.array([h - l for l, h in parts], np.int64)  # B_r of every rank
        self._buf = None
        # bytes: payload (result size on one rank) of each collective
        self.step_bytes = 0  # of the last per-step allreduce
        self.steps = 0
        self.step_bytes_total = 0
        self.eval_bytes = 0

    def eval_sums(self, trainer, x, y):
        """This rank's contiguous part of the rows, then one allreduce of (correct, loss sum)."""
        lo, hi = split(x.shape[0], self.size, self.rank)
        self.beat()
        sums = np.array(trainer.eval_sums(x[lo:hi], y[lo:hi]), np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, sums, op=self.MPI.SUM)
        self.eval_bytes += sums.nbytes
        self.beat()
        return float(sums[0]), float(sums[1])

    # -------------------------------------------------------------- per step
    def local_rows(self, idx: np.ndarray) -> np.ndarray:
        """This rank's contiguous slice of a global mini-batch's indices."""
        return idx[self.lo : self.hi]

    def allreduce(self, model, loss, correct):
        """Sum the ranks' gradients (each scaled by B_r/B) in place, with the loss and the count
        of correct predictions, in one allreduce; returns the global batch's (loss, correct)."""
        params = model.params()
        n = sum(p.grad.size for p in params) + 2
        buf = self._buf
        if buf is None or buf.shape[0] != n:
            buf = self._buf = np.empty(n, np.float32)
        w = np.float32(self.weight)
        o = 0
        for p in params:
            g = p.grad.reshape(-1)
            np.multiply(g, w, out=buf[o : o + g.shape[0]])
            o += g.shape[0]
        buf[o] = float(loss) * self.weight
        buf[o + 1] = correct
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        o = 0
        for p in params:
            g = p.grad.reshape(-1)
            g[...] = buf[o : o + g.shape[0]]
            o += g.shape[0]
        self.step_bytes = buf.nbytes
        self.steps += 1
        self.step_bytes_total += buf.nbytes
        return float(buf[o]), int(round(float(buf[o + 1])))

    # -------------------------------------------------------------- topology updates
    def wrap_updater(self, updater):
        """Make ``updater`` rank-consistent: RigL's grow split over the ranks, and the guard
        after every update (instance attributes; the class is untouched)."""
        from sparsecore.rigl.updater import RigL

        if isinstance(updater, RigL):
            updater.grow = lambda layer, k, keep, step, index: self.grow(
                updater, layer, k, keep, step, index
            )
        super().wrap_updater(updater)

    def grow(self, updater, layer, k, keep, step, index):
        """RigL's grow over the global batch (exact or sampled), identical on every rank."""
        if layer.x is None or layer.dy is None:
            raise RuntimeError(
                f"RigL needs {layer.name}'s input and output gradient of the current batch: run "
                "forward and backward before the update"
            )
        m, n = layer.W.shape
        idx_dtype = np.int32 if max(m, n) < 2**31 else np.int64
        if k == 0:
            return np.empty(0, idx_dtype), np.empty(0, idx_dtype)
        if updater.grow_mode == "sampled":
            flat = self._sampled_grow(updater, layer, k, keep, step, index)
        else:
            flat = self._exact_grow(updater, layer, k, keep)
        rows = flat // n
        return rows.astype(idx_dtype), (flat - rows * n).astype(idx_dtype)

    def _exact_grow(self, updater, layer, k, keep):
        W = layer.W
        m, n = W.shape
        X = self.gather_columns(layer.x)  # (n, B): the global batch's input
        r0, r1 = split(m, self.size, self.rank)
        dY = self.rows_of_columns(layer.dy, r0, r1)  # (r1 - r0, B), global-mean-loss scale
        lo, hi = int(W.indptr[r0]), int(W.indptr[r1])
        indptr = W.indptr[r0 : r1 + 1] - W.indptr[r0]
        block_keep = keep[lo:hi]
        absent = (r1 - r0) * n - int(np.count_nonzero(block_keep))
        rows, cols, scores = layer.dev.grow(
            indptr,
            W.indices[lo:hi],
            block_keep,
            dY,
            X,
            min(k, absent),
            tile_bytes=updater.tile_bytes,
        )
        flat = (rows.astype(np.int64) + r0) * n + cols
        return self.merge_top_k(flat, scores, k)

    def _sampled_grow(self, updater, layer, k, keep, step, index):
        from kernels.cpu import sampled

        W = layer.W
        m, n = W.shape
        rng = updater.rng(step, index)  # as RigL.grow: the same draws
        c = sampled.n_candidates(m, n, sampled.count_kept(W.indptr, keep), k, updater.candidates)
        flat = sampled.sample_absent(W.indptr, W.indices, keep, n, c, rng)
        partial = np.empty(c, np.float32)  # Σ_b dY[i, b]·X[j, b] over this rank's columns
        dy, x = layer.dy, layer.x
        w = np.float32(self.weight)
        chunk = max(1, (1 << 22) // max(1, dy.shape[1]))
        for s in range(0, c, chunk):
            f = flat[s : s + chunk]
            i = f // n
            np.einsum("cb,cb->c", dy[i], x[f - i * n], out=partial[s : s + chunk])
        partial *= w
        self.comm.Allreduce(self.MPI.IN_PLACE, partial, op=self.MPI.SUM)
        self.other_bytes += partial.nbytes
        scores = np.abs(partial)
        if c > k:  # the k best, ties to the lower flat index (flat is ascending)
            order = np.lexsort((flat, -scores))[:k]
            flat = np.sort(flat[order])
        return flat

    def gather_columns(self, a: np.ndarray) -> np.ndarray:
        """(r, B_r) on each rank -> (r, B) on every rank: the global batch's columns, in order."""
        r = a.shape[0]
        counts = self.col_counts * r
        displs = np.concatenate(([0], np.cumsum(counts)[:-1]))
        out = np.empty((self.batch_size, r), np.float32)
        send = np.ascontiguousarray(a.T, dtype=np.float32)
        self.comm.Allgatherv(send, [out, counts.tolist(), displs.tolist(), self.MPI.FLOAT])
        self.other_bytes += out.nbytes
        return np.ascontiguousarray(out.T)

    def rows_of_columns(self, dy: np.ndarray, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of the global dY (m, B), from every rank's columns (m, B_r) scaled by
        B_r/B: one all-to-all, each rank receiving only its block of rows."""
        m = dy.shape[0]
        local = np.ascontiguousarray(dy * np.float32(self.weight), dtype=np.float32)  # (m, B_r)
        blocks = [split(m, self.size, q) for q in range(self.size)]
        send_counts = np.array([(h - l) * self.local_batch for l, h in blocks])
        send_displs = np.array([l * self.local_batch for l, _ in blocks])
        recv_counts = (r1 - r0) * self.col_counts
        recv_displs = np.concatenate(([0], np.cumsum(recv_counts)[:-1]))
        recv = np.empty(int(recv_counts.sum()), np.float32)
        F = self.MPI.FLOAT
        self.comm.Alltoallv(
            [local, send_counts.tolist(), send_displs.tolist(), F],
            [recv, recv_counts.tolist(), recv_displs.tolist(), F],
        )
        self.other_bytes += recv.nbytes
        out = np.empty((r1 - r0, self.batch_size), np.float32)
        c0 = 0
        for s, bs in enumerate(self.col_counts):
            part = recv[recv_displs[s] : recv_displs[s] + recv_counts[s]]
            out[:, c0 : c0 + bs] = part.reshape(r1 - r0, bs)
            c0 += bs
        return out

    def merge_top_k(self, flat: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
        """The global top k of every rank's candidates (score descending, flat index ascending),
        as ascending flat indices: the fused kernel's own order, so the result is exact."""
        every = allgather_records(self.comm, {"score": scores, "flat": flat})
        self.other_bytes += 8 * self.size + every.nbytes
        if self.update_candidates:
            self.update_candidates[-1].append(every.shape[0])
        order = np.lexsort((every["flat"], -every["score"]))[:k]
        return np.sort(every["flat"][order])

    def describe(self) -> str:
        """One line for the command line's report."""
        per_update = np.mean(self.update_bytes) if self.update_bytes else 0.0
        return (
            f"{self.size} ranks (local batch {self.local_batch}), {self.step_bytes / 1e3:.1f} kB "
            f"per step (one allreduce), {per_update / 1e6:.2f} MB per topology update "
            f"({len(self.update_bytes)} updates)" + self.describe_memory()
        )

    def stats(self) -> dict:
        """Bytes communicated (payload of each collective, counted on this rank)."""
        return {
            "ranks": self.size,
            "mode": "data-parallel",
            "memory": getattr(self, "memory", None),
            "eval_bytes": self.eval_bytes,
            "local_batch": self.local_batch,
            "step_bytes": self.step_bytes,
            "steps": self.steps,
            "step_bytes_total": self.step_bytes_total,
            "update_bytes": list(self.update_bytes),
            "update_candidates": list(self.update_candidates),
            "other_bytes": self.other_bytes,
        }


# ---------------------------------------------------------------------- sharded layers
# A sharded layer's drop and exact grow first ask each rank for ceil(OFFER_SHARE·k/N) +
# OFFER_SLACK candidates (RowShard.offered): its share of the k if they spread evenly, with room.
OFFER_SHARE = 1.5
OFFER_SLACK = 64


class RowShard:
    """Rows [r0, r1) of an m-row sparse layer on this rank, and the collectives that make a
    topology update of the rows equal to the whole layer's (sparsecore/rigl/updater.py).

    The global K smallest |w| (drop) or K largest scores (grow) are found by an exact
    distributed selection, never by gathering candidates: a radix select over the float32 bit
    patterns (non-negative floats order as their bits), 8 bits per pass, one allreduce of a
    256-bin histogram per pass (4 passes: 8 KiB), finds the K-th value; every entry strictly
    better is taken, and of the entries equal to it the first ones in the layer's order (rank
    order, then local order: CSR position for the drop, flat index for the grow, the kernels'
    own tie rule), by one allgather of the ranks' tie counts. Memory O(this rank's entries);
    bytes O(1) in nnz.
    """

    def __init__(self, comm, m: int):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.m = int(m)
        self.r0, self.r1 = split(self.m, self.size, self.rank)
        self.bytes = {"forward": 0, "backward": 0, "update": 0}  # payload received, per kind
        # selections run per kind (more than one per update: a rank's offer was saturated)
        self.rounds = {"drop": 0, "grow": 0}

    def counts(self, value: int) -> np.ndarray:
        """Every rank's ``value`` (int64), in rank order."""
        every = np.empty(self.size, np.int64)
        self.comm.Allgather(np.array([value], np.int64), every)
        self.bytes["update"] += every.nbytes
        return every

    def sums(self, values) -> list[int]:
        """Element-wise sums over the ranks of a few integers (one allreduce)."""
        return [int(v) for v in self._allreduce(np.array(values, np.int64))]

    def total(self, value: int) -> int:
        """The sum over the ranks of ``value`` (e.g. the layer's nnz from the shards')."""
        return int(self.counts(value).sum())

    def split(self, per_rank: np.ndarray, draws: int, rng) -> int:
        """This rank's share of ``draws`` positions drawn uniformly without replacement from
        the ranks' ``per_rank`` positions (the same generator on every rank: the same split)."""
        from kernels.formats import split_count

        return int(split_count(per_rank, draws, rng)[self.rank])

    def _allreduce(self, a: np.ndarray) -> np.ndarray:
        self.comm.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)
        self.bytes["update"] += a.nbytes
        return a

    def select(self, values: np.ndarray, k: int, largest: bool) -> np.ndarray:
        """Positions (into ``values``, ascending) of this rank's entries among the k smallest
        (or largest) non-negative float32 values of all ranks, ties to the lower (rank, local
        position)."""
        keys = np.ascontiguousarray(values, np.float32).view(np.uint32)
        if largest:
            keys = ~keys  # larger float -> smaller key
        total = self.total(keys.shape[0])
        k = min(int(k), total)
        if k == 0:
            return np.empty(0, np.int64)
        prefix = np.uint32(0)
        need = k  # of the entries matching the prefix so far, how many are still to be taken
        match = keys
        for shift in (24, 16, 8, 0):
            digits = (match >> np.uint32(shift)) & np.uint32(0xFF)
            hist = self._allreduce(np.bincount(digits, minlength=256).astype(np.int64))
            cum = np.cumsum(hist)
            d = int(np.searchsorted(cum, need))  # the digit of the k-th smallest key
            need -= int(cum[d - 1]) if d else 0
            prefix |= np.uint32(d << shift)
            match = match[digits == d]
        pivot = prefix  # the k-th smallest key; `need` of the keys equal to it are taken
        less = np.flatnonzero(keys < pivot)
        equal = np.flatnonzero(keys == pivot)
        ties = self.counts(equal.shape[0])
        before = int(ties[: self.rank].sum())
        take = min(max(need - before, 0), equal.shape[0])
        return np.sort(np.concatenate([less, equal[:take]]))

    def offered(self, candidates, k: int, most: int, largest: bool, what: str) -> np.ndarray:
        """The keys of this rank's entries among the layer's k smallest (or largest) values.

        ``candidates(want)`` returns this rank's best ``want`` entries (at most ``most``) as
        (keys ascending, values): CSR positions and |w| for the drop, flat indices and scores
        for the grow. Each rank first offers ceil(OFFER_SHARE·k/N) + OFFER_SLACK (its share
        of the k if they spread evenly, with room for unevenness), not k, so its buffers are
        O(k/N). A rank whose offer was taken whole while it had more (saturated) may hold more
        of the k: it recomputes with 4x the offer and the selection is repeated until no rank
        is saturated. Then every rank's offer holds all of its entries among the k (an entry
        offered but not chosen ranks before everything that rank did not offer), so the result
        is exact."""
        want = min(most, max(1, -(-int(OFFER_SHARE * k) // self.size) + OFFER_SLACK))
        keys, values = candidates(want)
        while True:
            chosen = self.select(values, k, largest)
            saturated = chosen.shape[0] == want and want < most
            self.rounds[what] += 1
            if not self.counts(int(saturated)).any():
                return keys[chosen]
            if saturated:
                want = min(most, 4 * want)  # (want >= 1 here: a saturated offer was taken)
                keys, values = candidates(want)

    def smallest_of(self, dev, data: np.ndarray, k: int) -> np.ndarray:
        """The drop: positions (ascending) of this rank's entries among the layer's k smallest
        |w| (|w| ascending, CSR position ascending: the drop kernel's order)."""

        def candidates(want):
            pos = np.sort(dev.drop(data, want))
            return pos, np.abs(data[pos])

        return self.offered(candidates, k, min(k, data.shape[0]), False, "drop")

    def largest_of(self, candidates, k: int, most: int, n: int):
        """The exact grow: ``candidates(want)`` gives this rank's best ``want`` absent entries
        (flat indices into its rows, scores); returns (rows, cols) of those among the layer's
        k highest scores (score descending, flat index ascending: the grow kernel's order)."""

        def sorted_candidates(want):
            flat, scores = candidates(want)
            order = np.argsort(flat, kind="stable")
            return flat[order], scores[order]

        return self._rows_cols(self.offered(sorted_candidates, k, most, True, "grow"), n)

    def _rows_cols(self, best: np.ndarray, n: int):
        idx = np.int32 if max(self.m, n) < 2**31 else np.int64
        rows = best // n
        return rows.astype(idx), (best - rows * n).astype(idx)

    def largest(self, flat: np.ndarray, scores: np.ndarray, k: int, n: int):
        """The grow: of this rank's candidates (flat indices into its rows, ascending, and their
        scores), those among the layer's k highest (score descending, flat index ascending), as
        (rows, cols) of this rank's block."""
        order = np.argsort(flat, kind="stable")
        flat, scores = flat[order], scores[order]
        return self._rows_cols(flat[self.select(scores, k, largest=True)], n)


class ShardedSparseLinear(SparseLinear):
    """Rows [r0, r1) of an m × n sparse layer, on this rank: its weights, indices, bias,
    gradients and optimizer state are those rows only (memory ≈ 1/N of the layer).

    forward: this rank's rows of y = W·x + b (x, n × B, is on every rank), then one allgather
    of the rows: every rank holds y (m × B; 4·m·B bytes). backward: dW and db of its rows from
    its rows of dY, and the partial dX = W_rowsᵀ·dY_rows (through the feeding ReLU's gate, which
    is elementwise and so commutes with the sum), summed over the ranks by one allreduce
    (4·n·B bytes; none for the first layer, whose dX nobody needs). Every rank runs the whole
    batch; layers that are not sharded (ReLUs, a dense classifier) are replicated and compute
    the same on every rank. A topology update goes through ``shard`` (RowShard), so the result
    equals the unsharded layer's.
    """

    def __init__(self, W_rows, bias, name, comm, m: int):
        super().__init__(W_rows, bias, name)
        self.shard = RowShard(comm, m)
        self.comm = comm
        self.m = int(m)
        self.r0, self.r1 = self.shard.r0, self.shard.r1
        if W_rows.shape[0] != self.r1 - self.r0:
            raise ValueError(
                f"{name}: rank {comm.Get_rank()} holds rows [{self.r0}, {self.r1}) of {m}, "
                f"got a block of {W_rows.shape[0]} rows"
            )

    @classmethod
    def shard_of(cls, layer, comm) -> ShardedSparseLinear:
        """This rank's rows of a whole SparseLinear (copied)."""
        from kernels.formats import CSR

        W = layer.W
        m, n = W.shape
        r0, r1 = split(m, comm.Get_size(), comm.Get_rank())
        lo, hi = int(W.indptr[r0]), int(W.indptr[r1])
        rows = CSR(
            W.indptr[r0 : r1 + 1] - W.indptr[r0],
            W.indices[lo:hi].copy(),
            W.data[lo:hi].copy(),
            (r1 - r0, n),
        )
        return cls(rows, layer.b[r0:r1].copy(), layer.name, comm, m)

    def _row_counts(self, per_row: int):
        size = self.comm.Get_size()
        parts = [split(self.m, size, r) for r in range(size)]
        return [(h - l) * per_row for l, h in parts], [l * per_row for l, _ in parts]

    @property
    def full_shape(self) -> tuple[int, int]:
        return self.m, self.W.shape[1]

    def total_nnz(self) -> int:
        return self.shard.total(self.W.nnz)

    def forward(self, x, relu: bool = False):
        from mpi4py import MPI

        mine = super().forward(x, relu)  # (r1 - r0, B)
        y = np.empty((self.m, x.shape[1]), np.float32)
        counts, displs = self._row_counts(x.shape[1])
        self.comm.Allgatherv(mine, [y, counts, displs, MPI.FLOAT])
        self.shard.bytes["forward"] += y.nbytes
        return y

    def backward(self, dy, need_dx=True, gate=None):
        from mpi4py import MPI

        dx = super().backward(np.ascontiguousarray(dy[self.r0 : self.r1]), need_dx, gate)
        if dx is not None:
            self.comm.Allreduce(MPI.IN_PLACE, dx, op=MPI.SUM)
            self.shard.bytes["backward"] += dx.nbytes
        return dx

    def gather(self):
        """The whole layer (CSR, bias) on every rank: for tests (the whole layer's memory)."""
        from kernels.formats import CSR

        W = self.W
        every = allgather_records(
            self.comm,
            {"row": W.row_ids().astype(np.int64) + self.r0, "col": W.indices, "w": W.data},
        )
        b = np.empty(self.m, np.float32)
        from mpi4py import MPI

        counts, displs = self._row_counts(1)
        self.comm.Allgatherv(self.b, [b, counts, displs, MPI.FLOAT])
        indptr = np.zeros(self.m + 1, W.indptr.dtype)
        np.cumsum(np.bincount(every["row"], minlength=self.m), out=indptr[1:])
        full = CSR(indptr, every["col"].astype(W.indices.dtype), every["w"], (self.m, W.shape[1]))
        return full, b


__all__ = [
    "DataParallel",
    "ShardedParallel",
    "MPIUnavailableError",
    "RanksDiverged",
    "RowShard",
    "ShardedSparseLinear",
    "parallel",
    "sharding",
    "is_root",
    "launch",
    "world",
]
