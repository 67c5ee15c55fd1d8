"""The sparse-training kernels, callable from plain NumPy code.

Every function takes the sparse weight W (m × n) as one of

- a ``sparsecore.CSR`` (validated in full once when built; afterwards every call re-checks
  only its O(1) invariants, dtypes and lengths, since its index arrays are read-only and its
  ``data`` setter is checked: see ``sparsecore.CSR``; it caches its transpose structure and
  thread blocks, so repeated calls pay nothing for them),
- a ``scipy.sparse`` matrix or array of any format and index dtype (converted on every call:
  O(nnz); wrap it once with ``sparsecore.CSR.from_scipy`` when calling in a loop),
- a tuple ``(indptr, indices, data, shape)`` of NumPy arrays (fully validated on every call),

and dense operands as NumPy arrays. Activations are feature-major by default (``layout="feature"``:
X is n × B, Y is m × B, so each nonzero touches one contiguous row of length B); with
``layout="batch"`` they are batch-major (X is B × n, Y is B × m), at the cost of a transposed copy
of each dense operand. Dense operands are used as float32 C-contiguous arrays (others are
converted, a copy). ``out=`` must have exactly the result's shape, dtype float32 and be
C-contiguous; it is overwritten entirely.

On the GPU the same functions take W as a ``DeviceCSR`` (``CSR.to_device()``), a
``cupyx.scipy.sparse`` matrix, or a tuple of CuPy arrays, with CuPy dense operands, and run the
CUDA kernels of kernels/cuda (results are CuPy arrays; calls are asynchronous except where a
result size must be known). One call runs on one side: mixing NumPy and CuPy operands is a
TypeError naming the argument. Importing this package never needs CuPy; a GPU call without
CuPy or a device raises ``GPUUnavailableError`` saying ``pip install "sparsecore-rigl[gpu]"``.

Threads: see ``sparsecore.threading_info()`` for the setup that keeps Numba's and the BLAS's
threads from spinning against each other.
"""

from __future__ import annotations

# First, before NumPy loads OpenBLAS: the thread-pool settings (see kernels/_threads.py).
from kernels._threads import check_fork_safe, configure_threads  # noqa: I001

configure_threads()

import numpy as np  # noqa: E402

from kernels import config  # noqa: E402
from kernels import validation as V  # noqa: E402
from kernels.cpu import drop as _drop  # noqa: E402
from kernels.cpu import grow as _grow  # noqa: E402
from kernels.cpu import merge as _merge  # noqa: E402
from kernels.cpu import sddmm as _sddmm  # noqa: E402
from kernels.cpu import spmm as _spmm  # noqa: E402
from kernels.cpu import spmm_t as _spmm_t  # noqa: E402
from kernels.cuda._csr import DeviceCSR  # noqa: E402  (no CuPy import)
from kernels.formats import CSR, as_csr  # noqa: E402
from kernels.validation import GPUUnavailableError  # noqa: E402

__all__ = [
    "CSR",
    "DeviceCSR",
    "GPUUnavailableError",
    "spmm",
    "spmm_t",
    "sddmm",
    "topk_grow",
    "magnitude_drop",
    "merge",
    "remap",
    "config",
]


def _dense_in(a, name, n_rows, layout, *, finite=False):
    """Feature-major float32 C-contiguous view/copy of a dense operand, checked."""
    if V.is_cupy_array(a):
        V.raise_cupy(name)
    if layout == "batch":
        a = V.as_operand(a, name, None, finite=finite)
        if a.shape[1] != n_rows:
            raise ValueError(f"{name} has shape {a.shape}, expected (batch, {n_rows})")
        return np.ascontiguousarray(a.T)
    return V.as_operand(a, name, n_rows, finite=finite)


def _dense_out(result_fm, out, name, layout):
    """Return the feature-major result, or write it (transposed for 'batch') into ``out``."""
    if layout == "batch":
        if out is None:
            return np.ascontiguousarray(result_fm.T)
        out[...] = result_fm.T
        return out
    return result_fm


