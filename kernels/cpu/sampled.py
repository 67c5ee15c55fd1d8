"""Absent-connection sampling and the sampled grow: costs that scale with k, not with m·n.

sample_absent — k distinct (row, col) pairs drawn uniformly among the connections absent from a
kept CSR pattern.

Maths:    A = {(i, j) : 0 <= i < m, 0 <= j < n, (i, j) not a kept entry of W}; return a uniformly
          random k-subset of A as flat indices f = i·n + j (int64), ascending.
Buffers:  indptr (m+1,), indices (nnz,) canonical CSR pattern of W                      [in]
          keep (nnz,) bool, or None: entries with keep=False count as absent            [in]
          rng numpy.random.Generator: the only source of randomness (same seed, same
          result)                                                                      [in]
Scratch:  one int64 draw buffer of about -|A|·ln(1 - k/|A|)·(m·n/|A|)·1.02 + 64 entries (≈ k when
          k << |A| and W is sparse), sorted and compacted in place; see ``sample_bytes``.
          Never anything m×n, not even a boolean mask.
Cost:     O(N log N) for N draws (one in-place sort), O(N · log(row length)) for the rejection
          (a binary search in the sorted CSR row of each draw), O(N) for the trim.
Threads:  the rejection runs over contiguous blocks of the sorted draws, one compaction region
          per block, packed afterwards in order.

Algorithm (rejection, when k <= |A|/2):
  1. Draw N flat indices uniformly in [0, m·n) (int64), sort them in place.
  2. In one parallel pass drop the duplicates (adjacent after the sort) and the draws that hit a
     kept entry (binary search of j in row i; a dropped entry, keep=False, is absent). What is
     left is a set of distinct absent indices, uniform given its size (every absent index is
     equally likely to be drawn, and the set's law is invariant under permutations of A).
     N is chosen so that on average the set holds k·1.02 + 64 entries; if it falls short, draw
     again for the difference, append, re-sort, re-compact (rare).
  3. Trim the d >= k distinct indices to exactly k with selection sampling (Knuth's Algorithm S:
     keep the t-th of d with probability needed / remaining), which keeps ascending order and
     picks a uniform k-subset.
When k > |A|/2 rejection would need ever more draws to find the last few absent entries, so the
absent entries are enumerated instead (row by row, O(m·n) = O(|A| + nnz) <= O(2k + nnz) time and
8·|A| <= 16·k bytes), and Algorithm S picks k of them.

score_at — |dL/dW| at given coordinates: out[t] = |Σ_b dY[i_t, b]·X[j_t, b]|, (i_t, j_t) the
flat indices f[t] (an SDDMM at COO coordinates). Subnormal inputs are read as zero (they would
otherwise slow the products several-fold on x86 and change no score that matters).
Cost:     2·C·B flops; memory bound on the gathered X rows. prange over candidate blocks.

sampled_grow — the cheaper RigL grow: C = min(c·k, |A|) distinct absent candidates drawn
uniformly (sample_absent), scored exactly by score_at, and the k highest kept (ties to the lower
flat index), ascending flat order. With C = |A| it equals the exact top-k of |dY·Xᵀ|.
"""

import math

import numba
import numpy as np

from kernels import config
from kernels import validation as V

# Rejection: draw enough for this many distinct absent entries per wanted one, plus a constant.
DRAW_MARGIN = 1.02
DRAW_EXTRA = 64
# Uniforms for Algorithm S are generated in chunks of this many (bounded scratch).
SELECT_CHUNK = 1 << 20

_TINY = np.float32(np.finfo(np.float32).tiny)  # the smallest normal float32


@numba.njit(inline="always")
def _is_kept(indptr, indices, keep, use_keep, i, j):
    """Binary search of column j in the sorted CSR row i; True if present and kept."""
    lo = indptr[i]
    hi = indptr[i + 1]
    while lo < hi:
        mid = (lo + hi) >> 1
        c = indices[mid]
        if c < j:
            lo = mid + 1
        elif c > j:
            hi = mid
        else:
            return (not use_keep) or keep[mid]
    return False


@numba.njit(parallel=True, cache=config.CACHE, boundscheck=False)
def _reject_compact(a, starts, prev, n_cols, indptr, indices, keep, use_keep, counts):
    """Block t = a[starts[t]:starts[t+1]] (sorted): keep the first of each run of equal values
    if it is absent, compacted in place to the block's start; counts[t] = entries kept.
    prev[t] = the value just before the block (or -1), read before any block was written."""
    n_b = starts.shape[0] - 1
    for t in numba.prange(n_b):
        w = starts[t]
        last = prev[t]
        for q in range(starts[t], starts[t + 1]):
            f = a[q]
            if f == last:
                continue
            last = f
            i = f // n_cols
            j = f - i * n_cols
            if _is_kept(indptr, indices, keep, use_keep, i, j):
                continue
            a[w] = f
            w += 1
        counts[t] = w - starts[t]


