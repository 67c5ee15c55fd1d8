"""One body per operation, run on the side its operands live on.

A ``Backend`` is one side of the kernels: its array module ``xp`` (numpy or cupy) and its
launchers (kernels/cpu/*.py or kernels/cuda/*.py, which take the same arguments on both sides
and trust their input). The public operations of kernels/__init__.py choose the side once from
their operands (``side_of``) and run the one body written here, whose boundary checks are the
ones of kernels/validation.py over ``xp``. A new backend adds launchers and nothing else.

The engine (sparsecore) holds a Backend per layer and optimizer (``layer.dev``; sparsecore.device
keeps its old names) and calls the launchers directly on state it already trusts.

Without a GPU the tests build the CUDA backend over NumPy (``cuda_backend(numpy)``) and replace
kernels/cuda/_module.launch by NumPy models of the kernels (tests/test_cuda_emulated.py): the
bodies below and the CUDA launchers' host code then run exactly as they would on a device.
"""

from __future__ import annotations

import threading

import numpy as np

from kernels import validation as V
from kernels._threads import check_fork_safe
from kernels.cpu import drop as cpu_drop
from kernels.cpu import elementwise as cpu_elementwise
from kernels.cpu import grow as cpu_grow
from kernels.cpu import merge as cpu_merge
from kernels.cpu import sddmm as cpu_sddmm
from kernels.cpu import spmm as cpu_spmm
from kernels.cpu import spmm_t as cpu_spmm_t
from kernels.cuda import _module as cuda_module
from kernels.cuda import drop as cuda_drop
from kernels.cuda import elementwise as cuda_elementwise
from kernels.cuda import grow as cuda_grow
from kernels.cuda import merge as cuda_merge
from kernels.cuda import sddmm as cuda_sddmm
from kernels.cuda import spmm as cuda_spmm
from kernels.cuda import spmm_t as cuda_spmm_t
from kernels.formats import CSR, DeviceCSR, as_csr_for_call
from kernels.layout import transpose

# The launcher modules of each side (importing the CUDA ones never imports CuPy).
LAUNCHERS = {
    "cpu": dict(spmm=cpu_spmm, spmm_t=cpu_spmm_t, sddmm=cpu_sddmm, elementwise=cpu_elementwise,
                drop=cpu_drop, grow=cpu_grow, merge=cpu_merge),
    "cuda": dict(spmm=cuda_spmm, spmm_t=cuda_spmm_t, sddmm=cuda_sddmm, elementwise=cuda_elementwise,
                 drop=cuda_drop, grow=cuda_grow, merge=cuda_merge),
}  # fmt: skip


# layout="batch" on the CPU: from this many batch rows the panel kernel reads and writes the
# batch-major arrays where they are; below it the copies are small and the small-batch kernel
# (registers per row, kernels/cpu/spmm.py) beats a panel of mostly unused lanes.
BATCH_NATIVE_MIN = 8