def _host_parts(W) -> tuple:
    """The caller's own arrays behind W (a scipy matrix's or a tuple's), which an ``out=``
    must not overlap either (W itself may be a converted copy of them)."""
    if isinstance(W, tuple) and len(W) == 4:
        return tuple(a for a in W[:3] if isinstance(a, np.ndarray))
    parts = []
    for attr in ("data", "indices", "indptr", "row", "col"):
        a = getattr(W, attr, None) if not isinstance(W, CSR) else None
        if isinstance(a, np.ndarray):
            parts.append(a)
    return tuple(parts)


def _prepare_out(out, name, rows, batch, layout, W, *inputs):
    shape = (batch, rows) if layout == "batch" else (rows, batch)
    if out is not None:
        V.check_out(out, name, shape)
        V.check_no_overlap(out, name, W.data, *inputs)
    if layout == "batch" or out is None:
        return np.empty((rows, batch), dtype=np.float32)
    return out


# ---------------------------------------------------------------------------- GPU dispatch


def _w_parts(W, name="W"):
    """(name, object) pairs of W that decide its side: the tuple's arrays, or W itself."""
    if isinstance(W, tuple) and len(W) == 4:
        return [
            (f"{name}.{p}", a) for p, a in zip(("indptr", "indices", "data"), W[:3], strict=True)
        ]
    return [(name, W)]


def _on_gpu(W, **operands):
    """True when any operand is a CuPy object (then CuPy and a device must be present: else
    the one install error names the first such operand)."""
    for name, a in [*_w_parts(W), *operands.items()]:
        if isinstance(a, DeviceCSR) or V.is_cupy_array(a):
            V.require_gpu(name)
            return True
    return False


def _device_csr(W, name="W") -> DeviceCSR:
    if isinstance(W, DeviceCSR):
        return W
    if isinstance(W, tuple) and len(W) == 4:
        for part, a in _w_parts(W, name):
            if not V.is_cupy_array(a):
                raise V.backend_mismatch(part, True)
        return DeviceCSR.from_arrays(*W, name=name)
    if V.is_cupy_array(W):
        import cupyx.scipy.sparse as csp

        if csp.issparse(W):
            return DeviceCSR.from_cupy_scipy(W, name)
        raise TypeError(
            f"{name} must be a DeviceCSR, a cupyx.scipy.sparse matrix or a tuple of CuPy "
            f"arrays on the GPU; got a dense {type(W).__name__} (use cupyx.scipy.sparse)"
        )
    raise V.backend_mismatch(name, True)


def _dense_in_gpu(a, name, n_rows, layout, *, finite=False):
    if layout == "batch":
        a = V.as_device_operand(a, name, None)
        if a.shape[1] != n_rows:
            raise ValueError(f"{name} has shape {a.shape}, expected (batch, {n_rows})")
        a = a.T
    return V.as_device_operand(a, name, n_rows, finite=finite)


def _prepare_out_gpu(out, rows, batch, layout, W, *inputs):
    import cupy

    shape = (batch, rows) if layout == "batch" else (rows, batch)
    if out is not None:
        V.check_device_out(out, "out", shape)
        V.check_device_no_overlap(out, "out", W.data, *inputs)
    if layout == "batch" or out is None:
        return cupy.empty((rows, batch), dtype=np.float32)
    return out


def _dense_out_gpu(result_fm, out, layout):
    import cupy

    if layout == "batch":
        if out is None:
            return cupy.ascontiguousarray(result_fm.T)
        out[...] = result_fm.T
        return out
    return result_fm


