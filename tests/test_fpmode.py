"""FTZ/DAZ for the kernel threads: on, off, and what training does with it."""

import numba
import numpy as np
import pytest

from kernels.cpu import fpmode

pytestmark = pytest.mark.skipif(not fpmode.X86, reason="MXCSR exists on x86-64 only")

TINY = np.float32(1e-39)  # subnormal in float32


@numba.njit(parallel=True)
def _scaled(a, s, out):
    for i in numba.prange(a.shape[0]):
        out[i] = a[i] * s  # a subnormal result unless flushed


def test_flush_on_and_off_in_every_thread():
    a = np.full(4 * numba.get_num_threads(), 1e-30, np.float32)
    out = np.full_like(a, np.nan)
    try:
        assert fpmode.set_flush(True) and fpmode.flushing()
        _scaled(a, np.float32(1e-9), out)
        assert (out == 0).all()  # every pool thread flushed the subnormal product
        assert np.float32(TINY) * np.float32(1.0) == 0  # DAZ in this thread too
    finally:
        fpmode.set_flush(False)
    assert not fpmode.flushing()
    _scaled(a, np.float32(1e-9), out)
    assert (out > 0).all() and (out < np.finfo(np.float32).tiny).all()


def _tiny_trainer(**kw):
    from sparsecore.data import from_arrays
    from sparsecore.train import TrainConfig, Trainer

    rng = np.random.default_rng(0)
    d = from_arrays(rng.standard_normal((64, 6)), rng.integers(0, 2, 64),
                    rng.standard_normal((8, 6)), rng.integers(0, 2, 8))  # fmt: skip
    cfg = dict(arch=[6, 8, 2], sparsity=0.5, batch_size=16, epochs=1, progress=False)
    return Trainer(TrainConfig(**{**cfg, **kw}), d)


def _ieee_here():
    """Subnormals survive in this thread: Python floats and NumPy float32."""
    return 1e-310 * 1.0 != 0.0 and np.float32(1e-38) / np.float32(4) > 0


@pytest.mark.parametrize("flush", [True, False])
def test_training_scopes_the_mode_to_the_run(flush, monkeypatch):
    """Nothing changes at construction; inside run() the asked-for mode holds in this thread
    and every pool thread; afterwards every thread has its own mode back."""
    tr = _tiny_trainer(flush_denormals=flush)
    assert not fpmode.flushing() and not fpmode.pool_flushing().any()
    seen = {}
    step = tr.train_step

    def spy(xb, yb):
        seen.setdefault("here", fpmode.flushing())
        seen.setdefault("pool", bool(fpmode.pool_flushing().all()))
        return step(xb, yb)

    monkeypatch.setattr(tr, "train_step", spy)
    tr.run()
    assert seen == {"here": flush, "pool": flush}
    assert not fpmode.flushing() and not fpmode.pool_flushing().any()
    assert _ieee_here()


def test_the_mode_is_restored_after_an_exception(monkeypatch):
    tr = _tiny_trainer()

    def boom(xb, yb):
        assert fpmode.flushing()
        raise RuntimeError("boom")

    monkeypatch.setattr(tr, "train_step", boom)
    with pytest.raises(RuntimeError, match="boom"):
        tr.run()
    assert not fpmode.flushing() and not fpmode.pool_flushing().any()
    assert _ieee_here()


def test_a_caller_that_flushes_keeps_flushing():
    """The scope restores what was there, not 'off': a caller who had FTZ on keeps it, and a
    run with flush_denormals=False turns it off only while it runs."""
    try:
        fpmode.set_flush(True)
        tr = _tiny_trainer(flush_denormals=False)
        with fpmode.flush_denormals(False):
            assert not fpmode.flushing() and not fpmode.pool_flushing().any()
        assert fpmode.flushing() and fpmode.pool_flushing().all()
        tr.run()
        assert fpmode.flushing() and fpmode.pool_flushing().all()
    finally:
        fpmode.set_flush(False)
    assert _ieee_here()


def test_nested_scopes_unwind_in_order():
    with fpmode.flush_denormals(True):
        assert fpmode.flushing()
        with fpmode.flush_denormals(False):
            assert not fpmode.flushing() and not fpmode.pool_flushing().any()
        assert fpmode.flushing() and fpmode.pool_flushing().all()
    assert not fpmode.flushing() and not fpmode.pool_flushing().any()


@pytest.mark.skipif(__import__("os").environ.get("NUMBA_THREADING_LAYER") == "omp",
                    reason="this run is the omp run already")  # fmt: skip
def test_the_scoped_mode_under_the_omp_layer_too():
    """Under tbb, TBB carries the caller's mode to its workers, so the pool checks above see
    the caller's mode; under omp every pool thread is set and restored one by one. Run the
    same tests there (a subprocess: the layer is fixed per process)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    env = {**os.environ, "NUMBA_THREADING_LAYER": "omp", "PYTHONPATH": str(root)}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "not under_the_omp_layer"],
        capture_output=True, text=True, timeout=300, env=env, cwd=root,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:]
    assert " passed" in r.stdout