class Backend:
    """One side: ``xp``, the launchers (trusted, the same signatures on every side) and how
    this side accepts a sparse weight."""

    def __init__(self, name: str, xp, launchers: dict):
        self.name = name
        self.xp = xp
        self.on_device = name != "cpu"
        self.spmm = launchers["spmm"].spmm  # (indptr, indices, data, x, out, blocks, bias=, relu=)
        self.spmm_t = launchers["spmm_t"].spmm_t  # (t_indptr, t_indices, t_perm, data, dy, out, ..)
        self.sddmm = launchers["sddmm"].sddmm  # (indptr, indices, dy, x, out, blocks, bias_grad=)
        self.ew = launchers["elementwise"]  # relu, relu_backward, sgd_momentum, adam (device: sgd)
        self.drop = launchers["drop"].magnitude_drop  # magnitude_drop(data, k)
        self.grow = launchers["grow"].topk_grow  # topk_grow(indptr, indices, keep, dy, x, k, ...)
        self.row_sq_max = launchers["grow"].row_sq_max  # max_i Σ_b a[i, b]² (float64)
        self.merge_kernels = launchers["merge"]  # merge(...), remap(src, values, fill, out=)
        # batch-major products read and written where they are (kernels/cpu/panels.py); None
        # where the side has none (the device transposes, see operand/deliver)
        self.spmm_batch = getattr(launchers["spmm"], "spmm_batch", None)
        self.spmm_t_batch = getattr(launchers["spmm_t"], "spmm_t_batch", None)
        self.sddmm_batch = getattr(launchers["sddmm"], "sddmm_batch", None)

    def __repr__(self):
        return f"Backend({self.name!r}, xp={self.xp.__name__})"

    # ------------------------------------------------------------------ arrays
    def asarray(self, a, dtype=None):
        """``a`` (host or device) as an array of this side; no copy when already there."""
        if not self.on_device:
            a = to_host(a)
        return self.xp.asarray(a, dtype=dtype)

    def csr(self, W):
        """A trusted sparse weight (CSR or DeviceCSR) as this side's: CSR on the CPU, DeviceCSR
        on a device; no copy when already there."""
        if not self.on_device:
            return W.to_host()  # a CSR returns itself
        if isinstance(W, DeviceCSR):
            return W
        xp = self.xp
        return DeviceCSR(xp.asarray(W.indptr), xp.asarray(W.indices), xp.asarray(W.data), W.shape)

    def sparse(self, W, name: str = "W"):
        """A caller's sparse weight, checked: a CSR on the host (see formats.as_csr; a scipy
        matrix reuses its prepared pattern while it is provably unchanged, see
        formats.as_csr_for_call), a DeviceCSR on a device (from a DeviceCSR, a
        cupyx.scipy.sparse matrix or a tuple of this side's arrays)."""
        if not self.on_device:
            return as_csr_for_call(W, name)
        if isinstance(W, DeviceCSR):
            return W
        if isinstance(W, tuple) and len(W) == 4:
            for part, a in zip(("indptr", "indices", "data"), W[:3], strict=True):
                if not isinstance(a, self.xp.ndarray):
                    raise V.backend_mismatch(f"{name}.{part}", True)
            return DeviceCSR.from_arrays(*W, name=name)
        if V.is_cupy_array(W):
            import cupyx.scipy.sparse as csp  # (only reached with CuPy loaded)

            if csp.issparse(W):
                return DeviceCSR.from_cupy_scipy(W, name)
            raise TypeError(
                f"{name} must be a DeviceCSR, a cupyx.scipy.sparse matrix or a tuple of CuPy "
                f"arrays on the GPU; got a dense {type(W).__name__} (use cupyx.scipy.sparse)"
            )
        raise V.backend_mismatch(name, True)

    def given(self, W) -> tuple:
        """The caller's own arrays behind W (a scipy matrix's or a tuple's), which an ``out=``
        must not overlap either (the checked W may be a converted copy of them)."""
        if isinstance(W, tuple) and len(W) == 4:
            return tuple(a for a in W[:3] if isinstance(a, self.xp.ndarray))
        if isinstance(W, (CSR, DeviceCSR)):
            return ()
        parts = (getattr(W, a, None) for a in ("data", "indices", "indptr", "row", "col"))
        return tuple(a for a in parts if isinstance(a, self.xp.ndarray))

    def operand(self, a, name: str, n_rows: int, layout: str, *, finite: bool = False):
        """A dense operand in feature-major float32 C-contiguous form, checked. For
        layout="batch": a transposed copy (kernels/layout.py on the CPU), or none when the
        batch-major array is a transposed view of a feature-major one (``x.T``)."""
        xp = self.xp
        if layout == "batch":
            a = V.on_side(a, name, xp, "a 2-D NumPy array", convert=True)
            if a.ndim == 2 and a.shape[1] == n_rows and a.T.flags.c_contiguous:
                return V.as_operand(a.T, name, n_rows, finite=finite, xp=xp)  # no copy
            a = V.as_operand(a, name, None, finite=finite, xp=xp)
            if a.shape[1] != n_rows:
                raise ValueError(f"{name} has shape {a.shape}, expected (batch, {n_rows})")
            if self.on_device:
                return xp.ascontiguousarray(a.T)
            return transpose(a, scratch(name, (a.shape[1], a.shape[0])))
        return V.as_operand(a, name, n_rows, finite=finite, xp=xp)

    def batch_operand(self, a, name: str, n_cols: int, kernel, out=None):
        """layout="batch" with ``kernel``, this side's native batch-major kernel for the call
        (None: there is none): ``a`` checked as a (batch, n_cols) float32 C-contiguous array,
        read where it is. None (the caller then takes the copying path) when there is no such
        kernel, when ``a`` is the transposed view of a feature-major array (the feature-major
        kernel reads it with no copy: see operand), or when it has fewer than
        BATCH_NATIVE_MIN rows. An ``out`` sharing memory with ``a`` is refused on either path
        (the kernels read their inputs while they write out)."""
        a = V.on_side(a, name, self.xp, "a 2-D NumPy array", convert=True)
        if isinstance(out, self.xp.ndarray):  # (the copying path would read a copy: no matter,
            V.check_no_overlap(out, "out", a, xp=self.xp)  # the contract is the same)
        if kernel is None:
            return None
        if a.ndim == 2 and a.shape[1] == n_cols and a.T.flags.c_contiguous and a.shape[0] > 1:
            return None
        if a.ndim == 2 and a.shape[0] < BATCH_NATIVE_MIN:
            return None  # a few rows: the small-batch kernel after a copy of a few rows
        a = V.as_operand(a, name, None, xp=self.xp)
        if a.shape[1] != n_cols:
            raise ValueError(f"{name} has shape {a.shape}, expected (batch, {n_cols})")
        return a

    def batch_result(self, out, rows: int, batch: int, *inputs):
        """The batch-major (batch, rows) answer of a native batch-major product: ``out``,
        checked against the shape and the inputs, or a new array."""
        if out is None:
            return self.xp.empty((batch, rows), dtype=np.float32)
        V.check_out(out, "out", (batch, rows), xp=self.xp)
        V.check_no_overlap(out, "out", *inputs, xp=self.xp)
        return out

    def result(self, out, rows: int, batch: int, layout: str, *inputs):
        """The feature-major buffer a product writes: ``out`` itself when it can be (checked
        against the result's shape and the inputs), else a new array."""
        shape = (batch, rows) if layout == "batch" else (rows, batch)
        if out is not None:
            V.check_out(out, "out", shape, xp=self.xp)
            V.check_no_overlap(out, "out", *inputs, xp=self.xp)
        if layout == "batch" and not self.on_device:
            return scratch("result", (rows, batch))  # transposed into the answer by deliver
        if layout == "batch" or out is None:
            return self.xp.empty((rows, batch), dtype=np.float32)
        return out

    def deliver(self, result_fm, out, layout: str):
        """The feature-major result as the caller asked: as it is, or transposed for "batch"
        (into ``out`` when given)."""
        if layout == "batch":
            if not self.on_device:
                return transpose(result_fm, out)
            if out is None:
                return self.xp.ascontiguousarray(result_fm.T)
            out[...] = result_fm.T
            return out
        return result_fm

    # ------------------------------------------------------------------ topology updates
    def merge(self, W, keep, rows, cols):
        """(new W, src) of a topology update, checked (the engine's grown coordinates are
        sorted and distinct already: the check costs O(g log g) per update)."""
        return merge_on(self, W, keep, rows, cols)

    def remap(self, src, values, fill=0.0, out=None):
        """The trusted launcher: out[w] = values[src[w]], or fill where src < 0."""
        return self.merge_kernels.remap(src, values, fill, out=out)

    def free_bytes(self) -> int | None:
        """Device memory free now (the driver's free bytes plus what CuPy's pool holds unused);
        None on the CPU (the caller knows the host's limit)."""
        if not self.on_device or self.xp is np:
            return None
        return cuda_module.free_device_bytes(self.xp)[0]

    def sync(self):
        """Wait for the device's queued work (for timings); nothing on the CPU."""
        if self.on_device and hasattr(self.xp, "cuda"):
            self.xp.cuda.get_current_stream().synchronize()