def _spmm_gpu(W, X, out, layout):
    from kernels.cuda import spmm as cu

    W = _device_csr(W)
    m, n = W.shape
    X = _dense_in_gpu(X, "X", n, layout)
    y = _prepare_out_gpu(out, m, X.shape[1], layout, W, X)
    cu.spmm(W.indptr, W.indices, W.data, X, y)
    return _dense_out_gpu(y, out, layout)


def _spmm_t_gpu(W, dY, out, layout):
    from kernels.cuda import spmm_t as cu

    W = _device_csr(W)
    m, n = W.shape
    dY = _dense_in_gpu(dY, "dY", m, layout)
    dx = _prepare_out_gpu(out, n, dY.shape[1], layout, W, dY)
    t_indptr, t_indices, t_perm = W.transpose_structure()
    cu.spmm_t(t_indptr, t_indices, t_perm, W.data, dY, dx)
    return _dense_out_gpu(dx, out, layout)


def _sddmm_gpu(W, dY, X, out, layout):
    import cupy

    from kernels.cuda import sddmm as cu

    W = _device_csr(W)
    m, n = W.shape
    dY = _dense_in_gpu(dY, "dY", m, layout)
    X = _dense_in_gpu(X, "X", n, layout)
    if dY.shape[1] != X.shape[1]:
        raise ValueError(f"dY and X disagree on the batch size: {dY.shape[1]} vs {X.shape[1]}")
    if out is None:
        out = cupy.empty(W.nnz, dtype=np.float32)
    else:
        V.check_device_out(out, "out", (W.nnz,))
        V.check_device_no_overlap(out, "out", W.data, dY, X)
    return cu.sddmm(W.indptr, W.indices, dY, X, out)


def spmm(W, X, *, out=None, layout: str = "feature"):
    """Forward product Y = W·X.

    Maths: ``Y[i, b] = Σ_j W[i, j] X[j, b]`` over the stored entries of W.
    Shapes: W (m, n); X (n, B) -> Y (m, B)  [layout="batch": X (B, n) -> Y (B, m)].
    Dtypes: float32 values, int32/int64 indices; Y float32.
    Cost: 2·nnz·B flops, O(m·B) memory for Y; threads split rows by nonzeros.
    """
    layout = V.check_layout(layout)
    if _on_gpu(W, X=X, out=out):
        return _spmm_gpu(W, X, out, layout)
    check_fork_safe("kernels.spmm")
    given = _host_parts(W)
    W = as_csr(W)
    m, n = W.shape
    X = _dense_in(X, "X", n, layout)
    y = _prepare_out(out, "out", m, X.shape[1], layout, W, X, *given)
    _spmm.spmm(W.indptr, W.indices, W.data, X, y, W.row_blocks())
    return _dense_out(y, out, "out", layout)


def spmm_t(W, dY, *, out=None, layout: str = "feature"):
    """Backward product to the inputs dX = Wᵀ·dY, race-free (no atomics).

    Maths: ``dX[j, b] = Σ_i W[i, j] dY[i, b]``.
    Shapes: W (m, n); dY (m, B) -> dX (n, B)  [layout="batch": dY (B, m) -> dX (B, n)].
    Cost: 2·nnz·B flops; uses W's transpose structure (built once per pattern, O(nnz + n),
    cached on a CSR, rebuilt on every call for scipy or raw-array input).
    """
    layout = V.check_layout(layout)
    if _on_gpu(W, dY=dY, out=out):
        return _spmm_t_gpu(W, dY, out, layout)
    check_fork_safe("kernels.spmm_t")
    given = _host_parts(W)
    W = as_csr(W)
    m, n = W.shape
    dY = _dense_in(dY, "dY", m, layout)
    dx = _prepare_out(out, "out", n, dY.shape[1], layout, W, dY, *given)
    t_indptr, t_indices, t_perm = W.transpose_structure()
    _spmm_t.spmm_t(t_indptr, t_indices, t_perm, W.data, dY, dx, W.col_blocks())
    return _dense_out(dx, out, "out", layout)


