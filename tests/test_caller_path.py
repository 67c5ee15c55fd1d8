"""The NumPy caller's path: scipy.sparse weights and batch-major operands of the public products.

A scipy matrix is untrusted on every call (the caller may have changed it since the last one),
but repeated calls on an unchanged matrix reuse its validated pattern and derived structures
(kernels/formats.py, "scipy input of calls"). These tests hold both halves: every accepted kind
gives exactly the prepared-CSR result, a mutated matrix is either re-validated (the right answer)
or refused with the usual error, never a stale or out-of-bounds result; the cache is bounded,
keeps no matrix alive, and builds the transpose structure once per pattern.
Batch-major operands go through kernels/layout.py's transpose, or none for a transposed view.
"""

import gc
import threading
import weakref

import numpy as np
import pytest
import scipy.sparse as sp

import kernels
from kernels import backend as B
from kernels import formats as F
from kernels import layout
from kernels.cpu import sddmm as cpu_sddmm
from kernels.formats import CSR


@pytest.fixture(autouse=True)
def _fresh_cache():
    F.clear_scipy_cache()
    yield
    F.clear_scipy_cache()


def _operands(shape, batch, rng):
    m, n = shape
    X = rng.standard_normal((n, batch)).astype(np.float32)
    dY = rng.standard_normal((m, batch)).astype(np.float32)
    return X, dY


def _results(W, X, dY):
    """Every product and the values-only ops, feature- and batch-major."""
    Xb, dYb = np.ascontiguousarray(X.T), np.ascontiguousarray(dY.T)
    return [
        kernels.spmm(W, X),
        kernels.spmm_t(W, dY),
        kernels.sddmm(W, dY, X),
        kernels.spmm(W, Xb, layout="batch"),
        kernels.spmm_t(W, dYb, layout="batch"),
        kernels.sddmm(W, dYb, Xb, layout="batch"),
        kernels.magnitude_drop(W, 3),
    ]


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def _fresh(M, X, dY):
    """What the call must return for M as it is now: the uncached conversion."""
    return _results(CSR.from_scipy(M), X, dY)


def _canonical(rng, m=23, n=31, density=0.2):
    W = CSR.random((m, n), density, seed=int(rng.integers(2**31)))
    return sp.csr_matrix(W.to_scipy())


def _unsorted(rng):
    """A CSR matrix with columns unsorted within rows (no duplicates)."""
    M = _canonical(rng)
    for i in range(M.shape[0]):
        a, b = M.indptr[i], M.indptr[i + 1]
        order = rng.permutation(b - a)
        M.indices[a:b] = M.indices[a:b][order]
        M.data[a:b] = M.data[a:b][order]
    M.has_sorted_indices = False
    assert not F.V.is_canonical(M.indptr, M.indices)
    return M


def _with_duplicates(rng):
    """A CSR matrix whose first entries are stored twice (scipy leaves them unsummed)."""
    coo = _canonical(rng).tocoo()
    rows = np.concatenate([coo.row, coo.row[:5]])
    cols = np.concatenate([coo.col, coo.col[:5]])
    data = np.concatenate([coo.data, rng.standard_normal(5).astype(np.float32)])
    order = np.argsort(rows, kind="stable")
    indptr = np.zeros(coo.shape[0] + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=coo.shape[0]), out=indptr[1:])
    M = sp.csr_matrix((data[order], cols[order].astype(np.int32), indptr), shape=coo.shape)
    assert not M.has_canonical_format
    return M


