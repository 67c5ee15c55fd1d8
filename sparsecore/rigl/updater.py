"""Topology updaters: drop by |w|, grow by a criterion; one interface for RigL, SET and static.

RigL is SET with |gradient| as the grow score: both drop the K smallest-magnitude connections of
each sparse layer, then grow K connections among those absent after the drop (the dropped ones
included). RigL grows where |dL/dW| = |dY·Xᵀ| of the current batch is largest, through the fused
tiled top-k kernel (the dense gradient is never formed), or, with ``grow="sampled"``, among a
uniform random subset of the absent connections (cost ∝ k, not m·n; see RigL); SET grows
uniformly at random (kernels/cpu/sampled.py's O(k) sampler in both). New
connections start at weight 0 with zero optimizer state; a connection dropped and regrown in the
same update keeps its weight and state. nnz per layer is exactly constant.

To plug in another criterion, subclass TopologyUpdater and override ``drop`` and/or ``grow``.

Where the choosing runs is the updater's selection strategy, passed in (sparsecore/rigl/
selection.py): ``Local`` (one process, whole layers) by default; training on several MPI ranks
gives its own (sparsecore/mpi: data-parallel, or layers split by rows over the ranks), with the
same result as the whole layer's.

On a device (a model moved with ``Sequential.to("cuda")``) the drop, RigL's exact grow, the
merge and the remaps run there through the layer's launchers (``layer.dev``). The random draws
of SET and of the sampled grow run on the host, on a downloaded copy of the pattern and keep
mask (and, for the sampled grow, of dY and X: O(nnz + (m + n)·B) bytes per layer and update,
none per step), with the same seeded generator as on the CPU; the k chosen connections are
uploaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sparsecore.layers import Sequential, SparseLinear
from sparsecore.rigl.schedule import UpdateSchedule
from sparsecore.rigl.selection import LOCAL


@dataclass
class UpdateReport:
    step: int
    drop_fraction: float
    # dicts: layer, nnz, dropped, grown, new, seconds (the layer's update), grow_seconds (its grow)
    per_layer: list = field(default_factory=list)

    @property
    def total_grown(self) -> int:
        return sum(d["grown"] for d in self.per_layer)


DRAW_TAG = 0x5E7  # topology draws are seeded by (seed, DRAW_TAG, step, layer, ...)


class TopologyUpdater:
    """Base: drop the K smallest |w| per layer, grow K by ``grow`` (abstract here)."""

    name = "base"

    def rng(self, step: int, index: int, *more: int) -> np.random.Generator:
        """The generator of layer ``index``'s random draws at update ``step`` (tagged: apart
        from the data's, the epochs' and the initialisation's streams of the same seed)."""
        return np.random.default_rng([self.seed, DRAW_TAG, step, index, *more])

    tile_bytes = None  # the exact grow's tile (RigL's setting; None: the kernel's default)
    selection = LOCAL  # where choices are made (see sparsecore/rigl/selection.py)

    def __init__(self, schedule: UpdateSchedule, seed: int = 0, *, selection=None):
        self.schedule = schedule
        self.seed = int(seed)
        self.selection = LOCAL if selection is None else selection  # where choices are made

    def is_update_step(self, step: int) -> bool:
        return self.schedule.is_update_step(step)

    # -- criteria (override these) ----------------------------------------------------------
    def drop(self, layer: SparseLinear, k: int) -> np.ndarray:
        """Positions (into W.data) of the k connections to drop: the k smallest |w| (of a
        shard: those of the layer's k that are in this rank's rows)."""
        return self.selection.drop(self, layer, k)

    def grow(self, layer: SparseLinear, k: int, keep: np.ndarray, step: int, index: int):
        """(rows, cols) of k connections absent from the kept set, ascending flat order."""
        raise NotImplementedError

    # -- the update ---------------------------------------------------------------------------
    def update(self, step: int, model: Sequential, optimizer=None) -> UpdateReport:
        import time

        f = self.schedule.drop_fraction(step)
        sel = self.selection
        sel.check(model)  # (a strategy that cannot update a layer refuses before any change)
        report = UpdateReport(step=step, drop_fraction=f)
        for index, layer in enumerate(model.sparse_layers()):
            t0 = time.perf_counter()
            W = layer.W
            dev = layer.dev  # the layer's side: its array module and launchers
            nnz = sel.total(layer, W.nnz)  # the whole layer's (a shard holds some rows)
            k = int(f * nnz)  # <= nnz, so the absent-after-drop set always holds k
            dropped = self.drop(layer, k)
            keep = dev.xp.ones(W.nnz, dtype=bool)
            keep[dropped] = False
            dev.sync()
            t_grow = time.perf_counter()
            rows, cols = self.grow(layer, k, keep, step, index)
            dev.sync()
            t_grow = time.perf_counter() - t_grow
            W2, src = dev.merge(W, keep, rows, cols)
            # what happened, counted (over the ranks' rows for a shard: one allreduce)
            counts = [W2.nnz, int(dropped.shape[0]), int(rows.shape[0])]
            counts.append(int(dev.xp.count_nonzero(src < 0)))
            nnz2, n_dropped, n_grown, n_new = sel.sums(layer, counts)
            if nnz2 != nnz:
                raise RuntimeError(f"layer {layer.name}: nnz changed from {nnz} to {nnz2}")
            old_grad = layer.gW
            layer.set_weight(W2)
            dev.remap(src, old_grad, 0.0, out=layer.gW)  # for a step taken on this batch
            if optimizer is not None:
                optimizer.remap(f"{layer.name}.W", src)
                optimizer.rebind(layer.params())
            report.per_layer.append(
                dict(
                    layer=layer.name,
                    nnz=nnz2,
                    dropped=n_dropped,
                    grown=n_grown,
                    new=n_new,
                    seconds=time.perf_counter() - t0,  # (a shard: this rank's time)
                    grow_seconds=t_grow,
                )
            )
        return report


