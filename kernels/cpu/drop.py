"""Magnitude drop: the positions of the k entries of smallest |w|.

Order: (|w| ascending, position ascending), so ties are broken by the lower CSR position and
the result is deterministic. Returns int64 positions in ascending order (not in |w| order).
Cost: O(nnz) time (one partition to find the k-th smallest magnitude, two comparisons), O(nnz)
scratch (the magnitudes). Requires finite values (the public API checks).
The magnitudes are compared as bits (the float32 with its sign cleared, read as int32: ordered
like |w| for every finite value, subnormals included, +0 equal to -0), so the result does not
depend on the floating-point mode: under denormals-are-zero (training's flush_denormals) or on
the GPU (CuPy compiles with -ftz=true) a float compare would tie subnormal weights with zeros.
"""

import numpy as np

_KEY_TYPES = {2: np.int16, 4: np.int32, 8: np.int64}


def magnitude_keys(xp, data):
    """|data| as ordered integers: the float's bits with the sign cleared (float16, 32, 64, in
    native byte order: a swapped array is converted; ``xp`` numpy or cupy). Two finite values
    compare like their magnitudes, in any FP mode. Another dtype (long double) is ranked by its
    abs() as it is."""
    kind = _KEY_TYPES.get(data.dtype.itemsize) if data.dtype.kind == "f" else None
    if kind is None:
        return xp.abs(data)
    if not data.dtype.isnative:  # the bits of a byte-swapped float are not its order
        data = data.astype(data.dtype.newbyteorder("="))
    return xp.bitwise_and(data.view(kind), kind(np.iinfo(kind).max))


def magnitude_drop(data, k):
    nnz = data.shape[0]
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if k >= nnz:
        return np.arange(nnz, dtype=np.int64)
    mag = magnitude_keys(np, data)  # |w| as ordered bits
    kth = np.partition(mag, k - 1)[k - 1]
    below = np.flatnonzero(mag < kth)
    ties = np.flatnonzero(mag == kth)[: k - below.shape[0]]
    out = np.concatenate((below, ties)).astype(np.int64, copy=False)
    out.sort()
    return out
