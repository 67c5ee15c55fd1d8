"""Bad input: the error type, and a message that names the argument, expectation and value."""

import numpy as np
import pytest

import kernels
from sparsecore import CSR
from tests import cases

I = np.array


def _raw(indptr, indices, data, shape):
    return (I(indptr), I(indices), I(data, np.float32), shape)


@pytest.mark.parametrize(
    "W,err,msg",
    [
        (
            _raw([0, 1, 2], [0, 1], [1, 2], (3, 2)),
            ValueError,
            r"W.indptr has length 3, expected n_rows \+ 1 = 4",
        ),
        (_raw([1, 1, 2], [0, 1], [1, 2], (2, 2)), ValueError, r"W.indptr\[0\] must be 0, got 1"),
        (
            _raw([0, 1, 3], [0, 1], [1, 2], (2, 2)),
            ValueError,
            r"W.indptr\[-1\] = 3 must equal len\(W.indices\) = 2",
        ),
        (
            _raw([0, 2, 1, 2], [0, 1], [1, 2], (3, 2)),
            ValueError,
            r"nondecreasing, but indptr\[2\] = 1 < indptr\[1\] = 2",
        ),
        (
            _raw([0, 1, 2], [0, 2], [1, 2], (2, 2)),
            ValueError,
            r"W.indices must lie in \[0, n_cols = 2\), found column index 2",
        ),
        (
            _raw([0, 2, 2], [1, 0], [1, 2], (2, 2)),
            ValueError,
            r"not canonical: in row 0, column 0 follows column 1",
        ),
        (
            _raw([0, 2, 2], [1, 1], [1, 2], (2, 2)),
            ValueError,
            r"in row 0, column 1 follows column 1",
        ),
        (
            _raw([0, 1, 2], [0, 1], [1, np.nan], (2, 2)),
            ValueError,
            r"W.data must be finite in float32, found nan at position 1",
        ),
        (
            _raw([0, 1], [0], [1, 2], (1, 2)),
            ValueError,
            r"W.data has length 2, expected len\(W.indices\) = 1",
        ),
        (
            (I([0, 1]), I([0.0]), I([1.0], np.float32), (1, 2)),
            TypeError,
            r"W.indices must have an integer dtype, got float64",
        ),
        (
            _raw([0, 1], [0], [1], (1, -2)),
            ValueError,
            r"W.shape: n_cols must be a non-negative integer, got -2",
        ),
        (_raw([0, 1], [0], [1], 5), ValueError, r"W.shape must be a pair"),
        (
            [[1, 0], [0, 1]],
            TypeError,
            r"W must be a sparsecore.CSR, a scipy.sparse matrix, or a tuple",
        ),
    ],
)
def test_bad_matrices(W, err, msg):
    X = np.ones((2, 3), np.float32)
    with pytest.raises(err, match=msg):
        kernels.spmm(W, X)


def test_bad_operands(rng):
    W = cases.make("odd_37x53", rng)
    with pytest.raises(ValueError, match=r"X has shape \(52, 4\), expected 53 rows"):
        kernels.spmm(W, np.ones((52, 4), np.float32))
    with pytest.raises(ValueError, match=r"X must be 2-D, got 1-D with shape \(53,\)"):
        kernels.spmm(W, np.ones(53, np.float32))
    with pytest.raises(TypeError, match=r"X must hold real numbers .* got dtype complex64"):
        kernels.spmm(W, np.ones((53, 2), np.complex64))
    with pytest.raises(ValueError, match=r"X has shape \(4, 37\), expected \(batch, 53\)"):
        kernels.spmm(W, np.ones((4, 37), np.float32), layout="batch")
    with pytest.raises(ValueError, match=r"dY has shape \(53, 4\), expected 37 rows"):
        kernels.spmm_t(W, np.ones((53, 4), np.float32))
    with pytest.raises(ValueError, match=r"layout must be 'feature'"):
        kernels.spmm(W, np.ones((53, 2), np.float32), layout="rows")
    with pytest.raises(ValueError, match=r"dY and X disagree on the batch size: 3 vs 4"):
        kernels.sddmm(W, np.ones((37, 3), np.float32), np.ones((53, 4), np.float32))


