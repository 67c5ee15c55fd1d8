"""Checkpoints: one .npz holding everything a run needs to resume, on any number of MPI ranks.

Layout (format 2):

- ``meta``: JSON of the config, step, epoch, history and format; ``opt/t``: the optimizer's
  step count;
- a dense layer l: ``L{l}/W``, ``L{l}/b`` and its optimizer state ``opt/{param}/{moment}``;
- a sparse layer l: ``L{l}/shape`` (the whole layer's), ``L{l}/parts`` (row boundaries of its
  P parts: [0, ..., m]) and per part p: ``L{l}/p{p}/indptr|indices|data|b`` (the CSR of rows
  [parts[p], parts[p+1]), indptr from 0) with the optimizer state of those rows
  ``L{l}/p{p}/opt/{moment}/W`` (one value per entry, in CSR order) and ``.../b``. A layer
  trained whole is one part; a layer sharded over N MPI ranks is N parts, each rank's rows
  sent to rank 0 in turn and streamed into the file, so rank 0 never holds more than its own
  shard and one other.

Reading takes any row range of a layer from whatever parts were written (``read_rows``): a
checkpoint written by N ranks resumes on M ranks, sharded or not. Format 1 (every sparse layer
whole, ``L{l}/indptr`` ... and ``opt/{param}/{moment}``) is read too.

Rank 0 writes to a new temporary file (unpredictable name, created exclusively in the target
folder) and renames it over the checkpoint once complete (after an fsync), so a job killed
mid-write keeps the previous checkpoint, and no link planted in the folder is followed.

Reading treats the file as untrusted (``read``): the meta, the format version and every member
used are checked (kinds, shapes, index ranges, monotone indptr, canonical rows, finite values,
the config's nnz) before any array reaches the trainer or a kernel; a file that fails is one
``CheckpointError`` naming the member, and the trainer is left as it was.
"""

from __future__ import annotations

import ast
import json
import math
import os
import struct
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

from kernels import validation as V
from kernels.formats import CSR
from sparsecore import config
from sparsecore.device import to_host
from sparsecore.layers import SparseLinear
from sparsecore.parallel import split

FORMAT = 2
READS = (1, 2)  # the formats this version reads
# A checkpoint must match these settings to be loaded at all (they decide the shapes of the
# state), and these to resume into the same result as a run that never stopped (else a
# warning); the roles are declared with the fields (sparsecore/config.py).
STRUCTURE_KEYS = config.names(resume=config.STRUCTURE)
RESULT_KEYS = config.names(resume=config.RESULT)
# Keys added after checkpoints were first written: an old checkpoint had these values.
KEY_DEFAULTS = config.absent_values()
_HEADER_TAG, _ARRAY_TAG = 71, 72
# What every row of a checkpoint's history holds (the loop's metrics of one epoch)
HISTORY_KEYS = ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc")


