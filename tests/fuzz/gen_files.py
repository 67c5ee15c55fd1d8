"""Checkpoint, dataset and CLI cases (parent side; no library import).

Checkpoint cases name members of the base checkpoints (tests/fuzz/artifacts.py: a 8-16-3 RigL
run with SGD momentum, and a dense run with Adam) and transform them in the worker, so a case is
a short list of operations. Dataset cases carry their arrays. CLI cases are argument lists with
placeholders ({DATA}, {OUT}, {TMP}, {CKPT}, {FILE:name}) filled in by the worker.
"""

from __future__ import annotations

import base64
import re

import numpy as np

from tests.fuzz import codec as C

# ------------------------------------------------------------------------- checkpoints

SPARSE_MEMBERS = ["L{l}/shape", "L{l}/parts", "L{l}/p0/indptr", "L{l}/p0/indices", "L{l}/p0/data",
                  "L{l}/p0/b", "L{l}/p0/opt/momentum/W", "L{l}/p0/opt/momentum/b"]  # fmt: skip
DENSE_MEMBERS = ["L{l}/W", "L{l}/b", "opt/fc{l}.W/m", "opt/fc{l}.W/v", "opt/fc{l}.b/m", "opt/fc{l}.b/v"]
XFORMS = [
    ["dtype", "uint8"], ["dtype", "uint32"], ["dtype", "uint64"], ["dtype", "int8"], ["dtype", "int64"],
    ["dtype", "float32"], ["dtype", "float64"], ["dtype", "float16"], ["dtype", "bool"],
    ["dtype", "complex64"], ["dtype", ">i4"], ["dtype", "<U6"], ["dtype", "object"],
    ["nonmonotone", "int32"], ["nonmonotone", "uint32"], ["nonmonotone", "uint8"], ["nonmonotone", "uint64"],
    ["set_elem", -1], ["set_elem", 10**6], ["set_elem", 2**31], ["set_elem", "nan"], ["set_elem", "inf"],
    ["set_elem", 1e30], ["set_elem", 0.5], ["set_last", 10**6], ["set_last", -1], ["set_first", 1],
    ["append", 0], ["drop_last", 0], ["scalar", 0], ["2d", 0], ["empty", 0], ["reverse", 0],
    ["zeros", 0], ["fortran", 0], ["transpose", 0], ["huge_values", 0], ["negate", 0],
]  # fmt: skip
META_EDITS = [
    (["step"], -1), (["step"], "5"), (["step"], 1e30), (["step"], None), (["step"], 2.5),
    (["step"], "$delete"), (["epoch"], -3), (["epoch"], "x"), (["epoch"], "$delete"),
    (["history"], {}), (["history"], "x"), (["history"], [1, 2]), (["history"], None),
    (["history"], "$delete"), (["config"], "$delete"), (["config"], "x"), (["config"], {}),
    (["config"], None), (["config", "arch"], [8, 16, 4]), (["config", "arch"], "8-16-3"),
    (["config", "arch"], None), (["config", "method"], "set"), (["config", "optimizer"], "adam"),
    (["format"], 1), (["format"], 3), (["format"], 999), (["format"], "2"), (["format"], None),
    (["format"], "$delete"), (["config", "seed"], 5), (["config", "sparsity"], "nan"),
    (["config", "lr"], 0.2), (["config", "grow"], "$delete"), (["config", "max_steps"], -5),
    (["step"], 10**30), (["config", "activation"], "tanh"),
]  # fmt: skip
META_TEXTS = ["not json", "", "[]", "null", "{}", '{"config": null}', '{"format": 2}', "{\"a\": 1",
              '{"config": {}, "step": 0, "epoch": 0, "history": []}', "\udcff"]  # fmt: skip


def _members(base):
    src = SPARSE_MEMBERS if base == "rigl" else DENSE_MEMBERS
    return ["opt/t"] + [m.format(l=l) for l in (0, 1) for m in src]


