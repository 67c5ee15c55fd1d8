"""Flush-to-zero / denormals-are-zero for the threads that run the kernels (x86 MXCSR).

x86 cores compute with subnormal floats (|x| < 1.2e-38 in float32) through a microcode assist
10-100x slower than normal arithmetic. Training produces them: confident softmax probabilities
underflow, and so do small gradients multiplied through a few layers; with 1% of dY subnormal a
784-4096-4096-10 step measured 2-4x slower. Setting MXCSR's FTZ (bit 15: results that would be
subnormal become 0) and DAZ (bit 6: subnormal inputs read as 0) makes that arithmetic full speed;
values below 1.2e-38 then count as zero, which changes no gradient step measurably (GPUs and most
deep-learning runtimes train this way).

MXCSR is per thread, so ``flush_denormals()`` (a context manager: the mode holds inside the block
and every thread gets its own bits back on leaving it) and ``set_flush(True)`` set it on the
calling thread and on every thread of Numba's pool (one parallel iteration per thread; checked
by thread id; under Numba's tbb layer TBB itself gives its workers the calling thread's mode at
every parallel call). It does not reach the BLAS library's threads (the grow flushes its sgemm
inputs itself, kernels/cpu/grow.py). Elsewhere than x86-64 it does nothing and reports False.
"""

import contextlib
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
def _update_pool(set_bits, clear_bits, seen, old, n_iter):
    """Apply the update once in every pool thread that has not been reached yet (seen[tid]
    = 0), recording that thread's MXCSR from before (old[tid]). Each slot is written only by
    its own thread."""
    for _t in numba.prange(n_iter):
        tid = numba.get_thread_id()
        if seen[tid] == 0:
            old[tid] = _mxcsr_update(np.int32(set_bits), np.int32(clear_bits))
            seen[tid] = 1


@numba.njit(parallel=True, cache=False)
def _restore_pool(before, done, n_iter):
    """Put back each pool thread's FTZ/DAZ bits as recorded in before[tid] (once per thread)."""
    for _t in numba.prange(n_iter):
        tid = numba.get_thread_id()
        if done[tid] == 0:
            bits = before[tid] & FTZ_DAZ
            _mxcsr_update(np.int32(bits), np.int32(FTZ_DAZ & ~bits))
            done[tid] = 1


def _pool_follows_caller() -> bool:
    """TBB (Numba's tbb layer) runs every parallel call with the floating-point mode of the
    thread that made it, so its workers need no setting of their own (and may not all be
    reached by a short loop). Call after a parallel kernel ran."""
    try:
        return numba.threading_layer() == "tbb"
    except ValueError:
        return False


def _warn_unreached(seen, n):
    import warnings

    warnings.warn(
        f"FTZ/DAZ reached {int(seen[:n].sum())} of {n} Numba threads (threading layer "
        f"{numba.threading_layer()}); subnormal floats may slow the others",
        RuntimeWarning,
        stacklevel=3,
    )


def _apply(enable: bool):
    """Set FTZ/DAZ on this thread and the pool; returns (this thread's MXCSR before, the pool
    threads' MXCSR before, the flags of the pool threads reached)."""
    set_bits, clear_bits = (FTZ_DAZ, 0) if enable else (0, FTZ_DAZ)
    here = int(_update_here(0, 0))  # read first: the calling thread may be one of the pool's
    old = np.zeros(numba.config.NUMBA_NUM_THREADS, np.int32)
    seen, n = _reach_with(set_bits, clear_bits, old)
    _update_here(set_bits, clear_bits)
    return here, old, seen, n


def _reach_with(set_bits, clear_bits, old):
    """Run the update until every one of Numba's threads took part (static scheduling gives
    each thread one iteration; verified by thread id). Returns (flags of threads reached, n)."""
    seen = np.zeros(numba.config.NUMBA_NUM_THREADS, np.int8)
    n = _on_every_thread(lambda n_iter: _update_pool(set_bits, clear_bits, seen, old, n_iter), seen)
    return seen, n


def _on_every_thread(run, flags) -> int:
    """Call run(n_iter) with growing iteration counts until every pool thread has set its
    flag (static scheduling gives each thread one iteration; at most 8 tries). Returns the
    number of threads."""
    n = numba.get_num_threads()
    for attempt in range(1, 9):
        run(n * attempt)
        if flags[:n].all():
            break
    return n


def set_flush(enable: bool = True) -> bool:
    """Turn FTZ/DAZ on (or off) for this thread and Numba's threads, for good (prefer the
    scoped ``flush_denormals``). Returns True if it was applied everywhere, False where the
    platform has no MXCSR (or, with a warning, when some pool thread could not be reached)."""
    if not X86:
        return False
    _here, _old, seen, n = _apply(enable)
    if seen[:n].all() or _pool_follows_caller():
        return True
    _warn_unreached(seen, n)
    return False


@contextlib.contextmanager
def flush_denormals(enable: bool = True):
    """Scoped FTZ/DAZ: inside the block this thread and every Numba pool thread flush
    subnormals (``enable=True``) or keep them (``False``); on leaving it, normally or by an
    exception, each thread it changed gets its own earlier FTZ/DAZ bits back. Nests. The
    training loop runs inside one (TrainConfig.flush_denormals); the caller's arithmetic after
    it is IEEE as before. Does nothing off x86-64. Yields whether every thread was reached."""
    if not X86:
        yield False
        return
    here, old, seen, n = _apply(enable)
    reached = bool(seen[:n].all()) or _pool_follows_caller()
    if not reached:
        _warn_unreached(seen, n)
    try:
        yield reached
    finally:
        done = np.zeros_like(seen)
        done[seen == 0] = 1  # threads never changed are left as they are
        _on_every_thread(lambda n_iter: _restore_pool(old, done, n_iter), done)
        # last: the calling thread (which may have run pool iterations) gets its own bits
        _update_here(here & FTZ_DAZ, FTZ_DAZ & ~here)


def flushing() -> bool:
    """Whether FTZ and DAZ are both on in the calling thread."""
    if not X86:
        return False
    old = _update_here(0, 0)
    return (int(old) & FTZ_DAZ) == FTZ_DAZ


def pool_flushing() -> np.ndarray:
    """FTZ/DAZ as seen inside a parallel kernel, one bool per pool thread that ran an iteration
    of it (for the tests: under TBB that is the calling thread's mode, applied to its workers)."""
    if not X86:
        return np.zeros(numba.get_num_threads(), bool)
    old = np.zeros(numba.config.NUMBA_NUM_THREADS, np.int32)
    seen, n = _reach_with(0, 0, old)
    return (old[:n][seen[:n] == 1] & FTZ_DAZ) == FTZ_DAZ
