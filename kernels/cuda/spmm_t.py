"""dX = Wᵀ·dY on the GPU, through W's transpose structure (race-free, no atomics).

Same arguments as kernels/cpu/spmm_t.py. The transpose structure (t_indptr, t_indices, t_perm)
is W in CSC form; dX is then the forward product of Wᵀ stored as CSR, run by spmm.cu with the
value gather data[t_perm[p]] fused into the product (no permuted copy of the values, so
``t_data`` is accepted for the shared signature and unused; ``blocks`` likewise).
"""

from __future__ import annotations

from kernels.cuda import _module
from kernels.cuda import spmm as _spmm
from kernels.cuda._module import Launch


def plan(t_indptr, t_indices, t_perm, data, dy, out, gate=None) -> Launch:
    return _spmm.plan(t_indptr, t_indices, data, dy, out, perm=t_perm, gate=gate)


def spmm_t(t_indptr, t_indices, t_perm, data, dy, out, blocks=None, t_data=None, gate=None):
    """Launcher (trusts its inputs). Fills and returns ``out`` (n, B); asynchronous.

    ``gate`` (n, B): dX is zeroed where gate <= 0 (the fused backward of the ReLU whose output
    is this layer's input)."""
    if out.shape[0] and out.shape[1]:
        _module.launch(plan(t_indptr, t_indices, t_perm, data, dy, out, gate=gate))
    return out
