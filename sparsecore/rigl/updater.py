"""Topology updaters: drop by |w|, grow by a criterion; one interface for RigL, SET and static.

RigL is SET with |gradient| as the grow score: both drop the K smallest-magnitude connections of
each sparse layer, then grow K connections among those absent after the drop (the dropped ones
included). RigL grows where |dL/dW| = |dY·Xᵀ| of the current batch is largest, through the fused
tiled top-k kernel (the dense gradient is never formed); SET grows uniformly at random. New
connections start at weight 0 with zero optimizer state; a connection dropped and regrown in the
same update keeps its weight and state. nnz per layer is exactly constant.

To plug in another criterion, subclass TopologyUpdater and override ``drop`` and/or ``grow``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import kernels
from kernels.cpu import drop as _drop
from kernels.cpu import grow as _grow
from kernels.cpu import merge as _merge
from sparsecore.layers import Sequential, SparseLinear
from sparsecore.rigl.schedule import UpdateSchedule


@dataclass
class UpdateReport:
    step: int
    drop_fraction: float
    per_layer: list = field(default_factory=list)  # dicts: layer, nnz, dropped, grown, new, seconds

    @property
    def total_grown(self) -> int:
        return sum(d["grown"] for d in self.per_layer)


class TopologyUpdater:
    """Base: drop the K smallest |w| per layer, grow K by ``grow`` (abstract here)."""

    name = "base"

    def __init__(self, schedule: UpdateSchedule, seed: int = 0):
        self.schedule = schedule
        self.seed = int(seed)

    def is_update_step(self, step: int) -> bool:
        return self.schedule.is_update_step(step)

    # -- criteria (override these) ----------------------------------------------------------
    def drop(self, layer: SparseLinear, k: int) -> np.ndarray:
        """Positions (into W.data) of the k connections to drop."""
        return _drop.magnitude_drop(layer.W.data, k)

    def grow(self, layer: SparseLinear, k: int, keep: np.ndarray, step: int, index: int):
        """(rows, cols) of k connections absent from the kept set, ascending flat order."""
        raise NotImplementedError

    # -- the update ---------------------------------------------------------------------------
    def update(self, step: int, model: Sequential, optimizer=None) -> UpdateReport:
        import time

        f = self.schedule.drop_fraction(step)
        report = UpdateReport(step=step, drop_fraction=f)
        for index, layer in enumerate(model.sparse_layers()):
            t0 = time.perf_counter()
            W = layer.W
            k = int(f * W.nnz)  # <= nnz, so the absent-after-drop set always holds k
            dropped = self.drop(layer, k)
            keep = np.ones(W.nnz, dtype=bool)
            keep[dropped] = False
            rows, cols = self.grow(layer, k, keep, step, index)
            W2, src = kernels.merge(W, keep, rows, cols)
            if W2.nnz != W.nnz:
                raise RuntimeError(f"layer {layer.name}: nnz changed from {W.nnz} to {W2.nnz}")
            old_grad = layer.gW
            layer.set_weight(W2)
            _merge.remap(src, old_grad, 0.0, out=layer.gW)  # for a step taken on this batch
            if optimizer is not None:
                optimizer.remap(f"{layer.name}.W", src)
                optimizer.rebind(layer.params())
            report.per_layer.append(
                dict(
                    layer=layer.name,
                    nnz=W2.nnz,
                    dropped=int(dropped.shape[0]),
                    grown=int(rows.shape[0]),
                    new=int(np.count_nonzero(src < 0)),
                    seconds=time.perf_counter() - t0,
                )
            )
        return report


class RigL(TopologyUpdater):
    """Grow where |dY·Xᵀ| of the current batch is largest (the layer's last input and output
    gradient), exactly, through the fused top-k kernel."""

    name = "rigl"

    def grow(self, layer, k, keep, step, index):
        if layer.x is None or layer.dy is None:
            raise RuntimeError(
                f"RigL needs {layer.name}'s input and output gradient of the current batch: run "
                "forward and backward before the update"
            )
        W = layer.W
        rows, cols, _ = _grow.topk_grow(W.indptr, W.indices, keep, layer.dy, layer.x, k)
        return rows, cols


class SET(TopologyUpdater):
    """Grow uniformly at random among the absent connections (Mocanu et al., 2018)."""

    name = "set"

    def grow(self, layer, k, keep, step, index):
        W = layer.W
        m, n = W.shape
        rng = np.random.default_rng([self.seed, step, index])
        present = set((W.row_ids()[keep].astype(np.int64) * n + W.indices[keep]).tolist())
        chosen: set[int] = set()
        total = m * n
        while len(chosen) < k:  # rejection sampling: O(k) draws while the layer is sparse
            need = k - len(chosen)
            for f in rng.integers(0, total, size=2 * need + 16).tolist():
                if f not in present and f not in chosen:
                    chosen.add(f)
                    if len(chosen) == k:
                        break
        flat = np.fromiter(sorted(chosen), dtype=np.int64, count=k)
        return flat // n, flat % n


class Static(TopologyUpdater):
    """No topology change: the random initial pattern is kept for the whole run."""

    name = "static"

    def is_update_step(self, step: int) -> bool:
        return False

    def grow(self, layer, k, keep, step, index):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)


UPDATERS = {"rigl": RigL, "set": SET, "static": Static}
