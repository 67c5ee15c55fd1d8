"""How a topology update chooses its connections: the selection strategy an updater is given.

A TopologyUpdater (sparsecore/rigl/updater.py) decides *what* to drop and grow (K of the layer,
by |w|, by |dY·Xᵀ| exactly or over a sample, or uniformly); its selection decides *where* the
choosing runs. ``Local`` is one process holding whole layers: the kernels' own selections on the
layer's side (CPU or device). Training on several MPI ranks passes another strategy in
(sparsecore/mpi: ``DataParallelSelection``, the exact grow split by rows over the ranks;
``RowShardedSelection``, layers whose rows are spread over the ranks), each giving the same
result as ``Local`` on the whole layer. Every method takes the updater (for its settings and its
seeded generators) and the layer; none changes either.
"""

from __future__ import annotations

import numpy as np

from kernels.backend import check_scores_fit_float32
from kernels.cpu import sampled as _sampled
from sparsecore.device import to_host


class TrainingDiverged(RuntimeError):
    """The loss or a gradient stopped being finite; the last good checkpoint is kept.
    (Defined here, the lowest layer that raises it: sparsecore.train exports it.)"""


def exact_grow_checked(layer, indptr, indices, keep, dy, x, k: int, tile_bytes=None):
    """The fused top-k grow launcher (layer.dev.grow) behind the guards of the public
    kernels.topk_grow: dY and X finite, no score able to overflow float32 (both O((m + n)·B),
    against the grow's m·n·B), and exactly k connections with finite scores found. The
    updaters call the trusted launcher (the inputs are the engine's own), so a diverging run is
    stopped here, at the grow, with the reason, rather than later as a changed nnz."""
    xp, name = layer.dev.xp, getattr(layer, "name", "?")
    bad = [what for what, a in (("dY", dy), ("X", x)) if a.size and not bool(xp.isfinite(a).all())]
    if bad:
        raise TrainingDiverged(
            f"RigL's exact grow of layer {name}: {' and '.join(bad)} "
            f"{'hold' if len(bad) > 1 else 'holds'} NaN or inf, the run diverged (lower the "
            "learning rate)"
        )
    try:
        check_scores_fit_float32(layer.dev, dy, x)
    except OverflowError as e:  # in training, a gradient that large is a diverging run
        raise TrainingDiverged(
            f"RigL's exact grow of layer {name}: {str(e).split(';')[0]}, the run diverged "
            "(lower the learning rate)"
        ) from None
    rows, cols, scores = layer.dev.grow(indptr, indices, keep, dy, x, k, tile_bytes=tile_bytes)
    got = int(rows.shape[0])
    if got != k or (got and not bool(xp.isfinite(scores).all())):
        raise RuntimeError(  # finite inputs that fit: a broken invariant, never a wrong topology
            f"RigL's exact grow of layer {name} found {got} connections, expected {k} with "
            "finite scores"
        )
    return rows, cols, scores


def _whole(layer):
    """A layer whose rows are spread over MPI ranks cannot be updated locally: that would drop
    and grow by this rank's rows alone, a different (and rank-dependent) topology."""
    if getattr(layer, "shard", None) is not None:
        raise ValueError(
            f"layer {layer.name} is split by rows over MPI ranks: build the updater with "
            "selection=sparsecore.mpi.RowShardedSelection()"
        )
    return layer


class Local:
    """One process, whole layers."""

    name = "local"

    def check(self, model):
        """Before an update changes anything: every layer can be updated by this strategy."""
        for layer in model.sparse_layers():
            _whole(layer)

    def total(self, layer, value: int) -> int:
        """The layer's whole count of a per-layer quantity (nnz): here, the value itself."""
        _whole(layer)
        return value

    def sums(self, layer, values: list[int]) -> list[int]:
        """Counts of what an update did, over the whole layer: here, as they are."""
        return values

    def drop(self, updater, layer, k: int):
        """Positions (into W.data) of the layer's k smallest |w|."""
        return _whole(layer).dev.drop(layer.W.data, k)

    def exact_grow(self, updater, layer, k: int, keep, step: int, index: int):
        """(rows, cols) of the k absent connections with the largest |dY·Xᵀ| (fused top-k)."""
        W = _whole(layer).W
        rows, cols, _ = exact_grow_checked(
            layer, W.indptr, W.indices, keep, layer.dy, layer.x, k, updater.tile_bytes
        )
        return rows, cols

    def sampled_grow(self, updater, layer, k: int, keep, step: int, index: int):
        """(rows, cols) of the k best of C uniform absent candidates (on a device: drawn and
        scored on the host, uploaded)."""
        W = _whole(layer).W
        rows, cols, _ = _sampled.sampled_grow(
            *map(to_host, (W.indptr, W.indices, keep, layer.dy, layer.x)),
            k,
            updater.candidates,
            updater.rng(step, index),
        )
        return layer.dev.asarray(rows), layer.dev.asarray(cols)

    def uniform_grow(self, updater, layer, k: int, keep, step: int, index: int):
        """(rows, cols) of k distinct absent connections drawn uniformly (SET)."""
        W = _whole(layer).W
        indptr, indices, keep = map(to_host, (W.indptr, W.indices, keep))  # (a device: a copy)
        flat = _sampled.sample_absent(
            indptr, indices, keep, W.shape[1], k, updater.rng(step, index)
        )
        n = np.int64(W.shape[1])
        rows = flat // n
        return layer.dev.asarray(rows), layer.dev.asarray(flat - rows * n)


LOCAL = Local()
