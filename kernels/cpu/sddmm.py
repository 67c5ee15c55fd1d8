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
Threads:  prange over row blocks balanced by nonzeros; each thread writes its own slice of out.
          Four dot products run in one pass over b (four vector accumulators, fastmath
          reassociation: float32 sums in a different order than a sequential loop).
"""

import numba
import numpy as np

from kernels import config
from kernels.cpu._common import U1, U2, U3, U4, four_at, row_blocks, span


@numba.njit(parallel=True, fastmath=config.FASTMATH, cache=config.CACHE, boundscheck=False)
def _sddmm_kernel(indptr, indices, dy, x, out, blocks, bias_grad, has_bias):
    n_batch = x.shape[1]
    for t in numba.prange(blocks.shape[0] - 1):
        for i in range(blocks[t], blocks[t + 1]):
            if has_bias:
                sb = numba.float32(0.0)
                for b in range(n_batch):
                    sb += dy[i, b]
                bias_grad[i] = sb
            p, end = span(indptr, i)  # (unsigned: see spmm.py's header)
            while p + U4 <= end:
                c0, c1, c2, c3 = four_at(indices, p)
                s0 = numba.float32(0.0)
                s1 = numba.float32(0.0)
                s2 = numba.float32(0.0)
                s3 = numba.float32(0.0)
                for b in range(n_batch):
                    g = dy[i, b]
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
                    s0 += dy[i, b] * x[c0, b]
                out[p] = s0
                p += U1


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
