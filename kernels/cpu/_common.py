"""Helpers shared by the CPU launchers: thread blocks balanced by nonzeros."""

import numba
import numpy as np

from kernels import config

# unsigned offsets for the kernels' position counters: an index of a signed type makes Numba
# emit negative-index wraparound code on every load (compare, conditional move, add), which
# measured 1.4-2x slower on the per-nonzero loops of small batches (bench/RESULTS.md); with an
# unsigned counter plus these (uint64 + int64 would be float64 in Numba's typing) there is none
# (span and four_at below are inlined into the cached kernels of other files: Numba's on-disk
# cache checks only the calling file, so after editing them clear kernels/cpu/__pycache__)
U1, U2, U3, U4 = (np.uint64(v) for v in (1, 2, 3, 4))


@numba.njit(inline="always")
def span(indptr, i):
    """Row (or column) i's positions [start, end) as unsigned counters."""
    return numba.uint64(indptr[i]), numba.uint64(indptr[i + 1])


@numba.njit(inline="always")
def chunk(t, n, n_chunks):
    """Chunk t of n_chunks equal chunks of range(n), as unsigned bounds [start, end)."""
    return numba.uint64(t * n // n_chunks), numba.uint64((t + 1) * n // n_chunks)


@numba.njit(inline="always")
def four_at(a, p):
    """a[p], a[p+1], a[p+2], a[p+3] (p unsigned) as unsigned indices: the four nonzeros a
    product loop folds per pass over the batch."""
    return (
        numba.uint64(a[p]),
        numba.uint64(a[p + U1]),
        numba.uint64(a[p + U2]),
        numba.uint64(a[p + U3]),
    )


def row_blocks(indptr: np.ndarray, n_rows: int) -> np.ndarray:
    """Split rows ``0..n_rows`` into contiguous blocks of about equal work.

    Work of a row = its nonzeros + 1 (the +1 is the per-row cost of zeroing/writing an output row,
    which matters for empty rows). Returns int64 boundaries ``b`` with ``b[0] = 0``,
    ``b[-1] = n_rows``, nondecreasing; block t is rows ``b[t]:b[t+1]``. O(blocks · log n_rows).
    """
    n_blocks = max(1, min(n_rows, numba.get_num_threads() * config.BLOCKS_PER_THREAD))
    nnz = int(indptr[n_rows])
    total = nnz + n_rows
    targets = np.linspace(0, total, n_blocks + 1)
    # cumulative work before row i is indptr[i] + i; find the first row whose prefix reaches target
    work = indptr[: n_rows + 1].astype(np.int64) + np.arange(n_rows + 1, dtype=np.int64)
    bounds = np.searchsorted(work, targets, side="left").astype(np.int64)
    bounds[0] = 0
    bounds[-1] = n_rows
    return np.maximum.accumulate(bounds)
