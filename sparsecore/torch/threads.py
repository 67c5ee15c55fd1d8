"""The thread pools of a process that trains with ``sparsecore.torch``, and their set-up.

Three pools share the cores: Numba's (TBB where the wheel is installed: the engine's kernels,
i.e. every SparseLinear product and the fused grow), torch's intra-op pool (OpenMP, torch's own
bundled ``libgomp`` on Linux: the elementwise ops between layers, the loss, the optimizer and
any dense layer, MKL included) and NumPy's OpenBLAS (the engine's dense layers; the bridge does
not call it). Idle threads of each pool busy-wait for new work for a while, and on few cores a
pool that spins takes the cores the next pool needs (kernels/_threads.py, bench/RESULTS.md).

What ``import sparsecore`` sets (kernels/_threads.py) reaches torch's pool only through the
environment, and only if it is set when torch's libgomp loads, i.e. when ``import torch`` runs:

- ``import sparsecore`` (or ``import sparsecore.torch``) *before* ``import torch``: torch's
  libgomp reads ``GOMP_SPINCOUNT=10000`` (its workers spin a few µs, then sleep);
- ``import torch`` first: torch's libgomp keeps its default (about 300,000 spins, several ms
  of busy-waiting after every parallel op); nothing can change that later in the process. Export
  ``GOMP_SPINCOUNT=10000`` before starting Python, import sparsecore first, or run torch's pool
  with one thread (``torch.set_num_threads(1)``: no OpenMP workers, nothing spins).

Measured with bench/torch_threads.py (fresh processes, rotating order; the bridge's step of
784-4096-4096-10 at 99%, batch 128, Numba on TBB with 2 threads, on 2 shared cores under a load
of 2-6 from other jobs, so only the large effects are read): with 2 torch threads, torch's pool
at libgomp's default spin made the bridge's step 3.5-4× slower than with GOMP_SPINCOUNT=10000
(its workers burnt ~10 ms of CPU in the 50 ms after each torch op, against 0.1-1 ms), in every
round; with 1 torch thread the spin setting made no difference (no workers), and 1 thread was
as fast or faster than 2 on that loaded machine (0.5-0.9×; to be re-measured on a quiet one).
The dense model's step could not be told apart between the set-ups there.

So: ``threading_info()`` reports all of it (which of the two orders happened, the spin setting in
force in torch's pool as far as can be told, the thread counts); ``configure()`` applies what
those measurements support: where torch's pool spins at the default it gives torch one intra-op
thread (the only remedy once libgomp has loaded) and says why; otherwise it leaves torch's
threads as they are unless told a number. Importing this module changes nothing.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

from kernels._threads import threading_info as _engine_threading_info

SPIN_KEYS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def _initial_environ() -> dict | None:
    """The environment the process started with (/proc/self/environ: what the user exported,
    before anything in Python set a variable), or None where it cannot be read."""
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    out = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def torch_imported_first() -> bool:
    """Whether torch began loading before sparsecore's thread set-up ran (the order of the
    keys of ``sys.modules``, which grows as imports begin)."""
    keys = list(sys.modules)
    if "torch" not in sys.modules:
        return False
    setup = [
        keys.index(k) for k in ("kernels._threads", "kernels", "sparsecore") if k in sys.modules
    ]
    return not setup or keys.index("torch") < min(setup)


def torch_openmp_library() -> str | None:
    """The OpenMP runtime loaded in this process (Linux: from /proc/self/maps), or None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                name = line.rsplit("/", 1)[-1].strip()
                if name.startswith(("libgomp", "libiomp", "libomp")):
                    return line.split(None, 5)[-1].strip()
    except OSError:
        return None
    return None


def torch_spin_setting() -> dict:
    """What torch's OpenMP pool read when it loaded, as far as can be told: GOMP_SPINCOUNT and
    OMP_WAIT_POLICY from the environment then ("default" where unset)."""
    if torch_imported_first():
        env = _initial_environ()
        if env is None:  # (no /proc: the current environment is the best guess)
            env = dict(os.environ)
    else:
        env = dict(os.environ)
    return {k: env.get(k, "default") for k in SPIN_KEYS}


def threading_info() -> dict:
    """The engine's threading_info() and torch's pool: its threads, its OpenMP runtime, the
    import order and the spin setting in force there."""
    import numba

    spin = torch_spin_setting()
    return {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "numba_threads": numba.get_num_threads(),
        "torch_openmp": torch_openmp_library(),
        "torch_imported_first": torch_imported_first(),
        "torch_gomp_spincount": spin["GOMP_SPINCOUNT"],
        "torch_omp_wait_policy": spin["OMP_WAIT_POLICY"],
        "engine": _engine_threading_info(),
    }


def spinning_at_default() -> bool:
    """torch was imported before sparsecore and its libgomp pool spins at the default (nothing
    exported): the case the measurements warn about. Starts no thread pool."""
    spins_default = all(v == "default" for v in torch_spin_setting().values())
    gomp = (torch_openmp_library() or "").rsplit("/", 1)[-1].startswith("libgomp")
    return spins_default and gomp and torch_imported_first()


def warn_if_spinning(stacklevel: int = 2) -> bool:
    """Say once (a UserWarning) when torch's pool spins at the default; changes nothing and
    starts no thread pool (what ``import sparsecore.torch`` calls). Returns whether it did."""
    if not spinning_at_default():
        return False
    warnings.warn(
        "sparsecore.torch: torch was imported before sparsecore, so torch's OpenMP threads "
        "busy-wait at libgomp's default between ops and slow the sparse kernels on few "
        "cores; import sparsecore first, or export GOMP_SPINCOUNT=10000 (or call "
        "sparsecore.torch.threads.configure())",
        stacklevel=stacklevel + 1,
    )
    return True


def configure(torch_threads: int | str | None = "auto", *, warn: bool = True) -> dict:
    """Set torch's intra-op threads for training with sparsecore.torch; returns threading_info().

    torch_threads: an int sets it as is; None leaves torch's own setting; ``"auto"`` (default)
    chooses from the import order, by bench/torch_threads.py's measurements: where torch's pool
    spins at libgomp's default (torch imported before sparsecore, GOMP_SPINCOUNT not exported) it
    runs with one thread; otherwise torch keeps its setting. warn: say (once) when torch was
    imported first and its pool spins at the default.
    """
    spins_default = all(v == "default" for v in torch_spin_setting().values())
    gomp = (torch_openmp_library() or "").rsplit("/", 1)[-1].startswith("libgomp")
    if torch_threads == "auto":
        torch_threads = 1 if (spins_default and gomp) else None
    elif torch_threads is not None and (
        not isinstance(torch_threads, int) or isinstance(torch_threads, bool) or torch_threads < 1
    ):
        raise ValueError(
            f"torch_threads must be a positive int, None or 'auto', got {torch_threads!r}"
        )
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    if warn and spins_default and gomp and torch_imported_first():
        warnings.warn(
            "sparsecore.torch: torch was imported before sparsecore, so torch's OpenMP threads "
            "busy-wait at libgomp's default between ops and slow the sparse kernels on few "
            "cores; import sparsecore first, or export GOMP_SPINCOUNT=10000"
            + (" (torch now runs one intra-op thread)" if torch_threads == 1 else ""),
            stacklevel=2,
        )
    return threading_info()