@numba.njit(cache=config.CACHE, boundscheck=False)
def _pack(a, starts, counts):
    """Move the blocks' kept regions together, in order (forward copies: dst <= src)."""
    w = 0
    for t in range(counts.shape[0]):
        s = starts[t]
        for q in range(s, s + counts[t]):
            a[w] = a[q]
            w += 1
    return w


@numba.njit(cache=config.CACHE, boundscheck=False)
def _select_chunk(a, r, w, total, need, u):
    """Algorithm S over a[r : r + len(u)]: keep item t with probability need / (total - t)."""
    for q in range(u.shape[0]):
        t = r + q
        if need > 0 and (total - t) * u[q] < need:
            a[w] = a[t]
            w += 1
            need -= 1
    return w, need


@numba.njit(parallel=True, cache=config.CACHE, boundscheck=False)
def _absent_per_row(indptr, keep, use_keep, n_cols, counts):
    for i in numba.prange(counts.shape[0]):
        kept = 0
        for p in range(indptr[i], indptr[i + 1]):
            if not use_keep or keep[p]:
                kept += 1
        counts[i] = n_cols - kept


@numba.njit(parallel=True, cache=config.CACHE, boundscheck=False)
def _absent_fill(indptr, indices, keep, use_keep, n_cols, offsets, out):
    for i in numba.prange(offsets.shape[0] - 1):
        w = offsets[i]
        base = np.int64(i) * n_cols
        p = indptr[i]
        pe = indptr[i + 1]
        for j in range(n_cols):
            while p < pe and (indices[p] < j or (use_keep and not keep[p])):
                p += 1
            if p < pe and indices[p] == j:
                continue
            out[w] = base + j
            w += 1


@numba.njit(parallel=True, fastmath=config.FASTMATH, cache=config.CACHE, boundscheck=False)
def _score_kernel(flat, n_cols, dy, x, out, starts):
    n_batch = x.shape[1]
    tiny = _TINY
    for t in numba.prange(starts.shape[0] - 1):
        for q in range(starts[t], starts[t + 1]):
            f = flat[q]
            i = f // n_cols
            j = f - i * n_cols
            s = numba.float32(0.0)
            for b in range(n_batch):
                g = dy[i, b]
                v = x[j, b]
                if abs(g) < tiny:
                    g = numba.float32(0.0)
                if abs(v) < tiny:
                    v = numba.float32(0.0)
                s += g * v
            out[q] = abs(s)


def _blocks(n):
    n_b = max(1, min(n, numba.get_num_threads() * config.BLOCKS_PER_THREAD))
    return np.linspace(0, n, n_b + 1).astype(np.int64)


def _reject(a, n, pattern):
    """Sort a[:n] in place, keep its distinct absent values at a[:d]; returns d."""
    if n == 0:
        return 0
    v = a[:n]
    v.sort()
    starts = _blocks(n)
    prev = np.empty(starts.shape[0] - 1, dtype=np.int64)
    prev[0] = -1
    prev[1:] = v[starts[1:-1] - 1]
    counts = np.empty(starts.shape[0] - 1, dtype=np.int64)
    _reject_compact(v, starts, prev, *pattern, counts)
    return _pack(v, starts, counts)


def _select(a, d, k, rng):
    """Uniform k-subset of a[:d], kept in order at a[:k] (Algorithm S in chunks of uniforms)."""
    w, need = 0, k
    for r in range(0, d, SELECT_CHUNK):
        if need == 0:
            break
        # inline: the previous chunk is freed before the next is drawn
        w, need = _select_chunk(a, r, w, d, need, rng.random(min(SELECT_CHUNK, d - r)))
    return w


def _expected_draws(n_absent, p_absent, target, have):
    """Draws (over all m·n) expected to raise the distinct absent count from have to target."""

    def g(d):  # accepted draws expected to see d distinct values among n_absent
        return -n_absent * math.log1p(-d / n_absent) if d < n_absent else math.inf

    acc = (g(target) - g(have)) * DRAW_MARGIN
    return int(math.ceil(acc / p_absent)) + DRAW_EXTRA


def count_kept(indptr, keep):
    return int(np.count_nonzero(keep)) if keep is not None else int(indptr[-1])


def enumerates(m, n, n_kept, k):
    """True when sample_absent enumerates the absent entries instead of rejection sampling."""
    return 2 * k > m * n - n_kept


def _buffer_entries(m, n, n_kept, k):
    """int64 entries of sample_absent's buffer (what its result is a view of)."""
    n_absent = m * n - n_kept
    if k == 0:
        return 0
    if enumerates(m, n, n_kept, k):
        return n_absent
    return _expected_draws(n_absent, n_absent / (m * n), k, 0)


