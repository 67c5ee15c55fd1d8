"""Fused top-k gradient grow on the GPU: launcher of kernels/cuda/grow.cu.

Same arguments and result as kernels/cpu/grow.py: the k pairs (i, j) absent from W's pattern
(or stored with keep = False) with the largest |G[i, j]|, G = dY·Xᵀ, ties to the lower flat index
i·n + j, listed in ascending flat order; rows/cols int32 (int64 when m or n needs it), scores
float32. Trusts its inputs (k <= number of absent entries, canonical pattern, finite scores).

Algorithm (device memory O(tile + k), never the m × n gradient):
  1. Tiles in ascending flat order (full rows, or one row in column blocks: cpu/grow.tile_shape,
     so tiles cover disjoint, increasing flat ranges; tile_bytes None: auto_tile_bytes, from the
     device's memory). Per tile: cuBLAS sgemm (cupy.matmul) into the tile buffer;
     sparsecore_grow_mask sets the present connections to NaN; sparsecore_grow_select appends
     every score above thr to the candidate buffer (cap entries, unordered: slots come from an
     atomic counter that stays on the device from tile to tile).
  2. Host syncs: the tiles are streamed in runs (1, 2, 4, ... up to
     config.CUDA_TOPK_MAX_TILES_PER_SYNC), the counter copied after each tile on the device and
     read once per run. When it passed cap in some tile, the tiles before it are in the buffer
     (the later ones of the run found slots >= cap and wrote nothing), the tile is recomputed
     if a later one overwrote it, and the buffer is cut: over the union (buffer ∪ the tile's
     candidates), an exact radix select (sparsecore_grow_hist, two 16-bit digits of the score
     key) finds v = the k-th largest key, n_gt entries above it and n_eq equal to it;
     T = k - n_gt ties survive, those with the lowest flat indices: a second radix select on
     the flat index of the tied entries finds fstar = the T-th smallest. Then exactly the k
     entries with key > v, or key == v and flat <= fstar, are selected into a scratch of k
     entries and copied back, and thr = v: every later tile has larger flat indices, so a later
     score equal to v loses the tie and '>' is exact. The stream resumes after that tile with a
     run of 1.
  3. After the last tile, a cut to k if more remain; the k entries are sorted by flat index.
Scores are handled only as keys, the bits of |G| as int32 (grow.cu): the selection does not
depend on the flush-to-zero mode CuPy compiles with (-ftz=true), so subnormal scores rank as on
the CPU. The scores returned are those bits viewed as float32.
Choices: the selection is custom (a threshold filter plus radix select) because sorting the
tile (cupy.sort) would need several tile-sized temporaries; the final sort of k flat indices
(cupy.argsort, a radix sort) is O(k) memory and run once.
Memory: tile (tile_bytes) + buffer cap·(4 + f) + during a cut a scratch of k·(4 + f) bytes
(f = 4, or 8 when m·n >= 2**31) + 65536·8 bytes of histogram; host syncs: one per run of tiles,
a few per cut (the histograms, 512 KiB each, are scanned on the host).
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

BELOW_ALL = np.int32(-1)  # a threshold key below every score key (keys are >= 0)
INF_KEY = 0x7F800000  # the key of +inf (grow.cu: SC_INF_KEY)
N_BINS = 1 << 16
ALL_FLATS = np.uint64(np.iinfo(np.uint64).max)


class Union(NamedTuple):
    """The elements a hist/select launch looks at: a tile's (above thr) and a buffer's."""

    g: object  # tile (C-contiguous, n_tile floats; any float32 array if n_tile == 0)
    n_tile: int
    tc: int  # columns of the tile
    n_cols: int  # n, for flat = flat0 + (e // tc)·n + e % tc
    flat0: int
    bs: object  # buffer score keys (int32: the bits of |G|)
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
    _module.require_contiguous("grow_mask", indptr=indptr, indices=indices, keep=keep, g=g)
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
        np.int32(thr),
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
        np.int32(thr),
        np.int32(use_tie),
        np.int32(v),
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
    """(v, n_gt, n_eq): v the k-th largest score key of the union (1 <= k <= its size)."""
    hi, above = digit_from_top(_hist(u, thr, bins, shift=16), k)
    counts = _hist(u, thr, bins, smask=0xFFFF0000, sval=hi << 16, shift=0)
    lo, above_lo = digit_from_top(counts, k - above)
    return (hi << 16) | lo, above + above_lo, int(counts[lo])


def tth_smallest_tie(u: Union, thr, v_bits: int, t: int, n_digits: int, bins) -> int:
    """The t-th smallest flat index among the union's entries whose score key is v_bits."""
    prefix, mask = 0, 0
    for shift in range(16 * (n_digits - 1), -1, -16):
        counts = _hist(u, thr, bins, 0xFFFFFFFF, v_bits, mask, prefix, key_is_flat=1, shift=shift)
        d, below = digit_from_bottom(counts, t)
        t -= below
        prefix |= d << shift
        mask |= 0xFFFF << shift
    return prefix


