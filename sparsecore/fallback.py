"""The dense fallback: which sparse layers compute their products on dense BLAS.

A sparse layer's three products (forward, dW, dX) cost the kernels about 2·nnz·B flops each at
well under BLAS's rate, so above some density BLAS on the dense m × n weight is faster, even
though it does 1/density times the flops. Where that break-even lies depends on the machine,
the shape and the batch, so ``auto`` measures it: each layer's step products are timed both ways
on its own weights (interleaved repetitions, the median of each), and a layer computes dense
when that is faster by config.DENSE_FALLBACK_MARGIN. ``on`` makes every sparse layer dense,
``off`` none.

What a dense layer holds more: its dense copy of W and dW's scratch, 2·m·n·4 bytes (counted by
the memory plan, sparsecore/plan.py, and refused when over the budget). What stays the same:
weights, gradients and optimizer state are nnz-sized, checkpoints are the same CSR files,
RigL's drop and grow see the same pattern and the same gradients; the products agree with the
kernels' to float32 rounding. The choice holds for the run: RigL keeps each layer's nnz, so its
density does not change.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from kernels import _threads

MODES = ("off", "auto", "on")
# a layer goes dense under "auto" only when that is at least this much faster than its kernels
DENSE_FALLBACK_MARGIN = 0.05
# below this density the kernels always win (the measured break-even is 14-40% on the machines
# seen so far): such layers are not timed at all
DENSE_FALLBACK_MIN_DENSITY = 0.05
TIMING_REPS = 5


def _step_time(layer, x, dy, need_dx, reps):
    """Median seconds of one forward + backward of ``layer`` on (x, dy), per compute mode,
    interleaved rep by rep."""
    dev = layer.dev
    times = {"sparse": [], "dense": []}
    for rep in range(reps + 1):  # the first round warms up (JIT, the dense copy's allocation)
        for mode in ("sparse", "dense"):
            layer.compute = mode
            dev.sync()
            t = time.perf_counter()
            layer.forward(x)
            layer.backward(dy, need_dx=need_dx)
            dev.sync()
            if rep:
                times[mode].append(time.perf_counter() - t)
    return {mode: float(np.median(ts)) for mode, ts in times.items()}


def choose(model, mode: str, batch: int, spare_bytes: int | None = None, reps=TIMING_REPS):
    """Set every sparse layer's compute by ``mode`` (off | auto | on); returns one record per
    sparse layer: name, shape, density, compute, why, and for timed layers sparse_ms and
    dense_ms. ``spare_bytes``: memory the dense copies may take in all (None: no limit); a
    layer whose copy does not fit stays sparse. Leaves the layers' gradients zero and their
    batch references cleared."""
    if mode not in MODES:
        raise ValueError(f"dense_fallback must be one of {', '.join(MODES)}, got {mode!r}")
    records = []
    left = spare_bytes
    weighted = model.weighted()
    for layer in model.sparse_layers():
        m, n = layer.W.shape
        density = layer.W.nnz / max(m * n, 1)
        rec = dict(layer=layer.name, shape=[m, n], density=density, compute="sparse")
        extra = layer.dense_bytes()
        if mode == "off":
            rec["why"] = "dense fallback off"
        elif layer.shard is not None:
            rec["why"] = "split by rows over MPI ranks"
        elif left is not None and extra > left:
            rec["why"] = f"a dense copy ({extra / 2**20:.1f} MiB) exceeds the memory left"
        elif mode == "on":
            rec.update(compute="dense", why="dense fallback on")
        elif density < DENSE_FALLBACK_MIN_DENSITY:
            rec["why"] = f"density {density:.1%} < {DENSE_FALLBACK_MIN_DENSITY:.0%}"
        else:
            # timed as trained: dX only for a layer that is not the model's first
            rec.update(_timed(layer, batch, need_dx=layer is not weighted[0], reps=reps))
        if rec["compute"] == "dense":
            if left is not None:
                left -= extra
        layer.set_compute(rec["compute"])
        records.append(rec)
    on_cpu = (
        any(r["compute"] == "dense" for r in records) and not model.sparse_layers()[0].dev.on_device
    )
    why = _threads.blas_spin_warning() if on_cpu else None
    if why:  # the BLAS products would slow the kernels around them
        warnings.warn(f"dense fallback: {why}", RuntimeWarning, stacklevel=2)
    return records


def _timed(layer, batch, need_dx, reps):
    xp = layer.dev.xp
    m, n = layer.W.shape
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.standard_normal((n, batch), dtype=np.float32))
    dy = xp.asarray(rng.standard_normal((m, batch), dtype=np.float32))
    t = _step_time(layer, x, dy, need_dx, reps)
    layer.clear()
    layer.gW[...] = 0
    layer.gb[...] = 0
    dense = t["dense"] * (1 + DENSE_FALLBACK_MARGIN) < t["sparse"]
    return dict(
        compute="dense" if dense else "sparse",
        why=f"timed at batch {batch}: BLAS {t['sparse'] / t['dense']:.2f}x the kernels' speed",
        sparse_ms=1e3 * t["sparse"],
        dense_ms=1e3 * t["dense"],
    )


def describe(records) -> str:
    """One line: which layers compute dense, or that none does."""
    dense = [r for r in records if r["compute"] == "dense"]
    if not dense:
        return "dense fallback: every sparse layer runs the sparse kernels"
    parts = [f"{r['layer']} ({r['density']:.0%}: {r['why']})" for r in dense]
    return "dense fallback: " + "; ".join(parts) + " compute on BLAS"


__all__ = ["MODES", "choose", "describe"]
