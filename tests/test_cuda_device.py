"""GPU-only behaviour of the public API (skipped without CuPy and a CUDA device): input forms,
mixing host and device operands, results staying on the device, the DeviceCSR round trip.
The kernels' numerics are checked by the backend-parametrised tests (test_products, test_grow,
test_topology)."""

import numpy as np
import pytest

import kernels
from kernels import reference as R
from tests import cases


@pytest.fixture
def cp():
    cases.make_backend("cuda")  # skips without a device
    import cupy

    return cupy


def _forms(W, cp):
    import cupyx.scipy.sparse as csp

    D = W.to_device()
    Mc = D.to_cupy_scipy()
    return {
        "device_csr": D,
        "tuple": (cp.asarray(W.indptr), cp.asarray(W.indices), cp.asarray(W.data), W.shape),
        "cupyx_csr": Mc,
        "cupyx_csc64": csp.csc_matrix(Mc.tocsc()).astype(np.float64),
        "cupyx_coo": Mc.tocoo(),
    }


@pytest.mark.parametrize("form", ["device_csr", "tuple", "cupyx_csr", "cupyx_csc64", "cupyx_coo"])
def test_every_device_input_form_gives_the_same_result(form, rng, cp):
    W = cases.make("odd_37x53", rng)
    Win = _forms(W, cp)[form]
    X = cp.asarray(rng.standard_normal((53, 9)).astype(np.float32))
    dY = cp.asarray(rng.standard_normal((37, 9)).astype(np.float32))
    D = W.to_device()
    for f in (kernels.spmm, kernels.spmm_t):
        arg = X if f is kernels.spmm else dY
        got = f(Win, arg)
        assert isinstance(got, cp.ndarray)
        cp.testing.assert_allclose(got, f(D, arg), rtol=1e-6, atol=1e-6)
    cp.testing.assert_allclose(kernels.sddmm(Win, dY, X), kernels.sddmm(D, dY, X), rtol=1e-6)


def test_mixing_host_and_device_operands_is_a_type_error(rng, cp):
    W = cases.make("odd_37x53", rng)
    D = W.to_device()
    X = rng.standard_normal((53, 4)).astype(np.float32)
    with pytest.raises(TypeError, match=r"X is a host \(NumPy/scipy\) object"):
        kernels.spmm(D, X)
    with pytest.raises(TypeError, match=r"W is a host \(NumPy/scipy\) object"):
        kernels.spmm(W, cp.asarray(X))
    with pytest.raises(TypeError, match="out is a host"):
        kernels.spmm(D, cp.asarray(X), out=np.empty((37, 4), np.float32))
    with pytest.raises(TypeError, match=r"W\.indices is a host"):
        kernels.spmm((cp.asarray(W.indptr), W.indices, cp.asarray(W.data), W.shape), cp.asarray(X))


def test_device_csr_round_trip_and_validation(rng, cp):
    W = cases.make("odd_int64", rng)
    D = W.to_device()
    assert D.indices.dtype == np.int64 and D.nnz == W.nnz
    back = D.to_host()
    np.testing.assert_array_equal(back.to_dense(), W.to_dense())
    t_gpu = [cp.asnumpy(a) for a in D.transpose_structure()]
    for a, b in zip(t_gpu, W.transpose_structure(), strict=True):
        np.testing.assert_array_equal(a, b)
    bad = (cp.asarray([0, 2, 1]), cp.asarray([0, 1]), cp.ones(2, np.float32), (2, 3))
    with pytest.raises(ValueError, match="indptr"):
        kernels.spmm(bad, cp.ones((3, 2), np.float32))


def test_topology_update_on_the_device(rng, cp):
    """drop -> grow -> merge -> remap without leaving the device; equals the CPU result."""
    W = kernels.CSR.random((60, 70), 0.1, seed=int(rng.integers(1 << 30)))
    dY = rng.integers(-2, 3, size=(60, 5)).astype(np.float32)
    X = rng.integers(-2, 3, size=(70, 5)).astype(np.float32)
    K = W.nnz // 4
    moment = rng.standard_normal(W.nnz).astype(np.float32)
    D, dYd, Xd = W.to_device(), cp.asarray(dY), cp.asarray(X)
    dropped = kernels.magnitude_drop(D, K)
    keep = cp.ones(D.nnz, bool)
    keep[dropped] = False
    rows, cols, _ = kernels.topk_grow(D, dYd, Xd, K, keep=keep)
    D2, src = kernels.merge(D, keep, rows, cols)
    m2 = kernels.remap(src, cp.asarray(moment))
    assert isinstance(src, cp.ndarray) and isinstance(m2, cp.ndarray)
    keep_h = np.ones(W.nnz, bool)
    keep_h[kernels.magnitude_drop(W, K)] = False
    rr, cc, _ = R.topk_grow(W.indptr, W.indices, W.shape, dY, X, K, keep_h)
    W2, src_h = kernels.merge(W, keep_h, rr, cc)
    H = D2.to_host()
    np.testing.assert_array_equal(H.indptr, W2.indptr)
    np.testing.assert_array_equal(H.indices, W2.indices)
    np.testing.assert_array_equal(H.data, W2.data)
    np.testing.assert_array_equal(cp.asnumpy(src), src_h)
    np.testing.assert_array_equal(cp.asnumpy(m2), kernels.remap(src_h, moment))
