"""topk_grow: exact top-k of |dY·Xᵀ| over absent connections, tile by tile, on every backend."""

import numpy as np
import pytest

import kernels
from kernels import CSR
from kernels import reference as R
from kernels.cpu import grow as G
from tests import cases


def _int_operands(rng, m, n, batch, spread=2):
    """Small integers: every score is exact in float32, and ties are plentiful."""
    dY = rng.integers(-spread, spread + 1, size=(m, batch)).astype(np.float32)
    X = rng.integers(-spread, spread + 1, size=(n, batch)).astype(np.float32)
    return dY, X


def _n_absent(W, keep=None):
    return W.shape[0] * W.shape[1] - (W.nnz if keep is None else int(keep.sum()))


def _tiny_tiles(monkeypatch, nbytes=64):
    """Shrink the grow tile of both backends (16 floats: rows cut into column blocks)."""
    monkeypatch.setattr(kernels.config, "TOPK_TILE_BYTES", nbytes)
    monkeypatch.setattr(kernels.config, "CUDA_TOPK_TILE_BYTES", nbytes)


def _grow(backend, W, dY, X, k, keep=None, **kw):
    """topk_grow on a backend, results back as NumPy arrays."""
    if backend is None or not backend.device:
        return kernels.topk_grow(W, dY, X, k, keep=keep, **kw)
    a = backend.a
    out = kernels.topk_grow(backend.W(W), a(dY), a(X), k, keep=a(keep), **kw)
    return tuple(backend.np(r) for r in out)


def _assert_exact(W, dY, X, k, keep=None, backend=None, **kw):
    rows, cols, scores = _grow(backend, W, dY, X, k, keep=keep, **kw)
    rr, cc, ss = R.topk_grow(W.indptr, W.indices, W.shape, dY, X, k, keep)
    np.testing.assert_array_equal(rows, rr)
    np.testing.assert_array_equal(cols, cc)
    np.testing.assert_array_equal(scores, ss.astype(np.float32))
    assert rows.dtype == cols.dtype and scores.dtype == np.float32


@pytest.mark.parametrize("name", [n for n in cases.NAMES if not n.startswith("empty_0")])
@pytest.mark.parametrize("frac", [0.0, 0.01, 0.3, 1.0])
@pytest.mark.parametrize("tiles", ["default", "tiny"])
def test_exact_with_ties(name, frac, tiles, rng, monkeypatch, backend):
    if tiles == "tiny":  # 16 floats a tile: several rows cut into column blocks
        _tiny_tiles(monkeypatch)
    W = cases.make(name, rng)
    m, n = W.shape
    dY, X = _int_operands(rng, m, n, 5)
    k = int(frac * _n_absent(W))
    _assert_exact(W, dY, X, k, backend=backend)


@pytest.mark.parametrize("tile_bytes", [4, 64, 4 * 53, 4 * 53 * 3 + 8, 1 << 20])
@pytest.mark.parametrize("buffer_factor", [1.01, 1.5, 4.0])
def test_tiles_and_buffer_cuts(tile_bytes, buffer_factor, rng, monkeypatch, backend):
    """Every tiling and buffer size gives the reference answer (cuts happen with a small buffer)."""
    monkeypatch.setattr(kernels.config, "TOPK_BUFFER_FACTOR", buffer_factor)
    monkeypatch.setattr(kernels.config, "CUDA_TOPK_BUFFER_FACTOR", buffer_factor)
    W = cases.make("odd_37x53", rng)
    dY, X = _int_operands(rng, 37, 53, 4, spread=3)
    for k in (1, 7, 100, 600):
        _assert_exact(W, dY, X, k, tile_bytes=tile_bytes, backend=backend)


