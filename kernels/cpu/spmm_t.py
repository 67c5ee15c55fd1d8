"""dX = Wᵀ·dY on the CPU, through W's transpose structure (race-free, no atomics).

Maths:    dX[j, b] = Σ_{i : (i, j) in W} W[i, j] · dY[i, b]
          With the transpose structure (t_indptr, t_indices, t_perm) -- the CSC form of W where
          column j's rows are t_indices[t_indptr[j]:t_indptr[j+1]] and their values are
          data[t_perm[...]] -- this is the forward product of Wᵀ stored as CSR:
          dX = spmm(t_indptr, t_indices, data[t_perm], dY).
Buffers:  t_indptr (k+1,), t_indices (nnz,), t_perm (nnz,) int32|int64                 [in]
          data (nnz,) float32, W's values in CSR order                                  [in]
          dY (m, B) float32, C-contiguous                                               [in]
          out (k, B) float32, C-contiguous, every element overwritten                  [out]
          blocks (T+1,) int64 column-block boundaries (row_blocks of t_indptr)          [in]
          t_data (nnz,) float32 scratch for the permuted values (allocated if None)       [tmp]
          gate (k, B) float32 or None: dX[j, b] zeroed where gate[j, b] <= 0 (fused ReLU
          backward, gate = the ReLU's output, i.e. this layer's input)                    [in]
Cost:     one parallel gather of nnz values (values change every optimizer step, so they are
          permuted per call; measured as fast as gathering inside the product loop, and it lets
          dX share the forward kernel), then 2·nnz·B flops in spmm's kernel.
Threads:  prange over column blocks balanced by nonzeros; a thread owns whole rows of dX.
"""

import numba
import numpy as np

from kernels import config
from kernels.cpu._common import chunk, row_blocks
from kernels.cpu.panels import spmm_panels
from kernels.cpu.spmm import spmm


@numba.njit(parallel=True, cache=config.CACHE, boundscheck=False)
def _gather(data, perm, out):
    n = perm.shape[0]
    n_chunks = max(1, min(64, n // 8192))
    for t in numba.prange(n_chunks):
        # (unsigned: see spmm.py's header)
        for j in range(*chunk(t, n, n_chunks)):
            out[j] = data[numba.uint64(perm[j])]


def spmm_t(t_indptr, t_indices, t_perm, data, dy, out, blocks=None, t_data=None, gate=None):
    """Launcher (trusts its inputs). Fills and returns ``out`` (k, B)."""
    if blocks is None:
        blocks = row_blocks(t_indptr, out.shape[0])
    if t_data is None:
        t_data = np.empty(t_perm.shape[0], dtype=np.float32)
    if t_perm.shape[0]:
        _gather(data, t_perm, t_data)
    return spmm(t_indptr, t_indices, t_data, dy, out, blocks, gate=gate)


def spmm_t_batch(t_indptr, t_indices, t_perm, data, dy, out, blocks=None, t_data=None):
    """Launcher of the batch-major dX = dY·W (trusts its inputs): dy (B, m) -> out (B, k),
    both C-contiguous float32, read and written where they are (kernels/cpu/panels.py on the
    transpose structure, after the same value gather)."""
    if t_data is None:
        t_data = np.empty(t_perm.shape[0], dtype=np.float32)
    if t_perm.shape[0]:
        _gather(data, t_perm, t_data)
    return spmm_panels(t_indptr, t_indices, t_data, dy, out, blocks)
