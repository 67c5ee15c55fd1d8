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


@pytest.mark.parametrize("flush", [True, False])
def test_training_sets_the_mode_it_is_asked_for(flush):
    from sparsecore.data import from_arrays
    from sparsecore.train import TrainConfig, Trainer

    rng = np.random.default_rng(0)
    d = from_arrays(rng.standard_normal((64, 6)), rng.integers(0, 2, 64),
                    rng.standard_normal((8, 6)), rng.integers(0, 2, 8))  # fmt: skip
    Trainer(
        TrainConfig(
            arch=[6, 8, 2], sparsity=0.5, batch_size=16, flush_denormals=flush, progress=False
        ),
        d,
    )
    assert fpmode.flushing() is flush


def test_a_later_trainer_can_turn_flushing_off():
    from sparsecore.data import from_arrays
    from sparsecore.train import TrainConfig, Trainer

    rng = np.random.default_rng(0)
    d = from_arrays(rng.standard_normal((64, 6)), rng.integers(0, 2, 64),
                    rng.standard_normal((8, 6)), rng.integers(0, 2, 8))  # fmt: skip
    cfg = dict(arch=[6, 8, 2], sparsity=0.5, batch_size=16, progress=False)
    Trainer(TrainConfig(**cfg), d)
    assert fpmode.flushing()
    Trainer(TrainConfig(**cfg, flush_denormals=False), d)
    assert not fpmode.flushing()
    assert np.float32(1e-38) / np.float32(4) > 0  # IEEE subnormals again
