"""kernels/cpu/sampled.py: the O(k) absent-connection sampler, the scores at sampled
coordinates, and the sampled grow (the top-k of its candidates)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import reference as R
from kernels.cpu import grow as G
from kernels.cpu import sampled as S
from sparsecore import CSR
from tests import cases


def _absent_mask(W, keep=None):
    return ~R.pattern(W.indptr, W.indices, W.shape, keep)


def _check_sample(W, keep, k, seed):
    m, n = W.shape
    flat = S.sample_absent(W.indptr, W.indices, keep, n, k, np.random.default_rng(seed))
    assert flat.dtype == np.int64 and flat.shape == (k,)
    assert np.all(np.diff(flat) > 0)  # distinct, ascending
    if k:
        assert flat.min() >= 0 and flat.max() < m * n
        assert _absent_mask(W, keep).ravel()[flat].all()  # never a kept connection
    return flat


@pytest.mark.parametrize("name", cases.NAMES)
def test_sampler_on_named_cases(name, rng):
    W = cases.make(name, rng)
    m, n = W.shape
    keep = rng.random(W.nnz) < 0.6
    for kp in (None, keep):
        n_absent = int(_absent_mask(W, kp).sum())
        for k in sorted({0, 1, n_absent // 3, n_absent // 2, n_absent // 2 + 1, n_absent}):
            if k > n_absent:
                continue
            flat = _check_sample(W, kp, k, int(rng.integers(1 << 30)))
            if k == n_absent:  # all of them: must terminate, and be every absent entry
                np.testing.assert_array_equal(flat, np.flatnonzero(_absent_mask(W, kp).ravel()))


def test_sampler_edge_cases_drawn():
    # 1 x N:   x . x . . .      the dropped entry (col 2) is eligible again
    W = CSR(np.array([0, 2]), np.array([0, 2]), np.ones(2, np.float32), (1, 6))
    keep = np.array([True, False])
    flat = S.sample_absent(W.indptr, W.indices, keep, 6, 5, np.random.default_rng(0))
    np.testing.assert_array_equal(flat, [1, 2, 3, 4, 5])
    # full rows and empty rows:   x x x
    #                             . . .
    #                             x x x
    W = CSR.from_dense(np.array([[1, 1, 1], [0, 0, 0], [1, 1, 1]], np.float32))
    for k in range(4):
        for seed in range(5):
            flat = S.sample_absent(W.indptr, W.indices, None, 3, k, np.random.default_rng(seed))
            assert set(flat.tolist()) <= {3, 4, 5} and len(flat) == k
    # a huge sparse matrix: int64 flat indices beyond 2**31, nothing m×n allocated
    W = CSR.random((200_000, 300_000), 1e-7, seed=1)
    flat = S.sample_absent(W.indptr, W.indices, None, 300_000, 1000, np.random.default_rng(2))
    assert flat.shape == (1000,) and flat.max() > 2**31
    assert not np.isin(flat, W.row_ids().astype(np.int64) * 300_000 + W.indices).any()


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 30),
    n=st.integers(1, 30),
    density=st.floats(0.0, 1.0),
    frac=st.floats(0.0, 1.0),
    drop=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
)
def test_sampler_invariants(m, n, density, frac, drop, seed):
    W = CSR.random((m, n), density, seed=seed)
    keep = np.random.default_rng(seed).random(W.nnz) >= drop
    n_absent = m * n - int(keep.sum())
    k = int(frac * n_absent)
    a = _check_sample(W, keep, k, seed)
    np.testing.assert_array_equal(a, _check_sample(W, keep, k, seed))  # same seed, same result


@pytest.mark.parametrize("k_frac", [0.05, 0.4, 0.8])  # rejection, rejection near 1/2, enumeration
def test_sampler_is_uniform(k_frac):
    """Every absent entry is chosen with probability k/|A|: a chi-square over many draws.

    8 x 10 with rows of 0, 2, 5, 9 and 10 present (a full row, an empty row) and two dropped
    entries that are eligible again. The bound (p < 1e-6 under uniformity) fails a sampler that
    favours low flat indices, rows with few present entries or the first draws.
    """
    rng = np.random.default_rng(12345)
    mask = np.zeros((8, 10), bool)
    for i, c in enumerate([0, 2, 5, 9, 10, 3, 1, 7]):
        mask[i, rng.choice(10, c, replace=False)] = True
    W = CSR.from_dense(mask.astype(np.float32))
    keep = np.ones(W.nnz, bool)
    keep[[3, 20]] = False
    absent = np.flatnonzero(_absent_mask(W, keep).ravel())
    k = max(1, int(k_frac * absent.size))
    trials = 4000
    counts = np.zeros(80, np.int64)
    for t in range(trials):
        f = S.sample_absent(W.indptr, W.indices, keep, 10, k, np.random.default_rng([7, t]))
        counts[f] += 1
    assert counts[np.setdiff1d(np.arange(80), absent)].sum() == 0
    obs = counts[absent]
    expected = trials * k / absent.size
    # each count is Binomial(trials, k/|A|): the variance has the (1 - k/|A|) factor
    chi2 = (((obs - expected) ** 2) / (expected * (1 - k / absent.size))).sum()
    dof = absent.size - 1
    assert chi2 < dof + 7 * np.sqrt(2 * dof), (chi2, dof)
    # ... and a biased sampler fails the same bound: the lower half of the flat indices drawn
    # 1.5 times as often as the upper half
    biased = obs.astype(float).copy()
    biased[: absent.size // 2] *= 1.5
    biased *= obs.sum() / biased.sum()
    chi2_b = (((biased - expected) ** 2) / (expected * (1 - k / absent.size))).sum()
    assert chi2_b > dof + 7 * np.sqrt(2 * dof)


@pytest.mark.parametrize("name", ["odd_37x53", "empty_rows", "wide_3x5000", "col_Nx1"])
def test_scores_at_coordinates_match_float64(name, rng):
    W = cases.make(name, rng)
    m, n = W.shape
    dy = rng.standard_normal((m, 19)).astype(np.float32)
    x = rng.standard_normal((n, 19)).astype(np.float32)
    dy[0, :3] = 1e-40  # subnormals read as zero
    flat = S.sample_absent(W.indptr, W.indices, None, n, (m * n - W.nnz) // 2, rng)
    out = S.score_at(flat, n, dy, x, np.full(flat.shape[0], np.nan, np.float32))
    ref = np.abs(dy.astype(np.float64) @ x.astype(np.float64).T).ravel()[flat]
    absprod = (np.abs(dy.astype(np.float64)) @ np.abs(x.astype(np.float64)).T).ravel()[flat]
    assert np.all(np.abs(out - ref) <= 1e-5 * absprod + 1e-30)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 30),
    n=st.integers(1, 30),
    density=st.floats(0.0, 0.9),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
)
def test_sampled_grow_covering_all_absent_equals_exact(m, n, density, frac, seed):
    """With candidates·k >= |absent| every absent connection is scored: exact RigL's top-k
    (integer-valued inputs: float32 scores are exact, so ties are real ties)."""
    rng = np.random.default_rng(seed)
    W = CSR.random((m, n), density, seed=seed)
    keep = rng.random(W.nnz) < 0.7
    K = int(frac * (W.nnz - keep.sum()))
    dy = rng.integers(-2, 3, size=(m, 4)).astype(np.float32)
    x = rng.integers(-2, 3, size=(n, 4)).astype(np.float32)
    rows, cols, sc = S.sampled_grow(W.indptr, W.indices, keep, dy, x, K, m * n + 1, rng)
    rr, cc, ss = R.topk_grow(W.indptr, W.indices, W.shape, dy, x, K, keep)
    np.testing.assert_array_equal(rows, rr)
    np.testing.assert_array_equal(cols, cc)
    np.testing.assert_array_equal(sc, ss)
    r2, c2, _ = G.topk_grow(W.indptr, W.indices, keep, dy, x, K)
    np.testing.assert_array_equal(rows, r2)
    np.testing.assert_array_equal(cols, c2)


def test_sampled_grow_is_the_top_k_of_its_candidates(rng):
    W = CSR.random((60, 70), 0.1, seed=3)
    keep = rng.random(W.nnz) < 0.7
    dy = rng.standard_normal((60, 8)).astype(np.float32)
    x = rng.standard_normal((70, 8)).astype(np.float32)
    k, c = 40, 5
    rows, cols, sc = S.sampled_grow(
        W.indptr, W.indices, keep, dy, x, k, c, np.random.default_rng(9)
    )
    cand = S.sample_absent(W.indptr, W.indices, keep, 70, k * c, np.random.default_rng(9))
    cs = S.score_at(cand, 70, dy, x, np.empty(cand.shape[0], np.float32))
    best = np.sort(cand[np.lexsort((cand, -cs))[:k]])
    np.testing.assert_array_equal(rows.astype(np.int64) * 70 + cols, best)
    assert rows.dtype == cols.dtype == np.int32 and sc.dtype == np.float32
    assert not R.pattern(W.indptr, W.indices, W.shape, keep)[rows, cols].any()
