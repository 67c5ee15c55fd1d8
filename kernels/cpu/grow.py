"""Fused top-k gradient grow: the k absent connections with the largest |dY·Xᵀ|, tile by tile.

Maths:    G = dY·Xᵀ (m × n), the dense weight gradient of a layer Y = W·X.
          Return the k pairs (i, j) NOT in W's pattern (or whose ``keep`` flag is False) with the
          largest |G[i, j]|, in the order (|G| descending, flat index i·n + j ascending), i.e.
          ties go to the lower flat index. The result is listed in ascending flat order.
Buffers:  indptr (m+1,), indices (nnz,) canonical CSR pattern of W                      [in]
          keep (nnz,) bool, or None: entries with keep=False count as absent            [in]
          dY (m, B), X (n, B) float32, C-contiguous, finite                             [in]
Scratch:  one gradient tile (TOPK_TILE_BYTES: R full rows, or one row cut into column
          blocks when a single row is larger), a candidate buffer of cap = TOPK_BUFFER_FACTOR·k
          (score float32 + flat index int32|int64), R counts, and at each cut one float32 copy
          of the buffer for the partition. Never the dense m × n gradient.
Cost:     m·n·B multiply-adds in float32 BLAS (one sgemm per tile, the BLAS threads), plus O(m·n)
          for |.|, masking and counting (Numba threads, parallel over the tile's rows), plus the
          candidate traffic: with a random order of scores about k·ln(m·n/k) candidates pass the
          running threshold, and each cut of the buffer costs O(cap).
Algorithm: tiles are visited in ascending flat order. A candidate enters the buffer only if its
          score beats the running threshold thr (strictly). When the buffer is full it is cut to
          the best k: thr becomes the k-th largest score, entries above it stay, and entries equal
          to it stay in buffer (= flat) order until k are kept. Because every later candidate has
          a larger flat index, one that merely equals thr loses every tie, so '>' is exact.
          Present connections are written as -1 into the |G| tile, below any threshold.
"""

import numba
import numpy as np

from kernels import config


@numba.njit(parallel=True, fastmath=True, cache=config.CACHE, boundscheck=False)
def _abs_mask_count(g, r0, r_step, c0, indptr, indices, keep, use_keep, thr, counts):
    n_r, n_c = g.shape
    total = 0
    for r in numba.prange(n_r):
        cnt = 0
        for c in range(n_c):  # one vectorised pass: |G| in place, count above thr
            s = abs(g[r, c])
            g[r, c] = s
            if s > thr:
                cnt += 1
        i = r0 + r * r_step
        for p in range(indptr[i], indptr[i + 1]):  # then knock out the present connections
            col = indices[p] - c0
            if col >= n_c:
                break
            if col >= 0 and (not use_keep or keep[p]):
                if g[r, col] > thr:
                    cnt -= 1
                g[r, col] = -1.0
        counts[r] = cnt
        total += cnt
    return total


@numba.njit(parallel=True, cache=config.CACHE, boundscheck=False)
def _fill_parallel(g, r0, c0, n_cols, counts, offsets, thr, buf_s, buf_f):
    """Append every candidate above thr; row r writes at offsets[r] (room is guaranteed)."""
    n_r, n_c = g.shape
    for r in numba.prange(n_r):
        if counts[r] == 0:
            continue
        w = offsets[r]
        base = (r0 + r) * n_cols + c0
        for c in range(n_c):
            s = g[r, c]
            if s > thr:
                buf_s[w] = s
                buf_f[w] = base + c
                w += 1


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


@numba.njit(cache=config.CACHE, boundscheck=False)
def _fill(g, r_start, c_start, r0, c0, n_cols, counts, thr, buf_s, buf_f, n_buf):
    """Append candidates above thr from tile position (r_start, c_start) on.

    Returns (n_buf, r, c): (n_rows_of_tile, 0) when the tile is done, else the position of the
    first candidate that did not fit because the buffer is full (the caller cuts and resumes).
    """
    cap = buf_s.shape[0]
    n_r, n_c = g.shape
    c = c_start
    for r in range(r_start, n_r):
        if counts[r] > 0:
            base = (r0 + r) * n_cols + c0
            while c < n_c:
                s = g[r, c]
                if s > thr:
                    if n_buf == cap:
                        return n_buf, r, c
                    buf_s[n_buf] = s
                    buf_f[n_buf] = base + c
                    n_buf += 1
                c += 1
        c = 0
    return n_buf, n_r, 0


def _cut(buf_s, buf_f, n_buf, k):
    """Cut the buffer to its best k; returns (k, new threshold = k-th largest score)."""
    kth = np.partition(buf_s[:n_buf], n_buf - k)[n_buf - k]  # NumPy's introselect: O(n_buf)
    return _compact(buf_s, buf_f, n_buf, k, kth), np.float32(kth)


