"""Y = W·X on the CPU: a CSR weight times a dense feature-major operand.

Maths:    Y[i, b] = bias[i] + Σ_{p in row i} data[p] · X[indices[p], b]   (bias optional)
Buffers:  indptr (m+1,) int32|int64, indices (nnz,) int32|int64, data (nnz,) float32   [in]
          X (k, B) float32, C-contiguous                                                [in]
          out (m, B) float32, C-contiguous, every element overwritten                  [out]
          blocks (T+1,) int64 row-block boundaries from _common.row_blocks              [in]
          bias (m,) float32 or None: added to every column of Y (the layer's bias)        [in]
          relu: bool; True applies max(·, 0) to Y (a following ReLU, fused)                [in]
          gate (m, B) float32 or None: Y[i, b] is zeroed where gate[i, b] <= 0 (the backward
          of a ReLU whose output is gate, fused into dX = Wᵀ·dY)                         [in]
Cost:     2·nnz·B flops; reads one contiguous X row (4·B bytes) per nonzero, writes m·B floats;
          the ReLU / gate epilogue acts on an output row while it is still in L1.
          Arithmetic intensity is 0.5 flop per byte of X streamed from cache, whatever the density:
          the kernel is bound by L2→core bandwidth, not by the FMA units (see bench/RESULTS.md).
Threads:  one prange iteration per row block (blocks hold about equal nonzeros); a thread owns
          whole output rows: no races, no atomics. Four nonzeros at a time are folded into the
          output row, which stays in L1 (5 loads + 1 store per 4 FMA lanes).
Note:     indexing is 2-D (x[c, b]) on purpose: taking a row view x[c] inside a prange loop makes
          Numba touch the array's reference count atomically on every nonzero, and both cores then
          fight over that cache line (measured 2-5x slower).
Requires: indices in [0, k) (trusted: the public API validates them); columns within a row in
          any order, duplicates summed. Positions and indices are unsigned (numba.uint64, and
          _common.U1..U4 for the offsets): a signed index makes Numba emit negative-index
          wraparound code on every load, measured 1.4-2x slower on the per-nonzero loop of
          small batches (bench/RESULTS.md).
"""

import numba
import numpy as np

from kernels import config
from kernels.cpu._common import U1, U2, U3, U4, four_at, row_blocks, span
from kernels.cpu.panels import spmm_panels


@numba.njit(parallel=True, fastmath=config.FASTMATH, cache=config.CACHE, boundscheck=False)
def _spmm_kernel(indptr, indices, data, x, out, blocks, bias, has_bias, relu, gate, has_gate):
    n_batch = x.shape[1]
    for t in numba.prange(blocks.shape[0] - 1):
        for i in range(blocks[t], blocks[t + 1]):
            b0 = bias[i] if has_bias else numba.float32(0.0)
            for b in range(n_batch):
                out[i, b] = b0
            p, end = span(indptr, i)  # (unsigned: no wraparound code, see the header)
            while p + U4 <= end:
                c0, c1, c2, c3 = four_at(indices, p)
                d0 = data[p]
                d1 = data[p + U1]
                d2 = data[p + U2]
                d3 = data[p + U3]
                for b in range(n_batch):
                    out[i, b] += d0 * x[c0, b] + d1 * x[c1, b] + d2 * x[c2, b] + d3 * x[c3, b]
                p += U4
            while p < end:
                c0 = numba.uint64(indices[p])
                d0 = data[p]
                for b in range(n_batch):
                    out[i, b] += d0 * x[c0, b]
                p += U1
            if relu:
                for b in range(n_batch):
                    v = out[i, b]
                    out[i, b] = v if v > 0 else numba.float32(0.0)
            if has_gate:
                for b in range(n_batch):
                    if not gate[i, b] > 0:
                        out[i, b] = 0.0


@numba.njit(parallel=True, cache=config.CACHE, boundscheck=False)
def _spmm_small(indptr, indices, data, x, out, blocks, bias, has_bias, relu, gate, has_gate):
    """B <= 4: the output row's B values live in registers (s0..s3) for the whole row, instead
    of a load and store of the output slice per group of nonzeros (a dependency chain through
    memory that the batch-vector loop hides only when B is large). No fastmath: with it LLVM
    vectorises the sums over nonzeros with gathers, which are slow on AMD cores; B = 1 keeps
    four partial sums over the nonzeros instead (ILP)."""
    nb = x.shape[1]
    zero = numba.float32(0.0)
    for t in numba.prange(blocks.shape[0] - 1):
        for i in range(blocks[t], blocks[t + 1]):
            s0 = s1 = s2 = s3 = zero
            p, end = span(indptr, i)
            if nb == 1:
                while p + U4 <= end:
                    s0 += data[p] * x[numba.uint64(indices[p]), 0]
                    s1 += data[p + U1] * x[numba.uint64(indices[p + U1]), 0]
                    s2 += data[p + U2] * x[numba.uint64(indices[p + U2]), 0]
                    s3 += data[p + U3] * x[numba.uint64(indices[p + U3]), 0]
                    p += U4
                while p < end:
                    s0 += data[p] * x[numba.uint64(indices[p]), 0]
                    p += U1
                s0 = (s0 + s1) + (s2 + s3)
            else:
                while p < end:
                    c = numba.uint64(indices[p])
                    d = data[p]
                    s0 += d * x[c, 0]
                    s1 += d * x[c, 1]
                    if nb > 2:
                        s2 += d * x[c, 2]
                        if nb > 3:
                            s3 += d * x[c, 3]
                    p += U1
            b0 = bias[i] if has_bias else zero
            for b in range(nb):
                v = (s0 if b == 0 else s1 if b == 1 else s2 if b == 2 else s3) + b0
                if relu and not v > 0:
                    v = zero
                if has_gate and not gate[i, b] > 0:
                    v = zero
                out[i, b] = v


_NO_BIAS = np.zeros(1, dtype=np.float32)
_NO_GATE = np.zeros((1, 1), dtype=np.float32)


def spmm(indptr, indices, data, x, out, blocks=None, bias=None, relu=False, gate=None):
    """Launcher (trusts its inputs; the public API validates). Fills and returns ``out``."""
    if blocks is None:
        blocks = row_blocks(indptr, out.shape[0])
    if out.shape[0] and out.shape[1]:
        has_bias = bias is not None
        has_gate = gate is not None
        kernel = _spmm_small if out.shape[1] <= min(4, config.SMALL_BATCH_MAX) else _spmm_kernel
        kernel(
            indptr,
            indices,
            data,
            x,
            out,
            blocks,
            bias if has_bias else _NO_BIAS,
            has_bias,
            bool(relu),
            gate if has_gate else _NO_GATE,
            has_gate,
        )
    return out


def spmm_batch(indptr, indices, data, x, out, blocks=None):
    """Launcher of the batch-major product (trusts its inputs): x (B, k) -> out (B, m), both
    C-contiguous float32, read and written where they are (kernels/cpu/panels.py)."""
    return spmm_panels(indptr, indices, data, x, out, blocks)
