"""Fused top-k gradient grow on the GPU: launcher of kernels/cuda/grow.cu.

Same arguments and result as kernels/cpu/grow.py: the k pairs (i, j) absent from W's pattern
(or stored with keep = False) with the largest |G[i, j]|, G = dY·Xᵀ, ties to the lower flat index
i·n + j, listed in ascending flat order; rows/cols int32 (int64 when m or n needs it), scores
float32. Trusts its inputs (k <= number of absent entries, canonical pattern, finite scores).

Algorithm (device memory O(tile + k), never the m × n gradient):
  1. Tiles in ascending flat order (full rows, or one row in column blocks: cpu/grow.tile_shape,
     so tiles cover disjoint, increasing flat ranges). Per tile: cuBLAS sgemm (cupy.matmul)
     into the tile buffer; sparsecore_grow_mask sets the present connections to NaN;
     sparsecore_grow_select appends every |G| > thr to the candidate buffer (cap entries,
     unordered: slots come from an atomic counter) and counts them.
  2. If the tile's candidates do not fit, the buffer is cut: over the union (buffer ∪ the
     tile's candidates), an exact radix select (sparsecore_grow_hist, two 16-bit digits of the
     score's bits) finds v = the k-th largest score, n_gt entries above it and n_eq equal to it;
     T = k - n_gt ties survive, those with the lowest flat indices: a second radix select on
     the flat index of the tied entries finds fstar = the T-th smallest. Then exactly the k
     entries with s > v, or s == v and flat <= fstar, are selected into a scratch of k entries
     and copied back, and thr = v: every later tile has larger flat indices, so a later score
     equal to v loses the tie and '>' is exact.
  3. After the last tile, a cut to k if more remain; the k entries are sorted by flat index.
Choices: the selection is custom (a threshold filter plus radix select) because sorting the
tile (cupy.sort) would need several tile-sized temporaries; the final sort of k flat indices
(cupy.argsort, a radix sort) is O(k) memory and run once.
Memory: tile (tile_bytes) + buffer cap·(4 + f) + during a cut a scratch of k·(4 + f) bytes
(f = 4, or 8 when m·n >= 2**31) + 65536·8 bytes of histogram; host syncs: one per tile, a few
per cut (the histograms, 512 KiB each, are scanned on the host).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from kernels import config
from kernels import validation as V
from kernels.cpu.grow import row_sq_max as host_row_sq_max
from kernels.cpu.grow import tile_shape
from kernels.cuda import _module
from kernels.cuda._module import Launch, array_module, cdiv, index_suffix, to_host

BELOW_ALL = np.float32(-0.5)  # below every score |G| >= 0
N_BINS = 1 << 16
ALL_FLATS = np.uint64(np.iinfo(np.uint64).max)


class Union(NamedTuple):
    """The elements a hist/select launch looks at: a tile's (above thr) and a buffer's."""

    g: object  # tile (C-contiguous, n_tile floats), or any float32 array if n_tile == 0
    n_tile: int
    tc: int  # columns of the tile
    n_cols: int  # n, for flat = flat0 + (e // tc)·n + e % tc
    flat0: int
    bs: object  # buffer scores
    bf: object  # buffer flat indices
    n_buf: int

    def args(self):
        return (
            self.g,
            np.int64(self.n_tile),
            np.int64(max(self.tc, 1)),
            np.int64(self.n_cols),
            np.int64(self.flat0),
            self.bs,
            self.bf,
            np.int64(self.n_buf),
        )


def flat_suffix(flat_dtype) -> str:
    return "flat32" if np.dtype(flat_dtype).itemsize == 4 else "flat64"


def grid_1d(total: int) -> tuple:
    """Grid of the grid-stride kernels: enough blocks to cover ``total``, capped."""
    if total <= 0:
        return (0, 1, 1)
    return (min(config.CUDA_GROW_MAX_BLOCKS, cdiv(total, config.CUDA_GROW_THREADS)), 1, 1)


def mask_plan(indptr, indices, keep, g, r0, c0) -> Launch:
    tr, tc = g.shape
    args = (
        indptr,
        indices,
        keep if keep is not None else indices,  # a valid pointer, never read
        np.int32(keep is not None),
        g,
        np.int64(r0),
        np.int64(tr),
        np.int64(c0),
        np.int64(tc),
    )
    kernel = f"sparsecore_grow_mask_{index_suffix(indices.dtype)}"
    return Launch("grow.cu", kernel, (tr, 1, 1), (config.CUDA_GROW_THREADS, 1, 1), args)


def hist_plan(u: Union, thr, smask, sval, fmask, fval, key_is_flat, shift, bins) -> Launch:
    args = (
        *u.args(),
        np.float32(thr),
        np.uint32(smask),
        np.uint32(sval),
        np.uint64(fmask),
        np.uint64(fval),
        np.int32(key_is_flat),
        np.int32(shift),
        bins,
    )
    kernel = f"sparsecore_grow_hist_{flat_suffix(u.bf.dtype)}"
    block = (config.CUDA_GROW_THREADS, 1, 1)
    return Launch("grow.cu", kernel, grid_1d(u.n_tile + u.n_buf), block, args)


def select_plan(u: Union, thr, use_tie, v, fstar, out_s, out_f, counter, out_cap) -> Launch:
    args = (
        *u.args(),
        np.float32(thr),
        np.int32(use_tie),
        np.float32(v),
        np.uint64(fstar),
        out_s,
        out_f,
        counter,
        np.int64(out_cap),
    )
    kernel = f"sparsecore_grow_select_{flat_suffix(u.bf.dtype)}"
    block = (config.CUDA_GROW_THREADS, 1, 1)
    return Launch("grow.cu", kernel, grid_1d(u.n_tile + u.n_buf), block, args)


def digit_from_top(counts, k: int) -> tuple[int, int]:
    """The digit d holding the k-th largest element (1-based) of a 65536-bin histogram, and the
    number of elements in higher bins: above < k <= above + counts[d]."""
    c = np.cumsum(counts[::-1].astype(np.int64))  # c[j] = elements with digit >= 65535 - j
    j = int(np.searchsorted(c, k, side="left"))
    d = counts.shape[0] - 1 - j
    return d, int(c[j] - counts[d])


def digit_from_bottom(counts, t: int) -> tuple[int, int]:
    """The digit d holding the t-th smallest element (1-based), and the count in lower bins."""
    c = np.cumsum(counts.astype(np.int64))
    d = int(np.searchsorted(c, t, side="left"))
    return d, int(c[d] - counts[d])


def flat_digits(m: int, n: int) -> int:
    """16-bit digits needed for a flat index in [0, m·n)."""
    return max(1, cdiv(max(m * n - 1, 1).bit_length(), 16))


def _hist(u, thr, bins, smask=0, sval=0, fmask=0, fval=0, key_is_flat=0, shift=0):
    bins.fill(0)
    _module.launch(hist_plan(u, thr, smask, sval, fmask, fval, key_is_flat, shift, bins))
    return to_host(bins)


def kth_largest(u: Union, thr, k: int, bins) -> tuple[int, int, int]:
    """(bits of v, n_gt, n_eq): v the k-th largest score of the union (1 <= k <= its size)."""
    hi, above = digit_from_top(_hist(u, thr, bins, shift=16), k)
    counts = _hist(u, thr, bins, smask=0xFFFF0000, sval=hi << 16, shift=0)
    lo, above_lo = digit_from_top(counts, k - above)
    return (hi << 16) | lo, above + above_lo, int(counts[lo])


def tth_smallest_tie(u: Union, thr, v_bits: int, t: int, n_digits: int, bins) -> int:
    """The t-th smallest flat index among the union's entries whose score bits equal v_bits."""
    prefix, mask = 0, 0
    for shift in range(16 * (n_digits - 1), -1, -16):
        counts = _hist(u, thr, bins, 0xFFFFFFFF, v_bits, mask, prefix, key_is_flat=1, shift=shift)
        d, below = digit_from_bottom(counts, t)
        t -= below
        prefix |= d << shift
        mask |= 0xFFFF << shift
    return prefix


