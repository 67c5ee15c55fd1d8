"""The transpose structure of a CSR pattern on the GPU (CuPy array ops).

transpose(indptr, indices, n_cols) -> (t_indptr, t_indices, t_perm), as kernels/cpu/structure.py:
column j holds rows t_indices[t_indptr[j]:t_indptr[j+1]] (ascending) whose values sit at
data[t_perm[...]]. Method: sort the entries by the unique key col·m + row (cupy.argsort, a radix
sort), then find column starts with cupy.searchsorted. O(nnz log) work, once per topology change.
"""

from __future__ import annotations

import numpy as np

from kernels.cuda._module import array_module


def transpose(indptr, indices, n_cols):
    """Launcher: returns (t_indptr, t_indices, t_perm) in the index dtype of ``indices``."""
    cupy = array_module(indptr)  # numpy in the emulated tests

    m = indptr.shape[0] - 1
    nnz = indices.shape[0]
    dt = indices.dtype
    rows = cupy.searchsorted(indptr[1:], cupy.arange(nnz, dtype=indptr.dtype), side="right")
    key = indices.astype(np.int64) * max(m, 1) + rows
    t_perm = cupy.argsort(key)
    cols_sorted = indices[t_perm]
    t_indptr = cupy.searchsorted(cols_sorted, cupy.arange(n_cols + 1, dtype=dt), side="left")
    return t_indptr.astype(dt), rows[t_perm].astype(dt), t_perm.astype(dt)
