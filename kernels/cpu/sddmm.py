"""dW = (dY·Xᵀ) sampled at W's nonzeros on the CPU: the weight gradient, nnz-sized.

Maths:    out[p] = Σ_b dY[i, b] · X[indices[p], b]   for every p in row i of W
Buffers:  indptr (m+1,), indices (nnz,) int32|int64                                     [in]
          dY (m, B) float32, C-contiguous (gradient at the layer's output)              [in]
          X (k, B) float32, C-contiguous (the layer's input)                            [in]
          out (nnz,) float32, in W's CSR order, every element overwritten              [out]
          blocks (T+1,) int64 row-block boundaries                                      [in]
Cost:     2·nnz·B flops; per row, dY[i] stays in L1 while one X row per nonzero streams by.
Threads:  prange over row blocks balanced by nonzeros; each thread writes its own slice of out.
          Four dot products run in one pass over b (four vector accumulators, fastmath
          reassociation: float32 sums in a different order than a sequential loop).
"""

import numba

from kernels import config
from kernels.cpu._common import row_blocks


@numba.njit(parallel=True, fastmath=config.FASTMATH, cache=config.CACHE, boundscheck=False)
def _sddmm_kernel(indptr, indices, dy, x, out, blocks):
    n_batch = x.shape[1]
    for t in numba.prange(blocks.shape[0] - 1):
        for i in range(blocks[t], blocks[t + 1]):
            p = indptr[i]
            end = indptr[i + 1]
            while p + 4 <= end:
                c0 = indices[p]
                c1 = indices[p + 1]
                c2 = indices[p + 2]
                c3 = indices[p + 3]
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
                out[p + 1] = s1
                out[p + 2] = s2
                out[p + 3] = s3
                p += 4
            while p < end:
                c0 = indices[p]
                s0 = numba.float32(0.0)
                for b in range(n_batch):
                    s0 += dy[i, b] * x[c0, b]
                out[p] = s0
                p += 1


def sddmm(indptr, indices, dy, x, out, blocks=None):
    """Launcher (trusts its inputs). Fills and returns ``out`` (nnz,)."""
    if blocks is None:
        blocks = row_blocks(indptr, dy.shape[0])
    if out.shape[0]:
        _sddmm_kernel(indptr, indices, dy, x, out, blocks)
    return out
