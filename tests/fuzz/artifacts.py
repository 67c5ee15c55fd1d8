"""Valid base files the corruption cases start from, and the corruptions themselves.

Also what a reproducer imports: ``base_dataset(dir)``, ``base_checkpoint(dir, name)`` and
``corrupt_npz(src, dst, mutations)`` rebuild exactly the files a failing case used.
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import numpy as np

FEATURES, CLASSES = 8, 3
ARCH = [FEATURES, 16, CLASSES]

# the runs whose checkpoints are corrupted; each also trains with these CLI options
BASES = {
    "rigl": dict(method="rigl", optimizer="sgd"),
    "dense_adam": dict(method="dense", optimizer="adam"),
}
TRAIN_KW = dict(max_steps=4, batch_size=16, delta_t=2, epochs=1, seed=0)


def base_dataset(folder) -> str:
    """Three Gaussian blobs in 8 features: 96 training rows, 32 test rows (an .npz)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "blobs.npz"
    if not path.exists():
        rng = np.random.default_rng(0)
        centers = rng.standard_normal((CLASSES, FEATURES)) * 3
        ytr, yte = rng.integers(0, CLASSES, 96), rng.integers(0, CLASSES, 32)
        tmp = folder / "blobs.tmp.npz"
        np.savez(
            tmp,
            x_train=(centers[ytr] + rng.standard_normal((96, FEATURES))).astype(np.float32),
            y_train=ytr,
            x_test=(centers[yte] + rng.standard_normal((32, FEATURES))).astype(np.float32),
            y_test=yte,
        )
        tmp.replace(path)
    return str(path)


def base_config(folder, name="rigl", out=None):
    from sparsecore.train import TrainConfig

    return TrainConfig(
        dataset=base_dataset(folder), arch=list(ARCH), out=out, progress=False,
        **BASES[name], **TRAIN_KW,
    )  # fmt: skip


def cli_train_args(folder, name="rigl") -> list[str]:
    """The ``sparsecore train`` options of a base run (dataset and architecture included)."""
    b = BASES[name]
    return [
        "train", "--dataset", base_dataset(folder), "--arch", "-".join(map(str, ARCH)),
        "--method", b["method"], "--optimizer", b["optimizer"],
        "--max-steps", str(TRAIN_KW["max_steps"]), "--batch-size", str(TRAIN_KW["batch_size"]),
        "--delta-t", str(TRAIN_KW["delta_t"]), "--epochs", str(TRAIN_KW["epochs"]),
        "--no-progress",
    ]  # fmt: skip


def base_checkpoint(folder, name="rigl") -> str:
    """A checkpoint of a tiny finished run (trained once, then reused)."""
    folder = Path(folder)
    path = folder / f"base_{name}" / "checkpoint.npz"
    if not path.exists():
        from sparsecore.train import Trainer

        tr = Trainer(base_config(folder, name, out=str(path.parent)))
        tr.run()
        from kernels.cpu import fpmode

        if fpmode.flushing():
            fpmode.set_flush(False)
    return str(path)


# ------------------------------------------------------------------------- npz surgery


def read_members(path) -> dict:
    """name (without .npy) -> raw .npy bytes, in file order."""
    with zipfile.ZipFile(path) as zf:
        return {n[:-4] if n.endswith(".npy") else n: zf.read(n) for n in zf.namelist()}


def npy_bytes(a) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asanyarray(a), allow_pickle=True)
    return buf.getvalue()