def tile_shape(m, n, tile_bytes):
    """(rows, cols) of the gradient tile: full rows when one fits, else one row in column blocks."""
    row_bytes = 4 * max(n, 1)
    if row_bytes <= tile_bytes:
        return max(1, min(m, tile_bytes // row_bytes)), n
    return 1, max(1, tile_bytes // 4)


def topk_grow(indptr, indices, keep, dy, x, k, tile_bytes=None, buffer_factor=None):
    """Launcher (trusts its inputs: k <= number of absent entries, canonical pattern, finite data).

    Returns (rows, cols, scores): index dtype int32 when m and n < 2**31 else int64 (the flat
    index i·n + j is int64 internally when m·n needs it), scores float32,
    listed in ascending flat order.
    """
    m, n = dy.shape[0], x.shape[0]
    flat_dtype = np.int32 if m * n < 2**31 else np.int64
    idx_dtype = np.int32 if max(m, n) < 2**31 else np.int64
    if k == 0:
        return (np.empty(0, idx_dtype), np.empty(0, idx_dtype), np.empty(0, np.float32))
    tile_bytes = config.TOPK_TILE_BYTES if tile_bytes is None else tile_bytes
    factor = config.TOPK_BUFFER_FACTOR if buffer_factor is None else buffer_factor
    cap = max(k + 1, int(factor * k))
    buf_s = np.empty(cap, dtype=np.float32)
    buf_f = np.empty(cap, dtype=flat_dtype)
    use_keep = keep is not None
    keep_arr = keep if use_keep else np.ones(1, dtype=np.bool_)
    n_present = int(np.count_nonzero(keep)) if use_keep else int(indptr[m])
    tr, tc = tile_shape(m, n, tile_bytes)
    tile = np.empty(tr * tc, dtype=np.float32)
    counts = np.empty(tr, dtype=np.int64)
    offsets = np.empty(tr, dtype=np.int64)
    args = (indptr, indices, keep_arr, use_keep)
    scratch = (counts, offsets)

    thr = _estimate_threshold(dy, x, k, tr, tc, tile, scratch, args, n_present)
    if thr is not None:
        n_buf = _stream(dy, x, k, tr, tc, tile, scratch, args, thr, buf_s, buf_f)
        if n_buf < k:  # the estimate was too high: fewer than k entries reached it
            thr = None
    if thr is None:
        n_buf = _stream(dy, x, k, tr, tc, tile, scratch, args, BELOW_ALL, buf_s, buf_f)
    flat = buf_f[:n_buf].astype(np.int64)
    rows = (flat // n).astype(idx_dtype)
    cols = (flat % n).astype(idx_dtype)
    return rows, cols, buf_s[:n_buf].copy()


# Below every |G| (>= 0) and above the -1 written over present connections.
BELOW_ALL = np.float32(-0.5)

# The estimated threshold aims at this many candidates per wanted entry; it must be a lower
# bound of the true k-th score for the single pass to be exact (checked: else a second pass).
ESTIMATE_MARGIN = 2.0
ESTIMATE_MIN_RANK = 64


def _estimate_threshold(dy, x, k, tr, tc, tile, scratch, args, n_present):
    """Score one tile of rows spread evenly over the matrix and read off a threshold expected
    to let about ESTIMATE_MARGIN·k entries of the whole matrix through. Returns the threshold
    shifted one float32 ulp down (so that '>' admits scores equal to it), or None when the
    sample would not say enough (few rows, small k, rows cut into column blocks).
    """
    m, n = dy.shape[0], x.shape[0]
    if tc < n or 2 * tr > m:
        return None
    step = m // tr
    g = tile[: tr * n].reshape(tr, n)
    np.matmul(dy[0 : step * tr : step], x.T, out=g)
    n_sample = _abs_mask_count(g, 0, step, 0, *args, BELOW_ALL, scratch[0])
    n_absent = m * n - n_present
    rank = int(np.ceil(ESTIMATE_MARGIN * k * n_sample / max(n_absent, 1)))
    if rank < ESTIMATE_MIN_RANK or rank > n_sample:
        return None
    flat = tile[: tr * n]
    est = np.partition(flat, flat.shape[0] - rank)[flat.shape[0] - rank]
    return np.nextafter(np.float32(est), np.float32(-np.inf))


def _stream(dy, x, k, tr, tc, tile, scratch, args, thr, buf_s, buf_f):
    """One pass over all tiles in ascending flat order; returns the number of entries kept."""
    m, n = dy.shape[0], x.shape[0]
    counts, offsets = scratch
    cap = buf_s.shape[0]
    n_buf = 0
    for r0 in range(0, m, tr):
        r1 = min(m, r0 + tr)
        for c0 in range(0, n, tc):
            c1 = min(n, c0 + tc)
            g = tile[: (r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
            cnt = counts[: r1 - r0]
            np.matmul(dy[r0:r1], x[c0:c1].T, out=g)
            total = _abs_mask_count(g, r0, 1, c0, *args, thr, cnt)
            if total == 0:
                continue
            if n_buf + total <= cap:
                off = offsets[: r1 - r0]
                np.cumsum(cnt, out=off)
                off -= cnt
                off += n_buf
                _fill_parallel(g, r0, c0, n, cnt, off, thr, buf_s, buf_f)
                n_buf += total
                continue
            r, c = 0, 0
            while r < g.shape[0]:
                n_buf, r, c = _fill(g, r, c, r0, c0, n, cnt, thr, buf_s, buf_f, n_buf)
                if r < g.shape[0]:
                    n_buf, thr = _cut(buf_s, buf_f, n_buf, k)
    if n_buf > k:
        n_buf, _ = _cut(buf_s, buf_f, n_buf, k)
    return n_buf
