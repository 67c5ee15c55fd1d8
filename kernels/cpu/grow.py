"""Fused top-k gradient grow: the k absent connections with the largest |dY·Xᵀ|, tile by tile.

Maths:    G = dY·Xᵀ (m × n), the dense weight gradient of a layer Y = W·X.
          Return the k pairs (i, j) NOT in W's pattern (or whose ``keep`` flag is False) with the
          largest |G[i, j]|, in the order (|G| descending, flat index i·n + j ascending), i.e.
          ties go to the lower flat index. The result is listed in ascending flat order.
Buffers:  indptr (m+1,), indices (nnz,) canonical CSR pattern of W                      [in]
          keep (nnz,) bool, or None: entries with keep=False count as absent            [in]
          dY (m, B), X (n, B) float32, C-contiguous, finite, |dY·Xᵀ| < float32 max       [in]
Scratch:  one gradient tile (TOPK_TILE_BYTES, or TOPK_MIN_TILE_ROWS full rows if that is more
          and at most 1/16 of the gradient; one row cut into column blocks when a single row is
          larger than the tile), a candidate buffer of cap = TOPK_BUFFER_FACTOR·k
          (score float32 + flat index int32|int64), and at each cut one float32 copy of the
          buffer for the partition. Never the dense m × n gradient.
Cost:     m·n·B multiply-adds in float32 BLAS (one sgemm per tile, on the BLAS threads), one
          O(m·n) scan (Numba threads) and the candidate traffic (see Algorithm).

Algorithm:
  1. Threshold estimate. One tile of rows spread evenly over the matrix (every (m/R)-th row) is
     scored first; the score ranked ESTIMATE_MARGIN·k·(sample / all absent) in it is expected to
     let about ESTIMATE_MARGIN·k entries of the whole matrix through. It is only a guess: see 4.
  2. Stream. Tiles are visited in ascending flat order. For each, the sgemm writes G's tile,
     present connections are overwritten with NaN (never a candidate: NaN > t is false; the scan
     is compiled without the no-NaN fast-math flag), and one pass keeps the entries with
     |G| > thr. Threads scan disjoint row ranges into disjoint regions of the buffer, which are
     then packed in row order; a tile whose candidates do not fit is rescanned sequentially with
     buffer cuts (3).
  3. Cuts. When the buffer is full it is cut to the best k: thr becomes the k-th largest score,
     entries above it stay, and entries equal to it stay in buffer (= flat) order until k are
     kept. Every later candidate has a larger flat index, so one that merely equals thr loses
     every tie: '>' is exact.
  4. Exactness of the estimate. The first pass starts from thr = the estimate shifted one float32
     ulp down ('>' then admits scores equal to it). If at least k entries reach it, every entry
     of the true top-k does, so the result is exact. Otherwise (the sample was unlucky) a second
     pass starts from thr below every score, which is always exact.
  Without an estimate (small matrices, rows cut into column blocks, small k) the stream starts
  below every score; then about k·ln(m·n/k) candidates pass a running threshold in all.
"""

import numba
import numpy as np

from kernels import config
from kernels import validation as V

# Fast-math without 'nnan'/'ninf': the scan relies on NaN comparing false.
_FM_KEEP_NAN = {"arcp", "contract", "reassoc", "nsz"}

# Below every |G| (>= 0), and above the -1 that the estimate writes over present connections.
BELOW_ALL = np.float32(-0.5)

# The estimated threshold aims at this many candidates per wanted entry, and is used only when
# the sample ranks at least ESTIMATE_MIN_RANK entries above it (a steadier estimate).
ESTIMATE_MARGIN = 1.5
ESTIMATE_MIN_RANK = 64


@numba.njit(parallel=True, fastmath=True, cache=config.CACHE, boundscheck=False)
def _abs_mask_count(g, r0, r_step, c0, indptr, indices, keep, use_keep):
    """|G| in place, present connections set to -1; returns the number of absent entries.

    Row r of the tile is matrix row r0 + r·r_step (the estimate samples rows with a stride).
    """
    n_r, n_c = g.shape
    total = 0
    for r in numba.prange(n_r):
        for c in range(n_c):
            g[r, c] = abs(g[r, c])
        i = r0 + r * r_step
        n_present = 0
        for p in range(indptr[i], indptr[i + 1]):
            col = indices[p] - c0
            if col >= n_c:
                break
            if col >= 0 and (not use_keep or keep[p]):
                g[r, col] = -1.0
                n_present += 1
        total += n_c - n_present
    return total


@numba.njit(inline="always")
def _mask_row(g, r, i, c0, indptr, indices, keep, use_keep):
    n_c = g.shape[1]
    for p in range(indptr[i], indptr[i + 1]):
        col = indices[p] - c0
        if col >= n_c:
            break
        if col >= 0 and (not use_keep or keep[p]):
            g[r, col] = np.nan


