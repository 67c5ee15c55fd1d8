"""dW = (dY·Xᵀ) at W's nonzeros on the GPU: launcher of kernels/cuda/sddmm.cu.

Same arguments as kernels/cpu/sddmm.py (``blocks`` accepted and ignored: a block takes a row at
a time, in a grid-stride loop over the rows).
Trusts its inputs: CuPy arrays, float32 C-contiguous dense operands, one index dtype.
"""

from __future__ import annotations

import numpy as np

from kernels import config
from kernels.cuda import _module
from kernels.cuda._module import Launch, cdiv, index_suffix


def warps_per_row(m: int, nnz: int) -> int:
    """Warps of a row's block: about one per nonzero of an average row, a power of 2 in [1, 8]
    (short rows would leave most warps of a large block idle)."""
    mean = cdiv(nnz, max(m, 1))
    w = 1
    while w < mean and w < config.CUDA_SDDMM_MAX_WARPS:
        w *= 2
    return w


def plan(indptr, indices, dy, x, out, bias_grad=None) -> Launch:
    m, batch = dy.shape
    nnz = out.shape[0]
    _module.require_contiguous(
        "sddmm", indptr=indptr, indices=indices, dy=dy, x=x, out=out, bias_grad=bias_grad
    )
    block = (32 * warps_per_row(m, nnz), 1, 1)
    args = (
        indptr,
        indices,
        dy,
        x,
        out,
        bias_grad if bias_grad is not None else out,  # a valid pointer, never written
        np.int32(bias_grad is not None),
        np.int64(m),
        np.int64(batch),
    )
    kernel = f"sparsecore_sddmm_{index_suffix(indices.dtype)}"
    grid = (min(m, config.CUDA_SDDMM_MAX_BLOCKS), 1, 1)  # the kernel strides over the rows
    return Launch("sddmm.cu", kernel, grid, block, args)


def sddmm(indptr, indices, dy, x, out, blocks=None, bias_grad=None):
    """Launcher (trusts its inputs). Fills and returns ``out`` (nnz,) (and ``bias_grad``)."""
    m, batch = dy.shape
    if m == 0:
        return out
    if batch == 0:  # empty sums
        out.fill(0)
        if bias_grad is not None:
            bias_grad.fill(0)
        return out
    if out.shape[0] or bias_grad is not None:
        _module.launch(plan(indptr, indices, dy, x, out, bias_grad=bias_grad))
    return out