# Scratch of the batch-major path on the CPU: the feature-major copies of the operands and the
# feature-major result, which never leave the call (the answer is a new array, or out=). Fresh
# 2 MiB arrays on every call cost more than the transposes themselves where the allocator hands
# them back to the OS between calls (glibc trims the top of its heap beyond twice its mmap
# threshold, and every page of the next array faults again: 0.5-2 ms a call measured at
# m = k = 4096, B = 128 on a 2-core VM). Kept per thread (threads may call at once), by role and
# shape (the layers of a network differ), at most SCRATCH_MAX_BYTES per thread: the least
# recently used go first.
SCRATCH_MAX_BYTES = 64 << 20
_scratch = threading.local()


def scratch(role: str, shape: tuple) -> np.ndarray:
    """This thread's float32 C-contiguous scratch array for ``role`` (an operand's name, or
    "result") and ``shape``; it holds whatever the last call left: overwrite it entirely."""
    nbytes = 4 * shape[0] * shape[1]
    if nbytes > SCRATCH_MAX_BYTES:
        return np.empty(shape, dtype=np.float32)
    kept = getattr(_scratch, "arrays", None)
    if kept is None:
        kept = _scratch.arrays = {}
    key = (role, shape)
    a = kept.pop(key, None)
    if a is None:
        a = np.empty(shape, dtype=np.float32)
        total = nbytes + sum(x.nbytes for x in kept.values())
        while kept and total > SCRATCH_MAX_BYTES:
            total -= kept.pop(next(iter(kept))).nbytes
    kept[key] = a  # the most recently used last
    return a


