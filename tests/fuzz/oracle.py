"""The kernel oracle: what the public kernel API must do with a given set of arguments.

Runs in the worker. Every argument is interpreted here independently of the library (the
documented contract, with float64 / SciPy references): either the call is well defined, and
then a returned result must equal the reference (float32 tolerance), or it is not (``Invalid``:
a structurally broken W, a wrong shape ...), and then the call must raise a clear error.
Interpretation is lenient where a sensible meaning exists (a list for an array, an int 0/1 mask
for a bool one): then either a clear error or the correct result passes.
"""

from __future__ import annotations

import numbers

import numpy as np

F32_MAX = float(np.finfo(np.float32).max)
DENSE_LIMIT = 4_000_000  # entries of a dense reference we are willing to form
HUGE_SCALE = 1e36  # where float32 may overflow: any non-finite result is accepted


class Invalid(Exception):
    """The arguments define no result: the call must raise a clear error."""


class Wrong(Exception):
    """A returned result differs from the reference."""


# ------------------------------------------------------------------------- interpretation


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def shape_pair(shape, what="shape"):
    if not isinstance(shape, (tuple, list)) or len(shape) != 2:
        raise Invalid(f"{what} is not a pair: {shape!r}")
    out = []
    for v in shape:
        if not _is_int(v) or int(v) < 0:
            raise Invalid(f"{what} holds {v!r}, not a non-negative integer")
        out.append(int(v))
    return tuple(out)


def _index_array(a, what):
    if not isinstance(a, np.ndarray):
        if isinstance(a, (list, tuple)):
            a = np.asarray(a)
        else:
            raise Invalid(f"{what} is a {type(a).__name__}, not an array")
    if a.ndim != 1:
        raise Invalid(f"{what} is {a.ndim}-D")
    if a.size and a.dtype.kind not in "iu":
        raise Invalid(f"{what} has dtype {a.dtype}")
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a.dtype == np.uint64 and int(a.max()) > np.iinfo(np.int64).max:
        raise Invalid(f"{what} holds {int(a.max())}, beyond any size")
    return a.astype(np.int64)


def value_array(a, what, ndim=1):
    """Values as float64, or complex128 if complex; Invalid if not numbers."""
    if not isinstance(a, np.ndarray):
        try:
            a = np.asarray(a)
        except Exception as e:
            raise Invalid(f"{what} is not an array ({e})") from None
    if a.ndim != ndim:
        raise Invalid(f"{what} is {a.ndim}-D, expected {ndim}-D")
    kind = a.dtype.kind
    if kind in "biuf":
        return a.astype(np.float64)
    if kind == "c":
        return a.astype(np.complex128)
    if kind == "O":
        try:
            out = a.astype(np.complex128)
        except (TypeError, ValueError):
            raise Invalid(f"{what} holds non-numbers") from None
        return out.real.copy() if not np.any(out.imag) else out
    raise Invalid(f"{what} has dtype {a.dtype}")


def finite32(v) -> np.ndarray:
    """True where a value is finite once stored as float32."""
    if np.iscomplexobj(v):
        return finite32(v.real) & finite32(v.imag)
    with np.errstate(invalid="ignore"):
        return np.isfinite(v) & (np.abs(v) <= F32_MAX)


class Mat:
    """A sparse matrix as the contract defines it: canonical (row, col) pattern and values."""

    def __init__(self, m, n, rows, cols, vals, src_kind, data_obj=None):
        self.m, self.n = m, n
        self.rows, self.cols, self.vals = rows, cols, vals
        self.src_kind = src_kind  # "csr" | "tuple" | "scipy" | "values"
        self.data_obj = data_obj  # the array a kernel may read W's values from (overlap checks)

    @property
    def nnz(self):
        return int(self.rows.shape[0])

    def flat_keys(self):
        """(row, col) pairs as a structured-free sortable key: lexsort order is canonical."""
        return self.rows, self.cols

    def dense(self):
        if self.m * self.n > DENSE_LIMIT:
            return None
        out = np.zeros((self.m, self.n), dtype=self.vals.dtype)
        np.add.at(out, (self.rows, self.cols), self.vals)
        return out


