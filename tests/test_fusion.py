"""ReLU fused into the sparse kernels: spmm's relu epilogue, spmm_t's gate, and Sequential's use
of them, each against an unfused float64 reference."""

import numpy as np
import pytest

from kernels.cpu import spmm as _spmm
from kernels.cpu import spmm_t as _spmm_t
from sparsecore import CSR
from sparsecore.layers import ReLU, Sequential, mlp


@pytest.mark.parametrize("shape, density, batch", [((37, 23), 0.3, 5), ((1, 50), 0.5, 3),
                                                   ((40, 1), 0.5, 7), ((30, 20), 0.0, 4)])  # fmt: skip
def test_spmm_relu_epilogue(rng, shape, density, batch):
    W = CSR.random(shape, density, seed=int(rng.integers(1 << 30)))
    x = rng.standard_normal((shape[1], batch)).astype(np.float32)
    b = rng.standard_normal(shape[0]).astype(np.float32)
    out = np.full((shape[0], batch), np.nan, np.float32)  # poisoned
    _spmm.spmm(W.indptr, W.indices, W.data, x, out, bias=b, relu=True)
    ref = np.maximum(W.to_scipy().astype(np.float64) @ x.astype(np.float64) + b[:, None], 0)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert (out >= 0).all()


@pytest.mark.parametrize("shape, density, batch", [((37, 23), 0.3, 5), ((1, 50), 0.5, 3),
                                                   ((40, 1), 0.5, 7), ((30, 20), 0.0, 4)])  # fmt: skip
def test_spmm_t_gate(rng, shape, density, batch):
    W = CSR.random(shape, density, seed=int(rng.integers(1 << 30)))
    dy = rng.standard_normal((shape[0], batch)).astype(np.float32)
    gate = np.maximum(rng.standard_normal((shape[1], batch)), 0).astype(np.float32)
    out = np.full((shape[1], batch), np.nan, np.float32)
    ti, tj, tp = W.transpose_structure()
    _spmm_t.spmm_t(ti, tj, tp, W.data, dy, out, gate=gate)
    ref = (W.to_scipy().T.astype(np.float64) @ dy.astype(np.float64)) * (gate > 0)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert (out[gate <= 0] == 0).all()


class PlainReLU(ReLU):
    """A ReLU subclass: Sequential does not fuse it, so it runs the unfused path."""


def _twins(seed):
    fused = mlp([30, 24, 16, 5], [0.4, 0.5, None], seed=seed)
    mats = [(W.toarray() if i == 2 else W, b) for i, (W, b) in enumerate(fused.to_scipy())]
    plain = Sequential.from_matrices([W for W, _ in mats], [b for _, b in mats])
    plain.layers = [PlainReLU() if type(l) is ReLU else l for l in plain.layers]
    return fused, plain


def test_sequential_fused_equals_unfused(rng):
    fused, plain = _twins(3)
    assert any(type(l) is ReLU for l in fused.layers)
    x = rng.standard_normal((30, 9)).astype(np.float32)
    dy = rng.standard_normal((5, 9)).astype(np.float32)
    y1, y2 = fused.forward(x), plain.forward(x)
    np.testing.assert_allclose(y1, y2, rtol=1e-6, atol=1e-6)
    fused.backward(dy)
    plain.backward(dy)
    for a, b in zip(fused.params(), plain.params(), strict=True):
        np.testing.assert_allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6, err_msg=a.name)