class _NpzWriter:
    """Writes .npz members one at a time (numpy's savez needs every array at once)."""

    def __init__(self, f):
        self.zf = zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True)

    def add(self, name: str, array):
        with self.zf.open(name + ".npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array(fh, np.asanyarray(array), allow_pickle=False)

    def close(self):
        self.zf.close()


def _layer_arrays(layer, state: dict, moments) -> dict:
    """This process's rows of a sparse layer: CSR arrays, bias, and their optimizer state."""
    W = layer.W
    out = {
        "indptr": to_host(W.indptr),
        "indices": to_host(W.indices),
        "data": to_host(W.data),
        "b": to_host(layer.b),
    }
    for key in moments:
        out[f"opt/{key}/W"] = state[f"{layer.name}.W/{key}"]
        out[f"opt/{key}/b"] = state[f"{layer.name}.b/{key}"]
    return out


def write(path, trainer, meta: dict):
    """Write the trainer's checkpoint. Every rank calls this (a sharded layer's rows come from
    every rank); rank 0 (or a single process) writes ``path``, the others pass None."""
    par = trainer.par
    sharded = par.sharded
    root = par.rank == 0
    if root and path is None:
        raise ValueError("checkpoint.write: rank 0 (or a single process) needs a path")
    if not root and path is not None:
        raise ValueError("checkpoint.write: only rank 0 writes; the other ranks pass None")
    if not root and not sharded:
        return  # data-parallel: rank 0 holds everything
    comm = par.p2p if sharded else None  # a duplicate of the world: no clash with user tags
    if not root:  # this rank's rows of every sharded layer go to rank 0, in layer order
        state = trainer.opt.state_dict()
        for layer in trainer.model.sparse_layers():
            if layer.shard is not None:
                mine = _layer_arrays(layer, state, trainer.opt.state_names)
                comm.send([(k, a.dtype.str, a.shape) for k, a in mine.items()], 0, _HEADER_TAG)
                for a in mine.values():
                    comm.Send(np.ascontiguousarray(a), 0, _ARRAY_TAG)
        return
    path = Path(path)
    # a new file of an unpredictable name in the target folder, created exclusively (O_EXCL:
    # never a file or link that is already there), then renamed over the checkpoint; a link
    # at the checkpoint's own path is replaced, not followed
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _NpzWriter(f)
            try:
                _write_root(writer, trainer, meta, comm)
            finally:
                writer.close()
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # as open() would have made it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread);
    022 where /proc does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _fsync_dir(folder: Path):
    """Make the rename durable (POSIX: the folder's entry is data of the folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_root(writer, trainer, meta, comm):
    state = trainer.opt.state_dict()
    moments = trainer.opt.state_names
    writer.add("meta", np.array(json.dumps({**meta, "format": FORMAT})))
    writer.add("opt/t", state["t"])
    for l, layer in enumerate(trainer.model.weighted()):
        if not isinstance(layer, SparseLinear):
            writer.add(f"L{l}/W", to_host(layer.W))
            writer.add(f"L{l}/b", to_host(layer.b))
            for name in (f"{layer.name}.W", f"{layer.name}.b"):
                for key in moments:
                    writer.add(f"opt/{name}/{key}", state[f"{name}/{key}"])
            continue
        m, n = layer.full_shape
        writer.add(f"L{l}/shape", np.array([m, n], np.int64))
        if layer.shard is None or comm is None:
            writer.add(f"L{l}/parts", np.array([0, m], np.int64))
            for k, a in _layer_arrays(layer, state, moments).items():
                writer.add(f"L{l}/p0/{k}", a)
            continue
        size = comm.Get_size()
        writer.add(f"L{l}/parts", np.array([split(m, size, r)[0] for r in range(size)] + [m]))
        for k, a in _layer_arrays(layer, state, moments).items():
            writer.add(f"L{l}/p0/{k}", a)
        for p in range(1, size):  # one other rank's rows at a time
            for k, dtype, shape in comm.recv(source=p, tag=_HEADER_TAG):
                a = np.empty(shape, np.dtype(dtype))
                comm.Recv(a, source=p, tag=_ARRAY_TAG)
                writer.add(f"L{l}/p{p}/{k}", a)
                del a


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: damaged, foreign, of another structure or format,
    or inconsistent. Raised before anything of the trainer is changed."""


_READ_ERRORS = V.FILE_READ_ERRORS


class _Members:
    """The .npy members of an .npz, each opened as a read-only memory map where it is stored
    uncompressed (as sparsecore and numpy.savez write them): slicing one reads only the bytes
    of the slice, so a rank resuming its rows of a layer never loads the layer whole.
    Compressed members are read whole, after their declared size was checked against the
    zip's. Every header is checked against the file before a byte of data is mapped."""

    def __init__(self, path):
        self.path = str(path)
        self.zf = zipfile.ZipFile(self.path)
        self.files = [n[:-4] for n in self.zf.namelist() if n.endswith(".npy")]

    def __contains__(self, name) -> bool:
        return name in self.files

    def _header(self, fh, name):
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        elif version == (3, 0):  # utf-8 field names; NumPy has no public reader of its header
            shape, fortran, dtype = self._header_3_0(fh, name)
        else:
            raise CheckpointError(f"{self.path}: member {name} has .npy version {version}")
        if dtype.hasobject:
            raise CheckpointError(f"{self.path}: member {name} holds Python objects; refused")
        if any(int(s) < 0 for s in shape):
            raise CheckpointError(f"{self.path}: member {name} declares shape {shape}")
        return version, shape, fortran, dtype, math.prod(int(s) for s in shape) * dtype.itemsize

    def _header_3_0(self, fh, name):
        """The .npy 3.0 header: a 4-byte length, then a utf-8 dict literal."""
        raw = fh.read(4)
        if len(raw) < 4:
            raise CheckpointError(f"{self.path}: member {name} has a truncated header")
        (length,) = struct.unpack("<I", raw)
        text = fh.read(length)
        if len(text) < length or length > 1 << 20:
            raise CheckpointError(f"{self.path}: member {name} has a truncated header")
        d = ast.literal_eval(text.decode("utf-8"))
        if not (
            isinstance(d, dict)
            and set(d) == {"descr", "fortran_order", "shape"}
            and isinstance(d["shape"], tuple)
            and all(isinstance(x, int) for x in d["shape"])
            and isinstance(d["fortran_order"], bool)
        ):
            raise CheckpointError(f"{self.path}: member {name} has a malformed .npy header")
        return d["shape"], d["fortran_order"], np.lib.format.descr_to_dtype(d["descr"])

    def __getitem__(self, name):
        if name not in self.files:
            raise CheckpointError(f"checkpoint {self.path} has no member {name!r}")
        info = self.zf.getinfo(name + ".npy")
        if info.compress_type != zipfile.ZIP_STORED:
            with self.zf.open(info) as fh:
                nbytes = self._header(fh, name)[-1]
                if nbytes > info.file_size:
                    raise CheckpointError(
                        f"{self.path}: member {name} is shorter than its header says"
                    )
            with self.zf.open(info) as fh:
                return np.lib.format.read_array(fh, allow_pickle=False)
        with open(self.path, "rb") as fh:
            fh.seek(info.header_offset)
            local = fh.read(30)  # the member's local header: its own name and extra lengths
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{self.path}: member {name} has no zip local header")
            n_name, n_extra = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + n_name + n_extra
            fh.seek(start)
            version, shape, fortran, dtype, nbytes = self._header(fh, name)
            offset = fh.tell()
            size = os.fstat(fh.fileno()).st_size
        if offset + nbytes > min(start + info.file_size, size):
            raise CheckpointError(f"{self.path}: member {name} is shorter than its header says")
        if version == (3, 0):  # read whole (numpy maps only what it writes itself)
            with self.zf.open(info) as member:
                return np.lib.format.read_array(member, allow_pickle=False)
        if nbytes == 0:
            return np.empty(shape, dtype)
        return np.memmap(
            self.path,
            dtype=dtype,
            mode="r",
            offset=offset,
            shape=shape,
            order="F" if fortran else "C",
        )

    def close(self):
        self.zf.close()


# ---------------------------------------------------------------------- the format check
class _Check:
    """Typed reads of an open checkpoint's members: every array is checked (kind, shape,
    range) before it is used, and errors name the file and the member."""

    def __init__(self, d):
        self.d = d  # a _Members, or numpy's NpzFile
        self.path = getattr(d, "path", None) or getattr(getattr(d, "zip", None), "filename", "")

    def fail(self, what: str):
        raise CheckpointError(f"checkpoint {self.path}: {what}")

    def array(self, name, kind, shape):
        """Member ``name`` of dtype kind "i" (integers), "f" (real floats); ``shape`` with
        None where any length goes."""
        try:
            a = self.d[name]
        except CheckpointError:
            raise
        except _READ_ERRORS as e:
            self.fail(f"member {name} cannot be read ({type(e).__name__}: {str(e).strip()})")
        if kind == "i" and a.dtype.kind not in "iu":
            self.fail(f"{name} has dtype {a.dtype}, expected integers")
        if kind == "f" and a.dtype.kind != "f":
            self.fail(f"{name} has dtype {a.dtype}, expected real floating-point values")
        if a.ndim != len(shape) or any(
            w is not None and w != s for w, s in zip(shape, a.shape, strict=True)
        ):
            want = "(" + ", ".join("any" if w is None else str(w) for w in shape) + ")"
            self.fail(f"{name} has shape {a.shape}, expected {want}")
        big = kind == "i" and a.dtype == np.uint64 and a.size
        if big and int(a.max()) > np.iinfo(np.int64).max:
            self.fail(f"{name} holds {int(a.max())}, beyond the int64 range")
        return a

    def ints(self, name, shape) -> np.ndarray:
        return np.asarray(self.array(name, "i", shape), dtype=np.int64)

    def values(self, name, shape, *, nonneg=False, lo=None, hi=None) -> np.ndarray:
        """A float member of ``shape``, as float32, finite (and >= 0 if asked); of a 1-D one
        only the slice [lo, hi) is read and checked (a rank's rows of a part)."""
        a = self.array(name, "f", shape)
        if lo is not None:
            a = a[lo:hi]
        with np.errstate(over="ignore"):
            a = np.array(a, dtype=np.float32)
        bad = ~np.isfinite(a) | ((a < 0) if nonneg else False)
        if bad.any():
            p = int(np.flatnonzero(bad.ravel())[0])
            want = "finite values >= 0" if nonneg else "finite float32 values"
            self.fail(f"{name} must hold {want}, found {a.ravel()[p]} at position {p}")
        return a

    def csr_part(self, prefix, key, rows: int, n: int, a: int, b: int):
        """Rows [a, b) of the part at ``prefix`` (rows rows, n columns): its indptr checked
        whole (monotone from 0 to its nnz), the slice's columns in [0, n) and canonical.
        Returns (row counts, indices, data slice bounds)."""
        indptr = self.ints(key(prefix, "indptr"), (rows + 1,))
        nnz_p = int(indptr[-1])
        if int(indptr[0]) != 0:
            self.fail(f"{key(prefix, 'indptr')}[0] must be 0, got {int(indptr[0])}")
        down = indptr[1:] < indptr[:-1]
        if down.any():
            r = int(np.flatnonzero(down)[0])
            self.fail(
                f"{key(prefix, 'indptr')} must be nondecreasing, but indptr[{r + 1}] = "
                f"{int(indptr[r + 1])} < indptr[{r}] = {int(indptr[r])}"
            )
        all_idx = self.array(key(prefix, "indices"), "i", (nnz_p,))
        e0, e1 = int(indptr[a]), int(indptr[b])
        cols = np.asarray(all_idx[e0:e1], dtype=np.int64)
        if cols.size and (int(cols.min()) < 0 or int(cols.max()) >= n):
            bad = int(cols.min()) if int(cols.min()) < 0 else int(cols.max())
            self.fail(f"{key(prefix, 'indices')} must lie in [0, {n}), found {bad}")
        local = indptr[a : b + 1] - e0
        if not V.is_canonical(local, cols):
            self.fail(
                f"{key(prefix, 'indices')} must be sorted and unique within each row "
                "(canonical CSR)"
            )
        return np.diff(indptr[a : b + 1]), cols, nnz_p, e0, e1


def _read_meta(c: _Check) -> dict:
    raw = c.array("meta", None, ())
    if raw.dtype.kind not in "US" or raw.ndim != 0:
        c.fail(f"meta has dtype {raw.dtype} shape {raw.shape}, expected a JSON string")
    try:
        meta = json.loads(str(raw[()] if raw.dtype.kind == "U" else raw[()].decode()))
    except (ValueError, UnicodeDecodeError) as e:
        c.fail(f"meta is not JSON ({e})")
    if not isinstance(meta, dict):
        c.fail(f"meta must be a JSON object, got {type(meta).__name__}")
    fmt = meta.get("format", 1)
    if fmt not in READS:
        if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > FORMAT:
            c.fail(
                f"it has format {fmt}, newer than this sparsecore reads (formats "
                f"{', '.join(map(str, READS))}; it writes {FORMAT}): upgrade sparsecore"
            )
        c.fail(f"unknown format {fmt!r} (this sparsecore reads {', '.join(map(str, READS))})")
    for key, typ in (("config", dict), ("history", list)):
        if not isinstance(meta.get(key), typ):
            c.fail(f"meta.{key} must be a JSON {typ.__name__}, got {meta.get(key)!r:.60}")
    for key in ("step", "epoch"):
        v = meta.get(key)
        if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62):
            c.fail(f"meta.{key} must be an integer in [0, 2**62), got {v!r:.60}")
    for i, row in enumerate(meta["history"]):
        if not isinstance(row, dict):
            c.fail(f"meta.history[{i}] must be an object of that epoch's metrics")
        for k in HISTORY_KEYS:
            v = row.get(k)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool)):
                c.fail(f"meta.history[{i}].{k} must be a number, got {v!r:.60}")
        if row["epoch"] != i + 1:
            c.fail(f"meta.history[{i}].epoch must be {i + 1}, got {row['epoch']!r}")
    if len(meta["history"]) != meta["epoch"]:
        c.fail(f"meta.history has {len(meta['history'])} epochs, but meta.epoch is {meta['epoch']}")
    return meta


