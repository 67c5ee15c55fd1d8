"""dX = Wᵀ·dY on the CPU, through W's transpose structure (race-free, no atomics).

Maths:    dX[j, b] = Σ_{i : (i, j) in W} W[i, j] · dY[i, b]
          With the transpose structure (t_indptr, t_indices, t_perm) -- the CSC form of W where
          column j's rows are t_indices[t_indptr[j]:t_indptr[j+1]] and their values are
          data[t_perm[...]] -- this is a forward-style product over the columns of W:
          dX[j, b] = Σ_{q in col j} data[t_perm[q]] · dY[t_indices[q], b].
Buffers:  t_indptr (k+1,), t_indices (nnz,), t_perm (nnz,) int32|int64                 [in]
          data (nnz,) float32, W's values in CSR order                                  [in]
          dY (m, B) float32, C-contiguous                                               [in]
          out (k, B) float32, C-contiguous, every element overwritten                  [out]
          blocks (T+1,) int64 column-block boundaries (row_blocks of t_indptr)          [in]
Cost:     2·nnz·B flops, one gather of data per nonzero (amortised over B), plus what spmm costs.
Threads:  prange over column blocks balanced by nonzeros; a thread owns whole rows of dX.
"""

import numba

from kernels import config
from kernels.cpu._common import row_blocks


@numba.njit(parallel=True, fastmath=config.FASTMATH, cache=config.CACHE, boundscheck=False)
def _spmm_t_kernel(t_indptr, t_indices, t_perm, data, dy, out, blocks):
    n_batch = dy.shape[1]
    for t in numba.prange(blocks.shape[0] - 1):
        for j in range(blocks[t], blocks[t + 1]):
            for b in range(n_batch):
                out[j, b] = 0.0
            q = t_indptr[j]
            end = t_indptr[j + 1]
            while q + 4 <= end:
                r0 = t_indices[q]
                r1 = t_indices[q + 1]
                r2 = t_indices[q + 2]
                r3 = t_indices[q + 3]
                d0 = data[t_perm[q]]
                d1 = data[t_perm[q + 1]]
                d2 = data[t_perm[q + 2]]
                d3 = data[t_perm[q + 3]]
                for b in range(n_batch):
                    out[j, b] += d0 * dy[r0, b] + d1 * dy[r1, b] + d2 * dy[r2, b] + d3 * dy[r3, b]
                q += 4
            while q < end:
                r0 = t_indices[q]
                d0 = data[t_perm[q]]
                for b in range(n_batch):
                    out[j, b] += d0 * dy[r0, b]
                q += 1


def spmm_t(t_indptr, t_indices, t_perm, data, dy, out, blocks=None):
    """Launcher (trusts its inputs). Fills and returns ``out`` (k, B)."""
    if blocks is None:
        blocks = row_blocks(t_indptr, out.shape[0])
    if out.shape[0] and out.shape[1]:
        _spmm_t_kernel(t_indptr, t_indices, t_perm, data, dy, out, blocks)
    elif out.size:
        out[...] = 0.0
    return out