def _cut(u: Union, thr, k, buf_s, buf_f, counter, bins, n_digits):
    """Keep exactly the best k of the union in buf[:k]; returns the new threshold v."""
    cupy = array_module(buf_s)

    v_bits, n_gt, n_eq = kth_largest(u, thr, k, bins)
    t = k - n_gt
    fstar = ALL_FLATS if t == n_eq else tth_smallest_tie(u, thr, v_bits, t, n_digits, bins)
    v = np.uint32(v_bits).view(np.float32)
    new_s = cupy.empty(k, dtype=np.float32)
    new_f = cupy.empty(k, dtype=buf_f.dtype)
    counter.fill(0)
    _module.launch(select_plan(u, thr, 1, v, fstar, new_s, new_f, counter, k))
    got = int(to_host(counter)[0])
    if got != k:  # a broken invariant, never a silently wrong answer
        raise RuntimeError(f"topk_grow cut kept {got} entries, expected {k}")
    buf_s[:k] = new_s
    buf_f[:k] = new_f
    return v


_reductions: dict = {}


def row_sq_max(a) -> float:
    """max_i Σ_b a[i, b]² in float64 on the device: one reduction kernel, no m × B float64
    temporaries (the CPU's on NumPy arrays, in the emulated tests)."""
    cupy = array_module(a)
    if cupy is np:
        return host_row_sq_max(a)
    if "sq" not in _reductions:
        _reductions["sq"] = cupy.ReductionKernel(
            "T x", "float64 y", "(double)x * (double)x", "a + b", "y = a", "0", "sparsecore_sqsum"
        )
    return float(_reductions["sq"](a, axis=1).max())


