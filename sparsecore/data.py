"""Datasets: the bundled MNIST, or the user's own arrays; normalisation and a validation split.

Arrays are kept batch-major (N, features) float32 as users hold them; the training loop
transposes each mini-batch to the kernels' feature-major layout. A folder of .npy files is
streamed: the files are memory-mapped and each mini-batch's rows are read, cast and standardised
when the batch is drawn (``StreamedRows``), so a dataset larger than memory trains in O(batch).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kernels import validation as V

BUNDLED = {"mnist": Path(__file__).parent / "datasets" / "mnist.npz"}
MNIST_SHA256 = {
    "x_train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "y_train": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "x_test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "y_test": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])


class DatasetError(ValueError):
    """A dataset file or array that cannot be used, with what is wrong and where."""


MAX_LABEL = 2**31 - 1  # class indices; a label beyond this is not a class of any real model


def _labels(y, name):
    y = np.asarray(y)
    if y.ndim != 1:
        raise DatasetError(f"{name} must be 1-D integer labels, got shape {y.shape}")
    if y.size and y.dtype.kind not in "iuf":
        raise DatasetError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    if not y.size:
        return y.astype(np.int64)
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            p = int(np.flatnonzero(bad)[0])
            raise DatasetError(
                f"{name} must hold integer class labels, found {y[p]!r} at row {p} "
                f"(dtype {y.dtype})"
            )
    lo, hi = y.min(), y.max()  # compared in y's own dtype: no wrap-around before the check
    if lo < 0:
        raise DatasetError(f"{name} holds a negative label ({lo.item()!r}); labels are 0..C-1")
    if hi > MAX_LABEL:
        raise DatasetError(
            f"{name} holds the label {hi.item()!r}, beyond {MAX_LABEL}: labels must be class "
            "indices 0..C-1"
        )
    return y.astype(np.int64)


def _features(x, name):
    x = np.asarray(x)
    if x.ndim < 2:
        raise DatasetError(
            f"{name} must be (N, features...) with at least 2 dims, got shape {x.shape}"
        )
    if x.dtype.kind not in "fiub":
        raise DatasetError(f"{name} must be numeric, got dtype {x.dtype}")
    x = x.reshape(x.shape[0], int(np.prod(x.shape[1:], dtype=np.int64))).astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf")
    return x


def _check_split(xtr, ytr, xte, yte, val_fraction) -> int:
    """Shapes of a dataset's arrays agree and the split is valid; returns the class count."""
    if xtr.shape[0] != ytr.shape[0]:
        raise ValueError(f"x_train has {xtr.shape[0]} rows but y_train has {ytr.shape[0]} labels")
    if xte.shape[0] != yte.shape[0]:
        raise ValueError(f"x_test has {xte.shape[0]} rows but y_test has {yte.shape[0]} labels")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"x_train has {xtr.shape[1]} features but x_test has {xte.shape[1]}")
    if xtr.shape[0] == 0:
        raise DatasetError("x_train is empty (0 rows)")
    if xte.shape[0] == 0:
        raise DatasetError("x_test is empty (0 rows): the run reports test accuracy every epoch")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    return int(max(ytr.max(), yte.max() if yte.size else 0)) + 1


def from_arrays(
    x_train,
    y_train,
    x_test,
    y_test,
    *,
    name="arrays",
    val_fraction=0.0,
    seed=0,
    normalize: str = "standard",
) -> Dataset:
    """Build a Dataset from arrays: flatten, standardise with training statistics, split off
    a validation set (val_fraction of the training set, seeded)."""
    xtr, xte = _features(x_train, "x_train"), _features(x_test, "x_test")
    ytr, yte = _labels(y_train, "y_train"), _labels(y_test, "y_test")
    n_classes = _check_split(xtr, ytr, xte, yte, val_fraction)
    if normalize == "standard":
        mean = float(xtr.mean(dtype=np.float64))
        std = float(xtr.std(dtype=np.float64)) or 1.0
        xtr = (xtr - np.float32(mean)) / np.float32(std)
        xte = (xte - np.float32(mean)) / np.float32(std)
    elif normalize != "none":
        raise ValueError(f"normalize must be 'standard' or 'none', got {normalize!r}")
    n_val = int(round(val_fraction * xtr.shape[0]))
    perm = np.random.default_rng(seed).permutation(xtr.shape[0])
    val, tr = perm[:n_val], perm[n_val:]
    return Dataset(name, xtr[tr], ytr[tr], xtr[val], ytr[val], xte, yte, n_classes)


