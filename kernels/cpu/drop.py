"""Magnitude drop: the positions of the k entries of smallest |w|.

Order: (|w| ascending, position ascending), so ties are broken by the lower CSR position and
the result is deterministic. Returns int64 positions in ascending order (not in |w| order).
Cost: O(nnz) time (one partition to find the k-th smallest magnitude, two comparisons), O(nnz)
scratch (the magnitudes). Requires finite values (the public API checks).
"""

import numpy as np


def magnitude_drop(data, k):
    nnz = data.shape[0]
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if k >= nnz:
        return np.arange(nnz, dtype=np.int64)
    mag = np.abs(data)
    kth = np.partition(mag, k - 1)[k - 1]
    below = np.flatnonzero(mag < kth)
    ties = np.flatnonzero(mag == kth)[: k - below.shape[0]]
    out = np.concatenate((below, ties)).astype(np.int64, copy=False)
    out.sort()
    return out