KINDS = {
    "csr_matrix": lambda rng: _canonical(rng),
    "csr_array": lambda rng: sp.csr_array(_canonical(rng)),
    "int64_indices": lambda rng: _with_index_dtype(_canonical(rng), np.int64),
    "float64_data": lambda rng: _canonical(rng).astype(np.float64),
    "int_data": lambda rng: _int_data(_canonical(rng), rng),
    "explicit_zeros": lambda rng: _explicit_zeros(_canonical(rng)),
    "unsorted": _unsorted,
    "unsorted_int64": lambda rng: _with_index_dtype(_unsorted(rng), np.int64),
    "duplicates": _with_duplicates,
    "csc": lambda rng: _canonical(rng).tocsc(),
    "csc64": lambda rng: _with_index_dtype(_canonical(rng).tocsc(), np.int64).astype(np.float64),
    "coo": lambda rng: _canonical(rng).tocoo(),
    "bsr": lambda rng: _canonical(rng).tobsr(),
}


def _with_index_dtype(M, dt):
    M.indptr, M.indices = M.indptr.astype(dt), M.indices.astype(dt)
    return M


def _int_data(M, rng):
    M.data = rng.integers(-5, 6, M.nnz).astype(np.int16)
    return M


def _explicit_zeros(M):
    M.data[::3] = 0.0
    return M


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_scipy_kind_gives_the_prepared_csr_result(kind, rng):
    M = KINDS[kind](rng)
    X, dY = _operands(M.shape, 6, rng)
    want = _fresh(M, X, dY)
    for _ in range(3):  # the first call fills the cache, the next ones use it
        _assert_same(_results(M, X, dY), want)
    # the values change every step: re-read on every call
    M.data[:] = M.data * 2 - 1
    _assert_same(_results(M, X, dY), _fresh(M, X, dY))


def test_the_fast_path_is_taken_for_canonical_and_unsorted_csr(rng, monkeypatch):
    conversions = []
    real = CSR.from_scipy.__func__

    def counted(cls, M, *, name="W"):
        conversions.append(1)
        return real(cls, M, name=name)

    starts = ("csr_matrix", "csr_array", "int64_indices", "unsorted", "unsorted_int64", "csc",
              "csc64", "coo")  # fmt: skip
    for M in (KINDS[k](rng) for k in starts):
        X, _ = _operands(M.shape, 4, rng)
        want = kernels.spmm(CSR.from_scipy(M), X)
        kernels.spmm(M, X)
        e = F._prepared[id(M)]
        assert e.pattern is not None  # compared, not converted, from now on
        for attr, saved in e.pattern:
            np.testing.assert_array_equal(saved, getattr(M, attr))
            assert not saved.flags.writeable and not np.shares_memory(saved, getattr(M, attr))
        with monkeypatch.context() as mp:
            mp.setattr(CSR, "from_scipy", classmethod(counted))
            np.testing.assert_array_equal(kernels.spmm(M, X), want)
            np.testing.assert_array_equal(kernels.spmm(M, X), want)
        assert not conversions