KEYS = ("x_train", "y_train", "x_test", "y_test")

STREAM_CHUNK_BYTES = 64 << 20  # statistics and checks of a streamed array read this much at a time


class StreamedRows:
    """Rows of a (memory-mapped) array (N, ...), flattened to (N, F), cast to float32 and
    standardised as they are read: ``x[idx]`` (an int, a slice or an integer array) reads only
    those rows. ``rows`` selects a subset (a validation split) without copying anything."""

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, base, mean: float = 0.0, std: float = 1.0, rows=None):
        self.base = base
        self.mean, self.std = np.float32(mean), np.float32(std)
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        n = base.shape[0] if self.rows is None else self.rows.shape[0]
        self.shape = (int(n), int(np.prod(base.shape[1:], dtype=np.int64)))

    @property
    def nbytes(self) -> int:
        return 4 * self.shape[0] * self.shape[1]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx):
        if isinstance(idx, tuple):
            raise TypeError("StreamedRows takes one row index (int, slice or integer array)")
        src = idx if self.rows is None else self.rows[idx]
        a = np.array(self.base[src], dtype=np.float32)  # a copy: the map is read-only
        one = isinstance(src, (int, np.integer)) or (isinstance(src, np.ndarray) and src.ndim == 0)
        a = a.reshape(-1) if one else a.reshape(a.shape[0], self.shape[1])
        a -= self.mean
        a /= self.std
        return a

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)

    def subset(self, rows) -> StreamedRows:
        rows = np.asarray(rows, dtype=np.int64)
        return StreamedRows(
            self.base, self.mean, self.std, rows if self.rows is None else self.rows[rows]
        )


