"""Magnitude drop on the GPU: positions of the k entries of smallest |w| (CuPy array ops).

Same contract as kernels/cpu/drop.py: order (|w| ascending, position ascending), result int64
positions in ascending order. Magnitudes are compared as integer bits, as on the CPU
(cpu/drop.magnitude_keys): CuPy's elementwise kernels are compiled with -ftz=true, so cupy.abs
and float compares would flush subnormal weights to zero and tie them with true zeros.
Implemented with CuPy primitives rather than a custom kernel: one selection (cupy.partition)
for the k-th smallest magnitude, two comparisons with stream compaction (cupy.flatnonzero) and
a sort of the k positions. O(nnz) device scratch; it runs once per topology update, far from the
hot path.
"""

from __future__ import annotations

import numpy as np

from kernels.cpu.drop import magnitude_keys
from kernels.cuda._module import array_module


def magnitude_drop(data, k):
    cupy = array_module(data)  # numpy in the emulated tests

    nnz = data.shape[0]
    if k <= 0:
        return cupy.empty(0, dtype=np.int64)
    if k >= nnz:
        return cupy.arange(nnz, dtype=np.int64)
    mag = magnitude_keys(cupy, data)  # |w| as ordered bits
    kth = cupy.partition(mag, k - 1)[k - 1]
    below = cupy.flatnonzero(mag < kth)
    ties = cupy.flatnonzero(mag == kth)[: k - below.shape[0]]
    out = cupy.concatenate((below, ties)).astype(np.int64, copy=False)
    out.sort()
    return out
