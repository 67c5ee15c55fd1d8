"""Structural kernels: the transpose structure of a CSR pattern.

transpose(indptr, indices, n_cols) -> (t_indptr, t_indices, t_perm)
    The CSC form of the pattern: column j holds rows t_indices[t_indptr[j]:t_indptr[j+1]]
    (ascending) whose values sit at data[t_perm[...]] in CSR order. A counting sort:
    O(nnz + n_cols) time, O(n_cols) scratch, sequential (it runs once per topology change).
"""

import numba
import numpy as np

from kernels import config


@numba.njit(cache=config.CACHE, boundscheck=False)
def _transpose_kernel(indptr, indices, t_indptr, t_indices, t_perm):
    # (positions and indices unsigned, as in spmm.py: no wraparound code per nonzero)
    n_rows = indptr.shape[0] - 1
    n_cols = t_indptr.shape[0] - 1
    for j in range(n_cols + 1):
        t_indptr[j] = 0
    one = numba.uint64(1)
    for p in range(numba.uint64(indptr[n_rows])):
        t_indptr[numba.uint64(indices[p]) + one] += 1
    for j in range(n_cols):
        t_indptr[j + 1] += t_indptr[j]
    nxt = t_indptr[:n_cols].copy()
    for i in range(n_rows):
        for p in range(numba.uint64(indptr[i]), numba.uint64(indptr[i + 1])):
            c = numba.uint64(indices[p])
            q = numba.uint64(nxt[c])
            t_indices[q] = i
            t_perm[q] = p
            nxt[c] = q + one


def transpose(indptr, indices, n_cols):
    """Launcher: returns (t_indptr, t_indices, t_perm) in the index dtype of ``indices``."""
    nnz = int(indptr[-1])
    dt = indices.dtype
    t_indptr = np.empty(n_cols + 1, dtype=dt)
    t_indices = np.empty(nnz, dtype=dt)
    t_perm = np.empty(nnz, dtype=dt)
    _transpose_kernel(indptr, indices, t_indptr, t_indices, t_perm)
    return t_indptr, t_indices, t_perm
