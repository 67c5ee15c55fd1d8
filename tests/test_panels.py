"""The batch-panel product (kernels/cpu/panels.py) against a float64 reference: every compiled
panel width, partial panels, odd shapes, int32 and int64 indices; and the public batch-major
path that uses it, which copies nothing."""

import numpy as np
import pytest
import scipy.sparse as sp

import kernels
from kernels import CSR, config
from kernels import backend as B
from kernels.cpu import panels as P


def _pattern(m, k, density, rng, dtype):
    W = sp.random(m, k, density=density, format="csr", dtype=np.float32, random_state=rng)
    W.data[:] = rng.standard_normal(W.nnz).astype(np.float32)
    return W.indptr.astype(dtype), W.indices.astype(dtype), W.data, W


def _reference(W, X):
    return W.astype(np.float64) @ X.astype(np.float64)


@pytest.mark.parametrize("pw", P.WIDTHS)
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_panels_against_float64_on_random_shapes(pw, dtype, rng):
    for trial in range(36):
        m, k = (int(v) for v in rng.integers(1, 75, 2))
        batch = int(rng.choice([1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 40]))
        density = float(rng.choice([0.0, 0.04, 0.3, 1.0]))
        indptr, indices, data, W = _pattern(m, k, density, rng, dtype)
        X = rng.standard_normal((k, batch)).astype(np.float32)
        out = np.full((batch, m), np.nan, np.float32)
        got = P.spmm_panels(indptr, indices, data, np.ascontiguousarray(X.T), out, pw=pw)
        assert got is out
        np.testing.assert_allclose(
            out.T, _reference(W, X), rtol=1e-5, atol=1e-5,
            err_msg=f"trial {trial}: {(m, k, batch, density)}",
        )  # fmt: skip


def test_panels_every_row_length_and_block_split(rng, monkeypatch):
    """Rows of 0..40 nonzeros (every remainder of the accumulator groups), many row blocks
    (a panel split over tasks at odd row boundaries), k and m off the 8- and 16-row steps."""
    m, k = 41, 53
    rows = [np.sort(rng.choice(k, size=n, replace=False)) for n in range(m)]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    indices = np.concatenate(rows).astype(np.int64)
    data = rng.standard_normal(indices.shape[0]).astype(np.float32)
    W = sp.csr_matrix((data, indices, indptr), shape=(m, k))
    monkeypatch.setattr(config, "BLOCKS_PER_THREAD", 13)
    for batch in (16, 24, 64):
        X = rng.standard_normal((batch, k)).astype(np.float32)
        for pw in P.WIDTHS:
            out = np.full((batch, m), np.nan, np.float32)
            P.spmm_panels(indptr, indices, data, X, out, pw=pw)
            np.testing.assert_allclose(out.T, _reference(W, X.T), rtol=1e-5, atol=1e-5)


def test_panels_empty_and_degenerate():
    indptr = np.zeros(6, np.int32)
    indices = np.zeros(0, np.int32)
    data = np.zeros(0, np.float32)
    out = np.full((9, 5), np.nan, np.float32)  # no nonzeros: zeros, not the poison
    P.spmm_panels(indptr, indices, data, np.ones((9, 4), np.float32), out)
    np.testing.assert_array_equal(out, 0)
    out = np.full((0, 5), np.nan, np.float32)  # an empty batch: nothing to do
    P.spmm_panels(indptr, indices, data, np.ones((0, 4), np.float32), out)
    with pytest.raises(ValueError, match="panel width must be one of"):
        P.spmm_panels(indptr, indices, data, np.ones((9, 4), np.float32),
                      np.empty((9, 5), np.float32), pw=12)  # fmt: skip


def test_panel_width_from_the_machine(monkeypatch):
    from kernels import machine

    for line, want in ((32, 8), (64, 16), (128, 32), (256, 32)):
        fake = machine.CacheSizes(l1d=32 << 10, l2=1 << 20, l3=0, line=line)
        monkeypatch.setattr(P, "cache_sizes", lambda fake=fake: fake)
        assert P.panel_width(128) == want  # one line of floats, within the compiled widths
        assert P.panel_width(8) == 8 and P.panel_width(3) == 8  # a batch of at most 8
    monkeypatch.setattr(config, "PANEL_WIDTH", 32)
    assert P.panel_width(128) == 32