def sample_bytes(m, n, n_kept, k):
    """Peak scratch bytes of sample_absent (the buffer its result views, plus the row offsets of
    the enumeration or one chunk of uniforms), for the plan. A rare second rejection round adds
    its own (smaller) draws."""
    e = _buffer_entries(m, n, n_kept, k)
    if k and enumerates(m, n, n_kept, k):
        return 8 * e + 16 * (m + 1)
    return 8 * e + 8 * min(SELECT_CHUNK, e)


def sample_absent(indptr, indices, keep, n_cols, k, rng):
    """Launcher (trusts its inputs: canonical pattern, 0 <= k <= number of absent entries).
    Returns k distinct absent flat indices i·n + j, int64, ascending (see the module header).
    """
    m = indptr.shape[0] - 1
    n = int(n_cols)
    use_keep = keep is not None
    keep_arr = keep if use_keep else np.ones(1, dtype=np.bool_)
    n_kept = count_kept(indptr, keep)
    n_absent = m * n - n_kept
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if enumerates(m, n, n_kept, k):
        counts = np.empty(m, dtype=np.int64)
        _absent_per_row(indptr, keep_arr, use_keep, n, counts)
        offsets = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        del counts
        a = np.empty(n_absent, dtype=np.int64)
        _absent_fill(indptr, indices, keep_arr, use_keep, n, offsets, a)
        del offsets
        return a[: _select(a, n_absent, k, rng)]  # a view: the buffer is <= 2k
    pattern = (n, indptr, indices, keep_arr, use_keep)
    total = m * n
    p = n_absent / total
    a = rng.integers(0, total, size=_expected_draws(n_absent, p, k, 0), dtype=np.int64)
    d = _reject(a, a.shape[0], pattern)
    while d < k:  # the first round fell short (rare): draw for the difference
        more = rng.integers(0, total, size=_expected_draws(n_absent, p, k, d), dtype=np.int64)
        dn = _reject(more, more.shape[0], pattern)
        if d + dn > a.shape[0]:
            grown = np.empty(d + dn, dtype=np.int64)
            grown[:d] = a[:d]
            a = grown
        a[d : d + dn] = more[:dn]
        del more
        d = _reject(a, d + dn, pattern)
    return a[: _select(a, d, k, rng)]  # a view of the draw buffer


def score_at(flat, n_cols, dy, x, out):
    """out[t] = |Σ_b dY[i, b]·X[j, b]| for f = flat[t] = i·n + j. Launcher; returns out."""
    if flat.shape[0]:
        _score_kernel(flat, np.int64(n_cols), dy, x, out, _blocks(flat.shape[0]))
    return out


def n_candidates(m, n, n_kept, k, candidates):
    """C = min(ceil(candidates·k), number of absent entries)."""
    return min(int(math.ceil(candidates * k)), m * n - n_kept)


def sampled_grow_bytes(m, n, n_kept, k, candidates):
    """Peak scratch bytes of sampled_grow, for the plan: the sampler's, or (while scoring) its
    buffer + the scores (float32), the partition's copy of them and the selection mask, and the
    result (k rows, cols, scores and an int64 temporary)."""
    c = n_candidates(m, n, n_kept, k, candidates)
    buf = 8 * _buffer_entries(m, n, n_kept, c)
    return max(sample_bytes(m, n, n_kept, c), buf + c * (4 + 4 + 1) + k * (8 + 4 + 4 + 4 + 8))


def sampled_grow(indptr, indices, keep, dy, x, k, candidates, rng):
    """Launcher (trusts its inputs, as topk_grow). The k highest |dY·Xᵀ| among C = min(c·k, |A|)
    uniformly drawn absent candidates; ties to the lower flat index. Returns (rows, cols,
    scores) in ascending flat order, rows/cols int32 when m and n < 2**31 else int64.
    """
    m, n = dy.shape[0], x.shape[0]
    idx_dtype = V.coords_dtype(m, n)
    if k <= 0:
        return np.empty(0, idx_dtype), np.empty(0, idx_dtype), np.empty(0, np.float32)
    c = n_candidates(m, n, count_kept(indptr, keep), k, candidates)
    flat = sample_absent(indptr, indices, keep, n, c, rng)
    scores = score_at(flat, n, dy, x, np.empty(c, dtype=np.float32))
    if c > k:
        kth = np.partition(scores, c - k)[c - k]
        sel = scores > kth
        ties = np.flatnonzero(scores == kth)[: k - int(np.count_nonzero(sel))]
        sel[ties] = True
        flat, scores = flat[sel], scores[sel]
        del sel
    rows = np.empty(flat.shape[0], idx_dtype)
    cols = np.empty(flat.shape[0], idx_dtype)
    np.floor_divide(flat, n, out=rows, casting="unsafe")
    np.subtract(flat, rows * np.int64(n), out=cols, casting="unsafe")
    return rows, cols, scores
