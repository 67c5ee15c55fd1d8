"""Y = W·X on the GPU: launcher of kernels/cuda/spmm.cu (same arguments as kernels/cpu/spmm.py).

The launcher trusts its inputs (the public API in kernels/__init__.py validates): CuPy arrays,
indptr/indices of one dtype (int32 or int64), data/x/out/bias float32 C-contiguous.
``blocks`` (the CPU's thread partition) is accepted for the shared signature and ignored: the GPU
maps one thread to one output element (see spmm.cu).
"""

from __future__ import annotations

import numpy as np

from kernels import config
from kernels.cuda import _module
from kernels.cuda._module import Launch, cdiv, index_suffix

MAX_GRID_Y = 65535


def block_shape(batch: int) -> tuple[int, int]:
    """(BX, BY): BX threads across the batch (a multiple of 32, at most 128), BY rows."""
    bx = min(128, 32 * cdiv(max(batch, 1), 32))
    by = max(1, config.CUDA_THREADS_PER_BLOCK // bx)
    return bx, by


def _address(a) -> int:
    """Device (CuPy) or host (NumPy stand-in) address of an array's first element."""
    ptr = getattr(a.data, "ptr", None)
    return int(ptr) if ptr is not None else int(a.ctypes.data)


def vector_width(batch: int, *arrays) -> int:
    """4 when the float4 kernel applies (B % 4 == 0, every array 16-byte aligned), else 1."""
    if not config.CUDA_SPMM_FLOAT4 or batch % 4:
        return 1
    return 4 if all(_address(a) % 16 == 0 for a in arrays if a is not None) else 1


def plan(indptr, indices, data, x, out, bias=None, perm=None, relu=False, gate=None) -> Launch:
    """The launch of out = W·x (+ bias), with values data[perm[p]] when perm is given, then the
    fused ReLU (relu) or ReLU-backward gate (gate), as the CPU twin."""
    m, batch = out.shape
    _module.require_contiguous(
        "spmm",
        indptr=indptr,
        indices=indices,
        data=data,
        perm=perm,
        x=x,
        bias=bias,
        gate=gate,
        out=out,
    )
    vec = vector_width(batch, x, out, gate)
    bx, by = block_shape(batch // vec)
    grid_y = cdiv(batch // vec, bx)
    if grid_y > MAX_GRID_Y:
        raise ValueError(f"batch {batch} exceeds the GPU spmm limit of {MAX_GRID_Y * bx} columns")
    grid = (cdiv(m, by) if batch else 0, grid_y, 1)
    args = (
        indptr,
        indices,
        data,
        perm if perm is not None else indices,  # a valid pointer, never read
        np.int32(perm is not None),
        x,
        bias if bias is not None else data,  # a valid pointer, never read
        np.int32(bias is not None),
        np.int32(bool(relu)),
        gate if gate is not None else out,  # a valid pointer, never read
        np.int32(gate is not None),
        out,
        np.int64(m),
        np.int64(batch),
    )
    name = "sparsecore_spmm4" if vec == 4 else "sparsecore_spmm"
    kernel = f"{name}_{index_suffix(indices.dtype)}"
    return Launch("spmm.cu", kernel, grid, (bx, by, 1), args)


def spmm(indptr, indices, data, x, out, blocks=None, bias=None, relu=False, gate=None):
    """Launcher (trusts its inputs). Fills and returns ``out`` (m, B); asynchronous.

    ``relu`` applies a following ReLU; ``gate`` (m, B) zeroes out where gate <= 0."""
    if out.shape[0] and out.shape[1]:
        _module.launch(plan(indptr, indices, data, x, out, bias=bias, relu=relu, gate=gate))
    return out
