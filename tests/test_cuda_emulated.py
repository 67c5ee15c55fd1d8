"""The CUDA launchers without a device: their host logic run on NumPy arrays, kernels emulated.

Every kernel of kernels/cuda/*.cu has a NumPy model here that reads the launch's arguments by
position, exactly as the C signature declares them (tests/test_cuda_build.py checks the
signatures against the PTX). With ``kernels.cuda._module.launch`` replaced by the model, the
launchers' real code runs: launch plans, argument lists, grid coverage, and all of the GPU
topk_grow's host algorithm (tiles, buffer overflow, radix-select cuts, tie handling). The
models write selected candidates in a shuffled order, as the atomics on a GPU may. The array-op
launchers (drop, merge, transpose) run on NumPy as they are and are compared with the CPU twins.
What this cannot check is the CUDA code itself: that needs a device (tests parametrised by
backend run it there).
"""

import types

import numpy as np
import pytest

import kernels
from kernels import reference as R
from kernels.cpu import drop as cpu_drop
from kernels.cpu import merge as cpu_merge
from kernels.cpu import structure as cpu_structure
from kernels.cuda import _module
from kernels.cuda import drop as cu_drop
from kernels.cuda import grow as cu_grow
from kernels.cuda import merge as cu_merge
from kernels.cuda import sddmm as cu_sddmm
from kernels.cuda import spmm as cu_spmm
from kernels.cuda import spmm_t as cu_spmm_t
from kernels.cuda import structure as cu_structure
from tests import cases


def _covers(grid, block, rows, cols=1):
    """The launch's threads cover rows × cols (x: cols/batch, y: rows), as the kernel maps them."""
    assert grid[1] * block[0] >= cols and grid[0] * block[1] >= rows