def _cut(u: Union, thr, k, buf_s, buf_f, counter, bins, n_digits):
    """Keep exactly the best k of the union in buf[:k]; returns the new threshold key v.
    Leaves the device counter at k (the buffer's next free slot)."""
    cupy = array_module(buf_s)

    v_bits, n_gt, n_eq = kth_largest(u, thr, k, bins)
    t = k - n_gt
    fstar = ALL_FLATS if t == n_eq else tth_smallest_tie(u, thr, v_bits, t, n_digits, bins)
    v = np.int32(v_bits)
    new_s = cupy.empty(k, dtype=np.int32)
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


def auto_tile_bytes(cupy) -> int:
    """The tile when none is given: config.CUDA_TOPK_TILE_FREE_FRACTION of the device's total
    memory, within [CUDA_TOPK_TILE_BYTES, CUDA_TOPK_TILE_MAX_BYTES], when that much is free now
    (the driver's free bytes plus what CuPy's pool holds unused), else the floor
    CUDA_TOPK_TILE_BYTES; the floor on NumPy arrays (the emulated tests). Larger tiles mean
    fewer sgemm calls and fewer host syncs. Sized from the total rather than the free memory so
    that the tile, hence cuBLAS's choice of kernel and the bits of every score, is the same
    from run to run and on every rank of the same GPU model (unless memory runs short)."""
    floor = int(config.CUDA_TOPK_TILE_BYTES)
    if cupy is np:
        return floor
    free, total = _module.free_device_bytes(cupy)
    share = int(config.CUDA_TOPK_TILE_FREE_FRACTION * total)
    want = max(floor, min(int(config.CUDA_TOPK_TILE_MAX_BYTES), share))
    return want if want <= free else floor


