"""The CSR container: conversions, random construction, transpose structure, memory."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sparsecore import CSR
from tests import cases


@settings(max_examples=80, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=12),
        elements=st.sampled_from([0.0, 0.0, 0.0, 1.5, -2.0, 3.25]),
    )
)
def test_dense_round_trip(a):
    W = CSR.from_dense(a)
    np.testing.assert_array_equal(W.to_dense(), a)
    assert W.nnz == np.count_nonzero(a)
    W2 = CSR.from_scipy(W.to_scipy())
    np.testing.assert_array_equal(W2.to_dense(), a)
    np.testing.assert_array_equal(W2.to_scipy("coo").toarray(), a)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(0, 15),
    n=st.integers(0, 15),
    nnz=st.integers(0, 60),
    fmt=st.sampled_from(["csr", "csc", "coo"]),
    idx=st.sampled_from([np.int32, np.int64]),
    seed=st.integers(0, 2**31),
)
def test_scipy_any_format_with_duplicates(m, n, nnz, fmt, idx, seed):
    rng = np.random.default_rng(seed)
    if m * n == 0:
        nnz = 0
    rows = rng.integers(0, max(m, 1), nnz).astype(idx)
    cols = rng.integers(0, max(n, 1), nnz).astype(idx)
    vals = rng.integers(-3, 4, nnz).astype(np.float64)
    M = sp.coo_matrix((vals, (rows, cols)), shape=(m, n)).asformat(fmt)
    if fmt == "coo":
        M.row, M.col = M.row.astype(idx), M.col.astype(idx)  # scipy picks int32 by itself
    else:
        M.indices, M.indptr = M.indices.astype(idx), M.indptr.astype(idx)
    before = M.toarray()
    W = CSR.from_scipy(M)
    np.testing.assert_array_equal(W.to_dense(np.float64), before)  # duplicates summed
    np.testing.assert_array_equal(M.toarray(), before)  # input untouched
    assert W.indices.dtype == np.int32 and W.data.dtype == np.float32
    CSR(W.indptr, W.indices, W.data, W.shape)  # passes full validation: canonical


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize(
    "shape,density", [((100, 80), 0.05), ((7, 3), 1.0), ((5, 9), 0.0), ((0, 4), 0.5)]
)
def test_random(shape, density, per_row):
    W = CSR.random(shape, density, seed=3, per_row=per_row)
    CSR(W.indptr, W.indices, W.data, W.shape)  # canonical, in range
    m, n = shape
    if per_row:
        assert np.all(np.diff(W.indptr) == round(density * n))
    else:
        assert W.nnz == round(density * m * n)
    W2 = CSR.random(shape, density, seed=3, per_row=per_row)
    np.testing.assert_array_equal(W.indices, W2.indices)  # seeded
    np.testing.assert_array_equal(W.data, W2.data)


def test_random_is_uniform_over_positions():
    counts = np.zeros((6, 5))
    for s in range(400):
        counts += CSR.random((6, 5), 0.2, seed=s).to_dense() != 0
    # each cell is present with probability 0.2: 80 of 400 expected, sd ~ 8
    assert np.all(np.abs(counts - 80) < 40)


@pytest.mark.parametrize("name", cases.NAMES)
def test_transpose_structure(name, rng):
    W = cases.make(name, rng)
    t_indptr, t_indices, t_perm = W.transpose_structure()
    ref = W.to_scipy().tocsc()
    ref.sort_indices()
    np.testing.assert_array_equal(t_indptr, ref.indptr)
    np.testing.assert_array_equal(t_indices, ref.indices)
    np.testing.assert_array_equal(W.data[t_perm], ref.data)
    assert W.transpose_structure() is W.transpose_structure()  # cached


def test_pattern_is_read_only_and_memory_is_reported(rng):
    W = cases.make("odd_37x53", rng)
    with pytest.raises(ValueError):
        W.indices[0] = 1
    W.data[0] = 5.0  # values may change
    b = W.nbytes()
    assert b["total"] == W.data.nbytes + W.indices.nbytes + W.indptr.nbytes
    W.transpose_structure()
    bt = W.nbytes()
    assert bt["transpose"] == 4 * (53 + 1 + 2 * W.nnz)
    assert "nnz=" in repr(W)


def test_int64_only_when_needed():
    W = CSR.random((10, 10), 0.3, seed=0)
    assert W.indptr.dtype == np.int32
    W64 = CSR(W.indptr.astype(np.int64), W.indices.astype(np.int64), W.data, W.shape)
    assert W64.indices.dtype == np.int32  # sizes fit: narrowed
    W64 = CSR(W.indptr, W.indices, W.data, W.shape, index_dtype=np.int64)
    assert W64.indices.dtype == np.int64 and W64.indptr.dtype == np.int64


def test_random_pattern_of_a_large_dense_ish_matrix_is_o_nnz():
    """CSR.random above 2**24 entries and density 1/50: rejection, not a shuffle of all m·n
    positions (which would take 8·m·n = 160 MB here)."""
    import tracemalloc

    tracemalloc.start()
    W = CSR.random((4, 5_000_000), 0.1, seed=3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert W.nnz == 2_000_000 and W.indices.dtype == np.int32
    CSR(W.indptr, W.indices, W.data, W.shape)  # canonical
    assert peak < 8 * 4 * 5_000_000, (
        peak
    )  # less than the m·n int64 positions alone (measured 97 MB)
    per_row = np.diff(W.indptr)
    assert np.all(np.abs(per_row - 500_000) < 5 * np.sqrt(500_000))
    np.testing.assert_array_equal(CSR.random((4, 5_000_000), 0.1, seed=3).indices, W.indices)


def test_with_values_shares_the_pattern_and_its_derived_structures():
    W = CSR.random((30, 40), 0.2, seed=5)
    t = W.transpose_structure()
    V2 = W._with_values(np.arange(W.nnz, dtype=np.float32))
    assert V2.indices is W.indices and V2.indptr is W.indptr
    assert V2.transpose_structure() is t and V2.row_blocks() is W.row_blocks()
    np.testing.assert_array_equal(V2.data, np.arange(W.nnz))
    assert not np.shares_memory(V2.data, W.data)
    with pytest.raises(ValueError, match="length nnz"):
        W._with_values(np.zeros(W.nnz + 1, np.float32))
    with pytest.raises(TypeError, match="float32"):
        W._with_values(np.zeros(W.nnz))


def test_from_scipy_checks_the_arrays_it_keeps(monkeypatch):
    """A caller writing its index arrays while from_scipy runs (another thread) cannot slip an
    unchecked index into the CSR: the scans run on the copies the CSR keeps."""
    from kernels import validation as V

    M = sp.csr_matrix(CSR.random((20, 30), 0.2, seed=1).to_scipy())
    real = V.check_finite_values

    def meanwhile(data, name):  # runs after the range check
        M.indices[0] = 10**6
        M.indptr[1] = 10**6
        return real(data, name)

    monkeypatch.setattr(V, "check_finite_values", meanwhile)
    W = CSR.from_scipy(M)
    assert int(W.indices.max()) < 30
    assert np.all(np.diff(W.indptr) >= 0) and int(W.indptr[-1]) == W.nnz