def _emu_spmm(plan, rng):
    indptr, indices, data, perm, has_perm, x, bias, has_bias, relu, gate, has_gate, out, m, B = (
        plan.args
    )
    vec = 4 if plan.kernel.startswith("sparsecore_spmm4_") else 1
    assert int(B) % vec == 0
    _covers(plan.grid, plan.block, int(m), int(B) // vec)
    for i in range(int(m)):
        s, e = int(indptr[i]), int(indptr[i + 1])
        vals = data[perm[s:e]] if has_perm else data[s:e]
        v = (bias[i] if has_bias else 0) + vals.astype(np.float64) @ x[indices[s:e]]
        if relu:
            v = np.where(v > 0, v, 0)
        if has_gate:
            v = np.where(gate[i] > 0, v, 0)
        out[i] = v


def _emu_sddmm(plan, rng):
    indptr, indices, dy, x, out, bias_grad, has_bias, m, B = plan.args
    assert plan.grid[0] == min(int(m), kernels.config.CUDA_SDDMM_MAX_BLOCKS)
    assert plan.block[0] % 32 == 0
    blocks = int(plan.grid[0])
    for i in sorted(range(int(m)), key=lambda i: i % blocks):  # block i % grid, grid-stride
        s, e = int(indptr[i]), int(indptr[i + 1])
        out[s:e] = x[indices[s:e]].astype(np.float64) @ dy[i]
        if has_bias:
            bias_grad[i] = dy[i].sum(dtype=np.float64)


def _emu_mask(plan, rng):
    indptr, indices, keep, has_keep, g, r0, tr, c0, tc = plan.args
    assert plan.grid[0] == tr
    flat = g.reshape(-1)
    assert np.shares_memory(flat, g)
    for r in range(int(tr)):
        for p in range(int(indptr[r0 + r]), int(indptr[r0 + r + 1])):
            col = int(indices[p]) - c0
            if 0 <= col < tc and (not has_keep or keep[p]):
                flat[r * tc + col] = np.nan


def _key(a):
    """grow.cu's score key: the bits of a float32 with the sign cleared, as int64."""
    return (np.asarray(a, np.float32).view(np.int32) & 0x7FFFFFFF).astype(np.int64)


def _union(args):
    g, n_tile, tc, n_cols, flat0, bs, bf, n_buf = args[:8]
    assert g.dtype == np.float32 and bs.dtype == np.int32  # keys in the buffer
    e = np.arange(int(n_tile), dtype=np.int64)
    k_t = _key(g.reshape(-1)[: int(n_tile)])
    f_t = flat0 + (e // tc) * n_cols + e % tc
    key = np.concatenate((k_t, bs[: int(n_buf)].astype(np.int64)))
    flat = np.concatenate((f_t, bf[: int(n_buf)].astype(np.int64))).astype(np.uint64)
    thr = args[8]
    assert isinstance(thr, np.int32)  # a key, compared as an integer
    counted = np.concatenate(((k_t > thr) & (k_t <= cu_grow.INF_KEY), np.ones(int(n_buf), bool)))
    return key, flat, counted


def _emu_hist(plan, rng):
    key, flat, counted = _union(plan.args)
    _, smask, sval, fmask, fval, key_is_flat, shift, bins = plan.args[8:]
    assert plan.block[0] % 32 == 0
    bits = key.astype(np.uint64)
    sel = counted & ((bits & np.uint64(smask)) == sval) & ((flat & fmask) == fval)
    digit = (flat[sel] >> np.uint64(shift)) if key_is_flat else (bits[sel] >> np.uint64(shift))
    np.add.at(bins, (digit & np.uint64(0xFFFF)).astype(np.int64), 1)


def _emu_select(plan, rng):
    key, flat, counted = _union(plan.args)
    _, use_tie, v, fstar, out_s, out_f, counter, out_cap = plan.args[8:]
    assert out_s.dtype == np.int32 and isinstance(v, np.int32)
    chosen = counted.copy()
    if use_tie:
        chosen &= (key > v) | ((key == v) & (flat <= fstar))
    idx = rng.permutation(np.flatnonzero(chosen))  # atomics: any order
    start = int(counter[0])
    slots = start + np.arange(idx.shape[0])
    ok = slots < out_cap
    out_s[slots[ok]] = key[idx[ok]]
    out_f[slots[ok]] = flat[idx[ok]].astype(out_f.dtype)
    counter[0] += idx.shape[0]


def _emu_elementwise(plan, rng):
    """The maths of elementwise.cu in float32, in the kernel's operation order."""
    f = np.float32
    name = plan.kernel
    assert plan.grid[0] * plan.block[0] >= 1
    if name == "sparsecore_relu":
        x, out, n = plan.args
        assert x.size == out.size == n
        out[...] = np.where(x > 0, x, f(0))
    elif name == "sparsecore_relu_backward":
        dy, y, out, n = plan.args
        assert dy.size == y.size == out.size == n
        out[...] = np.where(y > 0, dy, f(0))
    elif name == "sparsecore_sgd":
        p, g, n, lr, wd = plan.args
        p -= lr * (g + wd * p)
    elif name == "sparsecore_sgd_momentum":
        p, g, v, n, lr, mom, wd, nesterov = plan.args
        gj = g + wd * p
        v[...] = mom * v + gj
        p -= lr * (gj + mom * v if nesterov else v)
    elif name == "sparsecore_adam":
        p, g, m, v, n, b1, a1, b2, a2, lr_c1, c2, eps, wd, decoupled, lr_wd = plan.args
        gj = g if decoupled else g + wd * p
        m[...] = b1 * m + a1 * gj
        v[...] = b2 * v + a2 * (gj * gj)
        if decoupled:
            p -= lr_wd * p
        p -= lr_c1 * m / (np.sqrt(v / c2) + eps)
    else:
        raise AssertionError(name)
    for a in plan.args:  # in-place updates stay float32
        assert not isinstance(a, np.ndarray) or a.dtype in (np.float32, np.int64)


_MODELS = {
    "sparsecore_relu": _emu_elementwise,
    "sparsecore_relu_backward": _emu_elementwise,
    "sparsecore_sgd": _emu_elementwise,
    "sparsecore_sgd_momentum": _emu_elementwise,
    "sparsecore_adam": _emu_elementwise,
    "sparsecore_spmm": _emu_spmm,
    "sparsecore_spmm4": _emu_spmm,
    "sparsecore_sddmm": _emu_sddmm,
    "sparsecore_grow_mask": _emu_mask,
    "sparsecore_grow_hist": _emu_hist,
    "sparsecore_grow_select": _emu_select,
}


def install(monkeypatch, rng):
    """Replace the device launch by the NumPy models; returns the list of launches made (also
    used by tests/test_device_training.py to run the device training path without a GPU)."""
    launched = []

    def fake_launch(plan):
        assert plan.source in ("spmm.cu", "sddmm.cu", "grow.cu", "elementwise.cu")
        assert all(not isinstance(a, (int, float, bool)) for a in plan.args), (
            f"{plan.kernel}: pass NumPy scalars, not Python numbers (sizes must match the C types)"
        )
        assert np.prod(plan.block) <= 1024
        launched.append(plan)
        if plan.grid[0] == 0:
            return
        model = _MODELS.get(plan.kernel) or _MODELS[plan.kernel.rsplit("_", 1)[0]]
        model(plan, rng)

    monkeypatch.setattr(_module, "launch", fake_launch)
    return launched


@pytest.fixture
def emulated(monkeypatch, rng):
    """Replace the device launch by the NumPy models; returns the list of launches made."""
    return install(monkeypatch, rng)


@pytest.mark.parametrize("name", cases.NAMES)
@pytest.mark.parametrize("batch", [5, 8])
def test_products_through_the_launchers(name, batch, rng, emulated):
    W = cases.make(name, rng)
    m, n = W.shape
    X = rng.standard_normal((n, batch)).astype(np.float32)
    dY = rng.standard_normal((m, batch)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    Y = cu_spmm.spmm(W.indptr, W.indices, W.data, X, cases.poisoned((m, batch)), bias=b)
    np.testing.assert_allclose(
        Y, R.spmm(W.indptr, W.indices, W.data, W.shape, X) + b[:, None], rtol=1e-5, atol=1e-5
    )
    t = W.transpose_structure()
    dX = cu_spmm_t.spmm_t(*t, W.data, dY, cases.poisoned((n, batch)))
    np.testing.assert_allclose(
        dX, R.spmm_t(W.indptr, W.indices, W.data, W.shape, dY), rtol=1e-5, atol=1e-5
    )
    gb = cases.poisoned((m,))
    dW = cu_sddmm.sddmm(W.indptr, W.indices, dY, X, cases.poisoned((W.nnz,)), bias_grad=gb)
    np.testing.assert_allclose(
        dW, R.sddmm(W.indptr, W.indices, W.shape, dY, X), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(gb, dY.sum(axis=1), rtol=1e-5, atol=1e-5)
    # the fused ReLU and ReLU-backward gate, as the CPU twins (same arguments)
    from kernels.cpu import spmm as cpu_spmm
    from kernels.cpu import spmm_t as cpu_spmm_t

    gate = rng.standard_normal((n, batch)).astype(np.float32)
    for relu in (False, True):
        a = cu_spmm.spmm(
            W.indptr, W.indices, W.data, X, cases.poisoned((m, batch)), bias=b, relu=relu
        )
        c = cpu_spmm.spmm(
            W.indptr, W.indices, W.data, X, cases.poisoned((m, batch)), bias=b, relu=relu
        )
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
    a = cu_spmm_t.spmm_t(*t, W.data, dY, cases.poisoned((n, batch)), gate=gate)
    c = cpu_spmm_t.spmm_t(*t, W.data, dY, cases.poisoned((n, batch)), gate=gate)
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
    assert np.all(a[gate <= 0] == 0)


def test_elementwise_launchers_match_the_cpu_twins(rng, emulated):
    from kernels.cpu import elementwise as cpu_ew
    from kernels.cuda import elementwise as cu_ew

    x = rng.standard_normal((7, 5)).astype(np.float32)
    y = cpu_ew.relu(x, np.empty_like(x))
    np.testing.assert_array_equal(cu_ew.relu(x, cases.poisoned(x.shape)), y)
    dy = rng.standard_normal((7, 5)).astype(np.float32)
    want = cpu_ew.relu_backward(dy, y, np.empty_like(dy))
    np.testing.assert_array_equal(cu_ew.relu_backward(dy, y, dy.copy()), want)
    for nesterov in (False, True):
        p, g, v = (rng.standard_normal(33).astype(np.float32) for _ in range(3))
        p2, v2 = p.copy(), v.copy()
        cpu_ew.sgd_momentum(p, g, v, np.float32(0.1), np.float32(0.9), np.float32(1e-3), nesterov)
        cu_ew.sgd_momentum(p2, g, v2, 0.1, 0.9, 1e-3, nesterov)
        np.testing.assert_allclose(p2, p, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(v2, v, rtol=1e-6, atol=1e-7)
    assert {p.kernel for p in emulated} == {
        "sparsecore_relu",
        "sparsecore_relu_backward",
        "sparsecore_sgd_momentum",
    }
    assert cu_ew.grid(0)[0] == 0
    assert cu_ew.grid(10**12)[0] == kernels.config.CUDA_ELEMENTWISE_MAX_BLOCKS


def test_launch_shapes():
    assert cu_spmm.block_shape(1) == (32, 8)
    assert cu_spmm.block_shape(256) == (128, 2)
    assert cu_spmm.block_shape(40) == (64, 4)
    a16 = np.empty(64, np.float32)  # NumPy allocations are 16-byte aligned
    assert cu_spmm.vector_width(8, a16, a16) == 4
    assert cu_spmm.vector_width(6, a16, a16) == 1
    assert cu_spmm.vector_width(8, a16, a16[1:]) == 1  # misaligned view: the scalar kernel
    assert (
        cu_spmm.plan(
            *[np.zeros(1, np.int32)] * 2, a16, a16[:16].reshape(2, 8), a16[16:32].reshape(2, 8)
        ).kernel
        == "sparsecore_spmm4_i32"
    )
    for m, nnz, w in [(10, 0, 1), (10, 10, 1), (10, 25, 4), (100, 100_000, 8), (0, 0, 1)]:
        assert cu_sddmm.warps_per_row(m, nnz) == w
    assert cu_grow.grid_1d(0)[0] == 0
    assert cu_grow.grid_1d(1)[0] == 1
    assert cu_grow.grid_1d(10**12)[0] == kernels.config.CUDA_GROW_MAX_BLOCKS
    # spmm's grid.y (batch blocks) has the hardware limit of 65535
    big = np.empty((1, 65535 * 128 + 1), np.float32)
    with pytest.raises(ValueError, match="batch"):
        cu_spmm.plan(
            np.zeros(2, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32), big, big
        )


def test_radix_digit_helpers():
    counts = np.zeros(65536, np.uint64)
    counts[[3, 7, 65535]] = [5, 2, 1]
    assert cu_grow.digit_from_top(counts, 1) == (65535, 0)
    assert cu_grow.digit_from_top(counts, 2) == (7, 1)
    assert cu_grow.digit_from_top(counts, 3) == (7, 1)
    assert cu_grow.digit_from_top(counts, 4) == (3, 3)
    assert cu_grow.digit_from_bottom(counts, 5) == (3, 0)
    assert cu_grow.digit_from_bottom(counts, 6) == (7, 5)
    assert cu_grow.digit_from_bottom(counts, 8) == (65535, 7)
    assert cu_grow.flat_digits(1, 1) == 1
    assert cu_grow.flat_digits(256, 256) == 1
    assert cu_grow.flat_digits(256, 257) == 2
    assert cu_grow.flat_digits(1 << 20, 1 << 20) == 3


def _exact(W, dY, X, k, keep=None, **kw):
    rows, cols, scores = cu_grow.topk_grow(W.indptr, W.indices, keep, dY, X, k, **kw)
    rr, cc, ss = R.topk_grow(W.indptr, W.indices, W.shape, dY, X, k, keep)
    np.testing.assert_array_equal(rows, rr)
    np.testing.assert_array_equal(cols, cc)
    np.testing.assert_array_equal(scores, ss.astype(np.float32))


def _ints(rng, m, n, batch, spread=2):
    dY = rng.integers(-spread, spread + 1, size=(m, batch)).astype(np.float32)
    X = rng.integers(-spread, spread + 1, size=(n, batch)).astype(np.float32)
    return dY, X


@pytest.mark.parametrize("name", [n for n in cases.NAMES if not n.startswith("empty_0")])
@pytest.mark.parametrize("tile_bytes", [64, 4 * 53 * 3 + 8, 1 << 20])
@pytest.mark.parametrize("factor", [1.01, 1.5, 4.0])
def test_grow_host_algorithm_is_exact_with_ties(name, tile_bytes, factor, rng, emulated):
    W = cases.make(name, rng)
    m, n = W.shape
    dY, X = _ints(rng, m, n, 4)
    absent = m * n - W.nnz
    for k in sorted({0, min(1, absent), absent // 7, absent // 2, absent}):
        _exact(W, dY, X, k, tile_bytes=tile_bytes, buffer_factor=factor)


def test_grow_cuts_and_tie_selection_run(rng, emulated):
    """Heavy ties across tiles: the flat-index radix select (several digits) must decide."""
    W = kernels.CSR.random((300, 700), 0.05, seed=int(rng.integers(1 << 30)))
    dY, X = _ints(rng, 300, 700, 2, spread=1)  # scores in {0, 1, 2}: ties everywhere
    keep = rng.random(W.nnz) < 0.5
    for k in (1, 999, 30_000):
        emulated.clear()
        _exact(W, dY, X, k, keep=keep, tile_bytes=700 * 4 * 16, buffer_factor=1.2)
        hists = [p for p in emulated if "hist" in p.kernel]
        assert any(int(p.args[13]) == 1 for p in hists), "tie selection by flat index ran"
        assert any(int(p.args[14]) == 16 for p in hists if int(p.args[13]) == 1), "2 digits"


def test_grow_float_scores_and_all_zero(rng, emulated):
    W = cases.make("odd_37x53", rng)
    dY = rng.standard_normal((37, 8)).astype(np.float32)
    X = rng.standard_normal((53, 8)).astype(np.float32)
    rows, cols, scores = cu_grow.topk_grow(W.indptr, W.indices, None, dY, X, 100, tile_bytes=256)
    S = R.grow_scores(W.indptr, W.indices, W.shape, dY, X)
    assert np.all(np.isfinite(S[rows, cols]))
    np.testing.assert_allclose(scores, S[rows, cols], rtol=1e-5)
    flat = rows.astype(np.int64) * 53 + cols
    assert np.all(np.diff(flat) > 0) and rows.dtype == np.int32 and scores.dtype == np.float32
    Z = np.zeros_like
    _exact(W, Z(dY), Z(X), 50, tile_bytes=64)


def test_grow_memory_is_tile_plus_k(rng, emulated, monkeypatch):
    """The launcher allocates the tile, the buffer and cut scratch: never m·n."""
    sizes = []
    real_empty = np.empty

    def counting_empty(shape, dtype=float, *a, **kw):
        out = real_empty(shape, dtype, *a, **kw)
        sizes.append(out.nbytes)
        return out

    W = kernels.CSR.random((400, 500), 0.02, seed=int(rng.integers(1 << 30)))
    dY, X = _ints(rng, 400, 500, 3)
    monkeypatch.setattr(np, "empty", counting_empty)
    k = 100
    cu_grow.topk_grow(W.indptr, W.indices, None, dY, X, k, tile_bytes=500 * 4 * 8)
    monkeypatch.setattr(np, "empty", real_empty)
    tile = 500 * 4 * 8
    others = [b for b in sizes if b != 65536 * 8]  # the histogram: a constant 512 KiB
    assert max(others) == tile  # then buffers of cap = 1.5·k entries and cut scratch of k
    assert sorted(others)[-2] <= 8 * int(kernels.config.CUDA_TOPK_BUFFER_FACTOR * k)


@pytest.mark.parametrize("name", cases.NAMES)
def test_array_op_launchers_match_the_cpu_twins(name, rng):
    W = cases.make(name, rng)
    W.data[:] = np.round(W.data * 2) / 2  # ties for the drop
    for k in {0, 1, W.nnz // 3, W.nnz}:
        np.testing.assert_array_equal(
            cu_drop.magnitude_drop(W.data, k), cpu_drop.magnitude_drop(W.data, k)
        )
    for a, b in zip(
        cu_structure.transpose(W.indptr, W.indices, W.shape[1]),
        cpu_structure.transpose(W.indptr, W.indices, W.shape[1]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    m, n = W.shape
    keep = rng.random(W.nnz) < 0.5
    absent = ~R.pattern(W.indptr, W.indices, W.shape, keep)
    flat = np.flatnonzero(absent.ravel())
    flat = np.sort(rng.choice(flat, size=min(flat.size, 9), replace=False))
    rows, cols = flat // max(n, 1), flat % max(n, 1)
    idx = W.indices.dtype.type
    g_indptr = np.zeros(m + 1, idx)
    np.cumsum(np.bincount(rows, minlength=m), out=g_indptr[1:])
    args = (W.indptr, W.indices, keep, g_indptr, cols.astype(idx))
    got, want = cu_merge.merge(*args), cpu_merge.merge(*args)
    for a, b in zip(got[:3], want[:3], strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert got[3] == want[3] == 0
    vals = rng.standard_normal(W.nnz).astype(np.float32)
    np.testing.assert_array_equal(
        cu_merge.remap(got[2], vals, -3.0), cpu_merge.remap(want[2], vals, -3.0)
    )


def test_merge_counts_conflicts_like_the_cpu(rng):
    W = cases.make("empty_rows", rng)
    keep = np.ones(W.nnz, bool)
    g_indptr = np.array([0, 1, 1, 1, 1, 1], W.indptr.dtype)
    cols = np.array([0], W.indices.dtype)  # (0, 0) is stored and kept
    assert cu_merge.merge(W.indptr, W.indices, keep, g_indptr, cols)[3] == 1
    assert cpu_merge.merge(W.indptr, W.indices, keep, g_indptr, cols)[3] == 1


# ------------------------------------------------- review fixes (GPU readiness, issue 17)


def _subnormal_case(rng, m=40, n=60):
    """dY, X of exact dyadic values whose products are subnormal float32 for some rows: the
    scores 2^-130·(small integer) lie below the smallest normal (2^-126) and are exact, so the
    float64 reference and any float32 sum agree on every score bit."""
    dY = rng.integers(-2, 3, size=(m, 2)).astype(np.float32)
    X = rng.integers(-2, 3, size=(n, 2)).astype(np.float32)
    tiny = rng.random(m) < 0.6
    dY[tiny] *= np.float32(2.0**-70)
    X[rng.random(n) < 0.7] *= np.float32(2.0**-60)
    return dY, X


def test_grow_ranks_subnormal_scores_exactly(rng, emulated):
    """The host algorithm on integer score keys (thresholds, cuts, ties) with subnormal
    scores; that the device code itself never flushes them is test_cuda_build's PTX check."""
    W = kernels.CSR.random((40, 60), 0.1, seed=int(rng.integers(1 << 30)))
    dY, X = _subnormal_case(rng)
    S = (dY.astype(np.float64) @ X.T.astype(np.float64)).astype(np.float32)
    sub = (S != 0) & (np.abs(S) < np.finfo(np.float32).tiny)
    assert sub.sum() > 100  # the case really holds subnormal scores, and zeros besides
    absent = 40 * 60 - W.nnz
    for k in (1, 50, int(sub.sum()), absent // 2, absent):
        _exact(W, dY, X, k, tile_bytes=60 * 4 * 3, buffer_factor=1.01)
    rows, cols, scores = cu_grow.topk_grow(W.indptr, W.indices, None, dY, X, 200)
    assert np.all(scores[np.abs(scores) < np.finfo(np.float32).tiny] >= 0)
    assert (scores > 0).sum() >= min(200, int(((S != 0) & ~_present(W)).sum()))


def _present(W):
    return R.pattern(W.indptr, W.indices, W.shape, None)


def test_grow_keeps_the_count_on_the_device_between_tiles(rng, emulated, monkeypatch):
    """Many tiles, few host syncs: the counter is read once per run of tiles (1, 2, 4, ...),
    not once per tile, and the answer stays exact."""
    reads = []
    real = cu_grow.to_host
    monkeypatch.setattr(cu_grow, "to_host", lambda a: reads.append(a.shape) or real(a))
    W = kernels.CSR.random((256, 50), 0.05, seed=int(rng.integers(1 << 30)))
    dY, X = _ints(rng, 256, 50, 3)
    tile = 50 * 4 * 2  # 2 rows a tile: 128 tiles
    _exact(W, dY, X, 400, tile_bytes=tile, buffer_factor=4.0)
    masks = [p for p in emulated if "mask" in p.kernel]
    assert len(masks) >= 128
    assert len(reads) < 128 // 3, f"{len(reads)} host reads for 128 tiles"


def test_grow_recomputes_a_tile_that_overflowed_inside_a_run(rng, emulated):
    """An overflow in a tile that a later tile of the same run overwrote: that tile is
    recomputed (one more sgemm and mask) and the cut is over the buffer ∪ its candidates."""
    W = kernels.CSR.random((300, 40), 0.05, seed=int(rng.integers(1 << 30)))
    dY = rng.standard_normal((300, 4)).astype(np.float32)
    X = rng.standard_normal((40, 4)).astype(np.float32)
    dY[200:] *= 50  # late rows score higher: the buffer overflows again after a quiet stretch
    n_tiles = 300 // 3
    for k in (20, 200, 900):
        emulated.clear()
        rows, cols, _ = cu_grow.topk_grow(
            W.indptr, W.indices, None, dY, X, k, tile_bytes=40 * 4 * 3, buffer_factor=1.5
        )
        rr, cc, _ = R.topk_grow(W.indptr, W.indices, W.shape, dY, X, k)
        np.testing.assert_array_equal(rows, rr)
        np.testing.assert_array_equal(cols, cc)
        masks = sum("mask" in p.kernel for p in emulated)
        assert masks > n_tiles, "no tile was recomputed: the path under test did not run"


def test_grow_tile_is_sized_from_the_device_memory(monkeypatch):
    cfg = kernels.config
    assert cu_grow.auto_tile_bytes(np) == cfg.CUDA_TOPK_TILE_BYTES  # NumPy: the floor

    def fake(free, pooled, total):
        pool = types.SimpleNamespace(free_bytes=lambda: pooled)
        device = types.SimpleNamespace(mem_info=(free, total))
        return types.SimpleNamespace(
            cuda=types.SimpleNamespace(Device=lambda: device),
            get_default_memory_pool=lambda: pool,
        )

    gib = 1 << 30
    # a quarter of the total, capped, when that much is free (the pool's unused blocks count)
    assert cu_grow.auto_tile_bytes(fake(100 * gib, 0, 140 * gib)) == cfg.CUDA_TOPK_TILE_MAX_BYTES
    assert cu_grow.auto_tile_bytes(fake(gib, 0, gib)) == gib // 4
    assert cu_grow.auto_tile_bytes(fake(0, gib, gib)) == gib // 4
    # not what happens to be free: the same tile whatever the other allocations
    assert cu_grow.auto_tile_bytes(fake(gib // 2, 0, gib)) == gib // 4
    # too little free: the floor, never more than what is there
    assert cu_grow.auto_tile_bytes(fake(gib // 8, 0, gib)) == cfg.CUDA_TOPK_TILE_BYTES
    assert cu_grow.auto_tile_bytes(fake(gib, 0, 32 << 20)) == cfg.CUDA_TOPK_TILE_BYTES
    monkeypatch.setattr(cfg, "CUDA_TOPK_TILE_FREE_FRACTION", 0.5)
    assert cu_grow.auto_tile_bytes(fake(gib, 0, gib)) == gib // 2


def test_grow_tile_boxes_cover_the_matrix_in_flat_order():
    for m, n, tr, tc in [(7, 5, 2, 5), (7, 5, 1, 2), (1, 9, 1, 4), (6, 6, 6, 6)]:
        n_tiles = -(-m // tr) * -(-n // tc)
        seen = []
        for t in range(n_tiles):
            r0, r1, c0, c1 = cu_grow.tile_box(t, m, n, tr, tc)
            seen += [i * n + j for i in range(r0, r1) for j in range(c0, c1)]
        assert seen == sorted(seen) == list(range(m * n))


def test_sddmm_grid_strides_over_rows(rng, emulated, monkeypatch):
    monkeypatch.setattr(kernels.config, "CUDA_SDDMM_MAX_BLOCKS", 3)
    W = cases.make("odd_37x53", rng)
    dY = rng.standard_normal((37, 5)).astype(np.float32)
    X = rng.standard_normal((53, 5)).astype(np.float32)
    out = np.full(W.nnz, np.nan, np.float32)
    bias = np.full(37, np.nan, np.float32)
    cu_sddmm.sddmm(W.indptr, W.indices, dY, X, out, bias_grad=bias)
    assert emulated[-1].grid == (3, 1, 1)
    ref = R.sddmm(W.indptr, W.indices, W.shape, dY, X)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bias, dY.sum(1), rtol=1e-5, atol=1e-5)
    big = cu_sddmm.plan(
        np.zeros(5, np.int64),
        np.zeros(0, np.int64),
        np.zeros((4, 2), np.float32),
        np.zeros((4, 2), np.float32),
        np.zeros(0, np.float32),
    )
    assert big.grid[0] == 3


def test_launch_plans_refuse_non_contiguous_operands(rng):
    from kernels.cuda import elementwise as cu_ew

    W = cases.make("odd_37x53", rng)
    x = rng.standard_normal((53, 16)).astype(np.float32)
    y = np.empty((37, 8), np.float32)
    with pytest.raises(ValueError, match=r"spmm: x must be C-contiguous"):
        cu_spmm.plan(W.indptr, W.indices, W.data, x[:, ::2], y)
    with pytest.raises(ValueError, match=r"spmm: out must be C-contiguous"):
        cu_spmm.plan(W.indptr, W.indices, W.data, x[:, :8].copy(), np.empty((8, 37), np.float32).T)
    with pytest.raises(ValueError, match=r"sddmm: dy must be C-contiguous"):
        cu_sddmm.plan(
            W.indptr, W.indices, y.T.copy().T, x[:, :8].copy(), np.empty(W.nnz, np.float32)
        )
    a = rng.standard_normal((6, 10)).astype(np.float32)
    with pytest.raises(ValueError, match=r"elementwise: array must be C-contiguous"):
        cu_ew.relu(a[:, ::2], a[:, ::2])
    view = a[:, ::2]
    before = view.copy()
    with pytest.raises(ValueError):  # before: the kernel wrote into a copy, the result was lost
        cu_ew.relu_plan(view, view)
    np.testing.assert_array_equal(view, before)


def test_kernel_functions_are_cached_per_device_and_name(monkeypatch):
    """RawModule.get_function builds a new object on every call: launch() must not."""
    import sys

    made, device = [], [0]

    class Module:
        def __init__(self, code, options):
            self.options = options

        def get_function(self, name):
            made.append(name)
            calls = []

            def fn(grid, block, args, shared_mem=0):
                calls.append((grid, block))

            fn.calls = calls
            return fn

    fake = types.SimpleNamespace(
        RawModule=Module,
        cuda=types.SimpleNamespace(
            Device=lambda: types.SimpleNamespace(id=device[0]),
            runtime=types.SimpleNamespace(getDevice=lambda: device[0]),
        ),
    )
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(_module, "_modules", {})
    monkeypatch.setattr(_module, "_functions", {})
    a = np.ones((2, 3), np.float32)
    from kernels.cuda import elementwise as cu_ew

    for _ in range(5):
        _module.launch(cu_ew.relu_plan(a, a))
    _module.launch(cu_ew.relu_backward_plan(a, a, a))
    assert made == ["sparsecore_relu", "sparsecore_relu_backward"]
    f = _module.get_function("elementwise.cu", "sparsecore_relu")
    assert len(f.calls) == 5
    device[0] = 1  # another device: its own module and function
    _module.launch(cu_ew.relu_plan(a, a))
    assert made == ["sparsecore_relu", "sparsecore_relu_backward", "sparsecore_relu"]


def _drop_reference(data, k):
    """Positions of the k smallest |w| (float64 magnitudes, ties to the lower position)."""
    order = np.lexsort((np.arange(data.shape[0]), np.abs(data.astype(np.float64))))
    return np.sort(order[:k])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_drop_ranks_subnormals_and_signed_zeros(dtype, rng):
    from kernels.cpu import fpmode

    tiny = np.finfo(dtype).tiny
    data = rng.choice(np.array([0.0, -0.0, tiny / 4, -tiny / 8, tiny / 2, 1.0, -2.0]), 300)
    data = (data * rng.integers(1, 4, 300)).astype(dtype)
    for k in (0, 1, 40, 150, 299, 300):
        want = _drop_reference(data, k)
        np.testing.assert_array_equal(cpu_drop.magnitude_drop(data, k), want)
        np.testing.assert_array_equal(cu_drop.magnitude_drop(data, k), want)
        with fpmode.flush_denormals():  # DAZ: a float compare would tie subnormals with 0
            np.testing.assert_array_equal(cpu_drop.magnitude_drop(data, k), want)
        swapped = data.astype(data.dtype.newbyteorder(">" if data.dtype.isnative else "<"))
        for drop in (cpu_drop.magnitude_drop, cu_drop.magnitude_drop):  # the bits of a swapped
            np.testing.assert_array_equal(drop(swapped, k), want)  # array are not its order