def test_coarser_blocks_cover_the_rows():
    fine = np.array([0, 3, 3, 9, 20, 21, 40, 41, 50], np.int64)
    for n in range(1, 12):
        b = P._coarser(fine, n)
        assert b[0] == 0 and b[-1] == 50 and np.all(np.diff(b) >= 0)
        assert set(b.tolist()) <= set(fine.tolist())
        assert b.shape[0] - 1 == min(n, 8)


def test_scratch_is_on_huge_page_aligned_memory_and_bounded(monkeypatch):
    a, nbytes = P._huge_pages((3, 100, 16))
    assert a.shape == (3, 100, 16) and a.dtype == np.float32 and a.flags.c_contiguous
    assert a.ctypes.data % P.HUGE_PAGE == 0 and nbytes >= a.nbytes + P.HUGE_PAGE
    P._scratch.slots = {}
    monkeypatch.setattr(P, "SCRATCH_MAX_BYTES", 3 * nbytes)  # room for three small shapes
    for k in range(1, 40):  # many shapes: what is held (padding included) stays bounded
        P.slots(("panel", k, 16), (k + 16, 16))
        assert sum(b for _, b in P._scratch.slots.values()) <= 3 * nbytes
    assert list(P._scratch.slots) == [("panel", k, 16) for k in (37, 38, 39)]  # the newest
    monkeypatch.setattr(P, "SCRATCH_MAX_BYTES", 1)
    P.slots(("panel", 5, 16), (21, 16))
    assert list(P._scratch.slots) == [("panel", 5, 16)]  # always the one in use


