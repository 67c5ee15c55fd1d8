"""Y = W·X on the CPU in batch panels: the kernel of batch-major operands (spmm, spmm_t).

Maths:    Y[b, i] = Σ_{p in row i} data[p] · X[b, indices[p]]
          X (B, k) and Y (B, m) batch-major (the NumPy / PyTorch ``x @ W.T`` convention),
          C-contiguous float32.
Buffers:  indptr (m+1,) int32|int64, indices (nnz,) int32|int64, data (nnz,) float32   [in]
          x, out: as above; every element of out overwritten                         [in/out]
          blocks (R+1,) int64 row-block boundaries                                       [in]
          scratch (T, k + 16, PW) float32: one slot per thread (numba.get_thread_id()), on
                  transparent huge pages (_huge_pages)                          [tmp]
          stage (T, PW, k) float32: the rows of a last, partial batch-major panel, zero-padded
                  (a (1, 1, 1) placeholder when there is none)                  [tmp]
How:      the batch is cut into panels of PW columns (8, 16 or 32 floats; by default one cache
          line, panel_width()). A task takes one panel and one row block. It first
          transposes the panel of X into its scratch slot as a (k, PW) array in 8 × 8 register
          blocks (kernels/layout.block8_at). Then each row
          is one pass over its nonzeros with the PW sums in vector registers for the whole row
          (_row_intrinsic below: 64 / PW accumulators, one per nonzero of a group, so that eight
          FMA chains overlap), and the sums of 16 rows are written out, transposed in 8 × 8
          blocks. No layout copy of X or Y is ever made.
Cost:     2·nnz·B flops; a nonzero reads one PW-float slice of the panel (at PW = 16 exactly one
          cache line) from a panel of 4·k·PW bytes, which stays in L2 where the whole X would
          not (X at k = 4096, B = 128 is 2 MiB; its 16-column panel 256 KiB). The price: the
          structure (8 bytes per nonzero) is read once per panel, and the panel copy.
          The batch-vector loop (spmm.py) instead loads and stores its output slice once per
          group of four nonzeros; on panels of 8-32 columns that chain through memory made it
          2-4x slower than these registers (bench/RESULTS.md, Session 24).
Threads:  prange over panels × row blocks; a task writes only its rows of its panel (no races).
Requires: indices in [0, k) (trusted: the public API validates them); positions unsigned as in
          spmm.py.
"""

import threading

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from kernels import config
from kernels.cpu._common import row_blocks
from kernels.layout import block8_at
from kernels.machine import cache_sizes

WIDTHS = (8, 16, 32)  # panel widths with a compiled row loop
GROUP = 16  # rows summed before they are written out (a 64-byte line of a batch-major Y row)


def _row_intrinsic(pw: int):
    """An intrinsic dst[dr, :] = Σ_{p in row i} data[p] · s[indices[p], :] for float32 2-D
    arrays s and dst of row length exactly ``pw`` (C-contiguous), summed in <pw x float>
    registers (LLVM splits them into the machine's vectors). 64 floats of accumulators in all
    (64 / pw of them, one per nonzero of a group): eight 32-byte registers, so that eight FMA
    chains overlap, and half of AVX2's 16 registers left for the loads (four accumulators
    of 32 floats spilled: measured 0.7x)."""
    n_acc = 64 // pw

    @intrinsic
    def row(typingctx, indptr, indices, data, s, i, dst, dr):
        sig = types.void(indptr, indices, data, s, types.intp, dst, types.intp)

        def codegen(context, builder, signature, args):
            ip_v, ix_v, d_v, s_v, i, dst_v, dr = args
            arrays = [
                context.make_array(signature.args[k])(context, builder, v)
                for k, v in ((0, ip_v), (1, ix_v), (2, d_v), (3, s_v), (5, dst_v))
            ]
            ipa, ixa, da, sa, dsta = arrays
            i64 = ir.IntType(64)
            i32 = ir.IntType(32)
            vt = ir.VectorType(ir.FloatType(), pw)
            width = ir.Constant(i64, pw)

            def position(arr, at):  # an index or position, read unsigned (see spmm.py)
                v = builder.load(builder.gep(arr.data, [at]))
                return builder.zext(v, i64) if v.type.width < 64 else v

            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vt, [vt, vt, vt]), f"llvm.fma.v{pw}f32"
            )
            undef = ir.Constant(vt, ir.Undefined)
            splat = ir.Constant(ir.VectorType(i32, pw), [0] * pw)

            def step(at, acc):
                col = position(ixa, at)
                v = builder.load(builder.gep(da.data, [at]))
                vb = builder.shuffle_vector(
                    builder.insert_element(undef, v, ir.Constant(i32, 0)), undef, splat
                )
                ptr = builder.gep(sa.data, [builder.mul(col, width)])
                x = builder.load(builder.bitcast(ptr, vt.as_pointer()))
                x.align = 4
                builder.store(builder.call(fma, [vb, x, builder.load(acc)]), acc)

            start = position(ipa, i)
            end = position(ipa, builder.add(i, ir.Constant(i64, 1)))
            zero = ir.Constant(vt, [0.0] * pw)
            accs = [cgutils.alloca_once_value(builder, zero) for _ in range(n_acc)]
            p = cgutils.alloca_once_value(builder, start)
            fn = builder.function
            test_g, body_g, test1, body1, done = (
                fn.append_basic_block(name)
                for name in ("test_g", "body_g", "test1", "body1", "done")
            )
            group = ir.Constant(i64, n_acc)
            builder.branch(test_g)
            builder.position_at_end(test_g)  # groups of n_acc nonzeros, one accumulator each
            at = builder.load(p)
            builder.cbranch(builder.icmp_unsigned("<=", builder.add(at, group), end), body_g, test1)
            builder.position_at_end(body_g)
            at = builder.load(p)
            for u in range(n_acc):
                step(builder.add(at, ir.Constant(i64, u)), accs[u])
            builder.store(builder.add(at, group), p)
            builder.branch(test_g)
            builder.position_at_end(test1)  # the last nonzeros, fewer than a group
            at = builder.load(p)
            builder.cbranch(builder.icmp_unsigned("<", at, end), body1, done)
            builder.position_at_end(body1)
            at = builder.load(p)
            step(at, accs[0])
            builder.store(builder.add(at, ir.Constant(i64, 1)), p)
            builder.branch(test1)
            builder.position_at_end(done)
            sums = [builder.load(acc) for acc in accs]
            while len(sums) > 1:  # a tree: (a0 + a1) + (a2 + a3) ...
                sums = [builder.fadd(sums[j], sums[j + 1]) for j in range(0, len(sums), 2)]
            total = sums[0]
            ptr = builder.gep(dsta.data, [builder.mul(dr, width)])
            store = builder.store(total, builder.bitcast(ptr, vt.as_pointer()))
            store.align = 4
            return context.get_dummy_value()

        return sig, codegen

    return row


