"""kernels/cpu/backward.py: dX and dW of a sparse layer in one pass, against float64 references
(fresh random inputs, the named odd shapes and edge cases, NaN-poisoned outputs), and the
engine's choice between it and the standalone spmm_t + sddmm."""

import numpy as np
import pytest

from kernels import config
from kernels.cpu import backward as BW
from sparsecore.layers import SparseLinear
from tests import cases


def _reference(W, dY, X, gate):
    dense = W.to_dense().astype(np.float64)
    dx = dense.T @ dY.astype(np.float64)
    if gate is not None:
        dx = np.where(gate > 0, dx, 0.0)
    rows = W.row_ids()
    dw = np.einsum("pb,pb->p", dY[rows].astype(np.float64), X[W.indices].astype(np.float64))
    return dx, dw, dY.astype(np.float64).sum(axis=1)


@pytest.mark.parametrize("name", cases.NAMES)
@pytest.mark.parametrize("batch", [0, 1, 3, 8, 33])
@pytest.mark.parametrize("gated", [False, True])
def test_fused_backward_matches_float64(name, batch, gated, rng):
    W = cases.make(name, rng)
    m, n = W.shape
    dY = rng.standard_normal((m, batch)).astype(np.float32)
    X = rng.standard_normal((n, batch)).astype(np.float32)
    gate = None
    if gated:
        gate = np.where(rng.random((n, batch)) < 0.4, 0.0, rng.random((n, batch)))
        gate = gate.astype(np.float32)
        gate[rng.random((n, batch)) < 0.1] = -1.0
    dx = np.full((n, batch), np.nan, np.float32)
    dw = np.full(W.nnz, np.nan, np.float32)
    gb = np.full(m, np.nan, np.float32)
    t = W.transpose_structure()
    got = BW.backward(*t, W.data, dY, X, dw, dx, W.col_blocks(), bias_grad=gb, gate=gate)
    assert got is dx
    rdx, rdw, rgb = _reference(W, dY, X, gate)
    tol = 1e-5 * max(1, batch) * max(1, int(np.diff(t[0]).max(initial=0)))
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=tol)
    np.testing.assert_allclose(dw, rdw, rtol=1e-4, atol=1e-5 * max(1, batch))
    np.testing.assert_allclose(gb, rgb, rtol=1e-4, atol=1e-5 * max(1, batch))


def test_fused_backward_on_a_random_layer_of_many_columns(rng):
    from kernels import CSR

    W = CSR.random((300, 700), 0.05, seed=int(rng.integers(1 << 30)))
    dY = rng.standard_normal((300, 128)).astype(np.float32)
    X = rng.standard_normal((700, 128)).astype(np.float32)
    dx = np.full((700, 128), np.nan, np.float32)
    dw = np.full(W.nnz, np.nan, np.float32)
    BW.backward(*W.transpose_structure(), W.data, dY, X, dw, dx, W.col_blocks())
    rdx, rdw, _ = _reference(W, dY, X, None)
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(dw, rdw, rtol=1e-4, atol=1e-3)


def test_the_engine_takes_the_fused_pass_by_the_nnz_limit(rng, monkeypatch):
    from kernels import CSR

    W = CSR.random((60, 80), 0.2, seed=int(rng.integers(1 << 30)))
    x = rng.standard_normal((80, 16)).astype(np.float32)
    dy = rng.standard_normal((60, 16)).astype(np.float32)
    gate = (rng.random((80, 16)) < 0.5).astype(np.float32)
    calls = []
    real = BW.backward
    monkeypatch.setattr(BW, "backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = {}
    for limit in (0, W.nnz - 1, W.nnz, None):
        monkeypatch.setattr(config, "FUSED_BACKWARD_MAX_NNZ", limit)
        layer = SparseLinear(W.copy())
        layer.forward(x)
        before = len(calls)
        dx = layer.backward(dy, gate=gate)
        results[limit] = (dx, layer.gW.copy(), layer.gb.copy(), len(calls) > before)
        assert layer.backward(dy, need_dx=False) is None  # dW alone: sddmm
    assert [results[k][3] for k in (0, W.nnz - 1, W.nnz)] == [False, False, True]
    assert results[None][3] == BW.fused_pays(W.nnz)
    for a, b in zip(results[0][:3], results[W.nnz][:3], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_fused_pays_reads_the_machine_by_default(monkeypatch):
    import numba

    from kernels.machine import cache_sizes

    monkeypatch.setattr(config, "FUSED_BACKWARD_MAX_NNZ", None)
    c = cache_sizes()
    limit = c.l2 * max(1, numba.get_num_threads() // c.l2_shared) // BW.FUSED_L2_BYTES_PER_NNZ
    assert BW.fused_pays(limit) and not BW.fused_pays(limit + 1) and not BW.fused_pays(0)
