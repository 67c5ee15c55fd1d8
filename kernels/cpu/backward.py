"""A sparse layer's backward in one pass over its nonzeros: dX = Wᵀ·dY and dW = (dY·Xᵀ) at W's
pattern together (the standalone spmm_t and sddmm stay; the engine picks this where it wins).

Maths:    dX[j, b] = Σ_{i : (i, j) in W} W[i, j] · dY[i, b]        (zeroed where gate <= 0)
          dW[p]    = Σ_b dY[i, b] · X[j, b]        for the entry p = (i, j) of W
          bias_grad[i] = Σ_b dY[i, b]              (optional)
Buffers:  t_indptr (n+1,), t_indices (nnz,), t_perm (nnz,) int32|int64: W's transpose structure
          (column j's rows t_indices[t_indptr[j]:t_indptr[j+1]], ascending; their entries sit
          at data[t_perm[...]] in CSR order)                                             [in]
          data (nnz,) float32, W's values in CSR order                                  [in]
          dY (m, B), X (n, B) float32, C-contiguous                                     [in]
          dw (nnz,) float32, in W's CSR order; dx (n, B) float32: every element written [out]
          blocks (T+1,) int64 column blocks balanced by nonzeros (row_blocks of t_indptr)  [in]
          bias_grad (m,) float32 or None                                               [out]
          gate (n, B) float32 or None: dX zeroed where gate <= 0 (the fused ReLU backward)  [in]
Cost:     4·nnz·B flops. The pass goes column by column: X[j] and the dX[j] being summed stay in
          L1 while one dY row per nonzero streams by, and each dY row serves both products (the
          two standalone kernels load a random dY row and a random X row per nonzero). The price:
          dW is written in CSC order, i.e. at scattered positions t_perm[q] (4 bytes each), which
          stays cheap while dW fits in cache: kernels/config.FUSED_BACKWARD_MAX_NNZ (default from
          the machine's L2) decides when the engine uses this pass.
Threads:  prange over column blocks; a thread owns whole rows of dX and the dW entries of its
          columns: no races, no atomics. Four nonzeros of a column per pass over b (four dot
          products and one dX update per vector of the batch).
Requires: a canonical pattern (trusted); the transpose structure of the same pattern.
"""

import numba
import numpy as np

from kernels import config
from kernels.cpu._common import U1, U4, four_at, span
from kernels.machine import cache_sizes


@numba.njit(parallel=True, fastmath=config.FASTMATH, cache=config.CACHE, boundscheck=False)
def _backward(t_indptr, t_indices, t_perm, data, dy, x, dw, dx, blocks, gate, has_gate):
    n_batch = dy.shape[1]
    for t in numba.prange(blocks.shape[0] - 1):
        for j in range(blocks[t], blocks[t + 1]):
            for b in range(n_batch):
                dx[j, b] = 0.0
            q, end = span(t_indptr, j)  # (unsigned: see spmm.py's header)
            while q + U4 <= end:
                i0, i1, i2, i3 = four_at(t_indices, q)
                p0, p1, p2, p3 = four_at(t_perm, q)
                v0 = data[p0]
                v1 = data[p1]
                v2 = data[p2]
                v3 = data[p3]
                s0 = numba.float32(0.0)
                s1 = numba.float32(0.0)
                s2 = numba.float32(0.0)
                s3 = numba.float32(0.0)
                for b in range(n_batch):
                    g0 = dy[i0, b]
                    g1 = dy[i1, b]
                    g2 = dy[i2, b]
                    g3 = dy[i3, b]
                    xj = x[j, b]
                    dx[j, b] += v0 * g0 + v1 * g1 + v2 * g2 + v3 * g3
                    s0 += g0 * xj
                    s1 += g1 * xj
                    s2 += g2 * xj
                    s3 += g3 * xj
                dw[p0] = s0
                dw[p1] = s1
                dw[p2] = s2
                dw[p3] = s3
                q += U4
            while q < end:
                i0 = numba.uint64(t_indices[q])
                p0 = numba.uint64(t_perm[q])
                v0 = data[p0]
                s0 = numba.float32(0.0)
                for b in range(n_batch):
                    g0 = dy[i0, b]
                    dx[j, b] += v0 * g0
                    s0 += g0 * x[j, b]
                dw[p0] = s0
                q += U1
            if has_gate:
                for b in range(n_batch):
                    if not gate[j, b] > 0:
                        dx[j, b] = 0.0


@numba.njit(parallel=True, fastmath=config.FASTMATH, cache=config.CACHE, boundscheck=False)
def _row_sums(dy, out):
    for i in numba.prange(dy.shape[0]):
        s = numba.float32(0.0)
        for b in range(dy.shape[1]):
            s += dy[i, b]
        out[i] = s


_NO_GATE = np.zeros((1, 1), dtype=np.float32)


def backward(t_indptr, t_indices, t_perm, data, dy, x, dw, dx, blocks, bias_grad=None, gate=None):
    """Launcher (trusts its inputs). Fills ``dw`` (nnz,), ``dx`` (n, B) and ``bias_grad``."""
    if bias_grad is not None and bias_grad.shape[0]:
        if dy.shape[1]:
            _row_sums(dy, bias_grad)
        else:
            bias_grad[:] = 0
    if dy.shape[1] == 0:  # empty sums; dx has no columns
        dw[:] = 0
        return dx
    if dx.shape[0]:
        has_gate = gate is not None
        _backward(
            t_indptr, t_indices, t_perm, data, dy, x, dw, dx, blocks,
            gate if has_gate else _NO_GATE, has_gate,
        )  # fmt: skip
    return dx


# L2 bytes per nonzero of the fused pass's working set: dW's 4 bytes, and the L2 it leaves to the
# streaming dY rows (the crossover measured between 335k and 419k nonzeros on 2 x 1 MiB of L2)
FUSED_L2_BYTES_PER_NNZ = 6


def fused_pays(nnz: int) -> bool:
    """Whether the engine should take this pass for a layer of ``nnz`` nonzeros: while dW's
    scattered writes stay in cache (config.FUSED_BACKWARD_MAX_NNZ; None: the L2 of the kernel
    threads' cores / FUSED_L2_BYTES_PER_NNZ, from kernels/machine.py). Measured on AMD EPYC
    (1 MiB L2 per core, 2 cores, B = 128), against the standalone kernels with unsigned indexing:
    1.15-1.39x from 52k to 335k nonzeros, 0.90x at 419k, 0.98x at 503k, 0.65x at 2.7M; so dW
    (4 bytes per nonzero) pays while it takes up to about 2/3 of the L2."""
    limit = config.FUSED_BACKWARD_MAX_NNZ
    if limit is None:  # the L2 of the cores this process runs its kernels on
        caches = cache_sizes()
        l2 = caches.l2 * max(1, numba.get_num_threads() // max(1, caches.l2_shared))
        limit = l2 // FUSED_L2_BYTES_PER_NNZ
    return 0 < nnz <= limit
