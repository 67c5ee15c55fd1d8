"""dW = (dY·Xᵀ) sampled at W's nonzeros on the CPU: the weight gradient, nnz-sized.

Maths:    out[p] = Σ_b dY[i, b] · X[indices[p], b]   for every p in row i of W
Buffers:  indptr (m+1,), indices (nnz,) int32|int64                                     [in]
          dY (m, B) float32, C-contiguous (gradient at the layer's output)              [in]
          X (k, B) float32, C-contiguous (the layer's input)                            [in]
          out (nnz,) float32, in W's CSR order, every element overwritten              [out]
          blocks (T+1,) int64 row-block boundaries                                      [in]
          bias_grad (m,) float32 or None: if given, also Σ_b dY[i, b] (the bias gradient),
          computed while dY[i] is in L1                                                [out]
Cost:     2·nnz·B flops; per row, dY[i] stays in L1 while one X row per nonzero streams by.
          sddmm_batch: the same with batch-major dY (B, m) and X (B, k): dY read where it is
          (each task's rows moved into an L2-sized slot in 8 × 8 register blocks), X through
          one transposed copy.
Threads:  prange over row blocks balanced by nonzeros; each thread writes its own slice of out.
          Four dot products run in one pass over b (four vector accumulators, fastmath
          reassociation: float32 sums in a different order than a sequential loop).
"""

import numba
import numpy as np

from kernels import config
from kernels.cpu._common import U1, U2, U3, U4, four_at, row_blocks, span
from kernels.cpu.panels import read_only_view, slots
from kernels.layout import block8_at, transpose
from kernels.machine import cache_sizes


@numba.njit(fastmath=config.FASTMATH, cache=config.CACHE, boundscheck=False, inline="always")
def _row_dots(indptr, indices, dy, r, x, out, i, bias_grad, has_bias):
    """out[p] = dy[r, :] · x[indices[p], :] for the nonzeros p of W's row i (and bias_grad[i])."""
    n_batch = x.shape[1]
    if has_bias:
        sb = numba.float32(0.0)
        for b in range(n_batch):
            sb += dy[r, b]
        bias_grad[i] = sb
    p, end = span(indptr, i)  # (unsigned: see spmm.py's header)
    while p + U4 <= end:
        c0, c1, c2, c3 = four_at(indices, p)
        s0 = numba.float32(0.0)
        s1 = numba.float32(0.0)
        s2 = numba.float32(0.0)
        s3 = numba.float32(0.0)
        for b in range(n_batch):
            g = dy[r, b]
            s0 += g * x[c0, b]
            s1 += g * x[c1, b]
            s2 += g * x[c2, b]
            s3 += g * x[c3, b]
        out[p] = s0
        out[p + U1] = s1
        out[p + U2] = s2
        out[p + U3] = s3
        p += U4
    while p < end:
        c0 = numba.uint64(indices[p])
        s0 = numba.float32(0.0)
        for b in range(n_batch):
            s0 += dy[r, b] * x[c0, b]
        out[p] = s0
        p += U1


@numba.njit(parallel=True, fastmath=config.FASTMATH, cache=config.CACHE, boundscheck=False)
def _sddmm_kernel(indptr, indices, dy, x, out, blocks, bias_grad, has_bias):
    for t in numba.prange(blocks.shape[0] - 1):
        for i in range(blocks[t], blocks[t + 1]):
            _row_dots(indptr, indices, dy, i, x, out, i, bias_grad, has_bias)


@numba.njit(parallel=True, fastmath=config.FASTMATH, cache=config.CACHE, boundscheck=False)
def _sddmm_dy_batch_kernel(indptr, indices, dy_b, x, out, blocks, slots):
    """As _sddmm_kernel with a batch-major dY (B, m): each task moves its rows' dY columns,
    ``rows`` at a time, into its slot (rows, B) in 8 x 8 register blocks, then runs the same
    row loop on them while they are in L2."""
    n_batch = dy_b.shape[0]
    rows = slots.shape[1]
    b8 = n_batch - n_batch % 8
    for t in numba.prange(blocks.shape[0] - 1):
        loc = slots[numba.get_thread_id()]
        i = blocks[t]
        r1 = blocks[t + 1]
        while i < r1:
            nr = min(rows, r1 - i)
            nr8 = nr - nr % 8
            for b in range(0, b8, 8):
                for r in range(0, nr8, 8):
                    block8_at(dy_b, b, i + r, loc, r, b)
            for b in range(b8, n_batch):
                for r in range(nr8):
                    loc[r, b] = dy_b[b, i + r]
            for r in range(nr8, nr):
                for b in range(n_batch):
                    loc[r, b] = dy_b[b, i + r]
            for r in range(nr):
                _row_dots(indptr, indices, loc, r, x, out, i + r, out, False)
            i += nr


_NO_BIAS = np.zeros(1, dtype=np.float32)


def sddmm(indptr, indices, dy, x, out, blocks=None, bias_grad=None):
    """Launcher (trusts its inputs). Fills and returns ``out`` (nnz,) (and ``bias_grad``)."""
    if blocks is None:
        blocks = row_blocks(indptr, dy.shape[0])
    has_bias = bias_grad is not None
    if out.shape[0] or (has_bias and bias_grad.shape[0]):
        _sddmm_kernel(
            indptr, indices, dy, x, out, blocks, bias_grad if has_bias else _NO_BIAS, has_bias
        )
    return out


# batch-major dY: the rows a task moves into its slot at a time fill about this share of one
# core's L2 (the rest for the X rows that stream by)
DY_SLOT_L2_SHARE = 0.25


def _dy_slots(n_batch: int) -> np.ndarray:
    rows = int(cache_sizes().l2 * DY_SLOT_L2_SHARE) // (4 * max(1, n_batch))
    rows = max(8, rows - rows % 8)
    return slots(("dy", rows, n_batch), (rows, n_batch))  # (the panel kernel's slot cache)


def sddmm_batch(indptr, indices, dy, x, out, blocks=None, x_t=None):
    """Launcher of the batch-major sampled product (trusts its inputs): dy (B, m) and x (B, k)
    C-contiguous float32 -> out (nnz,). dY is read where it is (per-task blocks in cache);
    X needs one whole transposed copy (every row of W reads any of its columns): into
    ``x_t`` (k, B) when given (the caller's scratch), else a new array."""
    n_batch, m = dy.shape
    if blocks is None:
        blocks = row_blocks(indptr, m)
    if out.shape[0] == 0:
        return out
    xf = transpose(x, x_t)
    # the inputs as read-only views: one compiled specialization (see panels.read_only_view)
    indptr, indices, dy, blocks = (read_only_view(a) for a in (indptr, indices, dy, blocks))
    _sddmm_dy_batch_kernel(indptr, indices, dy, xf, out, blocks, _dy_slots(n_batch))
    return out