def tile_box(t: int, m: int, n: int, tr: int, tc: int) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1) of tile t, tiles numbered in ascending flat order."""
    per_row = -(-n // tc)
    r0, c0 = (t // per_row) * tr, (t % per_row) * tc
    return r0, min(m, r0 + tr), c0, min(n, c0 + tc)


def topk_grow(indptr, indices, keep, dy, x, k, tile_bytes=None, buffer_factor=None):
    """Launcher (trusts its inputs). Returns CuPy (rows, cols, scores) in ascending flat order.

    ``tile_bytes`` None: sized from the device's memory (auto_tile_bytes).
    (With NumPy arrays and kernels/cuda/_module.launch replaced by an emulator, the same host
    logic runs on the CPU: tests/test_cuda_emulated.py.)
    """
    cupy = array_module(dy)

    m, n = dy.shape[0], x.shape[0]
    flat_dtype, idx_dtype = V.flat_dtype(m, n), V.coords_dtype(m, n)
    if k == 0 or m * n == 0:  # (k <= absent entries = 0 when m·n = 0)
        e = cupy.empty(0, dtype=idx_dtype)
        return e, e.copy(), cupy.empty(0, dtype=np.float32)
    auto = tile_bytes is None
    tile_bytes = auto_tile_bytes(cupy) if auto else tile_bytes
    factor = config.CUDA_TOPK_BUFFER_FACTOR if buffer_factor is None else buffer_factor
    cap = max(k + 1, int(factor * k))
    buf_s = cupy.empty(cap, dtype=np.int32)
    buf_f = cupy.empty(cap, dtype=flat_dtype)
    counter = cupy.zeros(1, dtype=np.uint64)  # the buffer's next free slot, kept on the device
    bins = cupy.empty(N_BINS, dtype=np.uint64)
    n_digits = flat_digits(m, n)
    tr, tc = tile_shape(m, n, tile_bytes)
    tile = cupy.empty(tr * tc, dtype=np.float32)
    n_tiles = -(-m // tr) * -(-n // tc)
    snaps = cupy.empty(max(1, min(n_tiles, int(config.CUDA_TOPK_MAX_TILES_PER_SYNC))), np.uint64)

    def scored(r0, r1, c0, c1):  # the tile's |G| with the present connections masked
        g = tile[: (r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
        cupy.matmul(dy[r0:r1], x[c0:c1].T, out=g)
        _module.launch(mask_plan(indptr, indices, keep, g, r0, c0))
        return Union(g, g.size, c1 - c0, n, r0 * n + c0, buf_s, buf_f, 0)

    thr = BELOW_ALL
    n_buf = 0  # entries of buf known (on the host) to be valid
    t, run = 0, 1  # next tile; tiles to stream before the next host sync
    while t < n_tiles:
        batch = [tile_box(j, m, n, tr, tc) for j in range(t, min(n_tiles, t + run))]
        for j, box in enumerate(batch):  # the counter runs on over the tiles: no sync
            u = scored(*box)
            _module.launch(select_plan(u, thr, 0, 0, 0, buf_s, buf_f, counter, cap))
            snaps[j : j + 1] = counter
        seen = to_host(snaps[: len(batch)])  # the one host sync of the batch
        full = seen > cap
        if not full.any():
            n_buf, t = int(seen[-1]), t + len(batch)
            run = min(2 * run, snaps.shape[0])
            continue
        over = int(np.argmax(full))  # the first tile of the run that overflowed
        # tile t + over overflowed: the tiles before it are in buf[:n_buf] (later tiles of the
        # batch found slots >= cap and wrote nothing); cut over buffer ∪ that tile's candidates
        n_buf = int(seen[over - 1]) if over else n_buf
        u = scored(*batch[over]) if over < len(batch) - 1 else u  # (recomputed if overwritten)
        thr = _cut(u._replace(n_buf=n_buf), thr, k, buf_s, buf_f, counter, bins, n_digits)
        n_buf, t, run = k, t + over + 1, 1
    if n_buf > k:
        u = Union(tile, 0, 1, n, 0, buf_s, buf_f, n_buf)
        _cut(u, thr, k, buf_s, buf_f, counter, bins, n_digits)
        n_buf = k
    flat = buf_f[:n_buf]
    order = cupy.argsort(flat)
    flat = flat[order]
    rows = flat // n
    cols = flat - rows * n
    result = rows.astype(idx_dtype), cols.astype(idx_dtype), buf_s[:n_buf][order].view(np.float32)
    if cupy is not np and auto and tile.nbytes > config.CUDA_TOPK_TILE_BYTES:
        # a tile enlarged from the device's memory would stay cached in CuPy's pool, where
        # torch (or anything else) cannot use it: hand the pool's unused blocks back
        u = None  # (the last tile view)
        del tile
        cupy.get_default_memory_pool().free_all_blocks()
    return result