def gen_checkpoint(rng) -> dict:
    base = "rigl" if rng.random() < 0.75 else "dense_adam"
    members = _members(base)
    muts = []
    for _ in range(int(rng.choice([1, 1, 1, 2, 2, 3]))):
        kind = rng.choice(["xform"] * 8 + ["meta"] * 3 + ["meta_text", "del", "add", "lie", "raw",
                                                            "rename", "compress", "bytes", "bytes"])  # fmt: skip
        if kind == "xform":
            member = str(rng.choice(members + ["L0/p0/indptr", "L0/p0/indices"] * (base == "rigl")))
            how, arg = XFORMS[int(rng.integers(len(XFORMS)))]
            muts.append({"op": "xform", "member": member, "how": how, "arg": arg})
        elif kind == "meta":
            path, value = META_EDITS[int(rng.integers(len(META_EDITS)))]
            muts.append({"op": "meta", "path": path, "value": value})
        elif kind == "meta_text":
            muts.append({"op": "meta_text", "text": str(rng.choice(META_TEXTS))})
        elif kind == "del":
            muts.append({"op": "del", "member": str(rng.choice(members + ["meta"]))})
        elif kind == "add":
            muts.append({"op": "add", "member": str(rng.choice(["L2/b", "L0/extra", "L5/parts", "L0/p1/indptr"])),
                         "value": C.enc(np.arange(3, dtype=np.int64))})  # fmt: skip
        elif kind == "lie":
            muts.append({"op": "lie", "member": str(rng.choice(members + ["meta"])),
                         "shape": [int(rng.choice([10**6, 2**40, 17, 0]))],
                         "dtype": str(rng.choice(["<f4", "<i4", "<U100", "|O"]))})  # fmt: skip
        elif kind == "raw":
            n = int(rng.integers(0, 40))
            muts.append({"op": "raw", "member": str(rng.choice(members + ["meta"])),
                         "b64": base64.b64encode(rng.bytes(n)).decode()})  # fmt: skip
        elif kind == "rename":
            muts.append({"op": "rename", "member": str(rng.choice(members)), "to": "junk"})
        elif kind == "compress":
            muts.append({"op": "compress"})
        else:
            b = rng.choice(["truncate", "truncate", "flip", "replace", "empty"])
            if b == "truncate":
                muts.append({"op": "truncate", "frac": float(rng.choice([0.0, 0.01, 0.3, 0.5, 0.9, 0.99, 0.999]))})
            elif b == "flip":
                muts.append({"op": "flip", "frac": float(rng.random()), "byte": int(rng.integers(256))})
            elif b == "empty":
                muts.append({"op": "replace", "b64": ""})
            else:
                muts.append({"op": "replace", "b64": base64.b64encode(b"PK\x03\x04" + rng.bytes(int(rng.integers(0, 200)))).decode()})
    return {"cat": "checkpoint", "base": base, "via": "api" if rng.random() < 0.7 else "cli", "muts": muts}


def shrink_checkpoint(case):
    out = []
    for i in range(len(case["muts"])):
        out.append({**case, "muts": case["muts"][:i] + case["muts"][i + 1 :]})
    if case["via"] == "cli":
        out.append({**case, "via": "api"})
    return out


def describe_checkpoint(case) -> str:
    return f"checkpoint ({case['base']}, via {case['via']}): " + "; ".join(_mut_text(m) for m in case["muts"])