def to_host(a):
    """A NumPy array of ``a`` (a copy from the device; a NumPy array as it is)."""
    if isinstance(a, np.ndarray) or np.isscalar(a):
        return a
    get = getattr(a, "get", None)
    return get() if get is not None else np.asarray(a)


def cpu_backend() -> Backend:
    return Backend("cpu", np, LAUNCHERS["cpu"])


def cuda_backend(xp) -> Backend:
    """The CUDA launchers with array module ``xp``: cupy, or numpy where the tests replace
    kernels/cuda/_module.launch by NumPy models of the kernels (tests/test_cuda_emulated.py)."""
    return Backend("cuda", xp, LAUNCHERS["cuda"])


BACKENDS = ("cpu", "cuda")
_cache: dict = {}


def get_backend(name="cpu") -> Backend:
    """The Backend called ``name`` ("cpu" or "cuda"; a Backend is returned as it is). "cuda"
    needs CuPy and a device, else the one GPUUnavailableError saying how to install them."""
    if isinstance(name, Backend):
        return name
    if name not in BACKENDS:
        raise ValueError(f"device must be one of {BACKENDS}, got {name!r}")
    if name not in _cache:
        if name == "cpu":
            _cache[name] = cpu_backend()
        else:
            cupy = V.require_gpu("device", lead="device='cuda' asks for the GPU")
            _cache[name] = cuda_backend(cupy)
    return _cache[name]


get_backend("cpu")  # built at import: side_of reads it from the cache


def _parts(name, a):
    """(name, object) pairs that decide a call's side: a tuple W's arrays, or W itself."""
    if isinstance(a, tuple) and len(a) == 4:
        parts = zip(("indptr", "indices", "data"), a[:3], strict=True)
        return [(f"{name}.{p}", x) for p, x in parts]
    return [(name, a)]


_HOST = (np.ndarray, CSR, type(None))