@numba.njit(parallel=True, fastmath=_FM_KEEP_NAN, cache=config.CACHE, boundscheck=False)
def _scan_parallel(
    g, r0, c0, n_cols, indptr, indices, keep, use_keep, thr, buf_s, buf_f, start, region, counts
):
    """Mask present entries with NaN, then append |G| > thr: thread t scans rows
    [t·per, (t+1)·per) into buf[start + t·region : start + (t+1)·region].

    counts[t] = entries thread t wrote, or -1 if its region overflowed (the tile must then be
    rescanned by _scan_sequential; what the threads wrote is discarded).
    """
    n_r, n_c = g.shape
    n_t = counts.shape[0]
    per = (n_r + n_t - 1) // n_t
    for t in numba.prange(n_t):
        w0 = start + t * region
        w = w0
        lim = w0 + region
        full = False
        for r in range(t * per, min(n_r, (t + 1) * per)):
            i = r0 + r
            _mask_row(g, r, i, c0, indptr, indices, keep, use_keep)  # every row, even when full
            if full:
                continue
            base = i * n_cols + c0
            for c in range(n_c):
                s = abs(g[r, c])
                if s > thr:
                    if w == lim:
                        full = True
                        break
                    buf_s[w] = s
                    buf_f[w] = base + c
                    w += 1
        counts[t] = -1 if full else w - w0


@numba.njit(cache=config.CACHE, boundscheck=False)
def _scan_sequential(g, r_start, c_start, r0, c0, n_cols, thr, buf_s, buf_f, n_buf):
    """Append |G| > thr from tile position (r_start, c_start) on (entries already masked).

    Returns (n_buf, r, c): (rows of the tile, 0) when the tile is done, else the position of the
    first candidate that did not fit because the buffer is full (the caller cuts and resumes).
    """
    cap = buf_s.shape[0]
    n_r, n_c = g.shape
    c = c_start
    for r in range(r_start, n_r):
        base = (r0 + r) * n_cols + c0
        while c < n_c:
            s = abs(g[r, c])
            if s > thr:
                if n_buf == cap:
                    return n_buf, r, c
                buf_s[n_buf] = s
                buf_f[n_buf] = base + c
                n_buf += 1
            c += 1
        c = 0
    return n_buf, n_r, 0


@numba.njit(cache=config.CACHE, boundscheck=False)
def _compact(buf_s, buf_f, n, k, kth):
    """Keep the best k of buf[:n] (ascending flat order) given kth = the k-th largest score."""
    n_gt = 0
    for j in range(n):
        if buf_s[j] > kth:
            n_gt += 1
    ties = k - n_gt
    w = 0
    for j in range(n):
        s = buf_s[j]
        if s > kth or (s == kth and ties > 0):
            if s == kth:
                ties -= 1
            buf_s[w] = s
            buf_f[w] = buf_f[j]
            w += 1
    return w


_TINY = np.float32(np.finfo(np.float32).tiny)  # the smallest normal float32


@numba.njit(parallel=True, cache=config.CACHE, boundscheck=False)
def _count_subnormal(a):
    n_r, n_c = a.shape
    total = 0
    for r in numba.prange(n_r):
        for c in range(n_c):
            v = abs(a[r, c])
            if v < _TINY and v != 0:
                total += 1
    return total


@numba.njit(parallel=True, cache=config.CACHE, boundscheck=False)
def _flush_subnormal(a):
    n_r, n_c = a.shape
    for r in numba.prange(n_r):
        for c in range(n_c):
            if abs(a[r, c]) < _TINY:
                a[r, c] = 0.0


def flush_subnormals(a):
    """``a`` itself, or a copy whose subnormal values (0 < |v| < 1.18e-38) are zero.

    Gradients of wide ReLU networks hold them (measured: 1.5% of dY at width 10^5), and the
    sgemm of a tile then runs 3x slower (x86 handles subnormals in microcode). Flushing changes a
    score by less than 1.2e-38·Σ|x|, far below float32 resolution of any score that matters.
    """
    if a.size == 0 or _count_subnormal(a) == 0:
        return a
    out = a.copy()
    _flush_subnormal(out)
    return out


def _cut(buf_s, buf_f, n_buf, k):
    """Cut the buffer to its best k; returns (k, new threshold = k-th largest score)."""
    kth = np.partition(buf_s[:n_buf], n_buf - k)[n_buf - k]  # NumPy's introselect: O(n_buf)
    return _compact(buf_s, buf_f, n_buf, k, kth), np.float32(kth)