def _mut_text(m) -> str:
    op = m["op"]
    if op == "xform":
        return f"member {m['member']}: {m['how']}({m['arg']!r})"
    if op == "meta":
        return f"meta{''.join(f'[{p!r}]' for p in m['path'])} = {m['value']!r}"
    if op == "meta_text":
        return f"meta = {m['text']!r}"
    if op in ("del", "rename"):
        return f"{op} member {m['member']}"
    if op == "add":
        return f"add member {m['member']}"
    if op == "lie":
        return f"member {m['member']}: .npy header says shape {m['shape']} {m['dtype']}, 8 bytes of data"
    if op == "raw":
        return f"member {m['member']} = {len(base64.b64decode(m['b64']))} random bytes"
    if op == "compress":
        return "rewritten with deflate compression"
    if op == "truncate":
        return f"file truncated to {m['frac']:.3g} of its size"
    if op == "flip":
        return f"byte at {m['frac']:.3f} of the file set to {m['byte']}"
    if op == "replace":
        return f"file replaced by {len(base64.b64decode(m['b64']))} bytes"
    return str(m)


# ------------------------------------------------------------------------- datasets

DS_MUTS = [
    ("x", "float16"), ("x", "int8"), ("x", "uint8"), ("x", "bool"), ("x", "complex"), ("x", "object"),
    ("x", "str"), ("x", "1e300"), ("x", "nan"), ("x", "inf"), ("x", "1d"), ("x", "3d"), ("x", "nofeat"),
    ("x", "empty"), ("x", "0d"), ("y", "float_int"), ("y", "float_frac"), ("y", "1e20"), ("y", "1e18"),
    ("y", "neg"), ("y", "uint64_huge"), ("y", "bool"), ("y", "object"), ("y", "str"), ("y", "int8"),
    ("y", "2d"), ("y", "nan"), ("y", "short"), ("y", "0d"), ("y", "empty"), ("x_test", "features"),
    ("key", "missing"), ("key", "extra"), ("key", "renamed"), ("raw", "garbage"), ("raw", "truncated_npy"),
    ("raw", "lie"), ("file", "truncate"), ("file", "flip"), ("layout", "missing"), ("layout", "raw_empty"),
    ("layout", "raw_garbage"), ("layout", "npy"), ("layout", "dir"), ("layout", "dir"),
    ("layout", "npz_compressed"), ("layout", "emptydir"), ("layout", "raw_txt"),
]  # fmt: skip


def gen_dataset(rng) -> dict:
    n_mut = int(rng.choice([0, 1, 1, 1, 2, 2, 3]))
    muts = [list(DS_MUTS[int(rng.integers(len(DS_MUTS)))]) for _ in range(n_mut)]
    return {"cat": "dataset", "seed": int(rng.integers(2**31)), "muts": muts,
            "via": "api" if rng.random() < 0.65 else "cli"}  # fmt: skip


def build_dataset(r) -> dict:
    import warnings

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return _build_dataset(r)