def _raw_pattern(indptr, indices, data, shape, *, major, strict, what, prune=False):
    m, n = shape_pair(shape, f"{what}.shape")
    indptr = _index_array(indptr, f"{what}.indptr")
    indices = _index_array(indices, f"{what}.indices")
    vals = value_array(data, f"{what}.data")
    nmaj, nmin = (m, n) if major == "row" else (n, m)
    if indptr.shape[0] != nmaj + 1:
        raise Invalid(f"{what}.indptr has length {indptr.shape[0]}, expected {nmaj + 1}")
    if indptr[0] != 0:
        raise Invalid(f"{what}.indptr[0] = {indptr[0]}")
    if np.any(np.diff(indptr) < 0):
        raise Invalid(f"{what}.indptr is not monotone")
    nnz = int(indptr[-1])
    if prune and indices.shape[0] >= nnz and vals.shape[0] >= nnz:
        indices, vals = indices[:nnz], vals[:nnz]
    if indices.shape[0] != nnz:
        raise Invalid(f"{what}.indptr[-1] = {nnz} != len(indices) = {indices.shape[0]}")
    if vals.shape[0] != nnz:
        raise Invalid(f"{what}.data has length {vals.shape[0]}, expected {nnz}")
    if nnz and (indices.min() < 0 or indices.max() >= nmin):
        raise Invalid(f"{what}.indices out of range [0, {nmin})")
    major_ids = np.repeat(np.arange(nmaj, dtype=np.int64), np.diff(indptr))
    if strict and nnz > 1:
        same_row = major_ids[1:] == major_ids[:-1]
        if np.any(same_row & (indices[1:] <= indices[:-1])):
            raise Invalid(f"{what} is not canonical (unsorted or duplicate columns)")
    rows, cols = (major_ids, indices) if major == "row" else (indices, major_ids)
    return m, n, rows, cols, vals