# ---------------------------------------------------------------------------- mutations
def _mutate_data(M, rng):
    M.data[: M.nnz // 2] = rng.standard_normal(M.nnz // 2)


def _mutate_indices_valid(M, rng):
    """Another valid canonical pattern: a column moved within its row."""
    for i in range(M.shape[0]):
        a, b = M.indptr[i], M.indptr[i + 1]
        cols = set(M.indices[a:b].tolist())
        free = [c for c in range(M.shape[1]) if c not in cols]
        if b > a and free:
            M.indices[a:b] = np.sort(np.r_[M.indices[a + 1 : b], free[0]])
            return
    raise AssertionError("no row to change")


def _mutate_indices_unsorted(M, rng):
    i = int(np.argmax(np.diff(M.indptr)))
    a = M.indptr[i]
    M.indices[a], M.indices[a + 1] = M.indices[a + 1], M.indices[a]


def _mutate_indices_duplicate(M, rng):
    i = int(np.argmax(np.diff(M.indptr)))
    a = M.indptr[i]
    M.indices[a + 1] = M.indices[a]


def _mutate_indptr_valid(M, rng):
    """The last entry of a row moved to the start of the next (the same indices array)."""
    i = int(np.flatnonzero(np.diff(M.indptr) > 0)[0])
    M.indptr[i + 1] -= 1


def _replace_arrays(M, rng):
    M.indices = M.indices.copy()
    M.indptr = M.indptr.copy()
    M.data = M.data.astype(np.float64) * 3


def _replace_pattern(M, rng):
    W = CSR.random(M.shape, 0.3, seed=int(rng.integers(2**31)))
    M.indptr, M.indices, M.data = W.indptr.copy(), W.indices.copy(), W.data.copy()


VALID = {
    "data": _mutate_data,
    "indices_valid": _mutate_indices_valid,
    "indices_unsorted": _mutate_indices_unsorted,
    "indices_duplicate": _mutate_indices_duplicate,
    "indptr_valid": _mutate_indptr_valid,
    "arrays_replaced": _replace_arrays,
    "pattern_replaced": _replace_pattern,
}


@pytest.mark.parametrize("start", ["csr_matrix", "csr_array", "unsorted", "int64_indices"])
@pytest.mark.parametrize("mutation", sorted(VALID))
def test_a_mutated_matrix_is_revalidated(start, mutation, rng):
    M = KINDS[start](rng)
    X, dY = _operands(M.shape, 5, rng)
    _results(M, X, dY)  # cached now
    VALID[mutation](M, rng)
    _assert_same(_results(M, X, dY), _fresh(M, X, dY))
    _assert_same(_results(M, X, dY), _fresh(M, X, dY))  # and cached again


def _bad_column(M):
    M.indices[M.nnz // 2] = M.shape[1] + 10**6  # far outside X: a kernel would read wild memory


def _negative_column(M):
    M.indices[0] = -1


def _bad_indptr(M):
    M.indptr[1], M.indptr[2] = M.indptr[2] + 1, M.indptr[1]


def _indptr_past_nnz(M):
    M.indptr[-1] += 1


def _nan_value(M):
    M.data[3] = np.nan


def _float32_overflow(M):
    M.data = M.data.astype(np.float64)
    M.data[2] = 1e300


def _short_data(M):
    M.data = M.data[:-1].copy()


def _shape_changed(M):
    M._shape = (M.shape[0], 3)  # what scipy's own resize-like internals may leave


BAD = {
    "column_out_of_range": (_bad_column, r"W.indices must lie in \[0, n_cols"),
    "negative_column": (_negative_column, r"W.indices must lie in \[0, n_cols"),
    "indptr_not_monotone": (_bad_indptr, r"W.indptr must be nondecreasing"),
    "indptr_past_nnz": (_indptr_past_nnz, r"W.indptr\[-1\]"),
    "nan_value": (_nan_value, r"W.data must be finite"),
    "float32_overflow": (_float32_overflow, r"W.data must be finite in float32"),
    "short_data": (_short_data, r"W.data has length"),
    "shape_changed": (_shape_changed, r"W.indices must lie in \[0, n_cols = 3\)"),
}


@pytest.mark.parametrize("start", ["csr_matrix", "unsorted", "int64_indices"])
@pytest.mark.parametrize("bad", sorted(BAD))
def test_a_matrix_made_invalid_is_refused_with_the_usual_error(start, bad, rng):
    M = KINDS[start](rng)
    X, dY = _operands(M.shape, 5, rng)
    _results(M, X, dY)
    mutate, message = BAD[bad]
    mutate(M)
    with pytest.raises(ValueError, match=message):
        CSR.from_scipy(M)  # the usual error ...
    for call in (
        lambda: kernels.spmm(M, X),
        lambda: kernels.spmm_t(M, dY),
        lambda: kernels.sddmm(M, dY, X),
    ):
        with pytest.raises(ValueError, match=message):  # ... on every call, not once
            call()


def _csc_moved(M, rng):
    j = int(np.flatnonzero(np.diff(M.indptr))[0])
    a, b = M.indptr[j], M.indptr[j + 1]
    free = sorted(set(range(M.shape[0])) - set(M.indices[a:b].tolist()))
    M.indices[a] = free[0]  # another row in this column (unsorted now, perhaps)


def _coo_moved(M, rng):
    taken = set(zip(M.row.tolist(), M.col.tolist(), strict=True))
    free = next((i, j) for i in range(M.shape[0]) for j in range(M.shape[1]) if (i, j) not in taken)
    M.row[0], M.col[0] = free


def _coo_duplicate(M, rng):
    M.row[1], M.col[1] = M.row[0], M.col[0]


OTHER_FORMATS = {
    "csc/data": ("csc", _mutate_data, None),
    "csc/moved": ("csc", _csc_moved, None),
    "csc/replaced": ("csc", _replace_arrays, None),
    "csc/out_of_range": ("csc", lambda M, rng: M.indices.__setitem__(0, M.shape[0]), "must lie in"),
    "csc/indptr": ("csc", lambda M, rng: _bad_indptr(M), "must be nondecreasing"),
    "coo/data": ("coo", _mutate_data, None),
    "coo/moved": ("coo", _coo_moved, None),
    "coo/duplicate": ("coo", _coo_duplicate, None),
    "coo/out_of_range": ("coo", lambda M, rng: M.col.__setitem__(0, -3), "must lie in"),
    "coo/replaced": ("coo", lambda M, rng: setattr(M, "coords", (M.row[::-1].copy(),
                                                                 M.col[::-1].copy())), None),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(OTHER_FORMATS))
def test_csc_and_coo_mutations_are_seen(case, rng):
    kind, mutate, error = OTHER_FORMATS[case]
    M = KINDS[kind](rng)
    X, dY = _operands(M.shape, 5, rng)
    _results(M, X, dY)
    assert F._prepared[id(M)].pattern is not None  # on the fast path before the change
    mutate(M, rng)
    if error is None:
        _assert_same(_results(M, X, dY), _fresh(M, X, dY))
        _assert_same(_results(M, X, dY), _fresh(M, X, dY))
    else:
        for call in (lambda: kernels.spmm(M, X), lambda: kernels.spmm_t(M, dY)):
            with pytest.raises(ValueError, match=error):
                call()


def test_a_matrix_whose_class_changed_is_read_as_its_new_format(rng):
    M = _canonical(rng, 20, 20)
    X, dY = _operands(M.shape, 3, rng)
    _results(M, X, dY)
    M.__class__ = sp.csc_matrix  # the same arrays, now a CSC matrix: the transpose's pattern
    _assert_same(_results(M, X, dY), _fresh(M, X, dY))


def test_a_valid_pattern_restored_is_served_again(rng):
    M = _canonical(rng)
    X, _ = _operands(M.shape, 4, rng)
    want = kernels.spmm(M, X)
    old = M.indices[4]
    M.indices[4] = M.shape[1]
    with pytest.raises(ValueError, match="W.indices must lie"):
        kernels.spmm(M, X)
    M.indices[4] = old
    np.testing.assert_array_equal(kernels.spmm(M, X), want)


def test_the_kernels_never_read_the_callers_index_arrays(rng, monkeypatch):
    """Whatever the caller's arrays become after a call, the next call's kernel reads the
    cached (private, read-only) arrays, or the full path's validated ones."""
    M = _canonical(rng)
    X, dY = _operands(M.shape, 4, rng)
    kernels.spmm(M, X)
    seen = []
    real = B.Backend.sparse

    def spy(self, W, name="W"):
        out = real(self, W, name)
        seen.append(out)
        return out

    monkeypatch.setattr(B.Backend, "sparse", spy)
    kernels.spmm(M, X)
    kernels.spmm_t(M, dY)
    for W in seen:
        assert not W.indices.flags.writeable and not W.indptr.flags.writeable
        for a in (M.indices, M.indptr):
            assert not np.shares_memory(W.indices, a) and not np.shares_memory(W.indptr, a)


def test_out_may_not_overlap_the_callers_arrays_on_the_cached_path(rng):
    M = _canonical(rng)
    X, dY = _operands(M.shape, 4, rng)
    kernels.sddmm(M, dY, X)  # cached
    with pytest.raises(ValueError, match="out overlaps an input array"):
        kernels.sddmm(M, dY, X, out=M.data)


# ---------------------------------------------------------------------------- the cache itself
def _count(monkeypatch, name):
    calls = []
    real = getattr(F, name)

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(F, name, counted)
    return calls


@pytest.mark.parametrize("kind", ["csr_matrix", "csr_array", "unsorted", "int64_indices", "bsr",
                                  "duplicates", "csc", "coo"])  # fmt: skip
def test_the_transpose_structure_is_built_once_per_pattern(kind, rng, monkeypatch):
    builds = _count(monkeypatch, "transpose")
    blocks = _count(monkeypatch, "row_blocks")
    M = KINDS[kind](rng)
    X, dY = _operands(M.shape, 4, rng)
    for _ in range(4):
        kernels.spmm_t(M, dY)
        kernels.spmm(M, X)
        kernels.sddmm(M, dY, X)
    assert len(builds) == 1
    assert len(blocks) == 2  # row blocks and column blocks
    M.data[:] = M.data + 1  # values only: nothing to rebuild
    kernels.spmm_t(M, dY)
    assert len(builds) == 1
    if M.format == "csr":  # a new pattern: built again, once
        _mutate_indices_valid(M, rng)
        want = kernels.spmm_t(CSR.from_scipy(M), dY)  # (this CSR builds its own: 2)
        for _ in range(3):
            np.testing.assert_array_equal(kernels.spmm_t(M, dY), want)
        assert len(builds) == 3


def test_the_cache_is_bounded_and_keeps_no_matrix_alive(rng, monkeypatch):
    monkeypatch.setattr(F, "SCIPY_CACHE_SIZE", 4)
    X = rng.standard_normal((31, 3)).astype(np.float32)
    live = [_canonical(rng) for _ in range(7)]
    for M in live:
        kernels.spmm(M, X)
        assert len(F._prepared) <= 4
    assert set(F._prepared) == {id(M) for M in live[-4:]}  # the most recently used
    refs = [weakref.ref(M) for M in live]
    del live, M
    gc.collect()
    assert all(r() is None for r in refs)  # the cache held no matrix
    assert not F._prepared  # and its entries went with them
    monkeypatch.setattr(F, "SCIPY_CACHE_SIZE", 0)
    M = _canonical(rng)
    kernels.spmm(M, X)
    assert not F._prepared  # size 0: no cache


def test_a_reused_id_is_not_mistaken_for_the_old_matrix(rng):
    """Entries are checked against a weak reference, so a new object at a freed id is new."""
    X = rng.standard_normal((31, 3)).astype(np.float32)
    M = _canonical(rng)
    kernels.spmm(M, X)
    e = F._prepared[id(M)]
    other = _canonical(rng)
    with F._prepared_lock:  # simulate the id of a dead matrix taken by another one
        F._prepared[id(other)] = e
    np.testing.assert_array_equal(kernels.spmm(other, X), kernels.spmm(CSR.from_scipy(other), X))


def test_concurrent_calls_on_one_matrix_agree(rng):
    M = sp.csr_matrix(CSR.random((200, 300), 0.05, seed=1).to_scipy())
    X = rng.standard_normal((300, 16)).astype(np.float32)
    want = kernels.spmm(CSR.from_scipy(M), X)
    errors = []

    def work():
        try:
            for _ in range(20):
                np.testing.assert_array_equal(kernels.spmm(M, X), want)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ---------------------------------------------------------------------------- batch-major
@pytest.mark.parametrize(
    "shape",
    [
        (1, 1),
        (3, 5),
        (8, 8),
        (4, 8),
        (9, 17),
        (16, 24),
        (37, 53),
        (128, 300),
        (300, 128),
        (131, 4097),
        (4099, 7),
        (64, 8192),
    ],  # fmt: skip
)
def test_the_parallel_transpose(shape, rng, monkeypatch):
    monkeypatch.setattr(layout, "PARALLEL_MIN", 0)  # the Numba kernel even on small arrays
    a = rng.standard_normal(shape).astype(np.float32)
    t = layout.transpose(a)
    assert t.flags.c_contiguous and t.shape == shape[::-1]
    np.testing.assert_array_equal(t, a.T)
    out = np.full(shape[::-1], np.nan, np.float32)
    assert layout.transpose(a, out) is out
    np.testing.assert_array_equal(out, a.T)
    inner = np.vstack([np.zeros((3, shape[1]), np.float32), a])[3:]  # a view at an offset
    np.testing.assert_array_equal(layout.transpose(inner), a.T)


def test_batch_major_results_are_the_feature_major_ones(rng, monkeypatch):
    copies = []
    real = B.transpose
    counted = lambda a, out=None: copies.append(a.shape) or real(a, out)  # noqa: E731
    monkeypatch.setattr(B, "transpose", counted)
    monkeypatch.setattr(cpu_sddmm, "transpose", counted)
    monkeypatch.setattr(layout, "PARALLEL_MIN", 0)
    W = CSR.random((70, 90), 0.1, seed=3)
    X, dY = _operands(W.shape, 12, rng)
    Xb, dYb = np.ascontiguousarray(X.T), np.ascontiguousarray(dY.T)
    W64 = W.to_scipy().astype(np.float64)
    # spmm and spmm_t read and write batch-major arrays where they are (the panel kernel: its
    # sums run in another order than the feature-major kernel's, hence a float64 reference)
    np.testing.assert_allclose(
        kernels.spmm(W, Xb, layout="batch"), (W64 @ X).T, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        kernels.spmm_t(W, dYb, layout="batch"), (W64.T @ dY).T, rtol=1e-5, atol=1e-5
    )
    assert copies == []
    np.testing.assert_array_equal(
        kernels.sddmm(W, dYb, Xb, layout="batch"), kernels.sddmm(W, dY, X)
    )
    assert copies == [(12, 90)]  # sddmm reads dY where it is and copies X
    out = np.full((12, 70), np.nan, np.float32)
    assert kernels.spmm(W, Xb, out=out, layout="batch") is out
    np.testing.assert_allclose(out, (W64 @ X).T, rtol=1e-5, atol=1e-5)
    # a transposed view of a feature-major array is used as it is: no copy of it
    copies.clear()
    np.testing.assert_array_equal(kernels.spmm(W, X.T, layout="batch"), kernels.spmm(W, X).T)
    np.testing.assert_array_equal(
        kernels.sddmm(W, dY.T, X.T, layout="batch"), kernels.sddmm(W, dY, X)
    )
    assert copies == [(70, 12)]  # only spmm's result


def test_batch_major_checks_are_unchanged(rng):
    W = CSR.random((7, 9), 0.3, seed=0)
    with pytest.raises(ValueError, match=r"X has shape \(4, 8\), expected \(batch, 9\)"):
        kernels.spmm(W, np.zeros((4, 8), np.float32), layout="batch")
    with pytest.raises(ValueError, match=r"X has shape \(8, 4\), expected \(batch, 9\)"):
        kernels.spmm(W, np.zeros((4, 8), np.float32).T, layout="batch")
    with pytest.raises(ValueError, match="must be 2-D"):
        kernels.spmm(W, np.zeros(9, np.float32), layout="batch")
    with pytest.raises(ValueError, match="must be finite"):
        kernels.topk_grow(W, np.full((2, 7), np.nan).T.T, np.zeros((2, 9)), 1, layout="batch")
    X64 = rng.standard_normal((9, 3)).T  # float64, a transposed view: converted, one copy
    np.testing.assert_allclose(
        kernels.spmm(W, X64, layout="batch"), kernels.spmm(W, X64.T.astype(np.float32)).T
    )


def test_batch_major_scratch_never_leaves_the_call(rng):
    """The feature-major copies and result are per-thread scratch reused across calls; the
    answers are new arrays (or out=), never that scratch."""
    W = CSR.random((70, 90), 0.1, seed=4)
    X1, dY1 = _operands(W.shape, 12, rng)
    X2, dY2 = _operands(W.shape, 12, rng)
    Y1 = kernels.spmm(W, np.ascontiguousarray(X1.T), layout="batch")
    keep = Y1.copy()
    G1 = kernels.sddmm(W, np.ascontiguousarray(dY1.T), np.ascontiguousarray(X1.T), layout="batch")
    Y2 = kernels.spmm(W, np.ascontiguousarray(X2.T), layout="batch")
    kernels.spmm_t(W, np.ascontiguousarray(dY2.T), layout="batch")
    np.testing.assert_array_equal(Y1, keep)  # not overwritten by the later calls
    np.testing.assert_allclose(Y2, kernels.spmm(W, X2).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(G1, kernels.sddmm(W, dY1, X1))
    for a in B._scratch.arrays.values():
        for answer in (Y1, Y2, G1):
            assert not np.shares_memory(a, answer)


def test_batch_major_scratch_is_per_thread_and_bounded(rng, monkeypatch):
    W = CSR.random((200, 300), 0.05, seed=2)
    inputs = [rng.standard_normal((16 + t, 300)).astype(np.float32) for t in range(4)]
    W64 = W.to_scipy().astype(np.float64)
    wants = [(W64 @ x.T.astype(np.float64)).T for x in inputs]
    dY = [rng.standard_normal((16 + t, 200)).astype(np.float32) for t in range(4)]
    grads = [kernels.sddmm(W, np.ascontiguousarray(d.T), np.ascontiguousarray(x.T))
             for d, x in zip(dY, inputs, strict=True)]  # fmt: skip
    errors = []

    def work(t):  # the panel kernel's slots (spmm) and the copies' scratch (sddmm), per thread
        try:
            for _ in range(20):
                got = kernels.spmm(W, inputs[t], layout="batch")
                np.testing.assert_allclose(got, wants[t], rtol=1e-5, atol=1e-5)
                got = kernels.sddmm(W, dY[t], inputs[t], layout="batch")
                np.testing.assert_array_equal(got, grads[t])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    monkeypatch.setattr(B, "SCRATCH_MAX_BYTES", 3 * 4 * 300 * 16)
    for b in range(16, 24):  # eight shapes, room for three arrays of the smallest
        kernels.sddmm(W, np.zeros((b, 200), np.float32), np.zeros((b, 300), np.float32),
                      layout="batch")  # fmt: skip
        assert sum(a.nbytes for a in B._scratch.arrays.values()) <= B.SCRATCH_MAX_BYTES


@pytest.mark.parametrize("shape, batch", [((6, 5), 1), ((1, 5), 3), ((1, 7), 1), ((300, 200), 1)])
def test_batch_layout_results_are_new_arrays(shape, batch, rng):
    """A batch-major answer is never a view of the call's scratch: the next call must not
    change it (B = 1 or one row made the transposed scratch contiguous already)."""
    import kernels
    from kernels import CSR

    W = CSR.random(shape, 0.5, seed=int(rng.integers(1 << 30)))
    m, n = shape
    x1 = rng.standard_normal((batch, n)).astype(np.float32)
    x2 = rng.standard_normal((batch, n)).astype(np.float32)
    dy1 = rng.standard_normal((batch, m)).astype(np.float32)
    dy2 = rng.standard_normal((batch, m)).astype(np.float32)
    y1 = kernels.spmm(W, x1, layout="batch")
    keep = y1.copy()
    y2 = kernels.spmm(W, x2, layout="batch")
    assert not np.shares_memory(y1, y2)
    np.testing.assert_array_equal(y1, keep)
    d1 = kernels.spmm_t(W, dy1, layout="batch")
    keep = d1.copy()
    kernels.spmm_t(W, dy2, layout="batch")
    np.testing.assert_array_equal(d1, keep)