def _ds_mut(m, what, how, rng, layout, raw_file, file_ops, N, F, T):
    target = str(rng.choice(["x_train", "x_test"])) if what == "x" else str(rng.choice(["y_train", "y_test"]))
    a = m.get(target)
    if what == "x" and isinstance(a, np.ndarray):
        m[target] = {
            "float16": lambda: a.astype(np.float16), "int8": lambda: np.round(a * 9).astype(np.int8),
            "uint8": lambda: np.abs(np.round(a * 9)).astype(np.uint8), "bool": lambda: a > 0,
            "complex": lambda: a + 1j, "object": lambda: a.astype(object), "str": lambda: a.astype(str),
            "1e300": lambda: np.where(np.arange(a.size).reshape(a.shape) == 0, 1e300, a),
            "nan": lambda: np.where(np.arange(a.size).reshape(a.shape) == 0, np.nan, a),
            "inf": lambda: np.where(np.arange(a.size).reshape(a.shape) == 0, np.inf, a),
            "1d": lambda: a[:, 0], "3d": lambda: a[:, :, None], "nofeat": lambda: a[:, :0],
            "empty": lambda: a[:0], "0d": lambda: np.array(1.0),
        }[how]() if a.ndim == 2 or how in ("0d",) else a  # fmt: skip
    elif what == "y" and isinstance(a, np.ndarray) and a.ndim == 1:
        m[target] = {
            "float_int": lambda: a.astype(np.float64), "float_frac": lambda: a + 0.5,
            "1e20": lambda: np.where(np.arange(a.size) == 0, 1e20, a).astype(np.float64),
            "1e18": lambda: np.where(np.arange(a.size) == 0, 1e18, a).astype(np.float64),
            "neg": lambda: a - 1, "uint64_huge": lambda: np.where(np.arange(a.size) == 0, 2**63 + 2, a).astype(np.uint64),
            "bool": lambda: a > 0, "object": lambda: a.astype(object), "str": lambda: a.astype(str),
            "int8": lambda: a.astype(np.int8), "2d": lambda: a[:, None], "nan": lambda: np.where(np.arange(a.size) == 0, np.nan, a),
            "short": lambda: a[:-1], "0d": lambda: np.array(1), "empty": lambda: a[:0],
        }[how]()  # fmt: skip
    elif what == "x_test":
        m["x_test"] = rng.standard_normal((T, F + 1))
    elif what == "key":
        k = str(rng.choice(list(m)))
        if how == "missing":
            m.pop(k, None)
        elif how == "extra":
            m["z_extra"] = np.zeros(3)
        elif k in m:
            m[k.upper()] = m.pop(k)
    elif what == "raw":
        k = str(rng.choice(["x_train", "y_train", "x_test", "y_test"]))
        if how == "garbage":
            m[k] = rng.bytes(int(rng.integers(0, 30)))
        elif how == "truncated_npy":
            import io

            buf = io.BytesIO()
            np.save(buf, np.zeros((N, F)))
            b = buf.getvalue()
            m[k] = b[: int(len(b) * float(rng.choice([0.1, 0.5, 0.9])))]
        else:
            from tests.fuzz.artifacts import lying_npy

            m[k] = lying_npy((10**6, F), "<f8")
    elif what == "file":
        file_ops.append({"op": how, "frac": float(rng.random()), "byte": int(rng.integers(256))})
    elif what == "layout":
        layout = {"raw_empty": "raw", "raw_garbage": "raw", "raw_txt": "raw"}.get(how, how)
        if how == "raw_empty":
            raw_file = b""
        elif how == "raw_garbage":
            raw_file = rng.bytes(int(rng.integers(1, 300)))
        elif how == "raw_txt":
            raw_file = b"x_train,y_train\n1,2\n"

    return layout, raw_file


def _build_dataset(r) -> dict:
    rng = np.random.default_rng(r["seed"])
    F, N, T = 5, 24, 8
    m = {
        "x_train": rng.standard_normal((N, F)),
        "y_train": rng.integers(0, 3, N),
        "x_test": rng.standard_normal((T, F)),
        "y_test": rng.integers(0, 3, T),
    }
    layout, file_ops, raw_file = "npz", [], None
    for what, how in r["muts"]:
        try:
            layout, raw_file = _ds_mut(m, what, how, rng, layout, raw_file, file_ops, N, F, T)
        except Exception:  # does not apply after an earlier mutation
            pass
    members = {k: C.enc(v) for k, v in m.items()}
    if raw_file is not None:
        members = {"raw": C.enc(raw_file)}
    if layout == "emptydir":
        members = {}
    feats = 5
    xt = m.get("x_train")
    if isinstance(xt, np.ndarray) and xt.ndim >= 2:
        feats = int(np.prod(xt.shape[1:]))
    case = {"cat": "dataset", "layout": layout, "members": members, "via": r["via"],
            "arch": f"{max(feats, 0)}-8-3"}  # fmt: skip
    if file_ops:
        case["file_ops"] = file_ops
    return case


def shrink_dataset(r):
    out = [{**r, "muts": r["muts"][:i] + r["muts"][i + 1 :]} for i in range(len(r["muts"]))]
    if r["via"] == "cli":
        out.append({**r, "via": "api"})
    if r["seed"]:
        out.append({**r, "seed": 0})
    return out