def sddmm(W, dY, X, *, out=None, layout: str = "feature"):
    """Weight gradient at the stored entries only: dW[p] = (dY·Xᵀ)[i, j] for entry p = (i, j).

    Maths: ``dW[p] = Σ_b dY[i, b] X[j, b]``.
    Shapes: W (m, n); dY (m, B); X (n, B) -> dW (nnz,) in W's CSR order (aligned with W.data)
    [layout="batch": dY (B, m), X (B, n)].
    Cost: 2·nnz·B flops, nnz floats of output: never the dense m × n gradient.
    """
    layout = V.check_layout(layout)
    if _on_gpu(W, dY=dY, X=X, out=out):
        return _sddmm_gpu(W, dY, X, out, layout)
    check_fork_safe("kernels.sddmm")
    given = _host_parts(W)
    W = as_csr(W)
    m, n = W.shape
    dY = _dense_in(dY, "dY", m, layout)
    X = _dense_in(X, "X", n, layout)
    if dY.shape[1] != X.shape[1]:
        raise ValueError(f"dY and X disagree on the batch size: {dY.shape[1]} vs {X.shape[1]}")
    if out is None:
        out = np.empty(W.nnz, dtype=np.float32)
    else:
        V.check_out(out, "out", (W.nnz,))
        V.check_no_overlap(out, "out", W.data, dY, X, *given)
    return _sddmm.sddmm(W.indptr, W.indices, dY, X, out, W.row_blocks())


def topk_grow(W, dY, X, k, *, keep=None, layout: str = "feature", tile_bytes=None):
    """The k absent connections with the largest |dY·Xᵀ|: RigL's grow step, fused and tiled.

    Maths: scores S = |dY·Xᵀ| (m × n, never formed whole); among (i, j) not stored in W (or
    stored with ``keep[p] = False``), return the k largest, ties to the lower flat index i·n + j.
    Shapes: W (m, n); dY (m, B); X (n, B) [layout="batch": (B, m), (B, n)]; keep (nnz,) bool.
    Returns (rows, cols, scores): int32 (int64 when m or n needs it) and float32 arrays of length k,
    listed in ascending (row, col) order, ready for ``merge``.
    Cost: m·n·B multiply-adds (float32 BLAS, one tile at a time) + O(m·n) scans; extra memory
    O(tile + k): ``config.TOPK_TILE_BYTES`` (or ``tile_bytes``) plus about 12·k bytes.
    Scores are float32: pairs whose float64 scores differ by less than float32 rounding may be
    ordered differently from a float64 computation.
    On the GPU: the same result as CuPy arrays; extra device memory O(tile + k)
    (``config.CUDA_TOPK_TILE_BYTES`` or ``tile_bytes``, see kernels/cuda/grow.py).
    """
    layout = V.check_layout(layout)
    if _on_gpu(W, dY=dY, X=X, keep=keep):  # the same checks, on device arrays
        import cupy as xp

        from kernels.cuda import grow as launcher

        W = _device_csr(W)
        dense_in, check_mask = _dense_in_gpu, V.check_device_mask
    else:
        check_fork_safe("kernels.topk_grow")
        xp, launcher = np, _grow
        W = as_csr(W)
        dense_in, check_mask = _dense_in, V.check_mask
    m, n = W.shape
    dY = dense_in(dY, "dY", m, layout, finite=True)
    X = dense_in(X, "X", n, layout, finite=True)
    if dY.shape[1] != X.shape[1]:
        raise ValueError(f"dY and X disagree on the batch size: {dY.shape[1]} vs {X.shape[1]}")
    if keep is not None:
        keep = check_mask(keep, "keep", W.nnz)
        n_present = int(xp.count_nonzero(keep))
    else:
        n_present = W.nnz
    k = V.check_int(k, "k", low=0, high=m * n - n_present)
    if tile_bytes is not None:
        tile_bytes = V.check_int(tile_bytes, "tile_bytes", low=4)
    _check_scores_fit_float32(dY, X)
    if dY.shape[1] == 0 and xp is np:  # batch 0: every score is 0, ties go to the lower i·n + j
        return _first_absent(W, keep, k)
    rows, cols, scores = launcher.topk_grow(
        W.indptr, W.indices, keep, dY, X, k, tile_bytes=tile_bytes
    )
    if rows.shape[0] != k:  # cannot happen with finite scores; never return a short answer
        raise RuntimeError(f"topk_grow found {rows.shape[0]} entries, expected {k}")
    return rows, cols, scores