def test_estimated_threshold_path_and_its_fallback(monkeypatch):
    """Large enough for the sampled threshold; then a sample that lies, forcing the second pass.

    Fixed seed: whether the estimate holds is a matter of chance (that is why the fallback
    exists); this test is about which path runs, and that both are right.
    """
    rng = np.random.default_rng(20261124)
    W = kernels.CSR.random((512, 300), 0.05, seed=int(rng.integers(1 << 30)))
    dY = rng.standard_normal((512, 8)).astype(np.float32)
    X = rng.standard_normal((300, 8)).astype(np.float32)
    k = 2000
    calls = []
    real = G._stream
    monkeypatch.setattr(G, "_stream", lambda *a: calls.append(a[7]) or real(*a))
    monkeypatch.setattr(kernels.config, "TOPK_TILE_BYTES", 300 * 4 * 32)  # 32-row tiles
    r1, c1, s1 = kernels.topk_grow(W, dY, X, k)
    assert len(calls) == 1 and calls[0] > 0  # one pass, from an estimated threshold
    # the sampled rows (every 16th) get huge gradients: the estimate overshoots
    dY2 = dY.copy()
    dY2[::16] *= 100
    calls.clear()
    r2, c2, s2 = kernels.topk_grow(W, dY2, X, k)
    assert len(calls) == 2 and calls[1] < 0  # a second, exact pass
    for dy, (r, c, s) in ((dY, (r1, c1, s1)), (dY2, (r2, c2, s2))):
        _assert_valid_float_topk(W, dy, X, k, r, c, s)


@pytest.mark.parametrize("lying_sample", [False, True])
def test_estimated_path_is_exact_with_ties(lying_sample, rng, monkeypatch, backend):
    """Integer scores (exact, many ties) through the sampled-threshold pass and its fallback
    (on the GPU: 32-row tiles with many buffer cuts)."""
    _tiny_tiles(monkeypatch, 300 * 4 * 32)  # 32-row tiles
    W = kernels.CSR.random((512, 300), 0.05, seed=int(rng.integers(1 << 30)))
    dY, X = _int_operands(rng, 512, 300, 6, spread=3)
    if lying_sample:
        dY[::16] *= 8  # the sampled rows (every 16th) look far larger than the rest
    for k in (1500, 4000):
        _assert_exact(W, dY, X, k, backend=backend)


def _assert_valid_float_topk(W, dY, X, k, rows, cols, scores, keep=None):
    """With float inputs, float32 rounding may reorder near-ties: check the set is a top-k
    up to the rounding bound, and that the returned scores are right."""
    S = R.grow_scores(W.indptr, W.indices, W.shape, dY, X, keep)
    bound = cases.tol(np.abs(dY.astype(np.float64)) @ np.abs(X.astype(np.float64)).T)
    assert rows.shape == (k,)
    flat = rows.astype(np.int64) * W.shape[1] + cols
    assert np.all(np.diff(flat) > 0), "listed in ascending flat order, no repeats"
    chosen = np.zeros(S.shape, bool)
    chosen.flat[flat] = True
    assert np.all(np.isfinite(S[chosen])), "only absent connections are grown"
    np.testing.assert_allclose(scores, S[chosen], rtol=0, atol=float(bound.max()))
    if k and (~chosen & np.isfinite(S)).any():
        # every chosen score is at least every unchosen absent score, up to rounding
        assert (S + bound)[chosen].min() >= (S - bound)[~chosen & np.isfinite(S)].max()


@pytest.mark.parametrize(
    "shape,density,k,batch",
    [
        ((64, 64), 0.1, 50, 16),
        ((200, 130), 0.02, 1300, 32),
        ((1, 999), 0.3, 10, 3),
        ((999, 1), 0.3, 10, 3),
    ],
)
def test_float_inputs(shape, density, k, batch, rng, small_tiles, monkeypatch, backend):
    monkeypatch.setattr(kernels.config, "CUDA_TOPK_TILE_BYTES", small_tiles)
    W = kernels.CSR.random(shape, density, seed=int(rng.integers(1 << 30)))
    dY = rng.standard_normal((shape[0], batch)).astype(np.float32)
    X = rng.standard_normal((shape[1], batch)).astype(np.float32)
    _assert_valid_float_topk(W, dY, X, k, *_grow(backend, W, dY, X, k))