def _expected_nnz(cfg, model) -> dict:
    """The nnz every sparse layer has at this config (constant through training)."""
    if cfg.method == "dense" or not model.sparse_layers():
        return {}
    shapes, dens = cfg.shapes(), cfg.densities()
    return {
        l: int(round(d * m * n))
        for l, ((m, n), d, layer) in enumerate(zip(shapes, dens, model.weighted(), strict=True))
        if isinstance(layer, SparseLinear)
    }


def read_rows(d, l: int, name: str, moments, r0: int, r1: int, *, nnz=None, n=None):
    """Rows [r0, r1) of sparse layer l of an open checkpoint ``d``: (CSR of those rows, bias,
    {"{name}.W/{moment}": ..., "{name}.b/{moment}": ...}), from the parts that hold them.
    Every member used is checked first (CheckpointError); ``nnz``, if given, is the layer's
    whole nnz that the parts must add up to, ``n`` its column count."""
    c = _Check(d)
    shape = c.ints(f"L{l}/shape", (2,))
    m, n_cols = int(shape[0]), int(shape[1])
    if n is not None and n_cols != n:
        c.fail(f"L{l}/shape says {n_cols} columns, the layer has {n}")
    n = n_cols
    if not 0 <= r0 <= r1 <= m:
        c.fail(f"layer {l} has {m} rows; rows [{r0}, {r1}) were asked for")
    if f"L{l}/parts" in d.files:
        bounds = [int(b) for b in c.ints(f"L{l}/parts", (None,))]
        if (
            len(bounds) < 2
            or bounds[0] != 0
            or bounds[-1] != m
            or any(hi < lo for lo, hi in zip(bounds[:-1], bounds[1:], strict=True))
        ):
            c.fail(f"L{l}/parts must run nondecreasing from 0 to {m}, got {bounds[:8]}")
        parts = [(bounds[p], bounds[p + 1], f"L{l}/p{p}/") for p in range(len(bounds) - 1)]

        def key(prefix, k):
            return prefix + k

    else:  # format 1: the whole layer, its optimizer state under opt/
        parts = [(0, m, f"L{l}/")]
        renames = {f"opt/{mo}/{p}": f"opt/{name}.{p}/{mo}" for mo in moments for p in "Wb"}

        def key(prefix, k):
            return renames.get(k, prefix + k)

    opt_keys = [f"opt/{mo}/{p}" for mo in moments for p in "Wb"]
    pieces = {k: [] for k in ("data", "b", *opt_keys)}
    cols, row_nnz, total = [], [], 0
    for p0, p1, prefix in parts:
        a, b = max(r0, p0) - p0, min(r1, p1) - p0
        if a >= b:  # not this rank's rows: only the part's count (one element) is read
            ip = c.array(key(prefix, "indptr"), "i", (p1 - p0 + 1,))
            total += int(ip[-1])
            continue
        counts, idx, nnz_p, e0, e1 = c.csr_part(prefix, key, p1 - p0, n, a, b)
        total += nnz_p
        row_nnz.append(counts)
        cols.append(idx)
        for k in pieces:
            per_row = k == "b" or k.endswith("/b")
            length, lo, hi = (p1 - p0, a, b) if per_row else (nnz_p, e0, e1)
            v_moment = k.startswith("opt/v/")  # Adam's second moment: never negative
            pieces[k].append(c.values(key(prefix, k), (length,), nonneg=v_moment, lo=lo, hi=hi))
    if nnz is not None and total != nnz:
        c.fail(f"layer {l} holds {total} connections, this config's layer has {nnz}")
    cat = {k: np.concatenate(v) if v else np.empty(0, np.float32) for k, v in pieces.items()}
    counts = np.concatenate(row_nnz) if row_nnz else np.empty(0, np.int64)
    indices = np.concatenate(cols) if cols else np.empty(0, np.int64)
    idx = V.index_dtype_for(r1 - r0, n, indices.shape[0])
    indptr = np.zeros(r1 - r0 + 1, idx)
    np.cumsum(counts, out=indptr[1:])
    W = CSR(indptr, indices.astype(idx), cat["data"], (r1 - r0, n))  # checked once more
    state = {}
    for mo in moments:
        state[f"{name}.W/{mo}"] = cat[f"opt/{mo}/W"]
        state[f"{name}.b/{mo}"] = cat[f"opt/{mo}/b"]
    return W, cat["b"], state


