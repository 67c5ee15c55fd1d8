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
            r"W.data must be finite, found nan at position 1",
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


def test_drop_arguments():
    with pytest.raises(ValueError, match=r"k must be at least 0, at most 3, got 4"):
        kernels.magnitude_drop(np.ones(3, np.float32), 4)
    with pytest.raises(ValueError, match=r"must be finite"):
        kernels.magnitude_drop(np.array([1.0, np.nan], np.float32), 1)


class _FakeCupyArray:
    """Looks like a CuPy array to the dispatcher, without CuPy installed."""

    shape = (53, 4)
    ndim = 2


_FakeCupyArray.__module__ = "cupy"


def test_cupy_arrays_get_a_clear_not_implemented(rng):
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
    kernels.spmm(W, np.ones((40, 2), np.float32))
    kernels.spmm_t(W, np.ones((50, 2), np.float32))