def side_of(op: str, **operands) -> Backend:
    """The Backend a call runs on: the CUDA one when any operand is a CuPy object or a
    DeviceCSR (CuPy and a device must then be present: else the one install error, naming the
    first such operand), else the CPU (after the fork-safety check of its thread pool)."""
    for name, a in operands.items():
        if isinstance(a, _HOST):  # the common case, decided without a look inside
            continue
        for part, x in _parts(name, a) if name == "W" else ((name, a),):
            if isinstance(x, DeviceCSR) or V.is_cupy_array(x):
                V.require_gpu(part)
                return get_backend("cuda")
    check_fork_safe(op)
    return _cache["cpu"]


# ---------------------------------------------------------------------------- the operations
# Each takes the Backend first, then the public function's arguments (kernels/__init__.py
# documents them). Mixed sides are caught by the checks: an operand of the other side is a
# TypeError naming it.


def spmm_on(b: Backend, W, X, out=None, layout="feature"):
    layout = V.check_layout(layout)
    given = b.given(W)
    W = b.sparse(W)
    m, n = W.shape
    xb = b.batch_operand(X, "X", n, b.spmm_batch, out) if layout == "batch" else None
    if xb is not None:  # batch-major in and out, no layout copy
        y = b.batch_result(out, m, xb.shape[0], W.data, xb, *given)
        return b.spmm_batch(W.indptr, W.indices, W.data, xb, y, W.row_blocks())
    X = b.operand(X, "X", n, layout)
    y = b.result(out, m, X.shape[1], layout, W.data, X, *given)
    b.spmm(W.indptr, W.indices, W.data, X, y, W.row_blocks())
    return b.deliver(y, out, layout)


def spmm_t_on(b: Backend, W, dY, out=None, layout="feature"):
    layout = V.check_layout(layout)
    given = b.given(W)
    W = b.sparse(W)
    m, n = W.shape
    db = b.batch_operand(dY, "dY", m, b.spmm_t_batch, out) if layout == "batch" else None
    if db is not None:  # batch-major in and out, no layout copy
        dx = b.batch_result(out, n, db.shape[0], W.data, db, *given)
        t_indptr, t_indices, t_perm = W.transpose_structure()
        return b.spmm_t_batch(t_indptr, t_indices, t_perm, W.data, db, dx, W.col_blocks())
    dY = b.operand(dY, "dY", m, layout)
    dx = b.result(out, n, dY.shape[1], layout, W.data, dY, *given)
    t_indptr, t_indices, t_perm = W.transpose_structure()
    b.spmm_t(t_indptr, t_indices, t_perm, W.data, dY, dx, W.col_blocks())
    return b.deliver(dx, out, layout)


def _pair(b: Backend, W, dY, X, layout, *, finite=False):
    m, n = W.shape
    dY = b.operand(dY, "dY", m, layout, finite=finite)
    X = b.operand(X, "X", n, layout, finite=finite)
    if dY.shape[1] != X.shape[1]:
        raise ValueError(f"dY and X disagree on the batch size: {dY.shape[1]} vs {X.shape[1]}")
    return dY, X


def sddmm_on(b: Backend, W, dY, X, out=None, layout="feature"):
    layout = V.check_layout(layout)
    given = b.given(W)
    W = b.sparse(W)
    m, n = W.shape
    if layout == "batch":
        db = b.batch_operand(dY, "dY", m, b.sddmm_batch, out)
        if db is not None:
            xb = b.batch_operand(X, "X", n, b.sddmm_batch, out)
        else:  # (X is converted by the copying path: only its overlap with out checked here)
            xb = None
            if isinstance(out, b.xp.ndarray) and isinstance(X, b.xp.ndarray):
                V.check_no_overlap(out, "out", X, xp=b.xp)
        if xb is not None:  # dY read where it is, one transposed copy of X
            if db.shape[0] != xb.shape[0]:
                raise ValueError(
                    f"dY and X disagree on the batch size: {db.shape[0]} vs {xb.shape[0]}"
                )
            out = _sddmm_out(b, W, out, db, xb, given)
            x_t = scratch("X", (n, xb.shape[0]))
            return b.sddmm_batch(W.indptr, W.indices, db, xb, out, W.row_blocks(), x_t)
    dY, X = _pair(b, W, dY, X, layout)
    return b.sddmm(W.indptr, W.indices, dY, X, _sddmm_out(b, W, out, dY, X, given), W.row_blocks())


