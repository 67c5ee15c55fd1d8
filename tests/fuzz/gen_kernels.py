"""Kernel-API cases: a valid small problem, then 0-3 named mutations, all from a recipe.

A recipe is a small JSON dict ``{"op", "seed", "m", "n", "B", "density", "form", "muts"}``; the
case (the argument specs) is built from it deterministically, so a failing recipe shrinks by
dropping mutations and sizes (``shrink``) and replays from the corpus. No library import here:
this runs in the parent process.
"""

from __future__ import annotations

import numpy as np

from tests.fuzz import codec as C

OPS = [
    "spmm", "spmm_t", "sddmm", "topk_grow", "magnitude_drop", "merge", "remap",
    "CSR", "from_dense", "from_scipy", "random",
]  # fmt: skip
W_OPS = {"spmm", "spmm_t", "sddmm", "topk_grow", "magnitude_drop", "merge"}
FORMS = ["csr", "tuple", "scipy_csr", "scipy_csc", "scipy_coo", "scipy_array", "scipy_other"]

INT_DT = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
VAL_DT = [
    "float16", "float32", "float64", "int8", "int32", "int64", "uint8", "bool", "complex64",
    "complex128", "object", ">f4", "longdouble",
]  # fmt: skip
HUGE_N = [2**31 + 3, 2**32, 2**40, 2**62]