def _first_absent(W, keep, k):
    """The k absent entries of lowest flat index i·n + j: topk_grow's answer when every score
    is 0 (an empty batch), in O(k + nnz) vectorised work instead of the O(m·n) scan."""
    m, n = W.shape
    idx = np.int32 if max(m, n) < 2**31 else np.int64
    if k == 0:
        return np.empty(0, idx), np.empty(0, idx), np.empty(0, np.float32)
    row_of = W.row_ids()
    cols = W.indices if keep is None else W.indices[keep]
    rows_p = row_of if keep is None else row_of[keep]
    present = np.bincount(rows_p, minlength=m).astype(np.int64)  # kept entries per row
    absent = n - present
    last = int(np.searchsorted(np.cumsum(absent), k))  # the row where the k-th absent falls
    take = absent[: last + 1].copy()
    take[last] -= int(take.sum()) - k  # only what is left in the last row
    r = np.repeat(np.arange(last + 1, dtype=np.int64), take)
    # j-th absent column of row i: the smallest c with c - (#present columns <= c) = j, found
    # from the row's present columns P (sorted): c = j + #{p in P : p - rank(p) <= j}
    start = np.zeros(last + 2, np.int64)
    np.cumsum(take, out=start[1:])
    j = np.arange(k, dtype=np.int64) - start[r]  # rank among the row's absent columns
    sel = rows_p <= last
    P, Pr = cols[sel].astype(np.int64), rows_p[sel].astype(np.int64)
    pstart = np.zeros(last + 2, np.int64)
    np.cumsum(present[: last + 1], out=pstart[1:])
    key = P - (np.arange(P.shape[0], dtype=np.int64) - pstart[Pr])  # p - rank(p), per row
    off = (n + 1) * Pr + key  # rows apart (keys lie in [0, n])
    c = j + (np.searchsorted(off, (n + 1) * r + j, side="right") - pstart[r])
    return r.astype(idx), c.astype(idx), np.zeros(k, np.float32)


def _check_scores_fit_float32(dY, X):
    """|G[i, j]| <= ||dY_i||·||X_j|| (Cauchy-Schwarz): if that bound fits float32 with room for
    rounding, no score can overflow to inf (or to NaN via inf - inf). O((m + n)·B)."""
    if not dY.size or not X.size:
        return
    if isinstance(dY, np.ndarray):
        a = float(np.sqrt(np.max(np.einsum("ij,ij->i", dY, dY, dtype=np.float64))))
        b = float(np.sqrt(np.max(np.einsum("ij,ij->i", X, X, dtype=np.float64))))
    else:  # CuPy: the same bound on the device (a reduction, no m × B temporaries)
        a = float(_row_sq_sums(dY).max() ** 0.5)
        b = float(_row_sq_sums(X).max() ** 0.5)
    if a * b > 1e37:
        raise OverflowError(
            f"dY·Xᵀ may overflow float32: the largest row norms are {a:.3g} (dY) and {b:.3g} (X); "
            "rescale dY or X (the ranking of |dY·Xᵀ| does not change under scaling)"
        )


_reductions: dict = {}


