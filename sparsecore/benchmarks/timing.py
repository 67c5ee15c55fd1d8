"""The one timer of the benchmarks: warm-up, repetitions fitted to a budget, the median.

``median_time(fn)`` calls ``fn`` ``warmup`` times, then times repeated calls and returns their
median (and quartiles). The number of timed calls is ``reps`` when given, else fitted to
``budget_s`` from the last warm-up call's duration, within [min_reps, max_reps].

On a device a call returns before its work is done, so a timing must wait for it: pass
``sync`` (``Backend.sync`` of kernels/backend.py, ``cupy.cuda.get_current_stream().synchronize``,
``torch.cuda.synchronize``). It is called before the first timed call (the warm-up's queued work
is not counted) and after every call, inside the timed region, so each figure is the wall time
from the call's start until its device work has finished.

This module imports nothing but the standard library and NumPy: bench/ab.py loads this one
file into the processes of both trees it compares, so that both are timed by the same code.
"""

from __future__ import annotations

import time

import numpy as np

WARMUP = 1  # untimed calls first: compilation, caches, memory pools
MIN_REPS, MAX_REPS = 3, 50
BUDGET_S = 0.6  # wall time the timed calls should take, when reps is not given


def median_time(
    fn,
    *,
    warmup: int = WARMUP,
    reps: int | None = None,
    min_reps: int = MIN_REPS,
    max_reps: int = MAX_REPS,
    budget_s: float = BUDGET_S,
    sync=None,
) -> dict:
    """Median wall time of ``fn()`` over repeated calls, in seconds, after ``warmup`` calls.

    Returns ``{"median_s", "q25_s", "q75_s", "reps", "times_s"}``. With ``reps=None`` the count
    is ``budget_s / (last warm-up call)`` clipped to [min_reps, max_reps] (with ``warmup=0``, one
    extra untimed call measures it). ``sync`` (optional) waits for a device; see the module."""
    done = sync if sync is not None else _nothing
    first = None
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        done()
        first = time.perf_counter() - t0
    if reps is None:
        if first is None:  # no warm-up asked for: one probe call sizes the run
            t0 = time.perf_counter()
            fn()
            done()
            first = time.perf_counter() - t0
        reps = int(min(max_reps, max(min_reps, budget_s / max(first, 1e-6))))
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    times = np.empty(reps)
    if sync is None:  # (no call of a no-op inside the timed region: tiny calls stay exact)
        for i in range(reps):
            t0 = time.perf_counter()
            fn()
            times[i] = time.perf_counter() - t0
    else:
        sync()  # nothing queued before the first timed call
        for i in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            times[i] = time.perf_counter() - t0
    return {
        "median_s": float(np.median(times)),
        "q25_s": float(np.quantile(times, 0.25)),
        "q75_s": float(np.quantile(times, 0.75)),
        "reps": reps,
        "times_s": times.tolist(),
    }


def median_s(fn, **kw) -> float:
    """``median_time(fn, **kw)["median_s"]``."""
    return median_time(fn, **kw)["median_s"]


def _nothing():
    pass
