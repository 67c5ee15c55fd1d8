"""Merge a CSR pattern with dropped and grown entries on the GPU (CuPy array ops).

Same arguments and results as kernels/cpu/merge.py: (indptr, indices, keep, grow_indptr,
grow_cols) -> (new_indptr, new_indices, src, conflicts); ``remap`` carries per-nonzero arrays.
Method: every entry gets the key row·N + col (N = 1 + the largest column present, int64), so
CSR order is ascending key order. Grown keys are looked up in the old keys (cupy.searchsorted:
a hit on a kept entry is a conflict, a hit on a dropped one is "dropped and regrown" and keeps
its old position as src), then kept and grown keys are sorted together (cupy.argsort, a radix
sort) and new_indptr is found by searching row starts. O((nnz + g) log) work in library
primitives instead of a custom merge kernel: it runs once per topology update.
"""

from __future__ import annotations

import numpy as np

from kernels.cuda._module import array_module


def _row_of(indptr, count):
    """Row of each of ``count`` entries of a CSR with row offsets ``indptr`` (int64)."""
    cupy = array_module(indptr)

    return cupy.searchsorted(indptr[1:], cupy.arange(count, dtype=indptr.dtype), side="right")


def merge(indptr, indices, keep, grow_indptr, grow_cols):
    """Launcher. Returns (new_indptr, new_indices, src, conflicts) in the index dtype of indptr."""
    cupy = array_module(indptr)  # numpy in the emulated tests

    m = indptr.shape[0] - 1
    nnz, g = indices.shape[0], grow_cols.shape[0]
    top = [int(a.max()) for a in (indices, grow_cols) if a.shape[0]]
    big_n = 1 + max(top, default=0)
    key_old = _row_of(indptr, nnz).astype(np.int64) * big_n + indices
    key_grow = _row_of(grow_indptr, g).astype(np.int64) * big_n + grow_cols
    if nnz and g:
        pos = cupy.minimum(cupy.searchsorted(key_old, key_grow), nnz - 1)
        hit = key_old[pos] == key_grow
        conflicts = int(cupy.count_nonzero(hit & keep[pos]))
        src_grow = cupy.where(hit, pos, -1).astype(np.int64)
    else:
        conflicts = 0
        src_grow = cupy.full(g, -1, dtype=np.int64)
    if conflicts:
        e = cupy.empty(0, dtype=indices.dtype)
        return cupy.zeros(m + 1, dtype=indptr.dtype), e, cupy.empty(0, np.int64), conflicts
    kept = cupy.flatnonzero(keep).astype(np.int64)
    keys = cupy.concatenate((key_old[kept], key_grow))
    srcs = cupy.concatenate((kept, src_grow))
    order = cupy.argsort(keys)
    keys = keys[order]
    src = srcs[order]
    rows = keys // big_n
    new_indices = (keys - rows * big_n).astype(indices.dtype)
    starts = cupy.arange(m + 1, dtype=np.int64)
    new_indptr = cupy.searchsorted(rows, starts, side="left").astype(indptr.dtype)
    return new_indptr, new_indices, src, conflicts


def remap(src, values, fill=0.0, out=None):
    """Carry a per-nonzero array to a merged pattern: out[w] = values[src[w]], fill if src<0."""
    cupy = array_module(src)

    if out is None:
        out = cupy.empty(src.shape[0], dtype=values.dtype)
    if values.shape[0] == 0:
        out.fill(fill)
        return out
    taken = values[cupy.maximum(src, 0)]
    out[...] = cupy.where(src >= 0, taken, cupy.asarray(fill, dtype=values.dtype))
    return out
