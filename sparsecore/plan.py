"""A memory plan: the bytes of every piece of training state, before anything is allocated.

``memory_plan(cfg)`` (a TrainConfig, or ``memory_plan(arch, sparsity, **settings)``: the plan
reads the settings marked plan=True in sparsecore/config.py) counts, per layer, exactly the
arrays the engine allocates (values, indices, indptr, the transpose structure, the weight
gradient, the transposed-values scratch of dX, optimizer moments, biases) and adds the
batch-sized activations, the largest topology update's transients (the grow tile and candidate
buffer, and the new pattern built beside the old one), and the dense equivalent of the same
run. ``sparsecore plan`` prints it; ``sparsecore train --max-memory`` refuses a run whose plan
exceeds the budget, before building anything.

With ``device="cuda"`` the plan is of GPU memory, where all of that state lives in a device run:
no dX values scratch (the CUDA spmm_t gathers in place), and the exact grow's tile, candidate
buffer, cut scratch and histogram by the CUDA launcher's rule (kernels/cuda/grow.py). SET's and
the sampled grow's draws run on the host (sparsecore/rigl/updater.py): they are not counted.
The training set, put on the device once by the trainer, is not part of the plan.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from kernels import config
from kernels.cpu.grow import tile_shape
from kernels.cpu.sampled import sample_bytes, sampled_grow_bytes
from kernels.cuda import grow as cuda_grow
from kernels.validation import flat_dtype, index_dtype_for
from sparsecore.config import UNITS, TrainConfig, parse_bytes  # noqa: F401 (their old home)

MOMENTS = {"sgd": 1, "adam": 2, "adamw": 2}  # SGD with momentum keeps one state array
# the exact CUDA grow's radix histogram: N_BINS 64-bit counters (kernels/cuda/grow.py)
CUDA_HISTOGRAM_BYTES = 8 * cuda_grow.N_BINS


def config_of(run, sparsity=None, settings=None) -> TrainConfig:
    """The TrainConfig a plan is of: ``run`` itself, or TrainConfig(arch=run, sparsity=...,
    **settings) (any TrainConfig field by name; the plan reads those that
    config.fields(plan=True) lists)."""
    settings = dict(settings or {})
    if isinstance(run, TrainConfig):
        if sparsity is not None or settings:
            raise TypeError(
                "a plan of a TrainConfig takes its settings from it; got "
                f"{'sparsity and ' if sparsity is not None else ''}{sorted(settings)} too"
            )
        return run
    if sparsity is not None:
        settings["sparsity"] = sparsity
    return TrainConfig(arch=list(run), **settings)


def memory_plan(run, sparsity=None, *, ranks: int = 1, sharded=(), **settings) -> dict:
    """Bytes of the training state of an MLP run, by piece and by layer, with the dense twin.

    run: a TrainConfig, or its layer sizes (arch) with ``sparsity`` and any other TrainConfig
    settings by name: ``memory_plan([784, 300, 10], 0.9, batch_size=64, device="cuda")``. The
    plan reads the settings that config.fields(plan=True) lists, among them grow_tile_bytes
    (the exact grow's tile as passed to topk_grow; None: its default rule) and device ("cpu":
    host memory, "cuda": the GPU's memory in a device run).
    ranks, sharded: the plan of one of ``ranks`` MPI ranks over which the weighted layers
    ``sharded`` (indices) are split by rows: such a layer counts the largest rank's rows
    (ceil(m / ranks)) and their expected nnz, its update the rank's grow over those rows (its
    candidate buffer holds its first offer, about 1.5·K/N), plus the shard's own output and
    output gradient rows (the layer's whole output, gathered, is the next layer's input,
    counted among the activations). Replicated layers and activations count whole on every
    rank.
    """
    cfg = config_of(run, sparsity, settings)
    arch, sparsity, batch_size, grow = cfg.arch, cfg.sparsity, cfg.batch_size, cfg.grow
    device, optimizer, method, alpha = cfg.device, cfg.optimizer, cfg.method, cfg.alpha
    grow_candidates, grow_tile_bytes = cfg.grow_candidates, cfg.grow_tile_bytes
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not (isinstance(grow_candidates, (int, float)) and 1 <= grow_candidates < math.inf):
        raise ValueError(f"grow_candidates must be a finite number >= 1, got {grow_candidates!r}")
    if not (isinstance(ranks, int) and ranks >= 1):
        raise ValueError(f"ranks must be an integer >= 1, got {ranks!r}")
    gpu = device == "cuda"
    if grow not in ("exact", "sampled"):
        raise ValueError(f"grow must be exact or sampled, got {grow!r}")
    if optimizer not in MOMENTS:
        raise ValueError(f"optimizer must be one of {sorted(MOMENTS)}, got {optimizer!r}")
    n_mom = MOMENTS[optimizer] if (optimizer != "sgd" or cfg.momentum > 0) else 0
    shapes, dens = cfg.shapes(), cfg.densities()
    B = batch_size
    layers, totals = [], {}

    def add(piece, nbytes):
        totals[piece] = totals.get(piece, 0) + int(nbytes)
        return int(nbytes)

    update_peak = 0
    shard_buffers = 0
    for l, ((m_full, n), d) in enumerate(zip(shapes, dens, strict=True)):
        row = {"shape": [m_full, n], "density": d}
        m = m_full
        if l in sharded and d < 1.0:
            m = -(-m_full // ranks)  # the largest rank's rows
            row["rows_per_rank"] = m
            shard_buffers = max(shard_buffers, 4 * B * 2 * m)
        if d >= 1.0:
            row.update(
                nnz=m * n,
                weights=add("weights", 4 * m * n),
                gradients=add("gradients", 4 * m * n),
                moments=add("optimizer moments", 4 * m * n * n_mom),
            )
        else:
            nnz_full = int(round(d * m_full * n))
            nnz = -(-nnz_full * m // m_full)  # this rank's share (expected; all when whole)
            it = np.dtype(index_dtype_for(m_full, n, nnz_full)).itemsize
            if m != m_full:
                row["nnz_per_rank"] = nnz
            row.update(
                nnz=nnz_full,
                weights=add("weights", 4 * nnz),
                indices=add("indices + indptr", it * nnz + it * (m + 1)),
                transpose=add("transpose structure", it * (2 * nnz + n + 1)),
                # dW, and (CPU only) the permuted values of the dX product
                gradients=add("gradients", 4 * nnz + (0 if gpu else 4 * nnz)),
                moments=add("optimizer moments", 4 * nnz * n_mom),
            )
            # the dense fallback (sparsecore/fallback.py): a dense copy of W and dW's scratch.
            # "on" holds it for every whole sparse layer; "auto" for those it picks, only
            # within what the budget leaves after this plan (so the most it may add is shown)
            if m == m_full and cfg.dense_fallback == "on":
                row["dense_fallback"] = add(DENSE_FALLBACK_PIECE, 8 * m * n)
            elif m == m_full and cfg.dense_fallback == "auto":
                row["dense_fallback_up_to"] = 8 * m * n
            if method in ("rigl", "set"):
                k = int(alpha * nnz)
                # a shard's drop and exact grow first offer its share of the layer's K (with
                # slack; more only when the K fall unevenly: mpi.RowShard.offered)
                k_offer = k
                if m != m_full:
                    k_layer = int(alpha * nnz_full)
                    share = -(-int(config.MPI_OFFER_SHARE * k_layer) // ranks)
                    k_offer = min(nnz, share + config.MPI_OFFER_SLACK)
                # the grow's scratch, sized by the launcher's own rule: the exact grow's tile and
                # candidate buffer, or the sampler's draws (SET) and candidates (sampled RigL)
                if gpu and (method == "set" or grow == "sampled"):
                    scratch = 16 * k  # drawn on the host; the k (row, col) int64 uploaded
                elif method == "set":
                    scratch = sample_bytes(m, n, nnz - k, k)
                elif grow == "sampled":
                    scratch = sampled_grow_bytes(m, n, nnz - k, k, grow_candidates)
                elif gpu:  # kernels/cuda/grow.py: tile + buffer + a cut's scratch + histogram
                    # (the tile counted is the floor: without a tile and a budget the launcher
                    # sizes it from the device's memory, CUDA_TOPK_TILE_FREE_FRACTION of it up
                    # to CUDA_TOPK_TILE_MAX_BYTES; with a budget the trainer passes this
                    # tile, so the plan holds)
                    tr, tc = tile_shape(m, n, grow_tile_bytes or config.CUDA_TOPK_TILE_BYTES)
                    cap = max(k + 1, int(config.CUDA_TOPK_BUFFER_FACTOR * k))
                    f = np.dtype(flat_dtype(m, n)).itemsize
                    scratch = 4 * tr * tc + (cap + k) * (4 + f) + CUDA_HISTOGRAM_BYTES + 8
                else:
                    tr, tc = (
                        tile_shape(m, n, config.TOPK_TILE_BYTES, config.TOPK_MIN_TILE_ROWS)
                        if grow_tile_bytes is None
                        else tile_shape(m, n, grow_tile_bytes)  # the launcher's rule when given
                    )
                    cap = int(config.TOPK_BUFFER_FACTOR * min(k_offer, m * n - nnz + k))
                    scratch = 4 * tr * tc + cap * (4 + np.dtype(flat_dtype(m, n)).itemsize)
                    scratch += 4 * cap  # the last cut's partition copy
                rebuild = (
                    nnz  # keep mask
                    + (4 + it) * nnz
                    + it * (m + 1)  # the new pattern and values
                    + 8 * nnz  # src map
                    + 4 * nnz * (2 + n_mom)  # new gradient, scratch, remapped moments
                    + 8 * k * 3  # dropped positions, grown rows and cols
                )
                if m != m_full:  # a shard's offers: positions + values, their sort and keys
                    rebuild += 24 * k_offer
                if gpu:  # the device merge's int64 sort keys (old, grown, joined) and order
                    rebuild += 32 * nnz
                row["update_transient"] = scratch + rebuild
                update_peak = max(update_peak, scratch + rebuild)
        row["biases"] = add("biases", 4 * m * (2 + n_mom))
        layers.append(row)
    if shard_buffers:
        totals[f"shard buffers (batch {B})"] = shard_buffers
    acts = (
        4
        * B
        * (
            sum(n for _, n in shapes)  # every layer's input, kept for backward
            + sum(m for (m, _), d in zip(shapes, dens, strict=True) if d < 1.0)  # dY kept for RigL
            + max(2 * m + n for m, n in shapes)
        )
    )  # the largest backward transient
    totals[f"activations (batch {B})"] = acts
    if update_peak:
        totals["topology update (transient)"] = update_peak
    state = sum(v for k, v in totals.items() if not k.startswith(("activations", "topology")))
    dense_w = sum(m * n for m, n in shapes)
    dense_state = 4 * dense_w * (2 + n_mom) + sum(4 * m * (2 + n_mom) for m, _ in shapes)
    dense_acts = 4 * B * (sum(n for _, n in shapes) + max(2 * m + n for m, n in shapes))
    return {
        "arch": list(arch),
        "sparsity": sparsity,
        "distribution": cfg.distribution,
        "batch_size": B,
        "optimizer": optimizer,
        "method": method,
        "grow": grow,
        "grow_candidates": grow_candidates,
        "grow_tile_bytes": grow_tile_bytes,
        "device": device,
        "ranks": ranks,
        "sharded": list(sharded),
        "layers": layers,
        "pieces": totals,
        "state_bytes": state,
        "total_bytes": sum(totals.values()),
        "dense_state_bytes": dense_state,
        "dense_total_bytes": dense_state + dense_acts,
        "dense_fallback": cfg.dense_fallback,
        "dense_fallback_up_to_bytes": sum(r.get("dense_fallback_up_to", 0) for r in layers),
    }


DENSE_FALLBACK_PIECE = "dense fallback (copies of W, dW)"  # (sparsecore/train.py reads it)


def sharded_layers(cfg, *args) -> list[int]:
    """The weighted layers that cfg.shard_layers splits over ``ranks`` MPI ranks
    (TrainConfig.sharded_layers): ``sharded_layers(cfg, ranks)``, or as before step 4 of the
    house, ``sharded_layers(arch, sparsity, distribution, method, shard_layers, ranks)``."""
    if isinstance(cfg, TrainConfig):
        (ranks,) = args
        return cfg.sharded_layers(ranks)
    sparsity, distribution, method, shard_layers, ranks = args
    run = TrainConfig(
        arch=list(cfg),
        sparsity=sparsity,
        distribution=distribution,
        method=method,
        shard_layers=shard_layers,
    )
    return run.sharded_layers(ranks)


MIN_GROW_TILE_BYTES = 64 << 10  # smaller tiles make the grow's sgemm calls too small to be useful


def fit_grow_tile(
    max_memory: int, run, sparsity=None, *, ranks: int = 1, sharded=(), **settings
) -> dict | None:
    """The plan whose exact-grow tile is the largest (up to the default tile) that keeps the
    total within max_memory, or None if even a MIN_GROW_TILE_BYTES tile does not fit. The tile
    changes the grow's memory and speed, never its result (the kernel is exact per tile).
    ``run`` and the settings as memory_plan takes them (their grow_tile_bytes is ignored)."""
    cfg = dataclasses.replace(config_of(run, sparsity, settings), grow_tile_bytes=None)
    where = dict(ranks=ranks, sharded=sharded)
    default = memory_plan(cfg, **where)
    if default["total_bytes"] <= max_memory:
        return default
    gpu = cfg.device == "cuda"
    hi = max(
        4 * r * c
        for r, c in (
            tile_shape(m, n, config.CUDA_TOPK_TILE_BYTES)
            if gpu
            else tile_shape(m, n, config.TOPK_TILE_BYTES, config.TOPK_MIN_TILE_ROWS)
            for m, n in cfg.shapes()
        )
    )
    lo = MIN_GROW_TILE_BYTES
    best = memory_plan(dataclasses.replace(cfg, grow_tile_bytes=lo), **where)
    if best["total_bytes"] > max_memory:
        return None
    while hi - lo > 4096:  # the plan grows with the tile: bisect for the largest that fits
        mid = (lo + hi) // 2
        plan = memory_plan(dataclasses.replace(cfg, grow_tile_bytes=mid), **where)
        if plan["total_bytes"] <= max_memory:
            lo, best = mid, plan
        else:
            hi = mid
    return best


def _fmt(b: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{int(b)} B"


def describe_plan(plan: dict) -> str:
    arch = "-".join(map(str, plan["arch"]))
    lines = [
        f"memory plan: {arch}, {plan['method']}"
        + (
            f" (sampled grow, {plan['grow_candidates']:g} candidates per grown connection)"
            if plan.get("grow") == "sampled" and plan["method"] == "rigl"
            else ""
        )
        + f" at sparsity {plan['sparsity']} "
        f"({plan['distribution']}), batch {plan['batch_size']}, {plan['optimizer']}"
        + (", GPU memory (device=cuda)" if plan.get("device") == "cuda" else "")
    ]
    if plan.get("sharded"):
        lines.append(
            f"  per MPI rank, {plan['ranks']} ranks; layers {plan['sharded']} split by rows "
            "(the others whole on every rank)"
        )
    for k, v in plan["pieces"].items():
        lines.append(f"  {k:32s} {_fmt(v):>12s}")
        if k.startswith("topology") and plan.get("grow_tile_bytes"):
            lines.append(
                f"    (exact grow tile {_fmt(plan['grow_tile_bytes'])}, fitted to the budget)"
            )
    lines.append(f"  {'total (peak)':32s} {_fmt(plan['total_bytes']):>12s}")
    if plan.get("dense_fallback") == "auto" and plan.get("dense_fallback_up_to_bytes"):
        lines.append(
            f"  (dense fallback auto: up to {_fmt(plan['dense_fallback_up_to_bytes'])} more for "
            "the layers it moves to BLAS, taken only within the budget)"
        )
    lines.append(
        f"  {'dense equivalent (peak)':32s} {_fmt(plan['dense_total_bytes']):>12s}  "
        f"(weights, gradients and moments alone: {_fmt(plan['dense_state_bytes'])})"
    )
    for l, row in enumerate(plan["layers"]):
        m, n = row["shape"]
        lines.append(
            f"  layer {l}: {m} x {n}, density {row['density']:.3g}, nnz {row['nnz']:,}"
            + (
                f" ({row['rows_per_rank']} rows, about {row['nnz_per_rank']:,} nnz per rank)"
                if "rows_per_rank" in row
                else ""
            )
        )
    return "\n".join(lines)
