"""Batch-major operands (B × features) of the public products: a parallel blocked transpose.

The CPU kernels are feature-major: every nonzero reads one contiguous row of B values, which is
what makes them fast. With ``layout="batch"`` the public functions therefore transpose each dense
operand in and the result out (kernels/backend.py), except where the batch-panel kernel
(kernels/cpu/panels.py) reads batch-major arrays itself, with this file's 8 × 8 register blocks
(``block8_at``) on panels that stay in cache. NumPy's own transposed copy of a float32
(128, 4096) array walks 16 KiB strides one element at a time and took 1-3.7 ms, as long as or
longer than the product it served; this one moves 8 × 8 blocks through vector registers (eight
32-byte loads, 24 shuffles, eight 32-byte stores: LLVM vector IR, lowered for whatever SIMD the
machine has) in strips of the longer axis split over the threads. Measured back to back on a
2-core EPYC (AVX2), 2 MiB: 105-150 µs, against 200-250 µs for 4 × 4 blocks of scalar moves,
about 2 ms for NumPy, and 65 µs for a plain copy of the same bytes.

transpose(a, out=None) -> a.T as a C-contiguous array
    a: 2-D float32 C-contiguous (R, C); out: (C, R) float32 C-contiguous, not overlapping a.
    Cost: R·C loads and stores; threads take strips of up to ``STRIP`` rows (or columns) of a,
    at least 4 strips per thread where the longer axis allows, each writing its own part of
    out: no races. The edges (R or C not a multiple of 8) are moved one element at a time.
    Small arrays (below ``PARALLEL_MIN`` elements), other dtypes and other layouts go through
    NumPy, whose copy then costs less than a parallel launch.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from kernels import config

STRIP = 128  # rows (or columns) of the source per parallel task, a multiple of 8
PARALLEL_MIN = 1 << 15  # elements: below this NumPy's copy is cheaper than a parallel launch


def _emit_block8(context, builder, signature, args):
    """LLVM IR of dst[di + c, dj + r] = src[si + r, sj + c] for r, c in 0..7 (float32 2-D arrays
    of unit inner stride): eight 32-byte loads, 24 shuffles, eight 32-byte stores."""
    srcv, si, sj, dstv, di, dj = args
    s = context.make_array(signature.args[0])(context, builder, srcv)
    d = context.make_array(signature.args[3])(context, builder, dstv)
    i64 = ir.IntType(64)
    v8 = ir.VectorType(ir.FloatType(), 8)
    byte = ir.IntType(8).as_pointer()
    s_row = cgutils.unpack_tuple(builder, s.strides, 2)[0]  # bytes from one row to the next
    d_row = cgutils.unpack_tuple(builder, d.strides, 2)[0]
    four = ir.Constant(i64, 4)
    s_at = builder.add(builder.mul(si, s_row), builder.mul(sj, four))
    d_at = builder.add(builder.mul(di, d_row), builder.mul(dj, four))

    def row_ptr(base, at, stride, k):
        off = builder.add(at, builder.mul(ir.Constant(i64, k), stride))
        return builder.bitcast(builder.gep(builder.bitcast(base, byte), [off]), v8.as_pointer())

    def shuffle(a, b, mask):
        return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(ir.IntType(32), 8), mask))

    rows = []
    for k in range(8):
        load = builder.load(row_ptr(s.data, s_at, s_row, k))
        load.align = 4
        rows.append(load)
    # interleave pairs of rows (within 128-bit halves), then pairs of pairs, then halves
    t = []
    for k in range(0, 8, 2):
        t.append(shuffle(rows[k], rows[k + 1], [0, 8, 1, 9, 4, 12, 5, 13]))
        t.append(shuffle(rows[k], rows[k + 1], [2, 10, 3, 11, 6, 14, 7, 15]))
    u = []
    for a, b in ((0, 2), (1, 3), (4, 6), (5, 7)):
        u.append(shuffle(t[a], t[b], [0, 1, 8, 9, 4, 5, 12, 13]))
        u.append(shuffle(t[a], t[b], [2, 3, 10, 11, 6, 7, 14, 15]))
    # u[c] holds columns c and c + 4 of rows 0-3, u[c + 4] the same of rows 4-7
    for c in range(4):
        for k, mask in ((c, [0, 1, 2, 3, 8, 9, 10, 11]), (c + 4, [4, 5, 6, 7, 12, 13, 14, 15])):
            store = builder.store(shuffle(u[c], u[c + 4], mask), row_ptr(d.data, d_at, d_row, k))
            store.align = 4
    return context.get_dummy_value()


@intrinsic
def _block8(typingctx, src, i0, j0, dst):
    """dst[j0:j0+8, i0:i0+8] = src[i0:i0+8, j0:j0+8].T for float32 2-D arrays of unit inner
    stride; the caller keeps the block inside both arrays (no bounds checks)."""
    sig = types.void(src, types.intp, types.intp, dst)

    def codegen(context, builder, signature, args):
        srcv, i0, j0, dstv = args
        return _emit_block8(context, builder, signature, (srcv, i0, j0, dstv, j0, i0))

    return sig, codegen


@intrinsic
def block8_at(typingctx, src, si, sj, dst, di, dj):
    """dst[di:di+8, dj:dj+8] = src[si:si+8, sj:sj+8].T for float32 2-D arrays of unit inner
    stride, at independent corners (the batch-panel kernels, kernels/cpu/panels.py); the caller
    keeps both blocks inside their arrays (no bounds checks)."""
    sig = types.void(src, types.intp, types.intp, dst, types.intp, types.intp)
    return sig, _emit_block8


@numba.njit(parallel=True, cache=config.CACHE, boundscheck=False)
def _transpose_kernel(src, dst, strip):
    n_r, n_c = src.shape
    r8 = n_r - n_r % 8
    c8 = n_c - n_c % 8
    if n_c >= n_r:  # strips of source columns (destination rows), all source rows each
        for s in numba.prange((n_c + strip - 1) // strip):
            c0 = s * strip
            c1 = min(c0 + strip, n_c)
            cb = min(c1, c8)  # c0 is a multiple of 8
            for r in range(0, r8, 8):
                for c in range(c0, cb, 8):
                    _block8(src, r, c, dst)
                for c in range(cb, c1):
                    for i in range(8):
                        dst[c, r + i] = src[r + i, c]
            for r in range(r8, n_r):
                for c in range(c0, c1):
                    dst[c, r] = src[r, c]
    else:  # strips of source rows (destination columns), all source columns each
        for s in numba.prange((n_r + strip - 1) // strip):
            r0 = s * strip
            r1 = min(r0 + strip, n_r)
            rb = min(r1, r8)
            for c in range(0, c8, 8):
                for r in range(r0, rb, 8):
                    _block8(src, r, c, dst)
                for r in range(rb, r1):
                    for j in range(8):
                        dst[c + j, r] = src[r, c + j]
            for c in range(c8, n_c):
                for r in range(r0, r1):
                    dst[c, r] = src[r, c]


def transpose(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """a.T as a C-contiguous array (always a new array, never a view of ``a``, or written into
    ``out``, which the caller checked: shape (C, R), float32, C-contiguous, writeable, not
    overlapping ``a``)."""
    fast = (
        a.dtype == np.float32
        and a.ndim == 2
        and a.flags.c_contiguous
        and a.size >= PARALLEL_MIN
        and (out is None or (out.dtype == np.float32 and out.flags.c_contiguous))
    )
    if not fast:
        if out is None:  # (ascontiguousarray would return a view when B or rows is 1)
            return np.array(a.T, order="C", copy=True)
        out[...] = a.T
        return out
    if out is None:
        out = np.empty((a.shape[1], a.shape[0]), dtype=np.float32)
    # at least 4 strips per thread when the longer axis allows it (a multiple of 8 rows each)
    per = -(-max(a.shape) // (4 * numba.get_num_threads()))
    strip = max(8, min(STRIP, -(-per // 8) * 8))
    _transpose_kernel(a, out, strip)
    return out
