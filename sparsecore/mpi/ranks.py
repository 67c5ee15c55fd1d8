"""What every MPI mode shares (``Ranks``): the guard (identical replicated state on every rank,
checked after start-up, loading a checkpoint and every topology update), the watchdog (a rank
that stops making progress stops every rank), per-rank memory, and byte counts."""

from __future__ import annotations

import math
import sys
import threading
import time
import warnings

import numpy as np

from kernels import config
from sparsecore.callbacks import Callback
from sparsecore.cost import held_bytes
from sparsecore.layers import SparseLinear
from sparsecore.mpi.runtime import RanksDiverged, crc
from sparsecore.parallel import Single
from sparsecore.rss import peak_rss_mib


class Watchdog(Callback):
    """The watchdog and per-rank memory as the run's callback: started before the first step,
    paused from the end of each epoch (the writes of the callbacks after it: metrics, the
    checkpoint; at the end, the plot) until the next epoch starts or the run has ended (each
    resume is a barrier: every rank waits for rank 0's writes), the ranks' memory gathered when
    the run ends well, stopped whatever happens. A run that ended well also undoes what binding
    it changed process-wide (``Ranks.undo_at_exit``: the abort hook, the warning filters)."""

    def __init__(self, ranks):
        self.ranks = ranks
        self.paused = False

    def on_run_start(self, trainer):
        self.ranks.start_watchdog()

    def on_epoch_start(self, trainer, steps):
        self._resume()

    def on_epoch_end(self, trainer, row):
        self.ranks.pause_watchdog()
        self.paused = True

    def on_run_exit(self, trainer, error):
        try:
            if error is None:  # after the others' last writes and the plot (rank 0's)
                self._resume()
                self.ranks.gather_memory(trainer.model, trainer.opt)
        finally:
            self.ranks.stop_watchdog()
        if error is None:  # (an error on its way out still needs the abort hook)
            for undo in self.ranks.undo_at_exit:
                undo()
            self.ranks.undo_at_exit = []

    def _resume(self):
        if self.paused:  # (every rank runs the same epochs: the barriers pair up)
            self.ranks.resume_watchdog()
            self.paused = False


class Ranks(Single):
    """What both MPI modes share: the guard (identical replicated state on every rank), the
    watchdog (a rank that stops making progress stops every rank), and byte counts."""

    sharded = False

    def __init__(self, comm, timeout: float = 0.0):
        from mpi4py import MPI  # (only with several ranks: importing sparsecore never needs it)

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
        # what the run changed process-wide (the abort hook; on ranks other than 0, the
        # warning filters), undone by the watchdog callback when the run has ended well
        self.undo_at_exit: list = []

    def callbacks(self) -> list:
        return [Watchdog(self)]

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
        tick = min(config.MPI_WATCHDOG_MAX_TICK_S, self.timeout / config.MPI_WATCHDOG_TICKS)
        tick = max(config.MPI_WATCHDOG_MIN_TICK_S, tick)

        def watch():
            while not stop.wait(tick):
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
                    time.sleep(config.MPI_ABORT_GRACE_S)  # (the message forwarded first)
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
        held = held_bytes(model, optimizer)
        peak = peak_rss_mib()  # (VmHWM: this rank's own, not its launcher's; NaN: unknown)
        rss = int(peak * 2**20) if math.isfinite(peak) else -1
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
    def update(self, updater, step: int, model, optimizer=None):
        """One topology update on every rank (the trainer calls this instead of the updater's
        own ``update``), then the guard: the updater was built with this mode's selection
        (``self.selection``), so the update is identical where it must be."""
        self.beat()
        before = self.other_bytes + self._shard_update_bytes(model)
        self.update_candidates.append([])
        report = updater.update(step, model, optimizer)
        self.check_same(model, f"the topology update at step {step}")
        self.update_bytes.append(self.other_bytes + self._shard_update_bytes(model) - before)
        self.beat()
        return report

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
                sums += [crc(W.indptr, W.indices), crc(W.data, layer.b)]
            else:
                sums += [0, crc(W, layer.b)]
            names.append(layer.name)
        if data is not None:
            names.append("the training set")
            shape = np.array([len(data.x_train), data.n_features], np.int64)
            sums += [crc(shape), crc(np.asarray(data.y_train))]
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