def test_the_launcher_refuses_strided_arrays():
    indptr, indices, data = np.zeros(3, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32)
    big = np.zeros((4, 32), np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        P.spmm_panels(indptr, indices, data, big[:, :16], np.zeros((4, 2), np.float32), pw=16)


# ----------------------------------------------------------------------- the public path
@pytest.mark.parametrize("batch", [8, 9, 16, 17, 40, 128])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_public_batch_major_products_copy_nothing(batch, dtype, rng, monkeypatch):
    copies = []
    real = B.transpose
    monkeypatch.setattr(B, "transpose", lambda a, out=None: copies.append(a.shape) or real(a, out))
    indptr, indices, data, W64 = _pattern(67, 45, 0.2, rng, dtype)
    W = CSR(indptr, indices, data, (67, 45))
    Xb = rng.standard_normal((batch, 45)).astype(np.float32)
    dYb = rng.standard_normal((batch, 67)).astype(np.float32)
    out = np.full((batch, 67), np.nan, np.float32)
    assert kernels.spmm(W, Xb, out=out, layout="batch") is out
    np.testing.assert_allclose(out, _reference(W64, Xb.T).T, rtol=1e-5, atol=1e-5)
    dx = np.full((batch, 45), np.nan, np.float32)
    assert kernels.spmm_t(W, dYb, out=dx, layout="batch") is dx
    np.testing.assert_allclose(dx, _reference(W64.T.tocsr(), dYb.T).T, rtol=1e-5, atol=1e-5)
    wide = np.repeat(Xb.astype(np.float64), 2, axis=1)  # float64, every other column: strided
    assert not wide[:, ::2].flags.c_contiguous
    np.testing.assert_allclose(  # new arrays, and the strided input converted once
        kernels.spmm(W, wide[:, ::2], layout="batch"), _reference(W64, Xb.T).T, rtol=1e-5,
        atol=1e-5,
    )  # fmt: skip
    assert copies == []
    buf = np.zeros(batch * (45 + 67), np.float32)  # an out= sharing 5 floats with X
    x2 = buf[: batch * 45].reshape(batch, 45)
    out2 = buf[batch * 45 - 5 : batch * 45 - 5 + batch * 67].reshape(batch, 67)
    with pytest.raises(ValueError, match="out overlaps an input"):
        kernels.spmm(W, x2, out=out2, layout="batch")
    with pytest.raises(ValueError, match=r"out has shape \(.*\), expected"):
        kernels.spmm(W, Xb, out=np.empty((batch, 66), np.float32), layout="batch")


def test_public_batch_major_small_batches_use_the_small_kernel(rng, monkeypatch):
    """Below BATCH_NATIVE_MIN rows the copies are small: the transposed path, same answers."""
    copies = []
    real = B.transpose
    monkeypatch.setattr(B, "transpose", lambda a, out=None: copies.append(a.shape) or real(a, out))
    W = CSR.random((30, 20), 0.3, seed=5)
    W64 = W.to_scipy().astype(np.float64)
    for batch in range(2, B.BATCH_NATIVE_MIN):
        Xb = rng.standard_normal((batch, 20)).astype(np.float32)
        np.testing.assert_allclose(
            kernels.spmm(W, Xb, layout="batch"), (W64 @ Xb.T).T, rtol=1e-5, atol=1e-5
        )
    assert len(copies) == 2 * (B.BATCH_NATIVE_MIN - 2)


@pytest.mark.parametrize("share", [None, 1e-9])  # the machine's slot, and 8-row slots
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_batch_major_sddmm_reads_dy_where_it_is(share, dtype, rng, monkeypatch):
    from kernels.cpu import sddmm as S

    if share is not None:
        monkeypatch.setattr(S, "DY_SLOT_L2_SHARE", share)
    copies = []
    real = S.transpose
    monkeypatch.setattr(S, "transpose", lambda a, out=None: copies.append(a.shape) or real(a, out))
    for m, k, batch in ((67, 45, 8), (67, 45, 9), (5, 3, 17), (130, 77, 40), (64, 64, 128)):
        indptr, indices, data, W64 = _pattern(m, k, 0.25, rng, dtype)
        W = CSR(indptr, indices, data, (m, k))
        dYb = rng.standard_normal((batch, m)).astype(np.float32)
        Xb = rng.standard_normal((batch, k)).astype(np.float32)
        out = np.full(W.nnz, np.nan, np.float32)
        assert kernels.sddmm(W, dYb, Xb, out=out, layout="batch") is out
        rows = np.repeat(np.arange(m), np.diff(indptr))
        want = (dYb.T.astype(np.float64)[rows] * Xb.T.astype(np.float64)[indices]).sum(axis=1)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
        # the same row loop as the feature-major kernel: the same bits
        feature = kernels.sddmm(W, np.ascontiguousarray(dYb.T), np.ascontiguousarray(Xb.T))
        np.testing.assert_array_equal(out, feature)
    assert copies == [(8, 45), (9, 45), (17, 3), (40, 77), (128, 64)]  # X only, never dY
    with pytest.raises(ValueError, match="disagree on the batch size: 8 vs 9"):
        kernels.sddmm(W, dYb[:8], np.zeros((9, 64), np.float32), layout="batch")


def test_batch_major_in_place_calls_are_refused(rng):
    """out= sharing memory with a batch-major operand: refused on every path (before the native
    kernels the copying path checked out only against its own copies, and let it through)."""
    W = CSR.random((45, 45), 0.2, seed=7)
    for batch in (5, 8, 40):  # the copying path (B < 8) and the native one
        X = rng.standard_normal((batch, 45)).astype(np.float32)
        with pytest.raises(ValueError, match="out overlaps an input"):
            kernels.spmm(W, X, out=X, layout="batch")
        with pytest.raises(ValueError, match="out overlaps an input"):
            kernels.spmm_t(W, X, out=X, layout="batch")
        buf = np.zeros(batch * 45 + W.nnz, np.float32)
        d2 = buf[: batch * 45].reshape(batch, 45)
        g = buf[batch * 45 - 3 : batch * 45 - 3 + W.nnz]  # sharing three floats with dY
        with pytest.raises(ValueError, match="out overlaps an input"):
            kernels.sddmm(W, d2, X, out=g, layout="batch")
        with pytest.raises(ValueError, match="out overlaps an input"):  # and with X, dY a view
            kernels.sddmm(W, np.zeros((45, batch), np.float32).T, d2, out=g, layout="batch")
