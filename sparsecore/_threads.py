"""The threading setup: Numba's threads and the BLAS's threads share two cores without spinning.

Measured on the 2-core development machine (bench/RESULTS.md has the figures): a Numba kernel
run right after a BLAS call, or a BLAS call right after a Numba kernel, is 2-4x slower with the
libraries' defaults, because each pool's idle threads busy-wait for new work (libgomp spins about
300,000 iterations, OpenBLAS for 2**28 cycles) and steal the cores the other pool needs.
Two settings stop that:

- ``GOMP_SPINCOUNT=10000``: Numba's OpenMP workers spin only briefly (a few microseconds) after a
  parallel region before they sleep. Back-to-back kernels (a training step is a chain of them)
  still find them awake; a BLAS call that follows finds them asleep. This measured faster than
  ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once: ~70 µs to wake per kernel call) on a full training
  step (784-4096-4096-10 at 99%: 4.5 vs 5.4 ms) and equal on the fused grow. Read when Numba first
  starts its pool (first parallel call). If OMP_WAIT_POLICY is set, libgomp follows it instead.
- ``OPENBLAS_THREAD_TIMEOUT=4``: OpenBLAS workers go to sleep after 2**4 cycles instead of spinning
  (read when NumPy's OpenBLAS loads, i.e. only if sparsecore is imported before NumPy; the
  command line, the benchmarks and ``import kernels`` do so).

Both are set with ``os.environ.setdefault``: a value the user exported wins, and
``SPARSECORE_THREAD_SETUP=0`` leaves the environment alone (the benchmarks use it to measure the
libraries' defaults). ``threading_info()`` reports what is in force.
"""

from __future__ import annotations

import os
import sys

DEFAULTS = {"GOMP_SPINCOUNT": "10000", "OPENBLAS_THREAD_TIMEOUT": "4"}
_state: dict = {}


def configure_threads() -> None:
    if _state:
        return
    _state["numpy_loaded_first"] = "numpy" in sys.modules
    if os.environ.get("SPARSECORE_THREAD_SETUP", "1") == "0":
        return
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)


def threading_info() -> dict:
    """The thread pools of this process: Numba's layer and threads, the BLAS, the settings."""
    import numba
    from threadpoolctl import threadpool_info

    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        layer = f"not started (configured: {numba.config.THREADING_LAYER})"
    return {
        "numba_threading_layer": layer,
        "numba_threads": numba.get_num_threads(),
        "env": {
            k: os.environ.get(k)
            for k in (*DEFAULTS, "OMP_WAIT_POLICY", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS")
        },
        "openblas_timeout_effective": not _state.get("numpy_loaded_first", True),
        "blas": [
            {k: p.get(k) for k in ("internal_api", "num_threads", "version", "threading_layer")}
            for p in threadpool_info()
            if p.get("user_api") == "blas"
        ],
    }