def describe_dataset(r) -> str:
    return f"dataset via {r['via']} (seed {r['seed']}): " + (", ".join(f"{a}:{b}" for a, b in r["muts"]) or "valid")


# ------------------------------------------------------------------------- CLI

NUM_VALUES = ["0", "-1", "nan", "inf", "-inf", "1e400", "1e20", "99999999999999999999", "", "abc",
              "0.5", "1", "2", "-0", "1e-320", "3.5"]  # fmt: skip
TRAIN_BASE = ["train", "--dataset", "{DATA}", "--arch", "8-16-3", "--epochs", "1", "--max-steps", "3",
              "--batch-size", "16", "--delta-t", "1", "--no-progress", "--out", "{OUT}"]  # fmt: skip
PLAN_BASE = ["plan", "--arch", "8-16-3"]
BENCH_BASE = ["bench", "--levels", "kernels", "--widths", "16", "--batch-sizes", "4", "--densities",
              "0.2", "--baselines", "scipy", "--no-progress", "--out", "{OUT}"]  # fmt: skip
TRAIN_FLOATS = ["--sparsity", "--lr", "--lr-gamma", "--alpha", "--t-end", "--momentum",
                "--weight-decay", "--val-fraction", "--grow-candidates", "--rank-timeout"]  # fmt: skip
TRAIN_INTS = ["--delta-t", "--warmup-steps", "--max-steps", "--batch-size", "--epochs",
              "--lr-step-every", "--seed", "--nprocs"]  # fmt: skip
CONTEXT = {  # options that make another one matter
    "--grow-candidates": ["--grow", "sampled"],
    "--lr-step-every": ["--lr-schedule", "step"],
    "--lr-gamma": ["--lr-schedule", "step", "--lr-step-every", "1"],
    "--warmup-steps": ["--lr-schedule", "constant"],
}
STRING_OPTS = {
    "train": {
        "--max-memory": ["0", "-1", "nan", "inf", "1e400", "", "8GB", "1B", "abc", "1e30GB", "99999999999999999999TB", "12 KiB", "0.5B"],
        "--arch": ["0-16-3", "8", "", "8-16-99999999999", "8--3", "a-b", "8-16-3-", "-8-16-3", "8-16-1", "9-16-3", "8-0-3", "8-99999999-3"],
        "--dataset": ["", "{TMP}/nope.npz", "{TMP}", "{FILE:bad.npz}", "{FILE:empty.npz}"],
        "--shard-layers": ["all", "0", "-1", "", "a", "5", "0,0"],
        "--resume": ["", "{TMP}/missing.npz", "{TMP}", "{FILE:bad.npz}", "{FILE:empty.npz}", "{CKPT}"],
        "--out": ["", "{FILE:afile}", "{FILE:afile}/sub", "/proc/nope"],
        "--device": ["cuda"],
        "--method": ["dense", "set", "static"],
        "--optimizer": ["adam", "adamw"],
        "--grow": ["sampled"],
    },
    "plan": {
        "--arch": ["784-100000000-10", "8", "0-1", "8-16-3", "1-1"],
        "--ranks": NUM_VALUES,
        "--shard-layers": ["all", "-1", "9", ""],
        "--device": ["cuda"],
        "--method": ["dense", "set"],
        "--json": [None],
    },
    "bench": {
        "--widths": ["0", "-1", "", "abc", "1e400", "16,0", "16,-3", "2", "99999999999", "1.5"],
        "--batch-sizes": ["0", "-1", "", "abc", "1e400", "99999999999", "1"],
        "--densities": ["0", "-1", "nan", "inf", "", "abc", "1", "1e-30", "0.5,nan"],
        "--sparsities": ["0", "nan", "inf", "", "1", "0.9"],
        "--delta-t": NUM_VALUES,
        "--threads": NUM_VALUES,
        "--seed": ["-1", "abc", "99999999999999999999", "0"],
        "--levels": ["", "gpu", "kernels,kernels", ","],
        "--baselines": ["", "mkl", "torch", "scipy,scipy"],
        "--from-json": ["{TMP}/missing.json", "{FILE:bad.json}", "{FILE:empty.json}", "{FILE:list.json}",
                        "{FILE:obj.json}", "{FILE:products.json}", "{TMP}"],
        "--results": ["{TMP}", "{FILE:afile}"],
    },
}  # fmt: skip
FILES = {
    "bad.npz": b"PK\x03\x04garbage",
    "empty.npz": b"",
    "afile": b"x",
    "bad.json": b"{not json",
    "empty.json": b"",
    "list.json": b"[1, 2]",
    "obj.json": b"{}",
    "products.json": b'{"products": [], "environment": {}}',
}