def topk_grow(indptr, indices, keep, dy, x, k, tile_bytes=None, buffer_factor=None):
    """Launcher (trusts its inputs). Returns CuPy (rows, cols, scores) in ascending flat order.

    (With NumPy arrays and kernels/cuda/_module.launch replaced by an emulator, the same host
    logic runs on the CPU: tests/test_cuda_emulated.py.)
    """
    cupy = array_module(dy)

    m, n = dy.shape[0], x.shape[0]
    flat_dtype, idx_dtype = V.flat_dtype(m, n), V.coords_dtype(m, n)
    if k == 0 or m * n == 0:  # (k <= absent entries = 0 when m·n = 0)
        e = cupy.empty(0, dtype=idx_dtype)
        return e, e.copy(), cupy.empty(0, dtype=np.float32)
    tile_bytes = config.CUDA_TOPK_TILE_BYTES if tile_bytes is None else tile_bytes
    factor = config.CUDA_TOPK_BUFFER_FACTOR if buffer_factor is None else buffer_factor
    cap = max(k + 1, int(factor * k))
    buf_s = cupy.empty(cap, dtype=np.float32)
    buf_f = cupy.empty(cap, dtype=flat_dtype)
    counter = cupy.zeros(1, dtype=np.uint64)
    bins = cupy.empty(N_BINS, dtype=np.uint64)
    n_digits = flat_digits(m, n)
    tr, tc = tile_shape(m, n, tile_bytes)
    tile = cupy.empty(tr * tc, dtype=np.float32)
    thr = BELOW_ALL
    n_buf = 0
    for r0 in range(0, m, tr):
        r1 = min(m, r0 + tr)
        for c0 in range(0, n, tc):
            c1 = min(n, c0 + tc)
            g = tile[: (r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
            cupy.matmul(dy[r0:r1], x[c0:c1].T, out=g)
            _module.launch(mask_plan(indptr, indices, keep, g, r0, c0))
            u = Union(g, g.size, c1 - c0, n, r0 * n + c0, buf_s, buf_f, 0)
            counter.fill(0)
            _module.launch(
                select_plan(u, thr, 0, 0.0, 0, buf_s[n_buf:], buf_f[n_buf:], counter, cap - n_buf)
            )
            found = int(to_host(counter)[0])
            if n_buf + found <= cap:
                n_buf += found
                continue
            # overflow: what the select wrote past n_buf is discarded; cut over buffer ∪ tile
            u = u._replace(n_buf=n_buf)
            thr = _cut(u, thr, k, buf_s, buf_f, counter, bins, n_digits)
            n_buf = k
    if n_buf > k:
        u = Union(buf_s, 0, 1, n, 0, buf_s, buf_f, n_buf)
        _cut(u, thr, k, buf_s, buf_f, counter, bins, n_digits)
        n_buf = k
    flat = buf_f[:n_buf]
    order = cupy.argsort(flat)
    flat = flat[order]
    rows = flat // n
    cols = flat - rows * n
    return rows.astype(idx_dtype), cols.astype(idx_dtype), buf_s[:n_buf][order]