def _row_sq_sums(a):
    """Σ_b a[i, b]² in float64 for every row of a 2-D CuPy array."""
    import cupy

    if "sq" not in _reductions:
        _reductions["sq"] = cupy.ReductionKernel(
            "T x", "float64 y", "(double)x * (double)x", "a + b", "y = a", "0", "sparsecore_sqsum"
        )
    return _reductions["sq"](a, axis=1)


def magnitude_drop(W, k):
    """Positions (into W.data, ascending, int64) of the k stored entries with the smallest |w|.

    Ties go to the lower position, so the result is deterministic. W may be any accepted sparse
    form, or a 1-D array of values. Cost O(nnz). On the GPU (a DeviceCSR, CuPy sparse matrix or
    1-D CuPy array) the result is a CuPy array.
    """
    if _on_gpu(W):
        return _magnitude_drop_gpu(W, k)
    check_fork_safe("kernels.magnitude_drop")
    if isinstance(W, np.ndarray) and W.ndim == 1:
        data = W
        if data.dtype.kind not in "fiu":
            raise TypeError(f"W values must be real numbers, got dtype {data.dtype}")
        if data.dtype.kind in "iu":  # abs(int8(-128)) is -128: rank integers as floats
            data = data.astype(np.float64)
        if data.size and not np.isfinite(data).all():
            raise ValueError("W values must be finite, but they hold NaN or inf")
    else:
        data = as_csr(W).data
        if data.size and not np.isfinite(data).all():
            raise ValueError("W.data must be finite, but it holds NaN or inf")
    k = V.check_int(k, "k", low=0, high=data.shape[0])
    return _drop.magnitude_drop(data, k)


def _magnitude_drop_gpu(W, k):
    import cupy

    from kernels.cuda import drop as cu

    if isinstance(W, cupy.ndarray):
        if W.ndim != 1:
            raise ValueError(f"W values must be 1-D, got shape {W.shape}")
        data = W
        if data.dtype.kind not in "fiu":
            raise TypeError(f"W values must be real numbers, got dtype {data.dtype}")
        if data.dtype.kind in "iu":
            data = data.astype(np.float64)
    else:
        data = _device_csr(W).data
    if data.size and not bool(cupy.isfinite(data).all()):
        raise ValueError("W values must be finite, but they hold NaN or inf")
    k = V.check_int(k, "k", low=0, high=data.shape[0])
    return cu.magnitude_drop(data, k)


def _check_coords_gpu(rows, cols, shape, name="grown"):
    """check_coords on the device: int64 (rows, cols) sorted row-major, in range, no repeats."""
    import cupy

    m, n = shape
    for a, nm in ((rows, f"{name} rows"), (cols, f"{name} cols")):
        if not isinstance(a, cupy.ndarray):
            raise V.backend_mismatch(nm, True)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise TypeError(f"{nm} must be a 1-D integer array, got {a.dtype} shape {a.shape}")
    if rows.shape != cols.shape:
        raise ValueError(
            f"{name} rows and cols differ in length: {rows.shape[0]} vs {cols.shape[0]}"
        )
    rows = rows.astype(np.int64, copy=False)
    cols = cols.astype(np.int64, copy=False)
    if rows.size:
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= m:
            raise ValueError(f"{name} rows must lie in [0, {m}), got [{lo}, {hi}]")
        lo, hi = int(cols.min()), int(cols.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"{name} cols must lie in [0, {n}), got [{lo}, {hi}]")
    flat = rows * n + cols
    order = cupy.argsort(flat)
    flat = flat[order]
    if flat.size > 1:
        dup = cupy.flatnonzero(flat[1:] == flat[:-1])
        if dup.size:
            f = int(flat[int(dup[0])])
            raise ValueError(f"{name} lists entry ({f // n}, {f % n}) more than once")
    return rows[order], cols[order]


def _merge_gpu(W, keep, grow_rows, grow_cols):
    from kernels.cuda import merge as cu

    W = _device_csr(W)
    keep = V.check_device_mask(keep, "keep", W.nnz)
    rows, cols = _check_coords_gpu(grow_rows, grow_cols, W.shape, "grown")
    return cu.merge_csr(W, keep, rows, cols)


