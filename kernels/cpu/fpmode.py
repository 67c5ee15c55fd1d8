"""Flush-to-zero / denormals-are-zero for the threads that run the kernels (x86 MXCSR).

x86 cores compute with subnormal floats (|x| < 1.2e-38 in float32) through a microcode assist
10-100x slower than normal arithmetic. Training produces them: confident softmax probabilities
underflow, and so do small gradients multiplied through a few layers; with 1% of dY subnormal a
784-4096-4096-10 step measured 2-4x slower. Setting MXCSR's FTZ (bit 15: results that would be
subnormal become 0) and DAZ (bit 6: subnormal inputs read as 0) makes that arithmetic full speed;
values below 1.2e-38 then count as zero, which changes no gradient step measurably (GPUs and most
deep-learning runtimes train this way).

MXCSR is per thread, so ``set_flush(True)`` sets it on the calling thread and on every thread of
Numba's pool (one parallel iteration per thread; checked by thread id). It does not reach the BLAS
library's threads (the grow flushes its sgemm inputs itself, kernels/cpu/grow.py). Elsewhere than
x86-64 it does nothing and reports False.
"""

import platform

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

FTZ_DAZ = 0x8040
X86 = platform.machine().lower() in ("x86_64", "amd64")


@intrinsic
def _mxcsr_update(typingctx, set_bits, clear_bits):
    """MXCSR = (MXCSR | set_bits) & ~clear_bits; returns the previous MXCSR."""
    sig = types.int32(types.int32, types.int32)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        i8p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i8p])
        stmxcsr = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.stmxcsr")
        ldmxcsr = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.ldmxcsr")
        slot = cgutils.alloca_once(builder, i32)
        ptr = builder.bitcast(slot, i8p)
        builder.call(stmxcsr, [ptr])
        old = builder.load(slot)
        new = builder.and_(builder.or_(old, args[0]), builder.not_(args[1]))
        builder.store(new, slot)
        builder.call(ldmxcsr, [ptr])
        return old

    return sig, codegen


@numba.njit(cache=False)
def _update_here(set_bits, clear_bits):
    return _mxcsr_update(np.int32(set_bits), np.int32(clear_bits))


@numba.njit(parallel=True, cache=False)
def _update_pool(set_bits, clear_bits, seen, n_iter):
    for _t in numba.prange(n_iter):
        _mxcsr_update(np.int32(set_bits), np.int32(clear_bits))
        seen[numba.get_thread_id()] = 1


def set_flush(enable: bool = True) -> bool:
    """Turn FTZ/DAZ on (or off) for this thread and Numba's threads. Returns True if it was
    applied everywhere, False where the platform has no MXCSR (or, with a warning, when some pool
    thread could not be reached)."""
    if not X86:
        return False
    set_bits, clear_bits = (FTZ_DAZ, 0) if enable else (0, FTZ_DAZ)
    _update_here(set_bits, clear_bits)
    n = numba.get_num_threads()
    seen = np.zeros(numba.config.NUMBA_NUM_THREADS, np.int8)
    for attempt in range(1, 9):  # static scheduling gives each thread one iteration; verify
        _update_pool(set_bits, clear_bits, seen, n * attempt)
        if seen[:n].all():
            return True
    import warnings

    warnings.warn(
        f"FTZ/DAZ reached {int(seen[:n].sum())} of {n} Numba threads (threading layer "
        f"{numba.threading_layer()}); subnormal floats may slow the others",
        RuntimeWarning,
        stacklevel=2,
    )
    return False


def flushing() -> bool:
    """Whether FTZ and DAZ are both on in the calling thread."""
    if not X86:
        return False
    old = _update_here(0, 0)
    return (int(old) & FTZ_DAZ) == FTZ_DAZ