_row8 = _row_intrinsic(8)
_row16 = _row_intrinsic(16)
_row32 = _row_intrinsic(32)


@numba.njit(cache=config.CACHE, boundscheck=False, inline="always")
def _row(pw, indptr, indices, data, s, i, dst, dr):
    if pw == 8:
        _row8(indptr, indices, data, s, i, dst, dr)
    elif pw == 16:
        _row16(indptr, indices, data, s, i, dst, dr)
    else:
        _row32(indptr, indices, data, s, i, dst, dr)


@numba.njit(parallel=True, cache=config.CACHE, boundscheck=False)
def _panels_kernel(indptr, indices, data, x, out, blocks, pw, scratch, stage):
    n_batch, k = x.shape
    n_rb = blocks.shape[0] - 1
    n_panels = (n_batch + pw - 1) // pw
    k8 = k - k % 8
    k16 = k - k % 16
    zero = numba.float32(0.0)
    for task in numba.prange(n_panels * n_rb):
        b0 = (task // n_rb) * pw
        rb = task % n_rb
        bq = min(pw, n_batch - b0)
        s = scratch[numba.get_thread_id()]  # rows 0..k-1: the panel; k..k+15: 16 rows of sums
        if bq == pw:
            # a whole 64-byte line of each of 8 rows of X at a time (two 8 x 8 blocks): the rows
            # are 4·k bytes apart, often a multiple of 4 KiB, so they share an L1 set; reading
            # both halves of a line before the next 8 rows keeps them within its 8 ways
            for c in range(0, k16, 16):
                for r in range(0, pw, 8):
                    block8_at(x, b0 + r, c, s, c, r)
                    block8_at(x, b0 + r, c + 8, s, c + 8, r)
            for c in range(k16, k8, 8):
                for r in range(0, pw, 8):
                    block8_at(x, b0 + r, c, s, c, r)
            for c in range(k8, k):
                for r in range(pw):
                    s[c, r] = x[b0 + r, c]
        else:  # a last, partial panel: its rows staged with zero rows after them
            st = stage[numba.get_thread_id()]
            for r in range(bq):
                for c in range(k):
                    st[r, c] = x[b0 + r, c]
            for r in range(bq, pw):
                for c in range(k):
                    st[r, c] = zero
            for c in range(0, k8, 8):
                for r in range(0, pw, 8):
                    block8_at(st, r, c, s, c, r)
            for c in range(k8, k):
                for r in range(pw):
                    s[c, r] = st[r, c]
        i = blocks[rb]
        r1 = blocks[rb + 1]
        while i < r1:
            nr = min(GROUP, r1 - i)
            for ii in range(nr):
                _row(pw, indptr, indices, data, s, i + ii, s, k + ii)
            if nr == GROUP and bq == pw:
                for r in range(0, pw, 8):  # whole 64-byte lines of Y's rows, as for X above
                    block8_at(s, k, r, out, b0 + r, i)
                    block8_at(s, k + 8, r, out, b0 + r, i + 8)
            else:
                for ii in range(nr):
                    for r in range(bq):
                        out[b0 + r, i + ii] = s[k + ii, r]
            i += nr


_NO_STAGE = np.zeros((1, 1, 1), dtype=np.float32)
# The kernel's per-thread slots, kept per calling Python thread (two threads may launch at
# once, and Numba's thread ids would then collide) and by shape, at most SCRATCH_MAX_BYTES per
# calling thread: the least recently used shapes go first (a network's layers alternate).
SCRATCH_MAX_BYTES = 64 << 20
_scratch = threading.local()


HUGE_PAGE = 2 << 20


def _huge_pages(shape) -> tuple[np.ndarray, int]:
    """A float32 array on 2 MiB-aligned memory of at least 4 MiB, which NumPy asks Linux to back
    with transparent huge pages (madvise), and the bytes allocated for it. A panel on 4 KiB
    pages lands on physical pages that can crowd some sets of the physically indexed L2 (the
    kernel's speed then changed by 30% from one process to the next); on one huge page it is
    contiguous."""
    n = int(np.prod(shape)) * 4
    # NumPy madvises from 4 MiB; the aligned start lies within the first 2 MiB
    raw = np.empty(max(n + HUGE_PAGE, 4 << 20), dtype=np.uint8)
    start = -raw.ctypes.data % HUGE_PAGE
    return raw[start : start + n].view(np.float32).reshape(shape), raw.nbytes


def slots(key, shape) -> np.ndarray:
    """Per-thread slots of ``shape`` (one per Numba thread), kept under ``key``; the cache
    counts the bytes allocated (with the huge-page padding), not the slots' own size."""
    cache = getattr(_scratch, "slots", None)
    if cache is None:
        cache = _scratch.slots = {}
    n = numba.config.NUMBA_NUM_THREADS
    a, nbytes = cache.pop(key, (None, 0))
    if a is None or a.shape[0] < n:
        a, nbytes = _huge_pages((n, *shape))
    cache[key] = (a, nbytes)  # (re)inserted last: the dict's order is the order of use
    while sum(b for _, b in cache.values()) > SCRATCH_MAX_BYTES and len(cache) > 1:
        del cache[next(iter(cache))]
    return a


def panel_width(n_batch: int) -> int:
    """One cache line of floats (16 on 64-byte lines; within WIDTHS): every nonzero then reads
    exactly one line of the panel; 8 for a batch of at most 8. ``config.PANEL_WIDTH``
    overrides. Measured on a 2-core EPYC (AVX2, 64-byte lines), batch-major, against the
    batch-vector kernel on a feature-major X (same run): at B = 128, width 16 1.00-1.31x
    (4096², 1%; 1024², 5%; 16384², 1%) and 1.20x (4096², 10%), width 32 0.79-1.15x, width 8
    0.62-0.99x; at B = 8, width 8 1.29-1.68x, width 16 0.96-0.98x."""
    if config.PANEL_WIDTH:
        return int(config.PANEL_WIDTH)
    if n_batch <= WIDTHS[0]:
        return WIDTHS[0]
    return min(WIDTHS[-1], max(WIDTHS[0], cache_sizes().line // 4))


def read_only_view(a: np.ndarray) -> np.ndarray:
    """A read-only view of an input: Numba compiles one specialization per array type, and a
    read-only array is another type; the kernel (about 7 s to compile) then has one per index
    dtype, whatever the caller's arrays' flags."""
    if not a.flags.writeable:
        return a
    v = a.view()
    v.flags.writeable = False
    return v


def _coarser(blocks: np.ndarray, n_blocks: int) -> np.ndarray:
    """About n_blocks row blocks out of finer ones (_common.row_blocks'), in O(n_blocks)."""
    fine = blocks.shape[0] - 1
    n_blocks = max(1, min(fine, n_blocks))
    return blocks[np.linspace(0, fine, n_blocks + 1).round().astype(np.int64)]


def spmm_panels(indptr, indices, data, x, out, blocks=None, *, pw=None):
    """Launcher (trusts its inputs; the public API validates): x (B, k) -> out (B, m), both
    float32 C-contiguous; fills and returns ``out``. blocks: row blocks as
    _common.row_blocks makes them (the CSR caches them), of which the launcher takes as many
    as the panels need; computed when None."""
    if not (x.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("the panel kernel reads x and writes out as C-contiguous arrays")
    n_batch, k = x.shape
    m = out.shape[1]
    if m == 0 or n_batch == 0:
        return out
    pw = panel_width(n_batch) if pw is None else pw
    if pw not in WIDTHS:
        raise ValueError(f"panel width must be one of {WIDTHS}, got {pw!r}")
    threads = numba.get_num_threads()
    n_panels = -(-n_batch // pw)
    # at least BLOCKS_PER_THREAD tasks per thread: row blocks split a panel when panels are few
    n_rb = max(1, -(-threads * config.BLOCKS_PER_THREAD // n_panels))
    if blocks is None:
        blocks = row_blocks(indptr, m)
    blocks = _coarser(blocks, n_rb)
    scratch = slots(("panel", k, pw), (k + GROUP, pw))
    # a last, partial panel stages its rows (pw, k)
    stage = slots(("stage", k, pw), (pw, k)) if n_batch % pw else _NO_STAGE
    _panels_kernel(
        *(read_only_view(a) for a in (indptr, indices, data, x)),
        out, blocks, pw, scratch, stage,
    )  # fmt: skip
    return out