def _sddmm_out(b: Backend, W, out, dY, X, given):
    if out is None:
        out = b.xp.empty(W.nnz, dtype=np.float32)
    else:
        V.check_out(out, "out", (W.nnz,), xp=b.xp)
        V.check_no_overlap(out, "out", W.data, dY, X, *given, xp=b.xp)
    return out


def topk_grow_on(b: Backend, W, dY, X, k, keep=None, layout="feature", tile_bytes=None):
    layout = V.check_layout(layout)
    xp = b.xp
    W = b.sparse(W)
    m, n = W.shape
    dY, X = _pair(b, W, dY, X, layout, finite=True)
    if keep is not None:
        keep = V.check_mask(keep, "keep", W.nnz, xp=xp)
        n_present = int(xp.count_nonzero(keep))
    else:
        n_present = W.nnz
    k = V.check_int(k, "k", low=0, high=m * n - n_present)
    if tile_bytes is not None:
        tile_bytes = V.check_int(tile_bytes, "tile_bytes", low=4)
    check_scores_fit_float32(b, dY, X)
    if dY.shape[1] == 0:  # batch 0: every score is 0, ties go to the lower i·n + j
        return first_absent(xp, W, keep, k)
    rows, cols, scores = b.grow(W.indptr, W.indices, keep, dY, X, k, tile_bytes=tile_bytes)
    if rows.shape[0] != k:  # cannot happen with finite scores; never return a short answer
        raise RuntimeError(f"topk_grow found {rows.shape[0]} entries, expected {k}")
    return rows, cols, scores


def check_scores_fit_float32(b: Backend, dY, X):
    """|G[i, j]| <= ||dY_i||·||X_j|| (Cauchy-Schwarz): if that bound fits float32 with room for
    rounding, no score can overflow to inf (or to NaN via inf - inf). O((m + n)·B)."""
    if not dY.size or not X.size:
        return
    a, c = b.row_sq_max(dY) ** 0.5, b.row_sq_max(X) ** 0.5
    if a * c > 1e37:
        raise OverflowError(
            f"dY·Xᵀ may overflow float32: the largest row norms are {a:.3g} (dY) and {c:.3g} (X); "
            "rescale dY or X (the ranking of |dY·Xᵀ| does not change under scaling)"
        )


def first_absent(xp, W, keep, k):
    """The k absent entries of lowest flat index i·n + j: topk_grow's answer when every score
    is 0 (an empty batch), in O(k + nnz) vectorised work instead of the O(m·n) scan."""
    m, n = W.shape
    idx = V.coords_dtype(m, n)
    if k == 0:
        return xp.empty(0, idx), xp.empty(0, idx), xp.empty(0, np.float32)
    row_of = W.row_ids()
    cols = W.indices if keep is None else W.indices[keep]
    rows_p = row_of if keep is None else row_of[keep]
    if rows_p.shape[0]:  # kept entries per row (CuPy's bincount refuses an empty input)
        present = xp.bincount(rows_p, minlength=m).astype(np.int64)
    else:
        present = xp.zeros(m, np.int64)
    absent = n - present
    # the row where the k-th absent falls: searchsorted(cumsum, k) ("left"), written as a count
    # since CuPy's searchsorted takes only arrays
    last = int(xp.count_nonzero(xp.cumsum(absent) < k))
    take = absent[: last + 1].copy()
    take[last] -= int(take.sum()) - k  # only what is left in the last row
    start = xp.zeros(last + 2, np.int64)
    xp.cumsum(take, out=start[1:])
    t = xp.arange(k, dtype=np.int64)
    r = xp.searchsorted(start[1:], t, side="right")  # the row of each answer
    j = t - start[r]  # its rank among the row's absent columns
    # j-th absent column of row i: the smallest c with c - (#present columns <= c) = j, found
    # from the row's present columns P (sorted): c = j + #{p in P : p - rank(p) <= j}
    sel = rows_p <= last
    P, Pr = cols[sel].astype(np.int64), rows_p[sel].astype(np.int64)
    pstart = xp.zeros(last + 2, np.int64)
    xp.cumsum(present[: last + 1], out=pstart[1:])
    key = P - (xp.arange(P.shape[0], dtype=np.int64) - pstart[Pr])  # p - rank(p), per row
    off = (n + 1) * Pr + key  # rows apart (keys lie in [0, n])
    c = j + (xp.searchsorted(off, (n + 1) * r + j, side="right") - pstart[r])
    return r.astype(idx), c.astype(idx), xp.zeros(k, np.float32)