def merge(W, keep, grow_rows, grow_cols):
    """A topology update: keep some stored entries, add grown ones; returns (new W, src).

    ``keep`` (nnz,) bool marks the entries that stay; (grow_rows, grow_cols) are the new
    connections, each absent from the kept set, in any order and without repeats. A grown entry
    that was stored before (dropped and regrown in the same update) keeps its old value; the
    others start at 0. The new W is canonical CSR; ``src`` (new nnz,) int64 gives for each new
    entry its position in the old arrays, or -1: carry per-nonzero state (optimizer moments) with
    ``remap(src, old_array)``. Cost O(nnz + g) plus O(g log g) to order the grown entries.
    On the GPU (DeviceCSR and CuPy arrays) it returns a DeviceCSR and a CuPy ``src``.
    """
    if _on_gpu(W, keep=keep, grow_rows=grow_rows, grow_cols=grow_cols):
        return _merge_gpu(W, keep, grow_rows, grow_cols)
    check_fork_safe("kernels.merge")
    W = as_csr(W)
    m, n = W.shape
    keep = V.check_mask(keep, "keep", W.nnz)
    rows, cols = V.check_coords(grow_rows, grow_cols, W.shape, "grown")
    needed = V.index_dtype_for(m, n, int(np.count_nonzero(keep)) + rows.shape[0])
    idx = np.promote_types(W.indices.dtype, needed).type  # never narrower than W's
    grow_indptr = np.zeros(m + 1, dtype=idx)
    np.cumsum(np.bincount(rows, minlength=m), out=grow_indptr[1:])
    indptr, indices = W.indptr, W.indices
    if indptr.dtype != idx:
        indptr, indices = indptr.astype(idx), indices.astype(idx)
    new_indptr, new_indices, src, conflicts = _merge.merge(
        indptr, indices, keep, grow_indptr, cols.astype(idx)
    )
    if conflicts:
        raise ValueError(
            f"{conflicts} grown entries are already present in W and kept; grow only "
            "connections that are absent (or dropped in this update)"
        )
    data = _merge.remap(src, W.data)
    return W._with_pattern(new_indptr, new_indices, data), src


def remap(src, values, fill=0.0):
    """Carry a per-nonzero array across ``merge``: out[w] = values[src[w]], or ``fill`` if src<0."""
    if _on_gpu(None, src=src, values=values):
        return _remap_gpu(src, values, fill)
    check_fork_safe("kernels.remap")
    src = np.asarray(src)
    values = np.asarray(values)
    if src.ndim != 1 or src.dtype.kind not in "iu":
        raise TypeError(f"src must be a 1-D integer array, got {src.dtype} shape {src.shape}")
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {values.shape}")
    if src.size and (src.max() >= values.shape[0] or src.min() < -1):
        raise ValueError(
            f"src must hold positions in [0, {values.shape[0]}) or -1 (new entry), "
            f"got values in [{src.min()}, {src.max()}]"
        )
    return _merge.remap(src, values, fill)


def _remap_gpu(src, values, fill):
    import cupy

    from kernels.cuda import merge as cu

    for a, name in ((src, "src"), (values, "values")):
        if not isinstance(a, cupy.ndarray):
            raise V.backend_mismatch(name, True)
    if src.ndim != 1 or src.dtype.kind not in "iu":
        raise TypeError(f"src must be a 1-D integer array, got {src.dtype} shape {src.shape}")
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {values.shape}")
    if src.size:
        lo, hi = int(src.min()), int(src.max())
        if hi >= values.shape[0] or lo < -1:
            raise ValueError(
                f"src must hold positions in [0, {values.shape[0]}) or -1 (new entry), "
                f"got values in [{lo}, {hi}]"
            )
    return cu.remap(src, values, fill)