def lying_npy(shape, dtype="<f4", fortran=False, payload=b"\0" * 8) -> bytes:
    """An .npy whose header promises ``shape`` but whose data is ``payload``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": dtype, "fortran_order": fortran, "shape": tuple(shape)}
    )
    return buf.getvalue() + payload


def _meta_edit(meta: dict, path, value):
    obj = meta
    for k in path[:-1]:
        if isinstance(obj, dict):
            obj = obj.setdefault(k, {}) if k not in obj or isinstance(obj[k], (dict, list)) else obj[k]
        elif isinstance(obj, list) and isinstance(k, int) and -len(obj) <= k < len(obj):
            obj = obj[k]
        else:
            return
    last = path[-1]
    if isinstance(obj, dict):
        if value == "$delete":
            obj.pop(last, None)
        else:
            obj[last] = value
    elif isinstance(obj, list) and isinstance(last, int) and -len(obj) <= last < len(obj):
        if value == "$delete":
            obj.pop(last)
        else:
            obj[last] = value


def xform(a: np.ndarray, how: str, arg):
    """One transformation of a checkpoint member's array."""
    a = np.array(a)
    flat = a.reshape(-1)
    if how == "dtype":
        with np.errstate(all="ignore"):
            return a.astype(object) if arg == "object" else a.astype(arg)
    if how == "nonmonotone":  # an entry above the next one (then cast, e.g. to unsigned)
        b = flat.astype(np.int64).copy()
        if b.size >= 3:
            i = b.size // 2
            b[i] = b[i + 1] + 3
        with np.errstate(all="ignore"):
            return b.astype(arg).reshape(a.shape)
    if how in ("set_elem", "set_last", "set_first"):
        v = float(arg) if isinstance(arg, str) else arg
        if isinstance(v, float) and not v.is_integer() or isinstance(v, float) and not np.isfinite(v):
            b = flat.astype(np.float64).copy()
        else:
            b = flat.astype(np.int64 if a.dtype.kind in "iub" else a.dtype).copy()
        if b.size:
            b[{"set_elem": b.size // 2, "set_last": -1, "set_first": 0}[how]] = v
        return b.reshape(a.shape)
    if how == "append":
        return np.append(flat, flat[-1:] if flat.size else np.zeros(1, a.dtype))
    if how == "drop_last":
        return flat[:-1]
    if how == "scalar":
        return flat[0] if flat.size else np.array(0, a.dtype)
    if how == "2d":
        return flat[:, None]
    if how == "empty":
        return flat[:0]
    if how == "reverse":
        return flat[::-1].reshape(a.shape)
    if how == "zeros":
        return np.zeros_like(a)
    if how == "fortran":
        return np.asfortranarray(a)
    if how == "transpose":
        return a.T if a.ndim == 2 else flat[None, :]
    if how == "huge_values":
        return np.full_like(a, np.iinfo(a.dtype).max if a.dtype.kind in "iu" else 3e38)
    if how == "negate":
        return -a if a.dtype.kind != "b" else ~a
    raise ValueError(f"unknown transformation {how!r}")


def corrupt_npz(src, dst, mutations) -> str:
    """Apply member-level then byte-level mutations to a copy of an .npz; returns dst.

    Member ops: set/add (member = array), del, raw (member = bytes), lie (header promises more),
    meta (edit the JSON at a key path), meta_text (meta = a string), rename, compress.
    Byte ops: truncate (at a fraction of the size), flip (set a byte), replace (whole file).
    """
    from tests.fuzz.codec import materialize

    members = read_members(src)
    compress = False
    byte_ops = []
    for mu in mutations:
        op = mu["op"]
        name = mu.get("member")
        if op in ("set", "add"):
            members[name] = npy_bytes(materialize(mu["value"]))
        elif op == "del":
            members.pop(name, None)
        elif op == "raw":
            members[name] = base64.b64decode(mu["b64"])
        elif op == "lie":
            members[name] = lying_npy(mu["shape"], mu.get("dtype", "<f4"), mu.get("fortran", False))
        elif op == "meta":
            meta = json.loads(str(np.lib.format.read_array(io.BytesIO(members["meta"]))))
            _meta_edit(meta, mu["path"], mu["value"])
            members["meta"] = npy_bytes(np.array(json.dumps(meta)))
        elif op == "meta_text":
            members["meta"] = npy_bytes(np.array(mu["text"]))
        elif op == "rename" and name in members:
            members[mu["to"]] = members.pop(name)
        elif op == "xform":
            if name not in members:
                raise KeyError(f"no member {name} to transform")
            a = np.lib.format.read_array(io.BytesIO(members[name]), allow_pickle=False)
            members[name] = npy_bytes(xform(a, mu["how"], mu["arg"]))
        elif op == "compress":
            compress = True
        else:
            byte_ops.append(mu)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        for name, raw in members.items():
            zf.writestr(name if name.endswith(".npy") or "." in name[-5:] else name + ".npy", raw)
    blob = bytearray(buf.getvalue())
    for mu in byte_ops:
        if mu["op"] == "truncate":
            blob = blob[: int(len(blob) * mu["frac"])]
        elif mu["op"] == "flip" and blob:
            blob[int(mu["frac"] * (len(blob) - 1))] = mu["byte"]
        elif mu["op"] == "replace":
            blob = bytearray(base64.b64decode(mu["b64"]))
    Path(dst).write_bytes(bytes(blob))
    return str(dst)