def _streamed_stats(x, name) -> tuple[float, float]:
    """Mean and standard deviation of every element, read in chunks (float64, Chan's combination
    of per-chunk moments); raises on NaN/inf or a non-numeric dtype."""
    if x.ndim < 2:
        raise ValueError(f"{name} must be (N, features...) with at least 2 dims, got {x.shape}")
    if x.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
    row_bytes = max(1, x.itemsize * int(np.prod(x.shape[1:], dtype=np.int64)))
    chunk = max(1, STREAM_CHUNK_BYTES // (8 * row_bytes // x.itemsize))
    n, mean, m2 = 0, 0.0, 0.0
    for start in range(0, x.shape[0], chunk):
        c = np.asarray(x[start : start + chunk], dtype=np.float64)
        if not (np.abs(c) <= np.finfo(np.float32).max).all():  # NaN, inf, or inf once float32
            raise ValueError(
                f"{name} holds NaN or inf, or values beyond float32 (rows "
                f"{start}..{start + c.shape[0] - 1})"
            )
        nc = c.size
        if not nc:
            continue
        mc = float(c.mean())
        m2c = float(((c - mc) ** 2).sum())
        delta = mc - mean
        tot = n + nc
        mean += delta * nc / tot
        m2 += m2c + delta * delta * n * nc / tot
        n = tot
    std = (m2 / n) ** 0.5 if n else 0.0
    return mean, std


def streamed(x_train, y_train, x_test, y_test, *, name="streamed", val_fraction=0.0, seed=0):
    """A Dataset over (memory-mapped) arrays whose features are read per batch: standardised
    with the training set's statistics (computed in chunks), split like ``from_arrays``."""
    ytr, yte = _labels(y_train, "y_train"), _labels(y_test, "y_test")
    mean, std = _streamed_stats(x_train, "x_train")
    _streamed_stats(x_test, "x_test")  # the same checks
    std = std or 1.0
    xtr = StreamedRows(x_train, mean, std)
    xte = StreamedRows(x_test, mean, std)
    n_classes = _check_split(xtr, ytr, xte, yte, val_fraction)
    n_val = int(round(val_fraction * xtr.shape[0]))
    perm = np.random.default_rng(seed).permutation(xtr.shape[0])
    val, tr = perm[:n_val], perm[n_val:]  # the rows from_arrays would give, in its order
    return Dataset(name, xtr.subset(tr), ytr[tr], xtr.subset(val), ytr[val], xte, yte, n_classes)


def _load_npy_dir(path: Path) -> dict:
    missing = [k for k in KEYS if not (path / f"{k}.npy").exists()]
    if missing:
        raise DatasetError(f"{path} lacks {', '.join(f'{k}.npy' for k in missing)}")
    out = {}
    for k in KEYS:
        a = np.load(path / f"{k}.npy", mmap_mode="r", allow_pickle=False)
        if not isinstance(a, np.ndarray):
            raise DatasetError(f"{path / (k + '.npy')} is not a .npy array file")
        out[k] = a
    return out


def _load_npz(path: Path) -> dict:
    d = np.load(path, allow_pickle=False)
    if not isinstance(d, np.lib.npyio.NpzFile):
        raise DatasetError(
            f"dataset {path} is a single array, not an .npz of x_train, y_train, x_test, "
            "y_test (np.savez them together, or put four .npy files in a folder)"
        )
    with d:
        missing = [k for k in KEYS if k not in d.files]
        if missing:
            raise DatasetError(f"{path} lacks array(s) {', '.join(missing)}; it has {d.files}")
        return {k: d[k] for k in KEYS}


_READ_ERRORS = V.FILE_READ_ERRORS


def _read_file(path: Path, reader) -> dict:
    """reader(path), with whatever a damaged file raises turned into one DatasetError."""
    try:
        return reader(path)
    except DatasetError:
        raise
    except _READ_ERRORS as e:
        raise DatasetError(
            f"dataset {path} cannot be read ({type(e).__name__}: {str(e).strip() or 'damaged'}); "
            "expected an .npz with x_train, y_train, x_test, y_test, or a folder of those four "
            ".npy files"
        ) from None


def load(name_or_path: str, *, val_fraction: float = 0.0, seed: int = 0, verify=True) -> Dataset:
    """'mnist' (bundled), a path to an .npz with x_train, y_train, x_test, y_test, or a folder
    holding those four arrays as .npy files."""
    path = BUNDLED.get(name_or_path)
    if path is None:
        path = Path(name_or_path)
        if not path.exists():
            raise FileNotFoundError(
                f"dataset {name_or_path!r}: not a bundled dataset ({', '.join(BUNDLED)}) and no "
                "such file (expected an .npz with x_train, y_train, x_test, y_test, or a folder "
                "of those four .npy files)"
            )
    if path.is_dir():
        arrays = _read_file(path, _load_npy_dir)
        return streamed(**arrays, name=path.stem, val_fraction=val_fraction, seed=seed)
    arrays = _read_file(path, _load_npz)
    if verify and name_or_path == "mnist":
        for k, h in MNIST_SHA256.items():
            if hashlib.sha256(np.ascontiguousarray(arrays[k]).tobytes()).hexdigest() != h:
                raise ValueError(f"bundled MNIST array {k} does not match its SHA-256")
    name = name_or_path if name_or_path in BUNDLED else Path(name_or_path).stem
    return from_arrays(**arrays, name=name, val_fraction=val_fraction, seed=seed)