def magnitude_drop_on(b: Backend, W, k):
    xp = b.xp
    if isinstance(W, xp.ndarray) and W.ndim == 1:  # the values themselves
        data, what = W, "W values must be finite, but they hold"
        if data.dtype.kind not in "fiu":
            raise TypeError(f"W values must be real numbers, got dtype {data.dtype}")
        if data.dtype.kind in "iu":  # abs(int8(-128)) is -128: rank integers as floats
            data = data.astype(np.float64)
    else:
        data, what = b.sparse(W).data, "W.data must be finite, but it holds"
    if data.size and not bool(xp.isfinite(data).all()):
        raise ValueError(f"{what} NaN or inf")
    k = V.check_int(k, "k", low=0, high=data.shape[0])
    return b.drop(data, k)


def merge_on(b: Backend, W, keep, grow_rows, grow_cols):
    xp = b.xp
    W = b.sparse(W)
    m, n = W.shape
    keep = V.check_mask(keep, "keep", W.nnz, xp=xp)
    rows, cols = V.check_coords(grow_rows, grow_cols, W.shape, "grown", xp=xp)  # row-major order
    needed = V.index_dtype_for(m, n, int(xp.count_nonzero(keep)) + rows.shape[0])
    idx = np.promote_types(W.indices.dtype, needed).type  # never narrower than W's
    grow_indptr = xp.zeros(m + 1, dtype=idx)
    if m and rows.shape[0]:
        grow_indptr[1:] = xp.cumsum(xp.bincount(rows, minlength=m))
    indptr = W.indptr.astype(idx, copy=False)
    indices = W.indices.astype(idx, copy=False)
    new_indptr, new_indices, src, conflicts = b.merge_kernels.merge(
        indptr, indices, keep, grow_indptr, cols.astype(idx)
    )
    if conflicts:
        raise ValueError(
            f"{conflicts} grown entries are already present in W and kept; grow only "
            "connections that are absent (or dropped in this update)"
        )
    data = b.merge_kernels.remap(src, W.data)
    return W._with_pattern(new_indptr, new_indices, data), src


def remap_on(b: Backend, src, values, fill=0.0):
    src = V.on_side(src, "src", b.xp, "a 1-D integer array", convert="any")
    if src.ndim != 1 or src.dtype.kind not in "iu":
        raise TypeError(f"src must be a 1-D integer array, got {src.dtype} shape {src.shape}")
    values = V.on_side(values, "values", b.xp, "a 1-D array", convert="any")
    if values.ndim != 1:  # (any dtype: values are carried, not ranked)
        raise ValueError(f"values must be 1-D, got shape {values.shape}")
    if src.size:
        lo, hi = int(src.min()), int(src.max())
        if hi >= values.shape[0] or lo < -1:
            raise ValueError(
                f"src must hold positions in [0, {values.shape[0]}) or -1 (new entry), "
                f"got values in [{lo}, {hi}]"
            )
    return b.merge_kernels.remap(src, values, fill)