def test_bad_out(rng):
    W = cases.make("odd_37x53", rng)
    X = np.ones((53, 4), np.float32)
    with pytest.raises(ValueError, match=r"out has shape \(37, 5\), expected \(37, 4\)"):
        kernels.spmm(W, X, out=np.empty((37, 5), np.float32))
    with pytest.raises(TypeError, match=r"out has dtype float64, expected float32"):
        kernels.spmm(W, X, out=np.empty((37, 4)))
    with pytest.raises(ValueError, match=r"out must be a writeable C-contiguous array"):
        kernels.spmm(W, X, out=np.empty((4, 37), np.float32).T)
    with pytest.raises(ValueError, match=r"out has shape \(3,\), expected \(\d+,\)"):
        kernels.sddmm(W, np.ones((37, 4), np.float32), X, out=np.empty(3, np.float32))


def test_bad_grow_arguments(rng):
    W = cases.make("empty_rows", rng)  # 5 × 5 with 9 stored: 16 absent
    dY = np.ones((5, 2), np.float32)
    X = np.ones((5, 2), np.float32)
    with pytest.raises(ValueError, match=r"k must be at least 0, at most 16, got 17"):
        kernels.topk_grow(W, dY, X, 17)
    with pytest.raises(TypeError, match=r"k must be an integer, got float 2.0"):
        kernels.topk_grow(W, dY, X, 2.0)
    with pytest.raises(ValueError, match=r"dY must be finite"):
        kernels.topk_grow(W, np.full((5, 2), np.inf, np.float32), X, 1)
    with pytest.raises(ValueError, match=r"keep has length 3, expected nnz = 9"):
        kernels.topk_grow(W, dY, X, 1, keep=np.ones(3, bool))
    with pytest.raises(TypeError, match=r"keep must have dtype bool, got int64"):
        kernels.topk_grow(W, dY, X, 1, keep=np.ones(9, np.int64))


def test_values_beyond_float32_are_refused():
    # 1e300 is finite in float64 but inf once stored as float32
    with pytest.raises(ValueError, match=r"W.data must be finite in float32, found inf"):
        CSR(I([0, 1]), I([0]), I([1e300]), (1, 1))
    with pytest.raises(ValueError, match=r"a must be finite in float32"):
        CSR.from_dense([[1e300]])
    with pytest.raises(ValueError, match=r"W.data must be finite in float32"):
        kernels.spmm((I([0, 1]), I([0]), I([1e300]), (1, 1)), np.ones((1, 1), np.float32))


def test_scipy_with_broken_indptr_gets_a_clear_error():
    import scipy.sparse as sp

    M = sp.csr_matrix((I([1.0, 2.0]), I([0, 1]), I([0, 2, 2])), shape=(2, 2))
    M.indptr = I([0, 2, 1]).astype(M.indptr.dtype)  # scipy does not check this
    with pytest.raises(ValueError, match=r"W.indptr\[-1\] = 1 must equal|nondecreasing"):
        CSR.from_scipy(M)


def test_callers_arrays_never_alias_a_trusted_pattern():
    """A CSR's pattern is trusted by kernels without bounds checks: it must own it."""
    base = I([0, 1, 0, 1])
    indptr = I([0, 2, 4])
    W = CSR(indptr, base[:], np.ones(4, np.float32), (2, 2))
    base[1] = 50_000_000  # the caller changes its array...
    assert W.indices[1] == 1  # ...the CSR does not see it
    assert base.flags.writeable and indptr.flags.writeable  # and the caller's arrays stay writeable
    raw = (I([0, 1]), I([0]), np.ones(1, np.float32), (1, 1))
    kernels.spmm(raw, np.ones((1, 2), np.float32))
    assert raw[0].flags.writeable and raw[1].flags.writeable


def test_random_index_dtype_is_checked():
    with pytest.raises(TypeError, match=r"index_dtype must be int32 or int64, got int8"):
        CSR.random((20, 20), 0.5, seed=0, index_dtype=np.int8)
    with pytest.raises(TypeError, match=r"index_dtype must be int32 or int64, got float32"):
        CSR.random((20, 20), 0.5, seed=0, index_dtype=np.float32)
    with pytest.raises(ValueError, match=r"density must be a number in \[0, 1\], got True"):
        CSR.random((2, 2), True)
    assert CSR.random((2, 2), np.int64(1), seed=0).nnz == 4