def tile_shape(m, n, tile_bytes, min_rows=0):
    """(rows, cols) of the gradient tile: full rows when one fits (at least min(min_rows, m//16)
    of them), else one row in column blocks."""
    row_bytes = 4 * max(n, 1)
    if row_bytes <= tile_bytes:
        rows = max(tile_bytes // row_bytes, min(min_rows, m // 16))
        return max(1, min(m, rows)), n
    return 1, max(1, tile_bytes // 4)


def row_sq_max(a) -> float:
    """max_i Σ_b a[i, b]² in float64 (the row-norm bound of kernels.topk_grow's overflow
    check), without m × B temporaries."""
    return float(np.max(np.einsum("ij,ij->i", a, a, dtype=np.float64)))


def topk_grow(indptr, indices, keep, dy, x, k, tile_bytes=None, buffer_factor=None):
    """Launcher (trusts its inputs: k <= number of absent entries, canonical pattern, finite
    scores). Returns (rows, cols, scores): index dtype int32 when m and n < 2**31 else int64 (the
    flat index i·n + j is int64 internally when m·n needs it), scores float32, listed in
    ascending flat order.
    """
    m, n = dy.shape[0], x.shape[0]
    flat_dtype, idx_dtype = V.flat_dtype(m, n), V.coords_dtype(m, n)
    if k == 0:
        return (np.empty(0, idx_dtype), np.empty(0, idx_dtype), np.empty(0, np.float32))
    dy, x = flush_subnormals(dy), flush_subnormals(x)
    min_rows = config.TOPK_MIN_TILE_ROWS if tile_bytes is None else 0
    tile_bytes = config.TOPK_TILE_BYTES if tile_bytes is None else tile_bytes
    factor = config.TOPK_BUFFER_FACTOR if buffer_factor is None else buffer_factor
    cap = max(k + 1, int(factor * k))
    buf_s = np.empty(cap, dtype=np.float32)
    buf_f = np.empty(cap, dtype=flat_dtype)
    use_keep = keep is not None
    keep_arr = keep if use_keep else np.ones(1, dtype=np.bool_)
    n_present = int(np.count_nonzero(keep)) if use_keep else int(indptr[m])
    tr, tc = tile_shape(m, n, tile_bytes, min_rows)
    tile = np.empty(tr * tc, dtype=np.float32)
    pattern = (indptr, indices, keep_arr, use_keep)

    thr = _estimate_threshold(dy, x, k, tr, tc, tile, pattern, n_present)
    n_buf = 0
    if thr is not None:
        n_buf = _stream(dy, x, k, tr, tc, tile, pattern, thr, buf_s, buf_f)
    if n_buf < k:  # no estimate, or it was too high: fewer than k entries reached it
        n_buf = _stream(dy, x, k, tr, tc, tile, pattern, BELOW_ALL, buf_s, buf_f)
    flat = buf_f[:n_buf]  # int32 when m·n fits: no int64 temporaries
    rows = (flat // n).astype(idx_dtype, copy=False)
    cols = flat - rows * n
    return rows, cols.astype(idx_dtype, copy=False), buf_s[:n_buf].copy()


def _estimate_threshold(dy, x, k, tr, tc, tile, pattern, n_present):
    """Score one tile of rows spread evenly over the matrix and read off a threshold expected
    to let about ESTIMATE_MARGIN·k entries of the whole matrix through. Returns it shifted one
    float32 ulp down, or None when the sample would not say enough.
    """
    m, n = dy.shape[0], x.shape[0]
    if tc < n or 2 * tr > m:
        return None
    step = m // tr
    g = tile[: tr * n].reshape(tr, n)
    np.matmul(dy[0 : step * tr : step], x.T, out=g)
    n_sample = _abs_mask_count(g, 0, step, 0, *pattern)
    n_absent = m * n - n_present
    rank = int(np.ceil(ESTIMATE_MARGIN * k * n_sample / max(n_absent, 1)))
    if rank < ESTIMATE_MIN_RANK or rank > n_sample:
        return None
    flat = tile[: tr * n]  # present entries hold -1, below every score
    est = np.partition(flat, flat.shape[0] - rank)[flat.shape[0] - rank]
    return np.nextafter(np.float32(est), np.float32(-np.inf))


def _stream(dy, x, k, tr, tc, tile, pattern, thr, buf_s, buf_f):
    """One pass over all tiles in ascending flat order; returns the number of entries kept."""
    m, n = dy.shape[0], x.shape[0]
    cap = buf_s.shape[0]
    counts = np.empty(numba.get_num_threads(), dtype=np.int64)
    n_buf = 0
    for r0 in range(0, m, tr):
        r1 = min(m, r0 + tr)
        for c0 in range(0, n, tc):
            c1 = min(n, c0 + tc)
            g = tile[: (r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
            np.matmul(dy[r0:r1], x[c0:c1].T, out=g)
            region = (cap - n_buf) // counts.shape[0]
            _scan_parallel(g, r0, c0, n, *pattern, thr, buf_s, buf_f, n_buf, region, counts)
            if counts.min() >= 0:  # pack the threads' regions, in row order
                start = n_buf
                for t, cnt in enumerate(counts.tolist()):
                    src = start + t * region
                    buf_s[n_buf : n_buf + cnt] = buf_s[src : src + cnt]
                    buf_f[n_buf : n_buf + cnt] = buf_f[src : src + cnt]
                    n_buf += cnt
                continue
            # a region overflowed: rescan the whole (already masked) tile with cuts
            r, c = 0, 0
            while r < g.shape[0]:
                n_buf, r, c = _scan_sequential(g, r, c, r0, c0, n, thr, buf_s, buf_f, n_buf)
                if r < g.shape[0]:
                    n_buf, thr = _cut(buf_s, buf_f, n_buf, k)
    if n_buf > k:
        n_buf, _ = _cut(buf_s, buf_f, n_buf, k)
    return n_buf
