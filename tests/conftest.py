"""Shared fixtures: fresh random inputs every run, reproducible from the seed in the header.

Set SPARSECORE_TEST_SEED=<int> to replay a run.
"""

import os  # noqa: I001 (kernels before NumPy, below)
import secrets
import zlib

# kernels first, as the CLI does: its thread setup reaches NumPy's OpenBLAS only if it runs
# before NumPy loads (else idle BLAS threads spin after each call; kernels/_threads.py)
import kernels

import numpy as np
import pytest

import sparsecore  # noqa: F401
from tests import cases

SEED = int(os.environ.get("SPARSECORE_TEST_SEED", secrets.randbits(32)))


def pytest_report_header(config):
    return f"sparsecore test seed: {SEED} (replay with SPARSECORE_TEST_SEED={SEED})"


@pytest.fixture
def rng(request):
    # a different stream per test, all derived from the run's seed
    return np.random.default_rng([SEED, zlib.crc32(request.node.nodeid.encode())])


@pytest.fixture(params=cases.BACKENDS)
def backend(request, monkeypatch, rng):
    """The side a kernel test runs on: "cpu", "cuda-emulated" (the CUDA side over NumPy, its
    kernels' NumPy models) or "cuda" (a real device; skipped without one). See tests/cases.py."""
    return cases.make_backend(request.param, monkeypatch, rng)


@pytest.fixture
def small_tiles(monkeypatch):
    """Shrink the grow tile so that small inputs take the multi-tile paths."""
    monkeypatch.setattr(kernels.config, "TOPK_TILE_BYTES", 64)
    return 64


@pytest.fixture(autouse=True)
def _no_flush_to_zero_leaks():
    """No test may leave FTZ/DAZ on in the main thread (training scopes it to the run:
    kernels/cpu/fpmode.flush_denormals); a leak fails the test that made it."""
    yield
    from kernels.cpu import fpmode

    if fpmode.flushing():
        fpmode.set_flush(False)
        pytest.fail("the test left flush-to-zero on in the calling thread")


TORCH_BUDGET_S = 180  # the PyTorch bridge's tests, all together (.ci/run's budget)


def pytest_terminal_summary(terminalreporter):
    """The PyTorch bridge's tests' total time against their budget (a line, not a failure:
    machines differ; CI's log shows it)."""
    total = 0.0
    for reports in terminalreporter.stats.values():
        for r in reports:
            where = getattr(r, "nodeid", "") or ""
            if "test_torch" in where.split("::")[0] or "test_bench_torch" in where:
                total += getattr(r, "duration", 0.0) or 0.0
    if total:
        terminalreporter.write_line(
            f"PyTorch bridge tests: {total:.0f} s (budget {TORCH_BUDGET_S} s)"
            + ("" if total <= TORCH_BUDGET_S else "  OVER BUDGET")
        )