@pytest.mark.parametrize("tiles", ["default", "tiny"])
def test_keep_mask_makes_dropped_entries_growable(tiles, rng, monkeypatch, backend):
    if tiles == "tiny":
        _tiny_tiles(monkeypatch)
    W = cases.make("odd_37x53", rng)
    keep = rng.random(W.nnz) < 0.6
    dY, X = _int_operands(rng, 37, 53, 6)
    for k in (0, 5, 300, _n_absent(W, keep)):
        _assert_exact(W, dY, X, k, keep=keep, backend=backend)


def test_all_zero_gradient_grows_lowest_flat_indices(rng, backend):
    W = cases.make("empty_rows", rng)
    dY = np.zeros((5, 3), np.float32)
    X = np.zeros((5, 3), np.float32)
    rows, cols, scores = _grow(backend, W, dY, X, 4)
    # row 0 has columns 0 and 2 present: the first absent cells are (0,1), (0,3), (0,4), (1,0)
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 1), (0, 3), (0, 4), (1, 0)]
    assert np.all(scores == 0)


def test_batch_layout(rng, backend):
    W = cases.make("odd_37x53", rng)
    dY, X = _int_operands(rng, 37, 53, 5)
    a = _grow(backend, W, dY, X, 40)
    b = _grow(backend, W, np.ascontiguousarray(dY.T), np.ascontiguousarray(X.T), 40, layout="batch")
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)


def test_tile_memory_stays_bounded():
    # the launcher sizes its scratch from the budget, never from m·n
    assert G.tile_shape(100_000, 100_000, 1 << 20) == (2, 100_000)
    assert G.tile_shape(100_000, 100_000, 1 << 20, min_rows=128) == (128, 100_000)
    assert G.tile_shape(16384, 16384, 2 << 20, min_rows=128) == (128, 16384)
    assert G.tile_shape(1000, 16384, 2 << 20, min_rows=128) == (62, 16384)  # <= 1/16 of m·n
    assert G.tile_shape(10, 1_000_000, 1 << 20) == (1, 1 << 18)
    assert G.tile_shape(4096, 4096, 2 << 20) == (128, 4096)
    assert G.tile_shape(3, 5, 1 << 20) == (3, 5)


def test_subnormal_inputs_are_flushed_and_the_result_stays_right(rng):
    """Subnormal gradients make sgemm slow; the launcher zeroes them in a copy (never in place)."""
    W = cases.make("odd_37x53", rng)
    dY, X = _int_operands(rng, 37, 53, 5)
    dY[3, 1] = np.float32(1e-40)  # subnormal
    keep_dY = dY.copy()
    _assert_exact(W, dY, X, 60)  # the reference sees 1e-40·x: far below every integer score gap
    np.testing.assert_array_equal(dY, keep_dY)
    assert G.flush_subnormals(X) is X  # no subnormals: no copy
    assert G.flush_subnormals(dY)[3, 1] == 0


def test_empty_batch_is_the_lowest_absent_entries_on_every_backend(rng, backend):
    """Batch 0: every score is 0, so the grow is the k absent entries of lowest flat index,
    found without the m·n scan (backend.first_absent, one body over the array module), against
    the float64 reference; also with every entry dropped (an empty kept set) and k = all."""
    for _ in range(12):
        m, n = (int(v) for v in rng.integers(1, 10, 2))
        W = CSR.random((m, n), float(rng.random()), seed=int(rng.integers(1 << 30)))
        for keep in (None, rng.random(W.nnz) < 0.5, np.zeros(W.nnz, bool)):
            absent = m * n - (W.nnz if keep is None else int(keep.sum()))
            for k in sorted({0, 1 if absent else 0, absent // 2, absent}):
                dY, X = np.zeros((m, 0), np.float32), np.zeros((n, 0), np.float32)
                rows, cols, scores = _grow(backend, W, dY, X, k, keep=keep)
                rr, cc, _ = R.topk_grow(W.indptr, W.indices, W.shape, dY, X, k, keep)
                np.testing.assert_array_equal(rows, rr)
                np.testing.assert_array_equal(cols, cc)
                assert scores.dtype == np.float32 and not np.any(scores)
                assert rows.dtype == cols.dtype == np.int32