class RigL(TopologyUpdater):
    """Grow where |dY·Xᵀ| of the current batch is largest (the layer's last input and output
    gradient).

    grow="exact" (the paper's RigL): the true top-k over every absent connection, through the
    fused tiled top-k kernel. Costs m·n·B multiply-adds per layer and update however sparse the
    layer is: at 10^6 × 10^6 and batch 128 that is 1.3·10^14, about an hour here.

    grow="sampled": draw C = min(candidates·k, |absent|) distinct absent connections uniformly
    (kernels/cpu/sampled.py: rejection against the kept CSR rows, O(C log C), nothing m×n), score
    them exactly by |Σ_b dY[i, b]·X[j, b]| (an SDDMM at their coordinates, C·B multiply-adds) and
    grow the k highest (ties to the lower flat index). What it approximates: the exact top-k of
    |dY·Xᵀ| is replaced by the top-k of a uniform C-sample of it. Each connection of the exact
    top-k is a candidate, and then surely grown, with probability C/|absent|; the rest of the k
    are the best of the sample, i.e. connections whose |gradient| ranks about in the top
    k/C fraction of all absent ones. Cost O(candidates·k·B) time and O(candidates·k) memory
    (about 17 bytes per candidate, measured 16), i.e. ∝ nnz, against m·n·B for the exact grow.
    candidates = 1 is SET (k uniform draws); candidates·k >= |absent| is exact RigL. Default 10:
    on MNIST LeNet-300-100 at 98% sparsity (bench/accuracy.py --grow, 5 seeds) c = 3, 10, 20,
    100 gave 97.12, 97.14, 97.16, 97.19% against 97.09% for the exact grow and 96.89% for c = 1
    (SET): no measurable accuracy cost from 3 on; 10 leaves a margin at little cost (at width
    10^6 and nnz 10^7 the grow of the big layer took 2.1 s). The draws are seeded by
    (seed, step, layer): the same seed gives the same topology.
    """

    name = "rigl"
    GROW_MODES = ("exact", "sampled")

    def __init__(
        self,
        schedule: UpdateSchedule,
        seed: int = 0,
        *,
        grow: str = "exact",
        candidates: float = 10,
        tile_bytes: int | None = None,
        selection=None,
    ):
        super().__init__(schedule, seed, selection=selection)
        if grow not in self.GROW_MODES:
            raise ValueError(f"grow must be one of {self.GROW_MODES}, got {grow!r}")
        if not candidates >= 1:
            raise ValueError(f"candidates (per grown connection) must be >= 1, got {candidates!r}")
        self.grow_mode = grow
        self.candidates = float(candidates)
        self.tile_bytes = tile_bytes  # the exact grow's tile (None: the kernel's default)

    def grow(self, layer, k, keep, step, index):
        if layer.x is None or layer.dy is None:
            raise RuntimeError(
                f"RigL needs {layer.name}'s input and output gradient of the current batch: run "
                "forward and backward before the update"
            )
        if self.grow_mode == "sampled":
            return self.selection.sampled_grow(self, layer, k, keep, step, index)
        return self.selection.exact_grow(self, layer, k, keep, step, index)


class SET(TopologyUpdater):
    """Grow uniformly at random among the absent connections (Mocanu et al., 2018): k distinct
    absent pairs by rejection against the kept CSR rows, O(k log k) time and O(k) memory
    (kernels/cpu/sampled.py), seeded by (seed, step, layer)."""

    name = "set"

    def grow(self, layer, k, keep, step, index):
        return self.selection.uniform_grow(self, layer, k, keep, step, index)


class Static(TopologyUpdater):
    """No topology change: the random initial pattern is kept for the whole run."""

    name = "static"

    def is_update_step(self, step: int) -> bool:
        return False

    def grow(self, layer, k, keep, step, index):
        e = layer.dev.xp.zeros(0, np.int64)
        return e, e


UPDATERS = {"rigl": RigL, "set": SET, "static": Static}