def _canonical(m, n, rows, cols, vals, sum_dtype=None):
    """Sort row-major and sum duplicates (in ``sum_dtype``, as scipy would)."""
    if rows.size == 0:
        return rows, cols, vals
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    v = vals[order] if sum_dtype is None else np.asarray(vals)[order]
    first = np.ones(rows.shape[0], bool)
    first[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
    grp = np.cumsum(first) - 1
    acc = np.zeros(int(first.sum()), dtype=v.dtype if sum_dtype is None else sum_dtype)
    np.add.at(acc, grp, v)
    if sum_dtype is not None:
        acc = acc.astype(np.complex128 if acc.dtype.kind == "c" else np.float64)
    return rows[first], cols[first], acc


def interp_W(W, *, finite, what="W"):
    """The matrix W stands for, by the documented contract, or Invalid."""
    from sparsecore import CSR

    if isinstance(W, CSR):
        data = W.data
        if not isinstance(data, np.ndarray):
            raise Invalid(f"{what}.data was replaced by a {type(data).__name__}")
        m, n, rows, cols, vals = _raw_pattern(
            W.indptr, W.indices, data, W.shape, major="row", strict=True, what=what
        )
        if finite and not finite32(vals).all():
            raise Invalid(f"{what}.data holds NaN/inf (op needs finite values)")
        return Mat(m, n, rows, cols, vals, "csr", data)
    if isinstance(W, tuple) and len(W) == 4:
        indptr, indices, data, shape = W
        for a, nm in ((indptr, "indptr"), (indices, "indices"), (data, "data")):
            if not isinstance(a, np.ndarray):
                raise Invalid(f"{what}.{nm} is not a NumPy array")
        if data.dtype.kind not in "biuf":
            raise Invalid(f"{what}.data has dtype {data.dtype}")
        m, n, rows, cols, vals = _raw_pattern(
            indptr, indices, data, shape, major="row", strict=True, what=what
        )
        if not finite32(vals).all():
            raise Invalid(f"{what}.data is not finite in float32")
        return Mat(m, n, rows, cols, vals, "tuple", data)
    import scipy.sparse as sp

    if sp.issparse(W):
        if W.ndim != 2:
            raise Invalid(f"{what} is {W.ndim}-D")
        if W.dtype.kind not in "biufc":
            raise Invalid(f"{what} has dtype {W.dtype}")
        fmt = W.format
        if fmt in ("csr", "csc"):
            m, n, rows, cols, vals = _raw_pattern(
                W.indptr, W.indices, W.data, W.shape,
                major="row" if fmt == "csr" else "col", strict=False, what=what, prune=True,
            )  # fmt: skip
            raw = np.asarray(W.data)[: rows.shape[0]]
        elif fmt == "coo":
            m, n = shape_pair(W.shape)
            r, c = _index_array(W.row, f"{what}.row"), _index_array(W.col, f"{what}.col")
            vals = value_array(W.data, f"{what}.data")
            if not (r.shape == c.shape == vals.shape):
                raise Invalid(f"{what}: row/col/data lengths differ")
            if r.size and (r.min() < 0 or r.max() >= m or c.min() < 0 or c.max() >= n):
                raise Invalid(f"{what}: coo indices out of range")
            rows, cols, raw = r, c, np.asarray(W.data)
        else:
            C = W.tocoo()
            m, n = shape_pair(C.shape)
            rows, cols = C.row.astype(np.int64), C.col.astype(np.int64)
            raw = np.asarray(C.data)
        # duplicates summed in float64: the float64 reference of what the stored entries add
        # up to (the library casts to float32 first, then sums; scipy would sum float16 or
        # int8 data in that dtype, rounding or wrapping)
        if raw.dtype.kind == "c":
            rows, cols, vals = _canonical(m, n, rows, cols, raw, np.complex128)
        else:
            rows, cols, vals = _canonical(m, n, rows, cols, value_array(raw, f"{what}.data"))
        if not finite32(vals).all():
            raise Invalid(f"{what}.data is not finite in float32")
        return Mat(m, n, rows, cols, vals, "scipy", None)
    raise Invalid(f"{what} is a {type(W).__name__}, not a sparse form")


def interp_dense(a, what, n_rows, layout, *, finite=False):
    """A dense operand as the contract reads it: (n_rows, B) feature-major, float64/complex."""
    if isinstance(a, (int, float, str, type(None))):
        raise Invalid(f"{what} is a {type(a).__name__}")
    if not isinstance(a, np.ndarray):
        try:
            a = np.asarray(a)
        except Exception:
            raise Invalid(f"{what} is not array-like") from None
    if a.ndim != 2:
        raise Invalid(f"{what} is {a.ndim}-D")
    v = value_array(a, what, ndim=2)
    if layout == "batch":
        v = v.T
    if v.shape[0] != n_rows:
        raise Invalid(f"{what} has {v.shape[0]} feature rows, expected {n_rows}")
    if finite and not finite32(v).all():
        raise Invalid(f"{what} is not finite in float32")
    return v


def interp_layout(layout):
    if not isinstance(layout, str) or layout not in ("feature", "batch"):
        raise Invalid(f"layout {layout!r}")
    return layout


def interp_out(out, shape, inputs):
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise Invalid("out is not an array")
    if out.shape != tuple(shape):
        raise Invalid(f"out has shape {out.shape}, expected {tuple(shape)}")
    if out.dtype != np.float32:
        raise Invalid(f"out has dtype {out.dtype}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise Invalid("out is not writeable C-contiguous")
    for a in inputs:
        if isinstance(a, np.ndarray) and np.may_share_memory(out, a):
            raise Invalid("out overlaps an input")
    return out


def interp_mask(keep, nnz, what="keep"):
    if keep is None:
        return np.ones(nnz, bool)
    if not isinstance(keep, np.ndarray):
        try:
            keep = np.asarray(keep)
        except Exception:
            raise Invalid(f"{what} is not array-like") from None
    if keep.ndim != 1 or keep.shape[0] != nnz:
        raise Invalid(f"{what} has shape {keep.shape}, expected ({nnz},)")
    if keep.dtype.kind == "b":
        return keep.astype(bool)
    if keep.dtype.kind in "iu" and np.all((keep == 0) | (keep == 1)):
        return keep.astype(bool)  # lenient: a 0/1 mask means the obvious
    raise Invalid(f"{what} has dtype {keep.dtype}")


def interp_count(k, low, high, what="k"):
    if _is_int(k) or isinstance(k, (bool, np.bool_)):
        v = int(k)
    elif isinstance(k, (float, np.floating)) and np.isfinite(k) and float(k).is_integer():
        v = int(k)  # lenient
    else:
        raise Invalid(f"{what} = {k!r} is not an integer")
    if not low <= v <= high:
        raise Invalid(f"{what} = {v} outside [{low}, {high}]")
    return v


def interp_int_array(a, what):
    try:
        a = np.asarray(a)
    except Exception:
        raise Invalid(f"{what} is not array-like") from None
    if a.ndim != 1:
        raise Invalid(f"{what} is {a.ndim}-D")
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a.dtype.kind in "iu":
        return _index_array(a, what)
    if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
        if np.abs(a).max() < 2**62:
            return a.astype(np.int64)  # lenient
    raise Invalid(f"{what} has dtype {a.dtype}")


# ------------------------------------------------------------------------- comparisons


def _as_ndarray(r, what):
    if not isinstance(r, np.ndarray):
        raise Wrong(f"{what} is a {type(r).__name__}, not an ndarray")
    return r


def close(got, ref, scale, what):
    """got (float32 result) against the float64 reference, per-entry tolerance from scale."""
    got = _as_ndarray(got, what)
    if got.shape != ref.shape:
        raise Wrong(f"{what} has shape {got.shape}, expected {ref.shape}")
    if got.dtype != np.float32:
        raise Wrong(f"{what} has dtype {got.dtype}, expected float32")
    if not got.size:
        return
    g = got.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        special = ~np.isfinite(ref) | ~np.isfinite(scale) | (scale >= HUGE_SCALE)
        tol = 1e-5 * np.where(np.isfinite(scale), scale, 0) + 1e-30
        err = np.abs(g - ref)  # complex ref: the imaginary part counts as error
        ok = np.where(special, ~np.isfinite(g) | (err <= tol), err <= tol)
    if not ok.all():
        idx = tuple(int(i) for i in np.argwhere(~ok)[0])
        raise Wrong(
            f"{what}{list(idx)} = {got[idx]!r}, float64 reference {ref[idx]!r} "
            f"({int((~ok).sum())} of {ok.size} entries wrong)"
        )


def matmul_ref(M: Mat, X, transpose=False):
    """W·X (or Wᵀ·X) over the stored entries, and Σ|w||x| for the tolerance."""
    rows, cols = (M.cols, M.rows) if transpose else (M.rows, M.cols)
    out_rows = M.n if transpose else M.m
    B = X.shape[1]
    if out_rows * B > DENSE_LIMIT * 4 or out_rows > 2**40:
        return None, None
    dt = np.complex128 if (np.iscomplexobj(X) or np.iscomplexobj(M.vals)) else np.float64
    Y = np.zeros((out_rows, B), dt)
    S = np.zeros((out_rows, B), np.float64)
    if M.nnz and B:
        with np.errstate(invalid="ignore", over="ignore"):
            np.add.at(Y, rows, M.vals[:, None] * X[cols])
            np.add.at(S, rows, np.abs(M.vals)[:, None] * np.abs(X[cols]))
    return Y, S


# ------------------------------------------------------------------------- the operations


def _std(args):
    return args.get("layout", "feature")


def expect_spmm(a, transpose=False):
    layout = interp_layout(_std(a))
    dname = "dY" if transpose else "X"
    M = interp_W(a["W"], finite=False)
    rows_needed = M.m if transpose else M.n
    X = interp_dense(a[dname], dname, rows_needed, layout)
    out_rows = M.n if transpose else M.m
    B = X.shape[1]
    shape = (B, out_rows) if layout == "batch" else (out_rows, B)
    out = interp_out(a.get("out"), shape, [a[dname], M.data_obj, *_w_arrays(a["W"])])
    Y, S = matmul_ref(M, X, transpose)

    def check(res):
        res = _as_ndarray(res, "result")
        if res.shape != shape:
            raise Wrong(f"result has shape {res.shape}, expected {shape}")
        if out is not None and not np.shares_memory(res, out) and res.size:
            raise Wrong("out= was given but the result is another array")
        if Y is None:
            return
        ref, sc = (Y.T, S.T) if layout == "batch" else (Y, S)
        close(res, ref, sc, "result")
        if out is not None:
            close(out, ref, sc, "out")

    return check


def _w_arrays(W):
    """The caller's arrays behind W (out= must not overlap any of them)."""
    if isinstance(W, tuple) and len(W) == 4:
        return [x for x in W[:3] if isinstance(x, np.ndarray)]
    return [getattr(W, a) for a in ("data", "indices", "indptr", "row", "col")
            if isinstance(getattr(W, a, None), np.ndarray)]


def expect_sddmm(a):
    layout = interp_layout(_std(a))
    M = interp_W(a["W"], finite=False)
    dY = interp_dense(a["dY"], "dY", M.m, layout)
    X = interp_dense(a["X"], "X", M.n, layout)
    if dY.shape[1] != X.shape[1]:
        raise Invalid("dY and X batch sizes differ")
    out = interp_out(a.get("out"), (M.nnz,), [a["dY"], a["X"], M.data_obj, *_w_arrays(a["W"])])
    with np.errstate(invalid="ignore", over="ignore"):
        ref = np.einsum("pb,pb->p", dY[M.rows], X[M.cols]) if M.nnz else np.zeros(0)
        sc = np.einsum("pb,pb->p", np.abs(dY[M.rows]), np.abs(X[M.cols])) if M.nnz else ref.real

    def check(res):
        res = _as_ndarray(res, "result")
        if out is not None and not np.shares_memory(res, out) and res.size:
            raise Wrong("out= was given but the result is another array")
        close(res, ref, np.asarray(sc, np.float64), "dW")

    return check


def expect_topk(a):
    layout = interp_layout(_std(a))
    M = interp_W(a["W"], finite=False)
    dY = interp_dense(a["dY"], "dY", M.m, layout, finite=True)
    X = interp_dense(a["X"], "X", M.n, layout, finite=True)
    if dY.shape[1] != X.shape[1]:
        raise Invalid("dY and X batch sizes differ")
    keep = interp_mask(a.get("keep"), M.nnz)
    present = int(keep.sum())
    k = interp_count(a["k"], 0, M.m * M.n - present)
    tb = a.get("tile_bytes")
    if tb is not None:
        interp_count(tb, 1, 2**63, "tile_bytes")
    kr, kc = M.rows[keep], M.cols[keep]
    small = M.m * M.n <= DENSE_LIMIT

    def check(res):
        if not isinstance(res, tuple) or len(res) != 3:
            raise Wrong(f"topk_grow returned {type(res).__name__}, expected (rows, cols, scores)")
        r, c, s = (_as_ndarray(x, nm) for x, nm in zip(res, ("rows", "cols", "scores"), strict=False))
        for x, nm in ((r, "rows"), (c, "cols")):
            if x.shape != (k,) or x.dtype.kind not in "iu":
                raise Wrong(f"{nm} has shape {x.shape} dtype {x.dtype}, expected ({k},) integers")
        if s.shape != (k,) or s.dtype != np.float32:
            raise Wrong(f"scores has shape {s.shape} dtype {s.dtype}, expected ({k},) float32")
        if not k:
            return
        r64, c64 = r.astype(object), c.astype(object)
        if min(r64) < 0 or max(r64) >= M.m or min(c64) < 0 or max(c64) >= M.n:
            raise Wrong("grown coordinates outside the matrix")
        flat = [int(i) * M.n + int(j) for i, j in zip(r64, c64, strict=False)]
        if any(b <= a_ for a_, b in zip(flat, flat[1:], strict=False)):
            raise Wrong("grown entries are not in ascending (row, col) order without repeats")
        kept = {int(i) * M.n + int(j) for i, j in zip(kr.tolist(), kc.tolist(), strict=False)}
        if kept & set(flat):
            raise Wrong("topk_grow returned a connection that is present (kept)")
        all_zero = not dY.size or not np.any(dY) or not np.any(X)
        if small and not all_zero:
            G = np.abs(dY @ X.T) if dY.size else np.zeros((M.m, M.n))
            # float32 rounding is relative to Σ_b |dY_ib·X_jb|, not to the (cancelled) sum
            S = np.abs(dY) @ np.abs(X).T if dY.size else np.zeros((M.m, M.n))
            ri, ci = r.astype(np.int64), c.astype(np.int64)
            close(s, G[ri, ci], S[ri, ci] + 1e-30, "scores")
            absent = np.ones((M.m, M.n), bool)
            absent[kr, kc] = False
            absent[ri, ci] = False
            if absent.any():
                best_left = G[absent].max()
                if best_left > G[ri, ci].min() + 1e-5 * S.max() + 1e-30:
                    raise Wrong(
                        f"not the top {k}: an absent connection scores {best_left:.7g} > "
                        f"the smallest chosen {G[ri, ci].min():.7g}"
                    )
        elif all_zero:  # all scores 0: exactly the first k absent positions (ties: lower i·n + j)
            want, pos = [], 0
            kept_sorted = sorted(kept)
            it = iter(kept_sorted)
            nxt = next(it, None)
            while len(want) < k:
                while nxt is not None and nxt < pos:
                    nxt = next(it, None)
                if nxt != pos:
                    want.append(pos)
                pos += 1
            if flat != want:
                raise Wrong(f"all scores are 0: expected the first {k} absent positions {want}, got {flat}")
            if np.any(s != 0):
                raise Wrong("all scores are 0 but nonzero scores were returned")

    return check


def expect_magnitude_drop(a):
    W = a["W"]
    if isinstance(W, np.ndarray):
        if W.ndim != 1:
            raise Invalid(f"W is a {W.ndim}-D dense array")
        if W.dtype.kind not in "biuf":
            raise Invalid(f"W values have dtype {W.dtype}")
        vals64 = W.astype(np.float64)
        if not np.isfinite(vals64).all():
            raise Invalid("W values are not finite")
        cands = [np.abs(vals64)]
        if W.dtype.kind == "f" and W.dtype.itemsize > 4:
            with np.errstate(over="ignore"):
                cands.append(np.abs(W.astype(np.float32)).astype(np.float64))
        n = W.shape[0]
    else:
        M = interp_W(W, finite=True)
        if np.iscomplexobj(M.vals):
            raise Invalid("W values are complex")
        with np.errstate(over="ignore"):
            cands = [np.abs(M.vals.astype(np.float32)).astype(np.float64), np.abs(M.vals)]
        n = M.nnz
    k = interp_count(a["k"], 0, n)
    wants = [np.sort(np.argsort(c, kind="stable")[:k]) for c in cands]

    def check(res):
        res = _as_ndarray(res, "result")
        if res.shape != (k,) or (k and res.dtype.kind not in "iu"):
            raise Wrong(f"result has shape {res.shape} dtype {res.dtype}, expected ({k},) ints")
        if not any(np.array_equal(res.astype(np.int64), w) for w in wants):
            raise Wrong(f"positions {res.tolist()[:12]}, expected {wants[0].tolist()[:12]}")

    return check


def expect_merge(a):
    M = interp_W(a["W"], finite=False)
    keep = interp_mask(a["keep"], M.nnz)
    gr = interp_int_array(a["grow_rows"], "grow_rows")
    gc = interp_int_array(a["grow_cols"], "grow_cols")
    if gr.shape != gc.shape:
        raise Invalid("grow_rows and grow_cols differ in length")
    if gr.size and (gr.min() < 0 or gr.max() >= M.m or gc.min() < 0 or gc.max() >= M.n):
        raise Invalid("grown coordinates outside the matrix")
    grown = list(zip(gr.tolist(), gc.tolist(), strict=False))
    if len(set(grown)) != len(grown):
        raise Invalid("a grown entry is listed twice")
    old = {(int(i), int(j)): p for p, (i, j) in enumerate(zip(M.rows.tolist(), M.cols.tolist(), strict=False))}
    kept = {key for key, p in old.items() if keep[p]}
    if kept & set(grown):
        raise Invalid("a grown entry is present and kept")
    new = sorted(kept | set(grown))
    src_want = np.array([old.get(e, -1) for e in new], dtype=np.int64)
    with np.errstate(over="ignore", invalid="ignore"):
        v32 = M.vals.astype(np.float32) if not np.iscomplexobj(M.vals) else None
    from sparsecore import CSR

    def check(res):
        if not isinstance(res, tuple) or len(res) != 2:
            raise Wrong(f"merge returned {type(res).__name__}, expected (CSR, src)")
        Wn, src = res
        if not isinstance(Wn, CSR):
            raise Wrong(f"merge returned a {type(Wn).__name__}, not a CSR")
        if tuple(Wn.shape) != (M.m, M.n):
            raise Wrong(f"new W has shape {Wn.shape}, expected {(M.m, M.n)}")
        try:
            N = interp_W(Wn, finite=False, what="new W")
        except Invalid as e:
            raise Wrong(f"merge returned a broken CSR: {e}") from None
        got = list(zip(N.rows.tolist(), N.cols.tolist(), strict=False))
        if got != new:
            raise Wrong(f"new pattern {got[:8]}..., expected {new[:8]}...")
        src = _as_ndarray(src, "src")
        if not np.array_equal(src.astype(np.int64), src_want):
            raise Wrong(f"src = {src.tolist()[:12]}, expected {src_want.tolist()[:12]}")
        if v32 is not None:
            want = np.where(src_want >= 0, v32[np.maximum(src_want, 0)] if M.nnz else 0, 0)
            if not np.array_equal(Wn.data, want.astype(np.float32), equal_nan=True):
                raise Wrong("new W's values are not the carried old values (0 for new entries)")

    return check


def expect_remap(a):
    try:
        src = np.asarray(a["src"])
        values = np.asarray(a["values"])
    except Exception:
        raise Invalid("src/values not array-like") from None
    if src.ndim != 1 or (src.size and src.dtype.kind not in "iu"):
        raise Invalid(f"src has dtype {src.dtype} shape {src.shape}")
    if values.ndim != 1:
        raise Invalid(f"values is {values.ndim}-D")
    if values.dtype.kind not in "biufcOUS":
        raise Invalid(f"values have dtype {values.dtype}")
    loose = values.dtype.kind in "OUSb"  # any fill the dtype takes is fine
    s = _index_array(src, "src") if src.size else np.zeros(0, np.int64)
    if s.size and (s.min() < -1 or s.max() >= values.shape[0]):
        raise Invalid("src holds positions outside [-1, len(values))")
    fill = a.get("fill", 0.0)
    kind = values.dtype.kind
    if loose:
        def check_loose(res):
            res = _as_ndarray(res, "result")
            if res.shape != s.shape:
                raise Wrong(f"result has shape {res.shape}, expected {s.shape}")
            for w, p in enumerate(s.tolist()):
                if p >= 0 and not (res[w] == values[p] or (res[w] != res[w] and values[p] != values[p])):
                    raise Wrong(f"result[{w}] = {res[w]!r}, expected {values[p]!r}")

        return check_loose
    if not isinstance(fill, (numbers.Number, np.generic)) or isinstance(fill, (str, bytes)):
        raise Invalid(f"fill is a {type(fill).__name__}")
    fill_c = complex(fill)
    if kind in "iu" and np.any(s < 0):
        if not (np.isfinite(fill_c.real) and fill_c.imag == 0):
            raise Invalid("a non-finite fill for integer values")
        info = np.iinfo(values.dtype)
        if not info.min <= fill_c.real <= info.max:
            raise Invalid("fill outside the integer dtype's range")
    if kind != "c" and fill_c.imag != 0 and np.any(s < 0):
        raise Invalid("a complex fill for real values")

    def eq(x, y):
        x, y = complex(x), complex(y)
        return x == y or (np.isnan(x.real) and np.isnan(y.real))

    def check(res):
        res = _as_ndarray(res, "result")
        if res.shape != s.shape:
            raise Wrong(f"result has shape {res.shape}, expected {s.shape}")
        for w, p in enumerate(s.tolist()):
            g = res[w]
            if p >= 0:
                ok = eq(g, values[p]) or eq(g, values[p].astype(res.dtype))
                want = values[p]
            else:
                cands = [fill_c]
                try:
                    with np.errstate(all="ignore"):
                        cands.append(complex(values.dtype.type(fill_c.real if kind != "c" else fill_c)))
                except (TypeError, ValueError, OverflowError):
                    pass
                ok = any(eq(g, c) for c in cands)
                want = fill
            if not ok:
                raise Wrong(f"result[{w}] = {g!r}, expected {want!r}")

    return check


def _check_csr_result(res, M_expected_rows, M_expected_cols, vals32, shape, index_dtype=None):
    from sparsecore import CSR

    if not isinstance(res, CSR):
        raise Wrong(f"returned a {type(res).__name__}, not a CSR")
    if tuple(res.shape) != tuple(shape) or not all(type(s) is int for s in res.shape):
        raise Wrong(f"shape {res.shape!r}, expected {tuple(shape)} (Python ints)")
    for nm in ("indptr", "indices"):
        arr = getattr(res, nm)
        if not isinstance(arr, np.ndarray) or arr.dtype not in (np.int32, np.int64):
            raise Wrong(f"{nm} dtype {getattr(arr, 'dtype', None)}, expected int32/int64")
        if arr.flags.writeable:
            raise Wrong(f"{nm} of a new CSR is writeable (its pattern is trusted)")
    if index_dtype is not None and res.indices.dtype != np.dtype(index_dtype):
        raise Wrong(f"index dtype {res.indices.dtype}, asked for {np.dtype(index_dtype)}")
    if not isinstance(res.data, np.ndarray) or res.data.dtype != np.float32:
        raise Wrong(f"data dtype {getattr(res.data, 'dtype', None)}, expected float32")
    try:
        N = interp_W(res, finite=False, what="result")
    except Invalid as e:
        raise Wrong(f"the new CSR is broken: {e}") from None
    if not (np.array_equal(N.rows, M_expected_rows) and np.array_equal(N.cols, M_expected_cols)):
        raise Wrong(
            f"pattern differs from the input matrix's: nnz {N.nnz} vs {len(M_expected_rows)}"
        )
    if vals32 is not None and not np.array_equal(res.data, vals32):
        bad = int(np.flatnonzero(res.data != vals32)[0])
        raise Wrong(f"data[{bad}] = {res.data[bad]!r}, expected {vals32[bad]!r}")
    if not finite32(res.data.astype(np.float64)).all():
        raise Wrong("the new CSR holds non-finite values")
    return N


def _index_dtype_arg(idt, m, n, nnz):
    if idt is None:
        return None
    try:
        dt = np.dtype(idt)
    except TypeError:
        raise Invalid(f"index_dtype {idt!r}") from None
    if dt not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise Invalid(f"index_dtype {dt}")
    if dt == np.int32 and max(m, n, nnz) > np.iinfo(np.int32).max:
        raise Invalid("index_dtype int32 too narrow")
    return dt


def expect_ctor(a):
    args = (a["indptr"], a["indices"], a["data"], a["shape"])
    M = interp_W(tuple(args), finite=True)
    idt = _index_dtype_arg(a.get("index_dtype"), M.m, M.n, M.nnz)
    with np.errstate(over="ignore"):
        v32 = np.asarray(a["data"]).astype(np.float32)

    def check(res):
        _check_csr_result(res, M.rows, M.cols, v32, (M.m, M.n), idt)
        for nm, given in (("indptr", a["indptr"]), ("indices", a["indices"])):
            if np.may_share_memory(getattr(res, nm), given):
                raise Wrong(f"the new CSR's {nm} shares memory with the caller's array")

    return check


def expect_from_dense(a):
    x = a["a"]
    try:
        arr = np.asarray(x)
    except Exception:
        raise Invalid("not array-like") from None
    if arr.ndim != 2:
        raise Invalid(f"a is {arr.ndim}-D")
    if arr.dtype.kind not in "biuf":
        raise Invalid(f"a has dtype {arr.dtype}")
    if arr.size and not finite32(arr.astype(np.float64)).all():
        raise Invalid("a is not finite in float32")
    m, n = arr.shape
    r, c = np.nonzero(arr)
    with np.errstate(over="ignore"):
        a32 = arr.astype(np.float32)
    r2, c2 = np.nonzero(a32)

    def check(res):
        try:
            _check_csr_result(res, r.astype(np.int64), c.astype(np.int64), a32[r, c], (m, n))
        except Wrong:
            _check_csr_result(res, r2.astype(np.int64), c2.astype(np.int64), a32[r2, c2], (m, n))

    return check


def expect_from_scipy(a):
    M = interp_W(a["M"], finite=True) if _is_scipy(a["M"]) else None
    if M is None:
        raise Invalid(f"M is a {type(a['M']).__name__}, not scipy.sparse")
    if np.iscomplexobj(M.vals):
        raise Invalid("complex values")
    with np.errstate(over="ignore"):
        v32 = M.vals.astype(np.float32)
    snap = _scipy_snapshot(a["M"])
    # float32 data: the library (like scipy) sums duplicates in float32, which errs against the
    # float64 sum by up to (terms - 1) roundings of the terms' magnitudes, far above the
    # result's own size when duplicates cancel; other dtypes are summed in float64 (formats.
    # _summable), whose error the plain bound below covers
    mag_sum = terms = None
    if getattr(a["M"], "dtype", None) == np.float32:
        try:  # (a mutated matrix scipy cannot convert: the plain bound)
            C = a["M"].tocoo()
            rows64, cols64 = C.row.astype(np.int64), C.col.astype(np.int64)
            mag = np.abs(np.asarray(C.data).astype(np.float64))
            r_, c_, mag_sum = _canonical(M.m, M.n, rows64, cols64, mag)
            _, _, terms = _canonical(M.m, M.n, rows64, cols64, np.ones(mag.shape[0]))
            if not (np.array_equal(r_, M.rows) and np.array_equal(c_, M.cols)):
                mag_sum = terms = None
        except Exception:
            mag_sum = terms = None
    dup = 0.0 if mag_sum is None else np.maximum(terms - 1, 0) * 2.0**-24 * mag_sum

    def check(res):
        _check_csr_result(res, M.rows, M.cols, None, (M.m, M.n))
        tol = 1e-6 * np.abs(M.vals) + dup + 1e-30
        if not np.all(np.abs(res.data.astype(np.float64) - v32.astype(np.float64)) <= tol + np.abs(v32) * 1e-7):
            bad = int(np.flatnonzero(res.data != v32)[0])
            raise Wrong(f"data[{bad}] = {res.data[bad]!r}, expected {v32[bad]!r} (duplicates summed)")
        if _scipy_snapshot(a["M"]) != snap:
            raise Wrong("from_scipy modified its input matrix")

    return check


def _is_scipy(M):
    import scipy.sparse as sp

    return sp.issparse(M)


def _scipy_snapshot(M):
    parts = []
    for attr in ("indptr", "indices", "data", "row", "col"):
        v = getattr(M, attr, None)
        if isinstance(v, np.ndarray):
            parts.append((attr, v.dtype.str, v.tobytes()))
    return parts


def expect_random(a):
    m, n = shape_pair(a["shape"])
    d = a["density"]
    if not isinstance(d, (numbers.Real, np.floating)) or isinstance(d, (bool, np.bool_)):
        raise Invalid(f"density {d!r}")
    if not 0.0 <= float(d) <= 1.0:
        raise Invalid(f"density {d!r} outside [0, 1]")
    scale = a.get("scale", 1.0)
    if not isinstance(scale, (numbers.Real, np.floating)) or isinstance(scale, (bool, np.bool_)):
        raise Invalid(f"scale {scale!r}")
    per_row = bool(a.get("per_row", False))
    nnz = int(round(float(d) * n)) * m if per_row else int(round(float(d) * m * n))
    if nnz and (not np.isfinite(scale) or abs(float(scale)) * 8 > F32_MAX):
        raise Invalid(f"scale {scale!r} makes non-finite float32 values")
    idt = _index_dtype_arg(a.get("index_dtype"), m, n, nnz)
    if nnz > 50_000_000:
        raise Invalid(f"nnz {nnz} needs more memory than the worker has")

    def check(res):
        from sparsecore import CSR

        if not isinstance(res, CSR):
            raise Wrong(f"returned a {type(res).__name__}")
        if tuple(res.shape) != (m, n):
            raise Wrong(f"shape {res.shape}, expected {(m, n)}")
        try:
            N = interp_W(res, finite=False, what="result")
        except Invalid as e:
            raise Wrong(f"CSR.random made a broken CSR: {e}") from None
        if N.nnz != nnz:
            raise Wrong(f"nnz {N.nnz}, expected {nnz}")
        if res.data.dtype != np.float32 or not finite32(N.vals).all():
            raise Wrong(f"data dtype {res.data.dtype} or non-finite values")
        if idt is not None and res.indices.dtype != idt:
            raise Wrong(f"index dtype {res.indices.dtype}, asked for {idt}")
        if per_row and nnz and np.any(np.diff(res.indptr) != nnz // m):
            raise Wrong("per_row=True but rows hold different counts")

    return check


EXPECT = {
    "spmm": lambda a: expect_spmm(a, False),
    "spmm_t": lambda a: expect_spmm(a, True),
    "sddmm": expect_sddmm,
    "topk_grow": expect_topk,
    "magnitude_drop": expect_magnitude_drop,
    "merge": expect_merge,
    "remap": expect_remap,
    "CSR": expect_ctor,
    "from_dense": expect_from_dense,
    "from_scipy": expect_from_scipy,
    "random": expect_random,
}

# positional argument names of each call; the rest go as keywords
POSITIONAL = {
    "spmm": ("W", "X"),
    "spmm_t": ("W", "dY"),
    "sddmm": ("W", "dY", "X"),
    "topk_grow": ("W", "dY", "X", "k"),
    "magnitude_drop": ("W", "k"),
    "merge": ("W", "keep", "grow_rows", "grow_cols"),
    "remap": ("src", "values"),
    "CSR": ("indptr", "indices", "data", "shape"),
    "from_dense": ("a",),
    "from_scipy": ("M",),
    "random": ("shape", "density"),
}


def function(op):
    import kernels
    from sparsecore import CSR

    if op in ("CSR",):
        return CSR
    if op in ("from_dense", "from_scipy", "random"):
        return getattr(CSR, op)
    return getattr(kernels, op)


def call_text(op):
    if op == "CSR":
        return "CSR"
    if op in ("from_dense", "from_scipy", "random"):
        return f"CSR.{op}"
    return f"kernels.{op}"