def cli_grid() -> list[dict]:
    """Every (subcommand, option, value) of the grid, each as a case."""
    cases = []
    for opt in TRAIN_FLOATS + TRAIN_INTS:
        for v in NUM_VALUES:
            cases.append(_cli_case("train", opt, v))
    for sub, opts in STRING_OPTS.items():
        for opt, vals in opts.items():
            for v in vals:
                cases.append(_cli_case(sub, opt, v))
    for opt in ("--sparsity", "--batch-size", "--grow-candidates"):
        for v in NUM_VALUES:
            cases.append(_cli_case("plan", opt, v))
    cases += [
        {"cat": "cli", "sub": "info", "argv": ["info"]},
        {"cat": "cli", "sub": "none", "argv": []},
        {"cat": "cli", "sub": "none", "argv": ["nope"]},
        {"cat": "cli", "sub": "train", "argv": TRAIN_BASE + ["--bogus"]},
        {"cat": "cli", "sub": "train", "argv": TRAIN_BASE},
        {"cat": "cli", "sub": "train", "argv": TRAIN_BASE + ["--method", "set", "--grow", "sampled"]},
        {"cat": "cli", "sub": "bench", "argv": BENCH_BASE},
    ]
    return cases


def _cli_case(sub, opt, v):
    base = {"train": TRAIN_BASE, "plan": PLAN_BASE, "bench": BENCH_BASE}[sub]
    extra = CONTEXT.get(opt, []) if sub != "bench" else []
    if sub == "plan" and opt == "--ranks":
        extra = ["--shard-layers", "all"]
    if sub == "plan" and opt == "--grow-candidates":
        extra = ["--grow", "sampled"]
    argv = list(base) + extra + ([opt] if v is None else [opt, v])
    case = {"cat": "cli", "sub": sub, "opt": opt, "value": v, "argv": argv}
    files = {}
    for a in argv:
        for name in re.findall(r"\{FILE:([^}]+)\}", a):
            files[name] = base64.b64encode(FILES[name]).decode()
    if files:
        case["files"] = files
        case["argv"] = [re.sub(r"\{FILE:([^}]+)\}", r"{TMP}/\1", a) for a in argv]
    if v is not None and v.lower() in ("nan",) and sub in ("train", "plan"):
        case["nan_opt"] = opt
    return case


def gen_cli(rng) -> dict:
    grid = cli_grid()
    c = grid[int(rng.integers(len(grid)))]
    if rng.random() < 0.3 and c["sub"] == "train":  # a second nonsense option
        opt = str(rng.choice(TRAIN_FLOATS + TRAIN_INTS))
        c = {**c, "argv": c["argv"] + [opt, str(rng.choice(NUM_VALUES))]}
        if opt == c.get("nan_opt"):  # given twice: argparse keeps the last, the NaN is gone
            c.pop("nan_opt")
    return c


def shrink_cli(case):
    return []


def describe_cli(case) -> str:
    return "sparsecore " + " ".join(_q(a) for a in case["argv"])


def _q(a: str) -> str:
    return a if a and all(ch.isalnum() or ch in "-_./{}:,=+" for ch in a) else repr(a)