def check_config(saved: dict, cfg, path):
    """A checkpoint's config against this run's: structure must match, results may differ
    (with a warning)."""
    momentum = saved.get("momentum", 0)
    if not isinstance(momentum, (int, float)) or isinstance(momentum, bool):
        raise CheckpointError(f"checkpoint {path}: meta.config.momentum is {momentum!r:.60}")
    if cfg.optimizer == "sgd" and (momentum > 0) != (cfg.momentum > 0):
        raise CheckpointError(
            f"checkpoint {path} was written with momentum={momentum!r}, this run has "
            f"momentum={cfg.momentum!r}: SGD with and without momentum keeps different state "
            "(resume with momentum on or off as it was; its value may change)"
        )
    for key in STRUCTURE_KEYS:
        if saved.get(key, KEY_DEFAULTS.get(key)) != getattr(cfg, key):
            raise CheckpointError(
                f"checkpoint {path} was written with "
                f"{key}={saved.get(key, KEY_DEFAULTS.get(key))!r}, "
                f"this run has {key}={getattr(cfg, key)!r}"
            )
    changed = [k for k in RESULT_KEYS if saved.get(k, KEY_DEFAULTS.get(k)) != getattr(cfg, k)]
    if changed:
        diffs = ", ".join(
            f"{k} ({saved.get(k, KEY_DEFAULTS.get(k))!r} -> {getattr(cfg, k)!r})" for k in changed
        )
        warnings.warn(
            f"resuming with different {diffs}: the run will not equal one that never stopped",
            stacklevel=4,  # the caller of read()
        )