def test_out_may_not_overlap_an_input():
    # W swaps the two rows: writing into X while reading it would give [2, 2]
    W = CSR(I([0, 1, 2]), I([1, 0]), np.ones(2, np.float32), (2, 2))
    X = I([[1.0], [2.0]], np.float32)
    with pytest.raises(ValueError, match=r"out overlaps an input array"):
        kernels.spmm(W, X, out=X)
    with pytest.raises(ValueError, match=r"out overlaps an input array"):
        kernels.spmm_t(W, X, out=X)
    with pytest.raises(ValueError, match=r"out overlaps an input array"):
        kernels.sddmm(W, X, X, out=W.data)


def test_grow_refuses_scores_that_overflow_float32():
    W = CSR(I([0, 0, 0]), I([], np.int32), I([], np.float32), (2, 3))
    dY = I([[0.0, 0.0], [1e20, 1e20]], np.float32)
    X = I([[1.0, 0.0], [0.0, 1.0], [1e20, -1e20]], np.float32)  # score (1, 2) is 0, not inf
    with pytest.raises(OverflowError, match=r"dY·Xᵀ may overflow float32"):
        kernels.topk_grow(W, dY, X, 1)


def test_remap_checks_src():
    with pytest.raises(ValueError, match=r"src must hold positions in \[0, 3\) or -1"):
        kernels.remap(I([0, -5]), np.ones(3))


def test_drop_arguments():
    with pytest.raises(ValueError, match=r"k must be at least 0, at most 3, got 4"):
        kernels.magnitude_drop(np.ones(3, np.float32), 4)
    with pytest.raises(ValueError, match=r"must be finite"):
        kernels.magnitude_drop(np.array([1.0, np.nan], np.float32), 1)
    # abs(int8(-128)) wraps to -128 in NumPy: integers are ranked as floats
    np.testing.assert_array_equal(kernels.magnitude_drop(np.array([-128, 1, 2], np.int8), 1), [1])


class _FakeCupyArray:
    """Looks like a CuPy array to the dispatcher, without CuPy installed."""

    shape = (53, 4)
    ndim = 2


_FakeCupyArray.__module__ = "cupy"


def test_cupy_arrays_get_a_clear_not_implemented(rng, monkeypatch):
    # as if CuPy were not installed, whatever this machine has (with CuPy and a GPU the same
    # calls are a TypeError about mixing sides: tests/test_cuda_device.py)
    import sys

    from sparsecore import validation

    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    monkeypatch.setattr(validation, "_gpu_state", {})
    W = cases.make("odd_37x53", rng)
    with pytest.raises(NotImplementedError, match=r"X is a CuPy array: the CUDA kernels"):
        kernels.spmm(W, _FakeCupyArray())
    with pytest.raises(NotImplementedError, match=r"W.data is a CuPy array"):
        kernels.spmm((W.indptr, W.indices, _FakeCupyArray(), W.shape), np.ones((53, 4), np.float32))


def test_validated_container_is_not_rechecked(rng, monkeypatch):
    """A CSR is trusted: calls on it never run the O(nnz) validation again."""
    from sparsecore import validation

    W = CSR.random((50, 40), 0.1, seed=1)
    monkeypatch.setattr(validation, "check_csr_arrays", lambda *a, **k: pytest.fail("revalidated"))
    monkeypatch.setattr(validation, "check_canonical", lambda *a, **k: pytest.fail("revalidated"))
    X, dY = np.ones((40, 2), np.float32), np.ones((50, 2), np.float32)
    kernels.spmm(W, X)
    kernels.spmm_t(W, dY)
    kernels.sddmm(W, dY, X)
    kernels.topk_grow(W, dY, X, 3)
    kernels.magnitude_drop(W, 3)
    kernels.merge(W, np.ones(W.nnz, bool), np.array([], int), np.array([], int))
