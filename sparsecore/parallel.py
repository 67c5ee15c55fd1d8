"""The parallelism a trainer talks to, for a world of one process (``Single``).

A Trainer (sparsecore/train.py) asks one object every question about other processes. Before
its model exists: which layers are split by rows over the processes (``sharded_layers``) and
how such a layer is built (``layer_builder``). Then ``bind(trainer)`` returns the object of the
run, which answers the rest: which rows of a global batch are its own, how to reduce the step's
gradient, loss and correct count, where a topology update chooses (its selection strategy), how
to evaluate, whether its state still matches the others', and which callbacks the run needs (a
watchdog, say).

``Single`` answers for one process: nothing is split, reduced or compared, updates choose
locally. sparsecore/mpi, which sits above the engine (nothing here imports it), subclasses it
for several ranks (``World``, bound to ``DataParallel`` or ``ShardedParallel``): a caller passes
``sparsecore.mpi.parallel()`` in (``sparsecore train`` does), and the trainer has no other
branch on how many processes there are.
"""

from __future__ import annotations

import os

from sparsecore.rigl.selection import LOCAL

# Environment variables that MPI launchers set to the number of ranks (MPICH/Hydra, Intel MPI,
# Slurm's PMI: PMI_SIZE; Open MPI: OMPI_COMM_WORLD_SIZE).
SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def launched_size() -> int:
    """Number of ranks an MPI launcher started this process with (1 without a launcher)."""
    for var in SIZE_VARS:
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 1


def split(total: int, parts: int, index: int) -> tuple[int, int]:
    """[lo, hi) of part ``index`` of ``total`` items in ``parts`` contiguous, near-equal parts."""
    return index * total // parts, (index + 1) * total // parts


class Single:
    """One process holding the whole model and every row of each batch."""

    rank = 0
    size = 1
    sharded = False  # whether some layers' rows live on other processes

    # -------------------------------------------------------- before the model is built
    def sharded_layers(self, cfg) -> list[int]:
        """The weighted layers of ``cfg`` split by rows over the processes (none here)."""
        return []

    def layer_builder(self, cfg, sharded):
        """How layers ``sharded`` are built (sparsecore.layers.mlp's sparse_layer; None: as
        whole layers)."""
        return None

    def bind(self, trainer):
        """The parallelism of ``trainer``'s run (its model built, its updater not yet)."""
        if launched_size() > 1:
            raise ValueError(
                f"this process is one of {launched_size()} MPI ranks (started by an MPI "
                "launcher), but its trainer was given no MPI parallelism: every rank would "
                "train alone and write the same files. Pass parallel=sparsecore.mpi.parallel() "
                "to Trainer or train(), or run `sparsecore train`"
            )
        return self

    # -------------------------------------------------------- during the run
    @property
    def selection(self):
        """Where a topology update chooses its connections (sparsecore/rigl/selection.py)."""
        return LOCAL

    def callbacks(self) -> list:
        """The run's callbacks of this parallelism (none for one process)."""
        return []

    def local_rows(self, idx):
        """This process's part of the global batch ``idx`` (rows of the training set)."""
        return idx

    def allreduce(self, model, loss, correct):
        """After backward: the global batch's gradient in the model, and its loss and correct
        count (one process: already so)."""
        return loss, correct

    def beat(self):
        """Progress was made (a step, an update, an evaluation batch)."""

    def update(self, updater, step: int, model, optimizer=None):
        """One topology update (several processes: the same on each, then checked)."""
        return updater.update(step, model, optimizer)

    def eval_sums(self, trainer, x, y):
        """(number correct, summed loss) over (x, y), a collective with several processes."""
        return trainer.eval_sums(x, y)

    def check_same(self, model, when: str, data=None):
        """Raise unless every process holds the same replicated state (one process: it does)."""

    def describe(self) -> str:
        return "one process: no communication"

    def stats(self):
        return None


SINGLE = Single()

__all__ = ["SINGLE", "SIZE_VARS", "Single", "launched_size", "split"]
