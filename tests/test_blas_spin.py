"""Whether NumPy's OpenBLAS read a thread timeout when it loaded (kernels/_threads.py), and the
warning the dense fallback gives when it did not: idle OpenBLAS threads then spin ~0.1 s after each
BLAS call and slow the kernels that follow (bench/RESULTS.md, "OpenBLAS's idle spin")."""

import json
import os
import subprocess
import sys

import pytest

from kernels import _threads

PROBE = """
import time, json
from kernels import _threads
a = numpy.ones((512, 512), numpy.float32)
a @ a  # a multithreaded sgemm: afterwards OpenBLAS's idle worker spins, or sleeps
t = time.process_time()
time.sleep(0.06)
spun = time.process_time() - t  # CPU time this process used while its main thread slept
print(json.dumps([_threads.openblas_timeout_effective(), _threads.blas_spin_warning(), spun]))
"""


def _probe(first: str, env_timeout: str | None, setup: str = "1"):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    env.update(OPENBLAS_NUM_THREADS="2", SPARSECORE_THREAD_SETUP=setup)
    if env_timeout is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = env_timeout
    code = f"import {first}; import numpy; import kernels\n" + PROBE
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


# (first import, OPENBLAS_THREAD_TIMEOUT, SPARSECORE_THREAD_SETUP) -> in force?, said
CASES = [
    (("kernels", None, "1"), True, None),  # ours, set before NumPy loaded
    (("numpy", None, "1"), False, "NumPy was imported before sparsecore"),  # too late
    (("numpy", "4", "1"), True, None),  # the user's own, exported before
    (("kernels", None, "0"), False, "unset (SPARSECORE_THREAD_SETUP=0)"),  # setup turned off
    (("numpy", "0", "1"), False, "OPENBLAS_THREAD_TIMEOUT is '0'"),  # OpenBLAS ignores 0
    (("kernels", "", "1"), False, "OPENBLAS_THREAD_TIMEOUT is ''"),  # and an empty value
]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="OpenBLAS's thread timeout: Linux wheels")
@pytest.mark.parametrize(("how", "in_force", "said"), CASES)
def test_the_timeout_is_in_force_only_if_openblas_could_read_it(how, in_force, said):
    effective, warning, spun = _probe(*how)
    assert effective is in_force
    if said is None:
        assert warning is None
    else:
        assert said in warning and "1.36x" in warning
        assert ("before NumPy" in warning) == (how == ("numpy", None, "1"))
    # what OpenBLAS really does agrees: its idle worker burns CPU while we sleep only when the
    # short timeout is not in force (60 ms asleep; a 2**28-cycle spin lasts ~0.1 s)
    if in_force:
        assert spun < 0.01, f"{spun * 1e3:.0f} ms of CPU while asleep, yet said to be in force"
    else:
        assert spun > 0.015, f"only {spun * 1e3:.0f} ms of CPU while asleep: no spin to warn of"


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
