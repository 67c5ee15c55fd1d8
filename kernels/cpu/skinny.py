"""Dense products of a layer with few outputs (a classifier: m ≤ config.SKINNY_MAX_ROWS), where
BLAS runs far below its peak because one dimension is tiny.

Maths:    forward   Y[i, b]  = bias[i] + Σ_j W[i, j] X[j, b]           (W m × n, X n × B)
          weight    gW[i, j] = Σ_b dY[i, b] X[j, b];  gb[i] = Σ_b dY[i, b]
          input     dX[j, b] = Σ_i W[i, j] dY[i, b], zeroed where gate[j, b] <= 0 (fused ReLU
                    backward; gate = the ReLU's output) when a gate is given
Buffers:  W (m, n) float32 C-contiguous; X (n, B), dY (m, B) float32 C-contiguous   [in]
          Y (m, B), gW (m, n), gb (m,), dX (n, B) float32, overwritten                [out]
          partial (T, m, B) float32 scratch of the forward (one slab per thread)      [tmp]
Cost:     2·m·n·B flops each. The wide dimension n is split across threads; each row of X (or
          of dX) is loaded once and used against all m rows of W / dY, which stay in L1
          (m·B floats): about m/2 flops per byte streamed instead of BLAS's packing overhead.
Threads:  forward: prange over n-chunks into per-thread partial sums, then a parallel reduction
          over the m·B outputs; backward: prange over n-chunks, each thread owns its rows of dX
          and its columns of gW (no races); gb is summed serially (m·B adds).
"""

import numba
import numpy as np

from kernels import config
from kernels.cpu._common import chunk


def _chunks(n: int) -> int:
    """Forward: one slab of partial sums per thread (equal work per chunk)."""
    return max(1, min(numba.get_num_threads(), n // 64))


@numba.njit(parallel=True, fastmath=config.FASTMATH, cache=config.CACHE, boundscheck=False)
def _forward(W, x, bias, partial, out):
    m, n = W.shape
    n_batch = x.shape[1]
    n_chunks = partial.shape[0]
    for t in numba.prange(n_chunks):
        for i in range(m):
            for b in range(n_batch):
                partial[t, i, b] = 0.0
        j = t * n // n_chunks
        end = (t + 1) * n // n_chunks
        while j + 4 <= end:  # four rows of X per pass over the L1-resident partial sums
            for i in range(m):
                w0 = W[i, j]
                w1 = W[i, j + 1]
                w2 = W[i, j + 2]
                w3 = W[i, j + 3]
                for b in range(n_batch):
                    partial[t, i, b] += (
                        w0 * x[j, b] + w1 * x[j + 1, b] + w2 * x[j + 2, b] + w3 * x[j + 3, b]
                    )
            j += 4
        while j < end:
            for i in range(m):
                w0 = W[i, j]
                for b in range(n_batch):
                    partial[t, i, b] += w0 * x[j, b]
            j += 1
    for i in numba.prange(m):
        for b in range(n_batch):
            s = bias[i]
            for t in range(n_chunks):
                s += partial[t, i, b]
            out[i, b] = s


@numba.njit(parallel=True, fastmath=config.FASTMATH, cache=config.CACHE, boundscheck=False)
def _backward(W, x, dy, gW, gb, dx, gate, need_dx, has_gate):
    m, n = W.shape
    n_batch = x.shape[1]
    n_chunks = max(1, min(64, n // 64))
    for t in numba.prange(n_chunks):
        # (an unsigned counter: no wraparound code; see spmm.py's header)
        for j in range(*chunk(t, n, n_chunks)):
            for i in range(m):
                s = numba.float32(0.0)
                for b in range(n_batch):
                    s += dy[i, b] * x[j, b]
                gW[i, j] = s
            if need_dx:
                for b in range(n_batch):
                    dx[j, b] = 0.0
                for i in range(m):
                    w = W[i, j]
                    for b in range(n_batch):
                        dx[j, b] += w * dy[i, b]
                if has_gate:
                    for b in range(n_batch):
                        if not gate[j, b] > 0:
                            dx[j, b] = 0.0
    for i in range(m):
        s = numba.float32(0.0)
        for b in range(n_batch):
            s += dy[i, b]
        gb[i] = s


_NO_GATE = np.zeros((1, 1), dtype=np.float32)


def forward(W, x, bias, out, partial=None):
    """Launcher (trusts its inputs). Fills and returns ``out`` (m, B)."""
    m, n = W.shape
    if partial is None or partial.shape[1:] != (m, x.shape[1]):
        partial = np.empty((_chunks(n), m, x.shape[1]), np.float32)
    _forward(W, x, bias, partial, out)
    return out


def backward(W, x, dy, gW, gb, dx=None, gate=None):
    """Launcher (trusts its inputs). Fills gW, gb and (when given) dx; returns dx."""
    need_dx = dx is not None
    has_gate = gate is not None
    _backward(
        W,
        x,
        dy,
        gW,
        gb,
        dx if need_dx else _NO_GATE,
        gate if has_gate else _NO_GATE,
        need_dx,
        has_gate,
    )
    return dx
