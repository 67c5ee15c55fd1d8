"""Merge a CSR pattern with dropped and grown entries into a new canonical CSR.

Inputs:   indptr (m+1,), indices (nnz,) canonical (sorted, unique per row)              [in]
          keep (nnz,) bool: False marks a dropped entry                                 [in]
          grow_indptr (m+1,), grow_cols (g,): grown entries grouped by row, columns
          ascending within a row, none equal to a kept entry                           [in]
Outputs:  new_indptr (m+1,), new_indices (kept + g,), canonical
          src (kept + g,) int64: for each new entry, its position in the old arrays, or -1 for
          a connection that did not exist before. A connection dropped and regrown in the same
          update points to its old position: it keeps its weight and optimizer state (RigL's
          official behaviour); truly new ones get -1 and start at zero (see remap).
Cost:     O(nnz + g) time in two parallel passes over rows (count, then fill after a prefix
          sum); the caller sorts grown entries in O(g log g) if they are not already in order.
Conflicts (a grown entry equal to a kept one) are counted, and the launcher raises.
"""

import numba
import numpy as np

from kernels import config
from kernels.cpu._common import U1, chunk


@numba.njit(parallel=True, cache=config.CACHE, boundscheck=False)
def _merge_count(indptr, indices, keep, grow_indptr, grow_cols, counts):
    n_rows = indptr.shape[0] - 1
    conflicts = 0
    for i in numba.prange(n_rows):
        n_kept = 0
        for p in range(indptr[i], indptr[i + 1]):
            if keep[p]:
                n_kept += 1
        # a grown column that equals a kept one is a conflict; count by a two-pointer walk
        p = indptr[i]
        pe = indptr[i + 1]
        bad = 0
        for q in range(grow_indptr[i], grow_indptr[i + 1]):
            c = grow_cols[q]
            while p < pe and indices[p] < c:
                p += 1
            if p < pe and indices[p] == c and keep[p]:
                bad += 1
        counts[i] = n_kept + (grow_indptr[i + 1] - grow_indptr[i]) - bad
        conflicts += bad
    return conflicts


@numba.njit(parallel=True, cache=config.CACHE, boundscheck=False)
def _merge_fill(indptr, indices, keep, grow_indptr, grow_cols, new_indptr, new_indices, src):
    n_rows = indptr.shape[0] - 1
    for i in numba.prange(n_rows):
        # (unsigned positions: no wraparound code; see spmm.py's header)
        w = numba.uint64(new_indptr[i])
        p = numba.uint64(indptr[i])
        pe = numba.uint64(indptr[i + 1])
        q = numba.uint64(grow_indptr[i])
        qe = numba.uint64(grow_indptr[i + 1])
        while p < pe or q < qe:
            if q < qe and (p >= pe or grow_cols[q] < indices[p]):
                new_indices[w] = grow_cols[q]  # new connection
                src[w] = -1
                w += U1
                q += U1
            elif q < qe and grow_cols[q] == indices[p]:
                new_indices[w] = grow_cols[q]  # dropped and regrown: keeps its old state
                src[w] = p
                w += U1
                p += U1
                q += U1
            else:
                if keep[p]:
                    new_indices[w] = indices[p]
                    src[w] = p
                    w += U1
                p += U1


def merge(indptr, indices, keep, grow_indptr, grow_cols):
    """Launcher. Returns (new_indptr, new_indices, src, conflicts) in the index dtype of indptr."""
    n_rows = indptr.shape[0] - 1
    counts = np.empty(n_rows, dtype=np.int64)
    conflicts = _merge_count(indptr, indices, keep, grow_indptr, grow_cols, counts)
    new_indptr = np.zeros(n_rows + 1, dtype=indptr.dtype)
    np.cumsum(counts, out=new_indptr[1:])
    nnz = int(new_indptr[-1])
    new_indices = np.empty(nnz, dtype=indices.dtype)
    src = np.empty(nnz, dtype=np.int64)
    if conflicts == 0:
        _merge_fill(indptr, indices, keep, grow_indptr, grow_cols, new_indptr, new_indices, src)
    return new_indptr, new_indices, src, int(conflicts)


@numba.njit(parallel=True, cache=config.CACHE, boundscheck=False)
def _remap(src, values, fill, out):
    n = src.shape[0]
    n_chunks = max(1, min(64, n // 8192))
    for t in numba.prange(n_chunks):
        # (unsigned counter: no wraparound code; see spmm.py's header)
        for w in range(*chunk(t, n, n_chunks)):
            s = src[w]
            out[w] = values[numba.uint64(s)] if s >= 0 else fill


# the dtypes the kernel is compiled for (Numba has no float16)
_NUMBA_DTYPES = {np.dtype(t) for t in (np.bool_, np.float32, np.float64)} | {
    np.dtype(f"{k}{b}") for k in "iu" for b in (1, 2, 4, 8)
}


def remap(src, values, fill=0.0, out=None):
    """Carry a per-nonzero array to a merged pattern: out[w] = values[src[w]], fill if src<0.

    One parallel pass (the NumPy masks it replaces took 13 ms per 1.2 M-entry array, three
    arrays per layer per topology update). ``src`` is the merge's own output or checked by the
    public ``kernels.remap`` (entries in [-1, len(values))), trusted here."""
    if out is None:
        out = np.empty(src.shape[0], dtype=values.dtype)
    if (
        values.dtype not in _NUMBA_DTYPES
        or out.dtype != values.dtype
        or src.dtype.kind not in "iu"
        or values.ndim != 1
        or out.shape != src.shape
        or not out.flags.writeable
        or np.may_share_memory(out, values)
        or np.may_share_memory(out, src)
    ):  # (other dtypes, e.g. float16, an out over an input, or a malformed call: NumPy's masks,
        # which gather before they write and raise as they always did)
        old = src >= 0
        out[old] = values[src[old]]
        out[~old] = fill
        return out
    fill = out.dtype.type(fill)  # (a fill the dtype cannot hold raises, as NumPy's masks did)
    if src.shape[0]:
        _remap(src, values, fill, out)
    return out
