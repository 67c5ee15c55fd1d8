"""Case specs: plain, picklable, JSON-able descriptions of a call's arguments.

A spec is built from Python scalars, lists and dicts plus a few tagged dicts:

- ``{"$nd": {"dtype", "shape", "b64"}}``: a NumPy array (object arrays: ``{"$ndobj": ...}``);
- ``{"$tuple": [...]}``, ``{"$complex": [re, im]}``, ``{"$np": [dtype, value]}`` (a NumPy
  scalar), ``{"$float": "nan"|"inf"|"-inf"}`` (strict JSON has no NaN), ``{"$bytes": b64}``;
- ``{"$view": {"of": spec, "how": "T"|"step2"|"fortran"|"readonly"|"tolist"|"sliceof"}}``: a
  view of another array (non-contiguous, transposed, read-only ...) made in the worker;
- ``{"$scipy": {...}}``: a scipy.sparse matrix built in the worker, with raw attribute
  assignments after construction (corrupt indptr, lying ``has_canonical_format``);
- ``{"$csr": {...}}``: a sparsecore.CSR built in the worker (validated), then mutated
  (``W.data = ...``, in-place writes);
- ``{"$same": "X"}``: the very object bound to an earlier argument (``out`` overlapping ``X``),
  ``{"$same": "W.data"}`` its data array.

``materialize`` turns a spec into live objects (in the worker); ``render`` turns it into Python
source for a reproducer; ``dumps``/``loads`` store it as JSON (the corpus).
"""

from __future__ import annotations

import base64
import json
import math

import numpy as np

# ------------------------------------------------------------------------------- building


def nd(a) -> dict:
    """Spec of a concrete NumPy array (copied)."""
    a = np.asarray(a)
    if a.dtype.hasobject:
        return {"$ndobj": {"shape": list(a.shape), "items": [enc(x) for x in a.ravel().tolist()]}}
    a = np.ascontiguousarray(a)
    return {
        "$nd": {
            "dtype": a.dtype.str,
            "shape": list(a.shape),
            "b64": base64.b64encode(a.tobytes()).decode("ascii"),
        }
    }


