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

Numba's threading layer is TBB where the ``tbb`` wheel is installed (a dependency on x86-64):
- GNU OpenMP (Numba's ``omp`` layer) is not fork-safe. Once a kernel has run, a forked child
  that calls one is terminated by Numba, so a ``multiprocessing.Pool`` (or a data loader's
  workers) started with fork hangs.
- ``workqueue`` aborts the process when several Python threads call kernels at once.
- ``tbb`` is both fork- and thread-safe, and measured as fast as ``omp`` here, also
  interleaved with BLAS calls (bench/threading_layers.py; the figures are in bench/RESULTS.md).

The wheel puts ``libtbb.so.12`` in ``<prefix>/lib``, where the loader does not look, so Numba
would silently fall back to omp: ``configure_threads`` loads it by absolute path, and Numba's
default choice, which tries tbb first, then picks it (``NUMBA_THREADING_LAYER`` set by the user
still wins; nothing is exported to child processes). Where no tbb is available (no wheel for the
platform), the layer stays omp, and a kernel called in a child forked after kernels ran on GNU
OpenMP raises ``ForkedOpenMPError`` saying what to do, instead of the worker dying.
"""

from __future__ import annotations

import os
import sys

DEFAULTS = {"GOMP_SPINCOUNT": "10000", "OPENBLAS_THREAD_TIMEOUT": "4"}
_state: dict = {}


TBB_LIBRARY = {"linux": "libtbb.so.12", "darwin": "libtbb.12.dylib", "win32": "tbb12.dll"}


class ForkedOpenMPError(RuntimeError):
    """A kernel was called in a child forked from a process whose kernels ran on GNU OpenMP."""


def configure_threads() -> None:
    if _state:
        return
    _state["numpy_loaded_first"] = "numpy" in sys.modules
    # what OpenBLAS read (or will read) when it loads with NumPy: the user's value if NumPy came
    # first, else whatever is in the environment once the defaults below are set
    _state["user_openblas_timeout"] = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
    # Numba's default choice tries tbb first: once the library is loaded, it is picked (no
    # variable is exported, so a child process that imports numba alone is not affected)
    _state["tbb"] = _load_tbb()
    os.register_at_fork(after_in_child=_after_fork_in_child)
    if os.environ.get("SPARSECORE_THREAD_SETUP", "1") == "0":
        return
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)


def _load_tbb() -> str | None:
    """Load the tbb wheel's library by absolute path (RTLD_GLOBAL), so that Numba's tbb layer
    finds it; returns its path, or None where the wheel is not installed."""
    import ctypes
    from importlib import metadata

    want = TBB_LIBRARY.get(sys.platform, "libtbb.so.12")
    try:
        files = metadata.files("tbb") or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == want:
            path = str(f.locate().resolve())
            try:
                ctypes.CDLL(path, mode=getattr(ctypes, "RTLD_GLOBAL", 0))
            except OSError:
                return None
            return path
    return None


def _after_fork_in_child():
    numba = sys.modules.get("numba")
    if numba is None:
        return
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel ran before the fork: the child may start any layer
        return
    if layer == "omp" and _openmp_vendor() == "GNU":  # Intel's and LLVM's OpenMP are fork-safe
        _state["forked_omp"] = True


def _openmp_vendor() -> str:
    try:
        from numba.np.ufunc import omppool

        return str(getattr(omppool, "openmp_vendor", "GNU"))
    except ImportError:
        return "GNU"


def check_fork_safe(what: str = "a sparse kernel") -> None:
    """Raise ForkedOpenMPError in a forked child whose parent ran kernels on GNU OpenMP (Numba
    would terminate the child at the kernel's launch, and a Pool waiting for it would hang)."""
    if _state.get("forked_omp"):
        raise ForkedOpenMPError(
            f"{what} was called in a process forked after kernels ran on GNU OpenMP, which is "
            "not fork-safe: install the tbb wheel (pip install 'tbb>=2021.6'; sparsecore then "
            "uses Numba's tbb layer), or start the workers with "
            "multiprocessing.get_context('spawn') or 'forkserver'"
        )


# OpenBLAS takes OPENBLAS_THREAD_TIMEOUT = n >= 1 (clamped to 4..30) as a spin of 2**n cycles
# and ignores an empty, non-numeric or non-positive value (its default is 2**28, ~0.1 s). A
# value up to this counts as a short spin here.
SHORT_SPIN_MAX = 16


def _short_spin(value) -> bool:
    try:
        return 1 <= int(str(value).strip()) <= SHORT_SPIN_MAX
    except ValueError:
        return False


def openblas_timeout_effective() -> bool:
    """Whether NumPy's OpenBLAS (where it is the BLAS) started with a short idle spin: it read
    OPENBLAS_THREAD_TIMEOUT (1..16) when it loaded, i.e. ours (sparsecore imported before NumPy)
    or the user's. The value is taken as os.environ held it when sparsecore was imported (an edit
    made after NumPy loaded is wrongly believed, and cannot be detected)."""
    if not _state.get("numpy_loaded_first", True):
        return _short_spin(os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
    return _short_spin(_state.get("user_openblas_timeout"))


def blas_spin_warning() -> str | None:
    """A sentence saying why BLAS calls will slow the kernels that follow them, or None.

    Without a short timeout, NumPy's OpenBLAS (pthreads build) keeps its idle workers spinning
    for about 2**28 cycles (~0.1 s) after each multithreaded call, on the cores the kernels then
    need. Measured on the 2-core development machine: a 16384-row layer's forward took 191 ms
    right after an sgemm instead of 140 ms (bench/RESULTS.md, "OpenBLAS's idle spin"). A running
    process cannot change it any more; the next one can."""
    if openblas_timeout_effective():
        return None
    from threadpoolctl import threadpool_info

    spinning = [
        p
        for p in threadpool_info()
        if p.get("user_api") == "blas" and p.get("internal_api") == "openblas"
        and (p.get("num_threads") or 1) > 1
        and p.get("threading_layer") in (None, "pthreads")  # an OpenMP build follows OMP_*
    ]  # fmt: skip
    if not spinning:
        return None
    first = _state.get("numpy_loaded_first", True)
    read = (
        _state.get("user_openblas_timeout") if first else os.environ.get("OPENBLAS_THREAD_TIMEOUT")
    )
    fix = "export OPENBLAS_THREAD_TIMEOUT=4"
    if read is not None:  # a value OpenBLAS ignores, or a long spin
        why = f"OPENBLAS_THREAD_TIMEOUT is {read!r}, so NumPy's OpenBLAS"
    elif first:
        why = "NumPy was imported before sparsecore, so its OpenBLAS"
        if os.environ.get("SPARSECORE_THREAD_SETUP", "1") != "0":
            fix = "import sparsecore (or kernels) before NumPy, or " + fix
    else:
        why = "OPENBLAS_THREAD_TIMEOUT is unset (SPARSECORE_THREAD_SETUP=0), so NumPy's OpenBLAS"
    return (
        f"{why} ({spinning[0].get('num_threads')} threads) keeps its idle threads spinning for "
        "about 0.1 s after every BLAS call, and the sparse kernels that run next lose their cores "
        "to them (measured: the next layer's forward 1.36x slower, the optimizer 1.75x, the "
        f"step 1.15x); {fix} before starting Python"
    )


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
        "tbb_library": _state.get("tbb"),
        "env": {
            k: os.environ.get(k)
            for k in (
                *DEFAULTS,
                "NUMBA_THREADING_LAYER",
                "OMP_WAIT_POLICY",
                "OMP_NUM_THREADS",
                "NUMBA_NUM_THREADS",
            )
        },
        "openblas_timeout_effective": openblas_timeout_effective(),
        "blas": [
            {k: p.get(k) for k in ("internal_api", "num_threads", "version", "threading_layer")}
            for p in threadpool_info()
            if p.get("user_api") == "blas"
        ],
    }
