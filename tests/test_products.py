"""spmm, spmm_t and sddmm against float64 references: every case, every input form, both layouts,
every backend (CPU; CUDA where a device is present)."""

import numpy as np
import pytest

import kernels
from kernels import reference as R
from tests import cases

BATCHES = [1, 2, 3, 4, 5, 17, 128]


def _ref_args(W):
    return W.indptr, W.indices, W.data, W.shape


@pytest.mark.parametrize("name", cases.NAMES)
@pytest.mark.parametrize("batch", BATCHES)
def test_spmm(name, batch, rng, backend):
    # (on CUDA, batch 128 runs the float4 kernel, the odd batches the scalar one)
    W = cases.make(name, rng)
    m, n = W.shape
    X = rng.standard_normal((n, batch)).astype(np.float32)
    ref = R.spmm(*_ref_args(W), X)
    bound = cases.tol(np.abs(R.dense(*_ref_args(W))) @ np.abs(X.astype(np.float64)))
    Wb = backend.W(W)
    out = backend.poisoned((m, batch))
    Y = kernels.spmm(Wb, backend.a(X), out=out)
    assert Y is out
    assert np.all(np.abs(backend.np(Y) - ref) <= bound)
    Yb = backend.np(kernels.spmm(Wb, backend.a(np.ascontiguousarray(X.T)), layout="batch"))
    assert Yb.shape == (batch, m)
    assert np.all(np.abs(Yb.T - ref) <= bound)


@pytest.mark.parametrize("name", cases.NAMES)
@pytest.mark.parametrize("batch", BATCHES)
def test_spmm_t(name, batch, rng, backend):
    W = cases.make(name, rng)
    m, n = W.shape
    dY = rng.standard_normal((m, batch)).astype(np.float32)
    ref = R.spmm_t(*_ref_args(W), dY)
    bound = cases.tol(np.abs(R.dense(*_ref_args(W))).T @ np.abs(dY.astype(np.float64)))
    Wb = backend.W(W)
    out = backend.poisoned((n, batch))
    dX = kernels.spmm_t(Wb, backend.a(dY), out=out)
    assert dX is out
    assert np.all(np.abs(backend.np(dX) - ref) <= bound)
    outb = backend.poisoned((batch, n))
    dXb = kernels.spmm_t(Wb, backend.a(np.ascontiguousarray(dY.T)), out=outb, layout="batch")
    assert dXb is outb
    assert np.all(np.abs(backend.np(dXb).T - ref) <= bound)


@pytest.mark.parametrize("name", cases.NAMES)
@pytest.mark.parametrize("batch", BATCHES)
def test_sddmm(name, batch, rng, backend):
    W = cases.make(name, rng)
    m, n = W.shape
    dY = rng.standard_normal((m, batch)).astype(np.float32)
    X = rng.standard_normal((n, batch)).astype(np.float32)
    ref = R.sddmm(W.indptr, W.indices, W.shape, dY, X)
    bound = cases.tol(R.sddmm(W.indptr, W.indices, W.shape, np.abs(dY), np.abs(X)))
    Wb, dYb, Xb = backend.W(W), backend.a(dY), backend.a(X)
    out = backend.poisoned((W.nnz,))
    dW = kernels.sddmm(Wb, dYb, Xb, out=out)
    assert dW is out
    assert np.all(np.abs(backend.np(dW) - ref) <= bound)
    dWb = kernels.sddmm(
        Wb,
        backend.a(np.ascontiguousarray(dY.T)),
        backend.a(np.ascontiguousarray(X.T)),
        layout="batch",
    )
    assert np.all(np.abs(backend.np(dWb) - ref) <= bound)


@pytest.mark.parametrize("form", ["csr", "tuple", "scipy_csr", "scipy_csc64", "scipy_coo"])
def test_every_input_form_gives_the_same_result(form, rng):
    W = cases.make("odd_37x53", rng)
    Win = cases.forms(W)[form]
    X = rng.standard_normal((53, 9)).astype(np.float32)
    dY = rng.standard_normal((37, 9)).astype(np.float32)
    np.testing.assert_array_equal(kernels.spmm(Win, X), kernels.spmm(W, X))
    np.testing.assert_array_equal(kernels.spmm_t(Win, dY), kernels.spmm_t(W, dY))
    np.testing.assert_array_equal(kernels.sddmm(Win, dY, X), kernels.sddmm(W, dY, X))


def test_float64_and_noncontiguous_operands_are_converted(rng):
    W = cases.make("odd_37x53", rng)
    X64 = rng.standard_normal((9, 53)).T  # float64, Fortran-ordered view
    ref = R.spmm(W.indptr, W.indices, W.data, W.shape, X64.astype(np.float32))
    np.testing.assert_allclose(kernels.spmm(W, X64), ref, rtol=1e-5, atol=1e-5)


def test_threads_split_rows_by_nonzeros(rng):
    W = cases.make("skewed_rows", rng)
    blocks = W.row_blocks()
    assert blocks[0] == 0 and blocks[-1] == W.shape[0]
    assert np.all(np.diff(blocks) >= 0)
    # the one dense row (300 of ~500 nonzeros) must not share a block with many other nonzeros
    b = np.searchsorted(blocks, 17, side="right") - 1
    lo, hi = blocks[b], blocks[b + 1]
    assert W.indptr[hi] - W.indptr[lo] <= 300 + 60


@pytest.mark.parametrize("name", ["empty_rows", "odd_37x53", "empty_4x0", "odd_int64"])
def test_launchers_fold_the_bias(name, rng, backend):
    """The layers' fused paths: spmm adds the bias, sddmm also returns Σ_b dY (bias gradient)."""
    S = backend.launchers("sddmm")
    P = backend.launchers("spmm")

    W = cases.make(name, rng)
    m, n = W.shape
    X = rng.standard_normal((n, 6)).astype(np.float32)
    dY = rng.standard_normal((m, 6)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    a = backend.a
    ip, ix, data = a(W.indptr), a(W.indices), a(W.data)
    Y = P.spmm(ip, ix, data, a(X), backend.poisoned((m, 6)), bias=a(b))
    ref = R.spmm(*_ref_args(W), X) + b[:, None]
    np.testing.assert_allclose(backend.np(Y), ref, rtol=1e-5, atol=1e-5)
    gb = backend.poisoned((m,))
    dW = S.sddmm(ip, ix, a(dY), a(X), backend.poisoned((W.nnz,)), bias_grad=gb)
    np.testing.assert_allclose(
        backend.np(gb), dY.astype(np.float64).sum(axis=1), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        backend.np(dW), R.sddmm(W.indptr, W.indices, W.shape, dY, X), rtol=1e-4, atol=1e-5
    )
    # the fused ReLU (forward) and ReLU-backward gate (dX), same launcher arguments everywhere
    Yr = P.spmm(ip, ix, data, a(X), backend.poisoned((m, 6)), bias=a(b), relu=True)
    np.testing.assert_allclose(backend.np(Yr), np.maximum(ref, 0), rtol=1e-5, atol=1e-5)
    T = backend.launchers("spmm_t")
    gate = rng.standard_normal((n, 6)).astype(np.float32)
    t = [a(t) for t in W.transpose_structure()]
    dX = T.spmm_t(*t, data, a(dY), backend.poisoned((n, 6)), gate=a(gate))
    ref_dx = np.where(gate > 0, R.spmm_t(*_ref_args(W), dY), 0)
    np.testing.assert_allclose(backend.np(dX), ref_dx, rtol=1e-5, atol=1e-5)
