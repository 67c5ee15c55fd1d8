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


@pytest.mark.parametrize(
    "m, n, batch", [(10, 4099, 33), (1, 1, 1), (3, 7, 5), (32, 130, 2), (5, 64, 1)]
)
@pytest.mark.parametrize("gated", [False, True])
def test_skinny_dense_kernels(rng, m, n, batch, gated):
    from kernels.cpu import skinny

    W = rng.standard_normal((m, n)).astype(np.float32)
    x = np.maximum(rng.standard_normal((n, batch)), 0).astype(np.float32)
    dy = rng.standard_normal((m, batch)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    y = np.full((m, batch), np.nan, np.float32)
    gW = np.full((m, n), np.nan, np.float32)
    gb = np.full(m, np.nan, np.float32)
    dx = np.full((n, batch), np.nan, np.float32)
    skinny.forward(W, x, b, y)
    skinny.backward(W, x, dy, gW, gb, dx, gate=x if gated else None)
    W64, x64, dy64 = W.astype(np.float64), x.astype(np.float64), dy.astype(np.float64)
    tol = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y, W64 @ x64 + b[:, None], **tol)
    np.testing.assert_allclose(gW, dy64 @ x64.T, **tol)
    np.testing.assert_allclose(gb, dy64.sum(axis=1), **tol)
    ref = W64.T @ dy64
    np.testing.assert_allclose(dx, ref * (x > 0) if gated else ref, **tol)
    gW2 = np.full((m, n), np.nan, np.float32)
    assert skinny.backward(W, x, dy, gW2, gb) is None  # no dX wanted: gW still computed
    np.testing.assert_allclose(gW2, gW)


def test_wide_dense_layer_fuses_like_the_unfused_path(rng):
    from sparsecore.layers import Linear

    assert 40 > __import__("kernels").config.SKINNY_MAX_ROWS  # the BLAS path
    W = rng.standard_normal((40, 12)).astype(np.float32)
    x = rng.standard_normal((12, 6)).astype(np.float32)
    gate = np.maximum(rng.standard_normal((12, 6)), 0).astype(np.float32)
    dy = rng.standard_normal((40, 6)).astype(np.float32)
    a, b = Linear(W), Linear(W)
    np.testing.assert_allclose(a.forward(x, relu=True), np.maximum(b.forward(x), 0), rtol=1e-6)
    np.testing.assert_allclose(a.backward(dy, gate=gate), b.backward(dy) * (gate > 0), rtol=1e-6)


def test_linear_checks_shapes_before_its_kernels(rng):
    from sparsecore.layers import Linear

    layer = Linear(rng.standard_normal((10, 100)).astype(np.float32), name="head")
    with pytest.raises(ValueError, match="head: x has 50 rows, expected 100"):
        layer.forward(np.ones((50, 4), np.float32))
    layer.forward(np.ones((100, 4), np.float32))
    with pytest.raises(ValueError, match=r"head: dy has shape \(10, 3\)"):
        layer.backward(np.ones((10, 3), np.float32))


def test_sequential_fuses_the_dense_classifier_too():
    model = mlp([30, 24, 5], [0.5, None], seed=1)
    assert model._fusable(2, 1)  # Linear fed by a ReLU: its dX is gated in the kernel