def read(path, trainer) -> dict:
    """Restore the trainer's model and optimizer from ``path`` (this rank's rows of a sharded
    layer); returns the checkpoint's meta (step, epoch, history).

    The file is untrusted: its meta (format, config, step, epoch, history) and every member
    this process uses (kinds, shapes, index ranges, monotone indptr, canonical columns, finite
    values, nnz as the config gives) are checked before the trainer is touched. Anything wrong
    is one CheckpointError naming the file and the member; the trainer is then unchanged."""
    try:
        members = _Members(path)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    except _READ_ERRORS as e:
        raise CheckpointError(
            f"checkpoint {path} is not a sparsecore checkpoint (not a readable .npz: "
            f"{type(e).__name__}: {str(e).strip() or 'damaged'})"
        ) from None
    try:  # member reads turn what a damaged file raises into CheckpointError (_Check.array)
        return _read_checked(members, trainer)
    finally:
        members.close()


def _read_checked(d: _Members, trainer) -> dict:
    c = _Check(d)
    if "meta" not in d:
        c.fail(
            "it has no meta member: not a sparsecore checkpoint"
            + (" (it looks like a dataset .npz)" if "x_train" in d else "")
        )
    meta = _read_meta(c)
    check_config(meta["config"], trainer.cfg, d.path)
    moments = trainer.opt.state_names
    weighted = trainer.model.weighted()
    nnz = _expected_nnz(trainer.cfg, trainer.model)
    t = c.ints("opt/t", ())
    if int(t) < 0:
        c.fail(f"opt/t (the optimizer's step count) must be >= 0, got {int(t)}")
    state = {"t": np.array(int(t))}
    loaded = []  # (layer, W or None, W dense or None, b), applied once everything passed
    for l, layer in enumerate(weighted):
        if isinstance(layer, SparseLinear):
            if f"L{l}/shape" not in d:
                c.fail(f"weighted layer {l} is missing (no L{l}/shape)")
            shape = tuple(int(s) for s in c.ints(f"L{l}/shape", (2,)))
            if shape != tuple(layer.full_shape):
                c.fail(f"layer {l} has shape {shape}, expected {layer.full_shape}")
            r0, r1 = (0, shape[0]) if layer.shard is None else (layer.r0, layer.r1)
            W, b, st = read_rows(d, l, layer.name, moments, r0, r1, nnz=nnz[l], n=shape[1])
            loaded.append((layer, W, None, b))
            state.update(st)
        else:
            if f"L{l}/W" not in d:
                c.fail(f"weighted layer {l} is missing (no L{l}/W)")
            m, n = layer.W.shape
            Wd = c.values(f"L{l}/W", (m, n))
            b = c.values(f"L{l}/b", (m,))
            for name in (f"{layer.name}.W", f"{layer.name}.b"):
                for key in moments:
                    k = f"opt/{name}/{key}"
                    shape = (m, n) if name.endswith(".W") else (m,)
                    state[f"{name}/{key}"] = c.values(k, shape, nonneg=key == "v")
            loaded.append((layer, None, Wd, b))
    device = trainer.device
    for layer, W, Wd, b in loaded:
        if W is not None:
            layer.set_weight(device.csr(W))
        else:
            layer.W[...] = device.asarray(Wd)
        layer.b[...] = device.asarray(b)
    trainer.opt.rebind(trainer.model.params())
    trainer.opt.load_state_dict(state)
    return meta