def enc(x):
    """Spec of a plain value (arrays, tuples, numpy scalars, complex, non-finite floats)."""
    if isinstance(x, dict):
        if any(k.startswith("$") for k in x):
            return x  # already a spec
        return {k: enc(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return nd(x)
    if isinstance(x, tuple):
        return {"$tuple": [enc(v) for v in x]}
    if isinstance(x, list):
        return [enc(v) for v in x]
    if isinstance(x, np.generic):
        return {"$np": [x.dtype.str, enc(x.item())]}
    if isinstance(x, complex):
        return {"$complex": [enc(x.real), enc(x.imag)]}
    if isinstance(x, float) and not math.isfinite(x):
        return {"$float": repr(x)}
    if isinstance(x, bytes):
        return {"$bytes": base64.b64encode(x).decode("ascii")}
    return x


def view(of, how) -> dict:
    return {"$view": {"of": of, "how": how}}


def same(name) -> dict:
    return {"$same": name}


# ------------------------------------------------------------------------------- decoding


def _dec_float(s):
    return float(s)


def materialize(spec, env=None):
    """Live objects from a spec. ``env`` maps names to objects built earlier ($same)."""
    env = {} if env is None else env
    if isinstance(spec, list):
        return [materialize(v, env) for v in spec]
    if not isinstance(spec, dict):
        return spec
    if "$nd" in spec:
        d = spec["$nd"]
        raw = base64.b64decode(d["b64"])
        a = np.frombuffer(raw, dtype=np.dtype(d["dtype"])).copy()
        return a.reshape(d["shape"])
    if "$ndobj" in spec:
        d = spec["$ndobj"]
        items = [materialize(v, env) for v in d["items"]]
        a = np.empty(len(items), dtype=object)
        for i, v in enumerate(items):
            a[i] = v
        return a.reshape(d["shape"])
    if "$tuple" in spec:
        return tuple(materialize(v, env) for v in spec["$tuple"])
    if "$np" in spec:
        dt, v = spec["$np"]
        return np.dtype(dt).type(materialize(v, env))
    if "$complex" in spec:
        re, im = spec["$complex"]
        return complex(materialize(re, env), materialize(im, env))
    if "$float" in spec:
        return _dec_float(spec["$float"])
    if "$bytes" in spec:
        return base64.b64decode(spec["$bytes"])
    if "$view" in spec:
        d = spec["$view"]
        base = materialize(d["of"], env)
        return make_view(base, d["how"])
    if "$empty" in spec:
        r, c, dt = spec["$empty"]
        return np.empty((r, c), dtype=dt)
    if "$np_dtype" in spec:
        try:
            return np.dtype(spec["$np_dtype"]).type
        except TypeError:
            return spec["$np_dtype"]
    if "$same" in spec:
        name = spec["$same"]
        if name.endswith(".data"):
            return env[name[:-5]].data
        return env[name]
    if "$scipy" in spec:
        return build_scipy(spec["$scipy"], env)
    if "$csr" in spec:
        return build_csr(spec["$csr"], env)
    return {k: materialize(v, env) for k, v in spec.items()}


def make_view(base, how):
    if how == "T":
        return base.T
    if how == "step2":  # every other element of a twice-as-long array along axis 0
        buf = np.zeros((2 * base.shape[0], *base.shape[1:]), base.dtype)
        v = buf[::2]
        if base.size:
            v[...] = base
        return v
    if how == "step2_last":
        buf = np.zeros((*base.shape[:-1], 2 * base.shape[-1]), base.dtype)
        v = buf[..., ::2]
        if base.size:
            v[...] = base
        return v
    if how == "fortran":
        return np.asfortranarray(base)
    if how == "readonly":
        v = base.view()
        v.flags.writeable = False
        return v
    if how == "tolist":
        return base.tolist()
    if how == "offset1":  # misaligned: the array starts one byte into a buffer
        buf = np.zeros(base.nbytes + 1, dtype=np.uint8)
        v = buf[1:].view(base.dtype).reshape(base.shape)
        v[...] = base
        return v
    raise ValueError(f"unknown view {how!r}")


def build_scipy(d, env):
    import scipy.sparse as sp

    fmt, kind = d["fmt"], d.get("kind", "matrix")
    shape = materialize(d["shape"], env)
    data = materialize(d["data"], env)
    if fmt == "coo":
        row, col = materialize(d["row"], env), materialize(d["col"], env)
        cls = sp.coo_matrix if kind == "matrix" else sp.coo_array
        M = cls((data, (row, col)), shape=shape)
    elif fmt in ("csr", "csc"):
        indices, indptr = materialize(d["indices"], env), materialize(d["indptr"], env)
        cls = {
            ("csr", "matrix"): sp.csr_matrix,
            ("csr", "array"): sp.csr_array,
            ("csc", "matrix"): sp.csc_matrix,
            ("csc", "array"): sp.csc_array,
        }[(fmt, kind)]
        M = cls((data, indices, indptr), shape=shape)
    else:  # lil, dok, bsr, dia: built through coo from valid triplets
        row, col = materialize(d["row"], env), materialize(d["col"], env)
        M = sp.coo_matrix((data, (row, col)), shape=shape).asformat(fmt)
    for attr, v in d.get("set", {}).items():
        setattr(M, attr, materialize(v, env))
    return M


def build_csr(d, env):
    """A validated sparsecore.CSR, then the listed mutations (a failing in-place write to a
    read-only pattern array is the library doing its job: it is recorded, not raised)."""
    from sparsecore import CSR

    a = materialize(d["arrays"], env)
    W = CSR(*a)
    for mut in d.get("mutate", []):
        try:
            if mut["op"] == "setattr":
                setattr(W, mut["attr"], materialize(mut["value"], env))
            elif mut["op"] == "setitem":
                getattr(W, mut["attr"])[mut["index"]] = materialize(mut["value"], env)
            else:
                raise RuntimeError(f"unknown mutation {mut!r}")
        except RuntimeError:
            raise
        except IndexError:  # an in-place write past the end of an empty array: numpy's, skipped
            continue
        except Exception as e:  # refused: judged by the worker (a clear refusal is fine)
            env.setdefault("_mutation_errors", []).append(e)
    return W


# ------------------------------------------------------------------------------- JSON


def dumps(obj) -> str:
    return json.dumps(enc(obj), separators=(",", ":"), allow_nan=False)


def loads(s: str):
    return json.loads(s)


# ------------------------------------------------------------------------------- rendering


def _dtype_name(dt) -> str:
    dt = np.dtype(dt)
    if dt.byteorder == ">":
        return f"np.dtype({dt.str!r})"
    return f"np.{dt.name}" if dt.name not in ("bool",) else "np.bool_"


def _lit(x) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "np.nan"
        if math.isinf(x):
            return "np.inf" if x > 0 else "-np.inf"
        return repr(x)
    return repr(x)


def _array_src(a: np.ndarray) -> str:
    if a.size == 0:
        return f"np.zeros({tuple(a.shape)!r}, dtype={_dtype_name(a.dtype)})"
    if a.dtype.hasobject:
        return f"np.array({a.tolist()!r}, dtype=object)"
    if a.dtype.kind in "fc":
        flat = a.ravel().tolist()
        if a.dtype.kind == "f":
            body = "[" + ", ".join(_lit(float(v)) for v in flat) + "]"
        else:
            body = "[" + ", ".join(f"complex({_lit(v.real)}, {_lit(v.imag)})" for v in flat) + "]"
    elif a.dtype.kind == "b":
        body = repr([bool(v) for v in a.ravel().tolist()])
    else:
        body = repr(a.ravel().tolist())
    if a.size > 1 and np.all(a.ravel() == a.ravel()[0]) and a.dtype.kind != "f":
        src = f"np.full({tuple(a.shape)!r}, {a.ravel().tolist()[0]!r}, dtype={_dtype_name(a.dtype)})"
        return src
    src = f"np.array({body}, dtype={_dtype_name(a.dtype)})"
    if a.ndim != 1:
        src += f".reshape({tuple(a.shape)!r})"
    return src


class Renderer:
    """Turns specs into statements; render(spec) returns an expression (maybe a variable)."""

    def __init__(self):
        self.lines: list[str] = []
        self.names: dict = {}
        self.n = 0

    def var(self, prefix, src) -> str:
        self.n += 1
        name = f"{prefix}{self.n}"
        self.lines.append(f"{name} = {src}")
        return name

    def render(self, spec, hint="a") -> str:
        if isinstance(spec, list):
            return "[" + ", ".join(self.render(v) for v in spec) + "]"
        if not isinstance(spec, dict):
            if isinstance(spec, float):
                return _lit(spec)
            return repr(spec)
        if "$nd" in spec or "$ndobj" in spec:
            a = materialize(spec)
            src = _array_src(a)
            return src if len(src) < 70 else self.var(hint, src)
        if "$tuple" in spec:
            items = [self.render(v) for v in spec["$tuple"]]
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        if "$np" in spec:
            dt, v = spec["$np"]
            return f"{_dtype_name(dt)}({self.render(v)})"
        if "$complex" in spec:
            re, im = spec["$complex"]
            return f"complex({self.render(re)}, {self.render(im)})"
        if "$float" in spec:
            return _lit(float(spec["$float"]))
        if "$bytes" in spec:
            return repr(base64.b64decode(spec["$bytes"]))
        if "$view" in spec:
            d = spec["$view"]
            base = self.render(d["of"], hint)
            how = d["how"]
            return {
                "T": f"{base}.T",
                "step2": f"np.repeat({base}, 2, axis=0)[::2]",
                "step2_last": f"np.repeat({base}, 2, axis=-1)[..., ::2]",
                "fortran": f"np.asfortranarray({base})",
                "readonly": f"readonly({base})",
                "tolist": f"{base}.tolist()",
                "offset1": f"misaligned({base})",
            }[how]
        if "$same" in spec:
            nm = spec["$same"]
            base, _, attr = nm.partition(".")
            b = self.names.get(base, base)
            return f"{b}.{attr}" if attr else b
        if "$empty" in spec:
            r, c, dt = spec["$empty"]
            return f"np.empty(({r}, {c}), dtype=np.{dt})"
        if "$np_dtype" in spec:
            try:
                return _dtype_name(np.dtype(spec["$np_dtype"]))
            except TypeError:
                return repr(spec["$np_dtype"])
        if "$scipy" in spec:
            return self._scipy(spec["$scipy"])
        if "$csr" in spec:
            return self._csr(spec["$csr"])
        return "{" + ", ".join(f"{k!r}: {self.render(v)}" for k, v in spec.items()) + "}"

    def _scipy(self, d):
        fmt, kind = d["fmt"], d.get("kind", "matrix")
        shape = self.render(d["shape"])
        data = self.render(d["data"], "data")
        if fmt == "coo":
            cls = f"sp.coo_{kind}"
            src = f"{cls}(({data}, ({self.render(d['row'])}, {self.render(d['col'])})), shape={shape})"
        elif fmt in ("csr", "csc"):
            cls = f"sp.{fmt}_{kind}"
            src = f"{cls}(({data}, {self.render(d['indices'])}, {self.render(d['indptr'])}), shape={shape})"
        else:
            src = (
                f"sp.coo_matrix(({data}, ({self.render(d['row'])}, {self.render(d['col'])})), "
                f"shape={shape}).asformat({fmt!r})"
            )
        name = self.var("M", src)
        for attr, v in d.get("set", {}).items():
            self.lines.append(f"{name}.{attr} = {self.render(v)}")
        return name

    def _csr(self, d):
        args = d["arrays"]["$tuple"] if "$tuple" in d["arrays"] else d["arrays"]
        name = self.var("W", "CSR(" + ", ".join(self.render(a) for a in args) + ")")
        for mut in d.get("mutate", []):
            if mut["op"] == "setattr":
                self.lines.append(f"{name}.{mut['attr']} = {self.render(mut['value'])}")
            else:
                self.lines.append(
                    f"{name}.{mut['attr']}[{mut['index']!r}] = {self.render(mut['value'])}"
                    "  # expected: ValueError (read-only)"
                )
        return name


HEADER = [
    "import numpy as np",
    "import scipy.sparse as sp",
    "import kernels",
    "from sparsecore import CSR",
]
