"""Whether NumPy's OpenBLAS read a thread timeout when it loaded (kernels/_threads.py), and the
warning the dense fallback gives when it did not: idle OpenBLAS threads then spin ~0.1 s after each
BLAS call and slow the kernels that follow (bench/RESULTS.md, "Dense where dense wins")."""

import os
import subprocess
import sys

import pytest

from kernels import _threads

PROBE = (
    "from kernels import _threads; "
    "print(_threads.openblas_timeout_effective(), _threads.blas_spin_warning() is not None)"
)


def _probe(first: str, env_timeout: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    env.update(OPENBLAS_NUM_THREADS="2", SPARSECORE_THREAD_SETUP="1")
    if env_timeout is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = env_timeout
    code = f"import {first}; import numpy; import kernels; " + PROBE
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.slow
def test_the_timeout_is_in_force_only_if_openblas_could_read_it():
    assert _probe("kernels", None) == ["True", "False"]  # ours, set before NumPy loaded
    assert _probe("numpy", None) == ["False", "True"]  # too late: OpenBLAS spins, we warn
    assert _probe("numpy", "4") == ["True", "False"]  # the user's own, exported before


def test_the_warning_needs_a_multithreaded_openblas(monkeypatch):
    import threadpoolctl

    monkeypatch.setitem(_threads._state, "numpy_loaded_first", True)
    monkeypatch.setitem(_threads._state, "user_openblas_timeout", None)
    pools = [{"user_api": "blas", "internal_api": "openblas", "num_threads": 2}]
    monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda: pools)
    said = _threads.blas_spin_warning()
    assert "NumPy was imported before sparsecore" in said and "(2 threads)" in said
    assert "OPENBLAS_THREAD_TIMEOUT=4" in said
    pools[0]["num_threads"] = 1  # one thread: nobody spins
    assert _threads.blas_spin_warning() is None
    pools[0].update(internal_api="mkl", num_threads=2)  # another BLAS: not this problem
    assert _threads.blas_spin_warning() is None
    monkeypatch.setitem(_threads._state, "user_openblas_timeout", "4")
    pools[0]["internal_api"] = "openblas"
    assert _threads.openblas_timeout_effective() and _threads.blas_spin_warning() is None
