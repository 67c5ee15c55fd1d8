"""A CSR's values into a dense array and back: what a layer computing on BLAS (the dense
fallback, sparsecore/fallback.py) does with its nnz-sized values each step.

Maths:    scatter   dense[i, indices[p]] = data[p]      for every stored entry p of row i
          gather    out[p] = dense[i, indices[p]]
          clear     dense[i, indices[p]] = 0            (the entries of an old pattern)
Buffers:  indptr (m+1,), indices (nnz,) int32|int64: a canonical CSR pattern             [in]
          data / out (nnz,) float32; dense (m, n) float32 C-contiguous            [in / out]
          blocks (T+1,) int64 row-block boundaries (_common.row_blocks)                  [in]
Cost:     O(nnz) each, rows in parallel; a row's writes (or reads) fall in one dense row, in
          ascending column order. The dense array itself is zeroed once per pattern (a topology
          update clears the old entries and scatters the new ones: no O(m·n) pass per step).
Requires: indices in [0, n) (trusted: the pattern is the engine's own, validated on entry).
          Positions and indices are read unsigned (no wraparound code: see spmm.py's header).
"""

import numba

from kernels import config


@numba.njit(parallel=True, cache=config.CACHE, boundscheck=False)
def _scatter(indptr, indices, data, dense, blocks):
    for t in numba.prange(blocks.shape[0] - 1):
        for i in range(blocks[t], blocks[t + 1]):
            for p in range(numba.uint64(indptr[i]), numba.uint64(indptr[i + 1])):
                dense[i, numba.uint64(indices[p])] = data[p]


@numba.njit(parallel=True, cache=config.CACHE, boundscheck=False)
def _clear(indptr, indices, dense, blocks):
    for t in numba.prange(blocks.shape[0] - 1):
        for i in range(blocks[t], blocks[t + 1]):
            for p in range(numba.uint64(indptr[i]), numba.uint64(indptr[i + 1])):
                dense[i, numba.uint64(indices[p])] = 0.0


@numba.njit(parallel=True, cache=config.CACHE, boundscheck=False)
def _gather(indptr, indices, dense, out, blocks):
    for t in numba.prange(blocks.shape[0] - 1):
        for i in range(blocks[t], blocks[t + 1]):
            for p in range(numba.uint64(indptr[i]), numba.uint64(indptr[i + 1])):
                out[p] = dense[i, numba.uint64(indices[p])]


def scatter(indptr, indices, data, dense, blocks):
    """dense[pattern] = data (other entries untouched). Returns dense."""
    if indices.shape[0]:
        _scatter(indptr, indices, data, dense, blocks)
    return dense


def clear(indptr, indices, dense, blocks):
    """dense[pattern] = 0. Returns dense."""
    if indices.shape[0]:
        _clear(indptr, indices, dense, blocks)
    return dense


def gather(indptr, indices, dense, out, blocks):
    """out = dense[pattern], in CSR order. Returns out."""
    if indices.shape[0]:
        _gather(indptr, indices, dense, out, blocks)
    return out