class Draft:
    """The arguments under construction (NumPy arrays and plain values)."""

    def __init__(self, r, rng):
        self.r, self.rng = r, rng
        m, n, B = r["m"], r["n"], r["B"]
        self.m, self.n, self.B = m, n, B
        mask = rng.random((m, n)) < r["density"]
        rows, cols = np.nonzero(mask)
        self.indptr = np.zeros(m + 1, np.int32)
        np.cumsum(np.bincount(rows, minlength=m), out=self.indptr[1:])
        self.indices = cols.astype(np.int32)
        self.data = rng.standard_normal(rows.shape[0]).astype(np.float32)
        self.shape = (m, n)
        self.form = r.get("form", "csr")
        self.csr_muts: list = []
        self.scipy_set: dict = {}  # attributes assigned after construction
        self.tuple_views: dict = {}
        self.layout = None  # None: not passed
        self.X = rng.standard_normal((n, B)).astype(np.float32)
        self.dY = rng.standard_normal((m, B)).astype(np.float32)
        self.views: dict = {"X": [], "dY": []}
        self.out = None  # None | "auto" | spec dict
        self.k = None
        self.keep = None
        self.tile_bytes = None
        nnz = self.indices.shape[0]
        self.grow_rows = self.grow_cols = None
        self.src = self.values = None
        self.fill = None
        self.extra: dict = {}
        op = r["op"]
        if op == "topk_grow":
            avail = m * n - nnz
            self.k = int(rng.integers(0, avail + 1)) if avail else 0
        elif op == "magnitude_drop":
            self.k = int(rng.integers(0, nnz + 1))
        elif op == "merge":
            self.keep = rng.random(nnz) < 0.6
            absent = np.flatnonzero(~mask.ravel() | np.isin(np.arange(m * n), self._flat()[~self.keep]))
            g = int(rng.integers(0, min(len(absent), 6) + 1))
            pick = np.sort(rng.choice(absent, size=g, replace=False)) if g else np.zeros(0, int)
            pick = rng.permutation(pick)
            self.grow_rows = (pick // max(n, 1)).astype(np.int64)
            self.grow_cols = (pick % max(n, 1)).astype(np.int64)
        elif op == "remap":
            L = int(rng.integers(0, 8))
            self.values = rng.standard_normal(L).astype(np.float32)
            self.src = rng.integers(-1, L, size=int(rng.integers(0, 8))).astype(np.int64)
        elif op == "from_dense":
            self.a = np.where(mask, rng.standard_normal((m, n)), 0.0)
        elif op == "random":
            self.extra = {"shape": (m, n), "density": float(r["density"]), "seed": r["seed"]}

    def _flat(self):
        rows = np.repeat(np.arange(self.m), np.diff(self.indptr.astype(np.int64)))
        return rows * self.n + self.indices.astype(np.int64)

    # ------------------------------------------------------------ encoding into a case
    def _operand(self, name):
        a = getattr(self, name)
        if isinstance(a, dict):  # already a spec
            return a
        if self.layout == "batch" and isinstance(a, np.ndarray) and a.ndim == 2:
            a = np.ascontiguousarray(a.T)
        spec = C.enc(a)
        for how in self.views.get(name, []):
            spec = C.view(spec, how)
        return spec

    def _W(self):
        ip, ix, d, shape = self.indptr, self.indices, self.data, self.shape
        f = self.form
        if f == "csr":
            return {"$csr": {"arrays": C.enc(self._valid_arrays()), "mutate": self.csr_muts}}
        if f == "tuple":
            parts = []
            for nm, a in (("indptr", ip), ("indices", ix), ("data", d)):
                s = C.enc(a)
                for how in self.tuple_views.get(nm, []):
                    s = C.view(s, how)
                parts.append(s)
            return {"$tuple": [*parts, C.enc(shape)]}
        if f == "values1d":
            return C.enc(d)
        kind = "array" if f == "scipy_array" else "matrix"
        fmt = {"scipy_csc": "csc", "scipy_coo": "coo", "scipy_other": self.r.get("fmt2", "lil")}.get(
            f, "csr"
        )
        valid_ip, valid_ix, valid_d, vshape = self._valid_arrays()
        rows = np.repeat(np.arange(len(valid_ip) - 1), np.diff(valid_ip.astype(np.int64)))
        if fmt == "csc" and vshape[1] > 10**6:
            fmt = "coo"
        spec = {"fmt": fmt, "kind": kind, "shape": C.enc(tuple(vshape)), "set": {}}
        if fmt == "csr":
            spec.update(data=C.enc(valid_d), indices=C.enc(valid_ix), indptr=C.enc(valid_ip))
            spec["set"] = {k: C.enc(v) for k, v in self.scipy_set.items()}
        elif fmt == "csc":
            m_, n_ = vshape
            T = np.lexsort((rows, valid_ix))
            cptr = np.zeros(n_ + 1, np.int32)
            np.cumsum(np.bincount(valid_ix[T].astype(np.int64), minlength=n_), out=cptr[1:])
            spec.update(data=C.enc(valid_d[T]), indices=C.enc(rows[T].astype(np.int32)),
                        indptr=C.enc(cptr))  # fmt: skip
            spec["set"] = {k: C.enc(v) for k, v in self.scipy_set.items() if k != "indptr"}
        else:
            spec.update(data=C.enc(valid_d), row=C.enc(rows), col=C.enc(valid_ix))
            if fmt == "coo":
                spec["set"] = {k: C.enc(v) for k, v in self.scipy_set.items()}
        return {"$scipy": spec}

    def _valid_arrays(self):
        """The arrays a form is built from: corrupt raw arrays go straight into tuples; CSR and
        scipy forms are built valid and corrupted afterwards (csr_muts / scipy_set)."""
        if self.form == "tuple":
            return self.indptr, self.indices, self.data, self.shape
        return self.base_arrays

    def encode(self) -> dict:
        op = self.r["op"]
        a: dict = {}
        if op in W_OPS:
            a["W"] = self._W()
        if op in ("spmm", "sddmm", "topk_grow"):
            a["X"] = self._operand("X")
        if op in ("spmm_t", "sddmm", "topk_grow"):
            a["dY"] = self._operand("dY")
        if op in ("topk_grow", "magnitude_drop"):
            a["k"] = C.enc(self.k)
        if op == "topk_grow":
            if self.keep is not None:
                a["keep"] = C.enc(self.keep)
            if self.tile_bytes is not None:
                a["tile_bytes"] = C.enc(self.tile_bytes)
        if op == "merge":
            a["keep"] = C.enc(self.keep)
            a["grow_rows"] = C.enc(self.grow_rows)
            a["grow_cols"] = C.enc(self.grow_cols)
        if op == "remap":
            a["src"] = C.enc(self.src)
            a["values"] = C.enc(self.values)
            if self.fill is not None:
                a["fill"] = C.enc(self.fill)
        if op == "CSR":
            for nm, v in zip(("indptr", "indices", "data", "shape"),
                             (self.indptr, self.indices, self.data, self.shape), strict=False):  # fmt: skip
                s = C.enc(v)
                for how in self.tuple_views.get(nm, []):
                    s = C.view(s, how)
                a[nm] = s
            if "index_dtype" in self.extra:
                a["index_dtype"] = self.extra["index_dtype"]
        if op == "from_dense":
            s = C.enc(self.a)
            for how in self.views.get("a", []):
                s = C.view(s, how)
            a["a"] = s
        if op == "from_scipy":
            a["M"] = self.extra.get("M_override") or self._W()
        if op == "random":
            for key in ("shape", "density", "seed", "scale", "per_row", "index_dtype"):
                if key in self.extra:
                    a[key] = C.enc(self.extra[key])
        if self.layout is not None:
            a["layout"] = self.layout
        if self.out is not None:
            a["out"] = self._out_spec(op)
        return {"cat": "kernels", "op": op, "args": a}

    def _out_spec(self, op):
        kind = self.out
        if isinstance(kind, dict):
            return kind
        if op == "sddmm":
            shape = (int(self.indices.shape[0]),)
        else:
            rows = self.n if op == "spmm_t" else self.m
            shape = (self.B, rows) if self.layout == "batch" else (rows, self.B)
        dt, views = np.float32, []
        if kind == "wrong_shape":
            shape = tuple(s + 1 for s in shape)
        elif kind == "float64":
            dt = np.float64
        elif kind == "fortran" and len(shape) == 2:
            views = ["T"]
            shape = shape[::-1]
        elif kind == "readonly":
            views = ["readonly"]
        elif kind == "step2":
            views = ["step2"]
        elif kind == "list":
            views = ["tolist"]
        elif kind == "1d":
            shape = (int(np.prod(shape)),)
        spec = C.enc(np.full(shape, np.nan, dtype=dt))
        for how in views:
            spec = C.view(spec, how)
        return spec


# ------------------------------------------------------------------------- mutations
# Each takes the draft and a parameter drawn at generation time (stored in the recipe).


def _csr_setattr(D, attr, value):
    D.csr_muts.append({"op": "setattr", "attr": attr, "value": C.enc(value)})


def _signed_like(a, dt):
    dt = np.dtype(dt)
    with np.errstate(over="ignore"):
        return a.astype(np.int64).astype(dt)


def m_index_dtype(D, p):
    which, dt = p
    if D.form == "csr":  # the constructor sees the dtype; corruption comes later
        D.base_arrays = (
            _signed_like(D.base_arrays[0], dt) if which != "indices" else D.base_arrays[0],
            _signed_like(D.base_arrays[1], dt) if which != "indptr" else D.base_arrays[1],
            *D.base_arrays[2:],
        )
        return
    if which in ("indptr", "both"):
        D.indptr = _signed_like(D.indptr, dt)
    if which in ("indices", "both"):
        D.indices = _signed_like(D.indices, dt)
    _sync_scipy(D, which)


def _sync_scipy(D, which="both"):
    if D.form.startswith("scipy"):
        if which in ("indptr", "both"):
            D.scipy_set["indptr"] = D.indptr
        if which in ("indices", "both"):
            D.scipy_set["indices"] = D.indices


def _corrupt(D, attr, new):
    """Replace a pattern array of any form: raw in a tuple, assigned after construction on
    scipy, assigned to the CSR's attribute on a CSR."""
    setattr(D, attr, new)
    if D.form == "csr":
        _csr_setattr(D, attr, new)
    elif D.form.startswith("scipy"):
        D.scipy_set[attr] = new


def m_indptr_nonmonotone(D, p):
    ip = D.indptr.astype(np.int64).copy()
    if ip.shape[0] < 3:
        return
    i = 1 + p % (ip.shape[0] - 2)
    ip[i] = ip[i + 1] + 1 + p % 3  # now indptr[i] > indptr[i + 1]
    _corrupt(D, "indptr", ip.astype(D.indptr.dtype))


def m_indptr_end(D, p):
    ip = D.indptr.astype(np.int64).copy()
    if p == "first":
        ip[0] = 1
    elif p == "last_up":
        ip[-1] += 1
    elif p == "last_down":
        ip[-1] -= 1
    elif p == "negative":
        ip[len(ip) // 2] = -1
    elif p == "short":
        ip = ip[:-1]
    elif p == "long":
        ip = np.append(ip, ip[-1])
    elif p == "huge":
        ip[-1] = 2**62
    _corrupt(D, "indptr", ip.astype(D.indptr.dtype) if p not in ("negative", "huge") else ip)


def m_indices_bad(D, p):
    if not D.indices.shape[0]:
        return
    ix = D.indices.astype(np.int64).copy()
    j = p[1] % ix.shape[0]
    ix[j] = {"n": D.n, "n+5": D.n + 5, "-1": -1, "2**31": 2**31, "big": 2**63 - 1}[p[0]]
    _corrupt(D, "indices", ix)


def m_indices_order(D, p):
    """Reverse (unsorted) or duplicate the columns of the longest row."""
    counts = np.diff(D.indptr.astype(np.int64))
    if not counts.size or counts.max() < 2:
        return
    i = int(np.argmax(counts))
    s, e = int(D.indptr[i]), int(D.indptr[i + 1])
    ix = D.indices.copy()
    if p == "unsorted":
        ix[s:e] = ix[s:e][::-1].copy()
    else:
        ix[s + 1] = ix[s]
    _corrupt(D, "indices", ix)


def m_data_dtype(D, dt):
    d = D.data
    if dt == "object":
        new = d.astype(object)
    elif dt.startswith("complex"):
        new = (d + 1j * (np.arange(d.shape[0]) % 2)).astype(dt)
    elif dt == "bool":
        new = d > 0
    elif dt[0] in "iu":
        new = np.round(d * 3).astype(dt)
    else:
        new = d.astype(dt)
    if D.form == "csr":
        _csr_setattr(D, "data", new)
    elif D.form.startswith("scipy"):  # assigned after construction: scipy refuses some dtypes
        D.scipy_set["data"] = new
    D.data = new


def m_data_values(D, p):
    if not D.data.shape[0]:
        return
    d = D.data.astype(np.float64 if p in ("1e39", "1e300") else D.data.dtype).copy()
    d[0] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "1e39": 1e39, "1e300": 1e300,
            "max": float(np.finfo(np.float32).max), "subnormal": 1e-40, "zero": 0.0}[p]  # fmt: skip
    if D.form == "csr":
        if p in ("nan", "inf", "zero"):  # in-place value changes are allowed
            D.csr_muts.append({"op": "setitem", "attr": "data", "index": 0, "value": C.enc(d[0])})
        else:
            _csr_setattr(D, "data", d)
    elif D.form.startswith("scipy"):
        D.base_arrays = (*D.base_arrays[:2], d, D.base_arrays[3])
    D.data = d


def m_data_len(D, p):
    d = D.data
    new = d[:-1] if (p == "short" and d.shape[0]) else np.append(d, np.float32(1.5)).astype(d.dtype)
    if D.form == "csr":
        _csr_setattr(D, "data", new)
    elif D.form.startswith("scipy"):
        D.scipy_set["data"] = new
    D.data = new


def m_csr_data(D, p):
    """Mutations of a validated CSR's values attribute (csr form only)."""
    if D.form != "csr":
        return
    d = D.data
    new = {
        "zeros1": lambda: np.zeros(1, np.float32),
        "empty": lambda: np.zeros(0, np.float32),
        "2d": lambda: d[:, None].copy(),
        "list": lambda: d.tolist(),
        "none": lambda: None,
        "float64": lambda: d.astype(np.float64),
        "int64": lambda: np.round(d * 4).astype(np.int64),
        "scalar": lambda: np.float32(1.0),
    }[p]()
    _csr_setattr(D, "data", new)


def m_csr_pattern(D, p):
    """In-place writes to a CSR's pattern (must be refused) or replaced attributes."""
    if D.form != "csr":
        return
    if p == "write_indptr":
        D.csr_muts.append({"op": "setitem", "attr": "indptr", "index": -1, "value": 10**6})
    elif p == "write_indices" and D.indices.shape[0]:
        D.csr_muts.append({"op": "setitem", "attr": "indices", "index": 0, "value": D.n + 100})
    elif p == "shape":
        _csr_setattr(D, "shape", (D.m + 3, D.n))
    elif p == "shape_list":
        _csr_setattr(D, "shape", [D.m, D.n])


def m_shape(D, p):
    m, n = D.shape
    new = {
        "huge_n": (m, HUGE_N[D.r["seed"] % len(HUGE_N)]),
        "huge_m": (2**40, n),
        "list": [m, n],
        "three": (m, n, 1),
        "one": (m,),
        "neg": (-1, n),
        "float": (float(m), n),
        "np_int": (np.int64(m), np.uint32(n)),
        "bool": (True, n) if m == 1 else (m, n),
        "none": None,
    }[p]
    if p == "huge_n":
        D.n = new[1]
        D.B = 0
        D.X = _empty_spec(D.n, 0)
        D.dY = np.zeros((D.m, 0), np.float32)
    if D.form == "csr":
        if p == "huge_n":
            D.base_arrays = (*D.base_arrays[:3], new)
        else:
            _csr_setattr(D, "shape", new)
    elif D.form.startswith("scipy"):
        if p in ("huge_n", "huge_m"):
            if p == "huge_m":
                D.form = "scipy_coo"
            D.base_arrays = (*D.base_arrays[:3], new)
        else:
            return
    D.shape = new


def _empty_spec(rows, cols, dtype="float32"):
    """A (rows, cols) array with no elements, for any rows (built in the worker)."""
    return {"$empty": [rows, cols, dtype]}


def m_lie(D, p):
    """scipy: claim canonical format while holding duplicates / unsorted columns."""
    if not D.form.startswith("scipy") or D.form == "scipy_other":
        return
    m_indices_order(D, "dup" if p == "dup" else "unsorted")
    D.scipy_set.setdefault("indices", D.indices)
    D.scipy_set["has_canonical_format"] = True
    if D.form == "scipy_csc":
        D.scipy_set.pop("indices", None)
        D.scipy_set["has_canonical_format"] = True


def m_scipy_index_attr(D, p):
    """scipy: index arrays of unusual dtypes assigned after construction (scipy itself only
    makes int32/int64)."""
    if D.form not in ("scipy_csr", "scipy_array", "scipy_coo"):
        return
    dt = p
    if D.form == "scipy_coo":
        rows = np.repeat(np.arange(D.m), np.diff(D.base_arrays[0].astype(np.int64)))
        D.scipy_set["row"] = rows.astype(dt)
        D.scipy_set["col"] = D.base_arrays[1].astype(dt)
    else:
        D.scipy_set["indptr"] = D.indptr.astype(dt)
        D.scipy_set["indices"] = D.indices.astype(dt)


def m_operand_dtype(D, p):
    name, dt = p
    a = getattr(D, name)
    if not isinstance(a, np.ndarray):
        return
    if dt == "object":
        new = a.astype(object)
    elif dt == "complex_real":
        new = a.astype(np.complex128)
    elif dt == "complex":
        new = a + 0.5j
    elif dt == "str":
        new = a.astype(str)
    elif dt == "bool":
        new = a > 0
    elif dt[0] in "iu":
        new = np.round(a * 3).astype(dt)
    else:
        new = a.astype(dt)
    setattr(D, name, new)


def m_operand_view(D, p):
    name, how = p
    if isinstance(getattr(D, name), np.ndarray):
        D.views[name].append(how)


def m_operand_shape(D, p):
    name, how = p
    a = getattr(D, name)
    if not isinstance(a, np.ndarray):
        return
    if how == "1d":
        new = a.ravel()
    elif how == "3d":
        new = a[None]
    elif how == "0d":
        new = np.float32(1.0)
    elif how == "rows+1":
        new = np.concatenate([a, np.ones((1, a.shape[1]), a.dtype)])
    elif how == "rows-1":
        new = a[:-1]
    elif how == "batch+1":  # batch disagreement between dY and X
        new = np.concatenate([a, np.ones((a.shape[0], 1), a.dtype)], axis=1)
    elif how == "scalar_list":
        new = [[1.0, 2.0]]
    elif how == "none":
        new = None
    else:
        raise ValueError(how)
    if how == "none":
        setattr(D, name, None)
        D.extra[f"{name}_none"] = True
        return
    setattr(D, name, new)


def m_operand_values(D, p):
    name, v = p
    a = getattr(D, name)
    if not isinstance(a, np.ndarray) or not a.size:
        return
    a = a.astype(np.float64) if v in ("1e300", "1e39") else a.copy()
    a.flat[0] = {"nan": np.nan, "inf": np.inf, "1e30": 1e30, "1e39": 1e39, "1e300": 1e300,
                 "1e20": 1e20, "subnormal": 1e-41}[v]  # fmt: skip
    if v in ("1e30", "1e20"):  # a whole column of them: products near float32's edge
        a[:, 0] = a.flat[0] if a.ndim == 2 else a.flat[0]
    setattr(D, name, a)


def m_layout(D, p):
    D.layout = p


def m_out(D, p):
    if p == "same_X":
        D.out = C.same("X" if D.r["op"] != "spmm_t" else "dY")
    elif p == "same_Wdata":
        D.out = C.same("W.data")
    elif p == "same_dY":
        D.out = C.same("dY" if D.r["op"] in ("spmm_t", "sddmm") else "X")
    else:
        D.out = p


def m_k(D, p):
    nnz = int(D.indices.shape[0])
    cap = D.m * D.n - nnz if D.r["op"] == "topk_grow" else nnz
    D.k = {
        "0": 0, "1": 1, "max": cap, "max+1": cap + 1, "-1": -1, "float": 1.0, "2.5": 2.5,
        "nan": float("nan"), "true": True, "np": np.int64(min(1, cap)), "str": "3",
        "none": None, "2**63": 2**63, "uint": np.uint64(min(2, cap)),
    }[p]  # fmt: skip


def m_keep(D, p):
    nnz = int(D.indices.shape[0])
    rng = np.random.default_rng(D.r["seed"] + 7)
    D.keep = {
        "valid": rng.random(nnz) < 0.5,
        "int01": (rng.random(nnz) < 0.5).astype(np.int8),
        "float": rng.random(nnz),
        "short": np.ones(max(nnz - 1, 0), bool),
        "long": np.ones(nnz + 1, bool),
        "2d": np.ones((nnz, 1), bool),
        "list": [True] * nnz,
        "none": None,
    }[p]


def m_tile(D, p):
    D.tile_bytes = {"4": 4, "1": 1, "0": 0, "-1": -1, "64": 64, "3": 3, "huge": 2**62, "float": 64.0}[p]


def m_grow(D, p):
    gr, gc = D.grow_rows, D.grow_cols
    if gr is None:
        return
    nnz = D.indices.shape[0]
    rows = np.repeat(np.arange(D.m), np.diff(D.indptr.astype(np.int64)))
    if p == "conflict" and nnz and np.any(D.keep):
        q = int(np.flatnonzero(D.keep)[0])
        gr, gc = np.append(gr, rows[q]), np.append(gc, D.indices[q])
    elif p == "regrow" and nnz and not np.all(D.keep):  # dropped and regrown: keeps its value
        q = int(np.flatnonzero(~D.keep)[0])
        if not np.any((gr == rows[q]) & (gc == D.indices[q])):
            gr, gc = np.append(gr, rows[q]), np.append(gc, D.indices[q])
    elif p == "dup" and gr.size:
        gr, gc = np.append(gr, gr[0]), np.append(gc, gc[0])
    elif p == "oob":
        gr, gc = np.append(gr, D.m), np.append(gc, 0)
    elif p == "neg":
        gr, gc = np.append(gr, -1), np.append(gc, 0)
    elif p == "float":
        gr, gc = gr.astype(np.float64), gc.astype(np.float64)
    elif p == "float_frac" and gr.size:
        gr = gr.astype(np.float64) + 0.5
    elif p == "uint64_huge":
        gr, gc = np.append(gr, 0).astype(np.uint64), np.append(gc, 2**64 - 1).astype(np.uint64)
    elif p == "len":
        gc = np.append(gc, 0)
    elif p == "2d":
        gr, gc = gr[:, None], gc[:, None]
    elif p == "uint8":
        gr, gc = gr.astype(np.uint8), gc.astype(np.uint8)
    D.grow_rows, D.grow_cols = gr, gc


def m_remap(D, p):
    what, v = p
    D.values, D.src = np.asarray(D.values), np.asarray(D.src)
    L = D.values.shape[0]
    if what == "src":
        s = D.src
        D.src = {
            "-2": np.append(s, -2), "len": np.append(s, L), "float": s.astype(np.float64),
            "uint64": np.append(s[s >= 0], 2**63 + 5).astype(np.uint64), "2d": s[:, None],
            "int8": s.astype(np.int8), "bool": s > 0, "list": s.tolist(),
            "uint8": s[s >= 0].astype(np.uint8), "neg_only": -np.ones(3, np.int64),
        }[v]  # fmt: skip
    elif what == "values":
        vals = D.values
        D.values = {
            "float64": vals.astype(np.float64), "float16": vals.astype(np.float16),
            "int8": np.round(vals * 10).astype(np.int8), "int64": np.round(vals * 10).astype(np.int64),
            "uint64": np.full(L, 2**63 + 1, np.uint64), "bool": vals > 0,
            "complex": vals + 1j, "object": vals.astype(object), "str": vals.astype(str),
            "2d": vals[:, None], "list": vals.tolist(), "step2": None,
        }[v]  # fmt: skip
        if v == "step2":
            D.values = vals
            D.extra["values_view"] = "step2"
    else:
        D.fill = {"nan": float("nan"), "1e300": 1e300, "-3": -3, "0.5": 0.5, "complex": 1j,
                  "str": "x", "none": None, "inf": float("inf"), "np16": np.float16(2)}[v]  # fmt: skip


def m_ctor(D, p):
    D.extra["index_dtype"] = {
        "int32": "int32", "int64": "int64", "uint32": "uint32", "int16": "int16", "float": "float64",
        "bogus": "banana",
    }[p]  # fmt: skip
    D.extra["index_dtype"] = {"$np_dtype": D.extra["index_dtype"]}


def m_dense_a(D, p):
    a = D.a
    if p in ("nan", "inf", "1e39", "1e-50") and a.size:
        a = a.copy()
        a.flat[0] = {"nan": np.nan, "inf": np.inf, "1e39": 1e39, "1e-50": 1e-50}[p]
    elif p in ("float16", "int8", "bool", "complex", "object", "uint64", "str"):
        a = {
            "float16": lambda: a.astype(np.float16), "int8": lambda: np.round(a * 3).astype(np.int8),
            "bool": lambda: a != 0, "complex": lambda: a + 0j, "object": lambda: a.astype(object),
            "uint64": lambda: np.abs(np.round(a * 3)).astype(np.uint64), "str": lambda: a.astype(str),
        }[p]()  # fmt: skip
    elif p == "1d":
        a = a.ravel()
    elif p == "3d":
        a = a[None]
    elif p in ("fortran", "T", "step2", "tolist", "readonly"):
        D.views["a"] = D.views.get("a", []) + [p]
    elif p == "wide_empty":
        a = _empty_spec(0, 2**40, "float32")
    elif p == "tall_empty":
        a = _empty_spec(2**40, 0, "float64")
    elif p == "negzero" and a.size:
        a = a.copy()
        a.flat[0] = -0.0
    D.a = a


def m_fromscipy(D, p):
    if p == "ndarray":
        D.extra["M_override"] = C.enc(np.eye(2, dtype=np.float32))
    elif p == "csr_obj":
        D.extra["M_override"] = {"$csr": {"arrays": C.enc(D.base_arrays), "mutate": []}}
    elif p == "tuple":
        D.extra["M_override"] = C.enc(D.base_arrays)
    elif p == "int8_dups":  # duplicates of int8 values: scipy sums them in int8
        D.form = "scipy_coo"
        if D.data.shape[0]:
            d = np.full(D.data.shape[0], 100, np.int8)
            D.base_arrays = (*D.base_arrays[:2], d, D.base_arrays[3])
            m_indices_order(D, "dup")
            D.scipy_set["col"] = None  # filled at build: see _fix_coo
    elif p == "explicit_zero" and D.data.shape[0]:
        d = D.base_arrays[2].copy()
        d[0] = 0.0
        D.base_arrays = (*D.base_arrays[:2], d, D.base_arrays[3])


def m_random(D, p):
    key, v = p
    vals = {
        "density": {"0": 0.0, "1": 1.0, "neg": -0.1, "1.1": 1.1, "nan": float("nan"),
                    "inf": float("inf"), "true": True, "str": "0.5", "np32": np.float32(0.3),
                    "int1": 1, "tiny": 1e-24},
        "scale": {"0": 0.0, "neg": -2.0, "1e39": 1e39, "inf": float("inf"), "nan": float("nan"),
                  "str": "x", "true": True, "1e-45": 1e-45},
        "seed": {"neg": -1, "str": "abc", "big": 2**70, "float": 1.5, "none": None},
        "per_row": {"true": True, "false": False},
        "shape": {"huge": (2**40, 2**40), "wide": (2, 2**62), "zero_m": (0, 5), "zero_n": (5, 0),
                  "neg": (-1, 3), "float": (2.0, 3), "three": (2, 3, 4), "int32edge": (2, 2**31)},
        "index_dtype": {"int32": {"$np_dtype": "int32"}, "int64": {"$np_dtype": "int64"},
                        "uint32": {"$np_dtype": "uint32"}, "str": "int64"},
    }[key][v]  # fmt: skip
    D.extra[key] = vals
    if key == "shape" and v in ("huge", "wide", "int32edge"):
        D.extra["density"] = 1e-24 if v == "huge" else 1e-8  # a few entries, not billions


MUTATIONS = {
    "index_dtype": (m_index_dtype, lambda rng: [str(rng.choice(["indptr", "indices", "both"])), str(rng.choice(INT_DT))]),
    "indptr_nonmonotone": (m_indptr_nonmonotone, lambda rng: int(rng.integers(0, 100))),
    "indptr_end": (m_indptr_end, lambda rng: str(rng.choice(["first", "last_up", "last_down", "negative", "short", "long", "huge"]))),
    "indices_bad": (m_indices_bad, lambda rng: [str(rng.choice(["n", "n+5", "-1", "2**31", "big"])), int(rng.integers(0, 100))]),
    "indices_order": (m_indices_order, lambda rng: str(rng.choice(["unsorted", "dup"]))),
    "data_dtype": (m_data_dtype, lambda rng: str(rng.choice(VAL_DT))),
    "data_values": (m_data_values, lambda rng: str(rng.choice(["nan", "inf", "-inf", "1e39", "1e300", "max", "subnormal", "zero"]))),
    "data_len": (m_data_len, lambda rng: str(rng.choice(["short", "long"]))),
    "csr_data": (m_csr_data, lambda rng: str(rng.choice(["zeros1", "empty", "2d", "list", "none", "float64", "int64", "scalar"]))),
    "csr_pattern": (m_csr_pattern, lambda rng: str(rng.choice(["write_indptr", "write_indices", "shape", "shape_list"]))),
    "shape": (m_shape, lambda rng: str(rng.choice(["huge_n", "huge_m", "list", "three", "one", "neg", "float", "np_int", "bool", "none"]))),
    "lie": (m_lie, lambda rng: str(rng.choice(["dup", "unsorted"]))),
    "scipy_index_attr": (m_scipy_index_attr, lambda rng: str(rng.choice(["uint8", "uint32", "uint64", "int8", "int16"]))),
    "operand_dtype": (m_operand_dtype, lambda rng: [None, str(rng.choice(["float16", "float64", "int32", "uint8", "bool", "complex_real", "complex", "object", "str", ">f4", "longdouble"]))]),
    "operand_view": (m_operand_view, lambda rng: [None, str(rng.choice(["T", "step2", "step2_last", "fortran", "readonly", "tolist", "offset1"]))]),
    "operand_shape": (m_operand_shape, lambda rng: [None, str(rng.choice(["1d", "3d", "0d", "rows+1", "rows-1", "batch+1", "scalar_list", "none"]))]),
    "operand_values": (m_operand_values, lambda rng: [None, str(rng.choice(["nan", "inf", "1e30", "1e39", "1e300", "1e20", "subnormal"]))]),
    "layout": (m_layout, lambda rng: str(rng.choice(["feature", "batch", "batch", "Feature", "", "rows"]))),
    "out": (m_out, lambda rng: str(rng.choice(["auto", "auto", "wrong_shape", "float64", "fortran", "readonly", "step2", "list", "1d", "same_X", "same_Wdata", "same_dY"]))),
    "k": (m_k, lambda rng: str(rng.choice(["0", "1", "max", "max+1", "-1", "float", "2.5", "nan", "true", "np", "str", "none", "2**63", "uint"]))),
    "keep": (m_keep, lambda rng: str(rng.choice(["valid", "valid", "int01", "float", "short", "long", "2d", "list", "none"]))),
    "tile": (m_tile, lambda rng: str(rng.choice(["4", "1", "0", "-1", "64", "3", "huge", "float"]))),
    "grow": (m_grow, lambda rng: str(rng.choice(["conflict", "regrow", "regrow", "dup", "oob", "neg", "float", "float_frac", "uint64_huge", "len", "2d", "uint8"]))),
    "remap": (m_remap, lambda rng: _remap_param(rng)),
    "ctor": (m_ctor, lambda rng: str(rng.choice(["int32", "int64", "uint32", "int16", "float", "bogus"]))),
    "dense_a": (m_dense_a, lambda rng: str(rng.choice(["nan", "inf", "1e39", "1e-50", "float16", "int8", "bool", "complex", "object", "uint64", "str", "1d", "3d", "fortran", "T", "step2", "tolist", "wide_empty", "tall_empty", "negzero"]))),
    "fromscipy": (m_fromscipy, lambda rng: str(rng.choice(["ndarray", "csr_obj", "tuple", "explicit_zero"]))),
    "random": (m_random, lambda rng: _random_param(rng)),
}  # fmt: skip


def _remap_param(rng):
    what = str(rng.choice(["src", "values", "fill"]))
    opts = {
        "src": ["-2", "len", "float", "uint64", "2d", "int8", "bool", "list", "uint8", "neg_only"],
        "values": ["float64", "float16", "int8", "int64", "uint64", "bool", "complex", "object",
                   "str", "2d", "list", "step2"],
        "fill": ["nan", "1e300", "-3", "0.5", "complex", "str", "none", "inf", "np16"],
    }[what]  # fmt: skip
    return [what, str(rng.choice(opts))]


def _random_param(rng):
    key = str(rng.choice(["density", "scale", "seed", "per_row", "shape", "index_dtype"]))
    opts = {
        "density": ["0", "1", "neg", "1.1", "nan", "inf", "true", "str", "np32", "int1", "tiny"],
        "scale": ["0", "neg", "1e39", "inf", "nan", "str", "true", "1e-45"],
        "seed": ["neg", "str", "big", "float", "none"],
        "per_row": ["true", "false"],
        "shape": ["huge", "wide", "zero_m", "zero_n", "neg", "float", "three", "int32edge"],
        "index_dtype": ["int32", "int64", "uint32", "str"],
    }[key]  # fmt: skip
    return [key, str(rng.choice(opts))]


# which mutations apply to which op; operand mutations get their operand name filled in
W_MUTS = ["index_dtype", "indptr_nonmonotone", "indptr_end", "indices_bad", "indices_order",
          "data_dtype", "data_values", "data_len", "csr_data", "csr_pattern", "shape", "lie",
          "scipy_index_attr"]  # fmt: skip
OPERANDS = {"spmm": ["X"], "spmm_t": ["dY"], "sddmm": ["dY", "X"], "topk_grow": ["dY", "X"]}
APPLICABLE = {
    "spmm": W_MUTS + ["operand_dtype", "operand_view", "operand_shape", "operand_values", "layout", "out"],
    "spmm_t": W_MUTS + ["operand_dtype", "operand_view", "operand_shape", "operand_values", "layout", "out"],
    "sddmm": W_MUTS + ["operand_dtype", "operand_view", "operand_shape", "operand_values", "layout", "out"],
    "topk_grow": W_MUTS + ["operand_dtype", "operand_view", "operand_shape", "operand_values", "layout", "k", "keep", "tile"],
    "magnitude_drop": W_MUTS + ["k"],
    "merge": W_MUTS + ["keep", "grow", "grow"],
    "remap": ["remap", "remap", "remap"],
    "CSR": ["index_dtype", "indptr_nonmonotone", "indptr_end", "indices_bad", "indices_order",
            "data_dtype", "data_values", "data_len", "shape", "ctor"],
    "from_dense": ["dense_a", "dense_a"],
    "from_scipy": ["index_dtype", "indptr_nonmonotone", "indptr_end", "indices_bad", "indices_order",
                   "data_dtype", "data_values", "data_len", "lie", "scipy_index_attr", "shape", "fromscipy"],
    "random": ["random", "random", "random"],
}  # fmt: skip


def generate(rng, op=None) -> dict:
    """A random recipe."""
    op = op or str(rng.choice(OPS))
    small = rng.random() < 0.85
    m = int(rng.integers(0, 9 if small else 70))
    n = int(rng.integers(0, 9 if small else 70))
    if op == "random":
        m, n = int(rng.integers(0, 30)), int(rng.integers(0, 30))
    # mostly tiny batches; one recipe in five from 8 to 40 rows (the batch-panel kernels'
    # range in layout="batch", with partial panels)
    B = int(rng.integers(0, 6)) if rng.random() < 0.8 else int(rng.integers(8, 41))
    density = float(rng.choice([0.0, 0.1, 0.3, 0.6, 1.0]))
    forms = {
        "magnitude_drop": FORMS + ["values1d"],
        "from_scipy": ["scipy_csr", "scipy_csc", "scipy_coo", "scipy_array", "scipy_other"],
        "CSR": ["tuple"], "from_dense": ["tuple"], "random": ["tuple"], "remap": ["tuple"],
    }.get(op, FORMS)  # fmt: skip
    form = str(rng.choice(forms))
    n_muts = int(rng.choice([0, 1, 1, 2, 2, 3]))
    muts = []
    for _ in range(n_muts):
        name = str(rng.choice(APPLICABLE[op]))
        param = MUTATIONS[name][1](rng)
        if isinstance(param, list) and param and param[0] is None:
            param[0] = str(rng.choice(OPERANDS.get(op, ["X"])))
        muts.append([name, param])
    r = {"op": op, "seed": int(rng.integers(0, 2**31)), "m": m, "n": n, "B": B,
         "density": density, "form": form, "muts": muts}  # fmt: skip
    if form == "scipy_other":
        r["fmt2"] = str(rng.choice(["lil", "dok", "bsr", "dia", "csr"]))
    return r


def build(r) -> dict:
    import warnings

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return _build(r)


def _build(r) -> dict:
    rng = np.random.default_rng(r["seed"])
    D = Draft(r, rng)
    D.base_arrays = (D.indptr.copy(), D.indices.copy(), D.data.copy(), D.shape)
    if D.form == "values1d" and r["op"] != "magnitude_drop":
        D.form = "tuple"
    for name, param in r["muts"]:
        try:
            MUTATIONS[name][0](D, param)
        except Exception:  # a mutation that does not apply to this draft: skipped
            pass
    case = D.encode()
    _post(D, case)
    return case


def _post(D, case):
    """Fix-ups that need the encoded case: None operands, dtype args, views of values."""
    a = case["args"]
    for name in ("X", "dY"):
        if D.extra.get(f"{name}_none"):
            a[name] = None
    if "index_dtype" in a and isinstance(a["index_dtype"], dict) and "$np_dtype" in a["index_dtype"]:
        a["index_dtype"] = {"$np_dtype": a["index_dtype"]["$np_dtype"]}
    if D.extra.get("values_view") and "values" in a:
        a["values"] = C.view(a["values"], "step2")
    W = a.get("M") or a.get("W")
    if isinstance(W, dict) and "$scipy" in W:
        s = W["$scipy"]
        if s.get("set", {}).get("col", "x") is None:  # int8 duplicates: coo from the dup'd arrays
            s["set"].pop("col")
            ip, ix = D.indptr, D.indices
            rows = np.repeat(np.arange(len(ip) - 1), np.diff(ip.astype(np.int64)))
            s["row"], s["col"] = C.enc(rows), C.enc(ix.astype(np.int64))
        if s["fmt"] != "csr":
            s["set"].pop("indices", None) if s["fmt"] == "coo" else None


def shrink(r):
    """Smaller variants of a recipe, most aggressive first."""
    out = []
    for i in range(len(r["muts"])):
        out.append({**r, "muts": r["muts"][:i] + r["muts"][i + 1 :]})
    for key in ("m", "n", "B"):
        v = r[key]
        for smaller in sorted({0, 1, 2, v // 2, v - 1}):
            if 0 <= smaller < v:
                out.append({**r, key: smaller})
    if r["density"] not in (0.0, 1.0):
        out.append({**r, "density": 1.0})
    if r["form"] not in ("csr", "tuple") and r["op"] in W_OPS:
        out.append({**r, "form": "tuple"})
        out.append({**r, "form": "csr"})
    if r["seed"] != 0:
        out.append({**r, "seed": 0})
    return out


def describe(r) -> str:
    ms = ", ".join(f"{n}={p}" for n, p in r["muts"]) or "no mutation"
    return f"{r['op']} W {r['form']} {r['m']}x{r['n']} B={r['B']} d={r['density']} [{ms}]"
