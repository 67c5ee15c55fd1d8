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

Rank 0 writes to a temporary file and renames it once complete (after an fsync), so a job
killed mid-write keeps the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np

from sparsecore.device import to_host
from sparsecore.formats import CSR
from sparsecore.layers import SparseLinear

FORMAT = 2
# A checkpoint must match these to be loaded at all (they decide the shapes of the state) ...
STRUCTURE_KEYS = (
    "arch",
    "method",
    "grow",
    "optimizer",
    "sparsity",
    "distribution",
    "activation",
    "fan_in",
)
# ... and these to resume into the same result as a run that never stopped (else a warning).
RESULT_KEYS = (
    "seed",
    "flush_denormals",
    "batch_size",
    "lr",
    "lr_schedule",
    "lr_step_every",
    "lr_gamma",
    "warmup_steps",
    "momentum",
    "nesterov",
    "weight_decay",
    "delta_t",
    "alpha",
    "t_end",
    "epochs",
    "max_steps",
    "step_on_update",
    "grow_candidates",
)
# Keys added after checkpoints were first written: an old checkpoint had these values.
KEY_DEFAULTS = {"grow": "exact", "grow_candidates": 10, "flush_denormals": False}
_HEADER_TAG, _ARRAY_TAG = 71, 72


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
    dist = trainer.dist
    sharded = getattr(dist, "sharded", False)
    root = dist is None or dist.rank == 0
    if root and path is None:
        raise ValueError("checkpoint.write: rank 0 (or a single process) needs a path")
    if not root and path is not None:
        raise ValueError("checkpoint.write: only rank 0 writes; the other ranks pass None")
    if not root and not sharded:
        return  # data-parallel: rank 0 holds everything
    comm = dist.p2p if sharded else None  # a duplicate of the world: no clash with user tags
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
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            writer = _NpzWriter(f)
            try:
                _write_root(writer, trainer, meta, comm)
            finally:
                writer.close()
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


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
        from sparsecore.distributed import split

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


class _Members:
    """The .npy members of an .npz, each opened as a read-only memory map where it is stored
    uncompressed (as sparsecore and numpy.savez write them): slicing one reads only the bytes
    of the slice, so a rank resuming its rows of a layer never loads the layer whole.
    Compressed members are read whole."""

    def __init__(self, path):
        self.path = str(path)
        self.zf = zipfile.ZipFile(self.path)
        self.files = [n[:-4] for n in self.zf.namelist() if n.endswith(".npy")]

    def __getitem__(self, name):
        info = self.zf.getinfo(name + ".npy")
        if info.compress_type != zipfile.ZIP_STORED:
            with self.zf.open(info) as fh:
                return np.lib.format.read_array(fh, allow_pickle=False)
        with open(self.path, "rb") as fh:
            fh.seek(info.header_offset)
            local = fh.read(30)  # the member's local header: its own name and extra lengths
            if local[:4] != b"PK\x03\x04":
                raise ValueError(f"{self.path}: member {name} has no zip local header")
            n_name, n_extra = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + n_name + n_extra
            fh.seek(start)
            version = np.lib.format.read_magic(fh)
            if version not in ((1, 0), (2, 0)):  # (3, 0): utf-8 field names; read whole
                with self.zf.open(info) as member:
                    return np.lib.format.read_array(member, allow_pickle=False)
            header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = header(fh)
            offset = fh.tell()
        if dtype.hasobject:
            raise ValueError(f"{self.path}: member {name} holds Python objects; refused")
        if offset + int(np.prod(shape)) * dtype.itemsize > start + info.file_size:
            raise ValueError(f"{self.path}: member {name} is shorter than its header says")
        if int(np.prod(shape)) == 0:
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


def read_rows(d, l: int, name: str, moments, r0: int, r1: int):
    """Rows [r0, r1) of sparse layer l of an open checkpoint ``d``: (CSR of those rows, bias,
    {"{name}.W/{moment}": ..., "{name}.b/{moment}": ...}), from the parts that hold them."""
    m, n = (int(s) for s in d[f"L{l}/shape"])
    if f"L{l}/parts" in d.files:
        bounds = [int(b) for b in d[f"L{l}/parts"]]
        parts = [(bounds[p], bounds[p + 1], f"L{l}/p{p}/") for p in range(len(bounds) - 1)]

        def key(prefix, k):
            return prefix + k

    else:  # format 1: the whole layer, its optimizer state under opt/
        parts = [(0, m, f"L{l}/")]
        renames = {f"opt/{mo}/{p}": f"opt/{name}.{p}/{mo}" for mo in moments for p in "Wb"}

        def key(prefix, k):
            return renames.get(k, prefix + k)

    opt_keys = [f"opt/{mo}/{p}" for mo in moments for p in "Wb"]
    pieces = {k: [] for k in ("indices", "data", "b", *opt_keys)}
    row_nnz = []
    for p0, p1, prefix in parts:
        a, b = max(r0, p0) - p0, min(r1, p1) - p0
        if a >= b:
            continue
        indptr = np.array(d[key(prefix, "indptr")][a : b + 1])
        e0, e1 = int(indptr[0]), int(indptr[-1])
        row_nnz.append(np.diff(indptr))
        for k in pieces:
            whole = d[key(prefix, k)]  # a memory map (_Members): the slice alone is read
            per_row = k == "b" or k.endswith("/b")
            pieces[k].append(np.array(whole[a:b] if per_row else whole[e0:e1]))
            del whole
    cat = {k: np.concatenate(v) if v else np.empty(0, np.float32) for k, v in pieces.items()}
    counts = np.concatenate(row_nnz) if row_nnz else np.empty(0, np.int64)
    indices = cat["indices"]
    indptr = np.zeros(r1 - r0 + 1, indices.dtype)
    np.cumsum(counts, out=indptr[1:])
    W = CSR(indptr, indices, cat["data"].astype(np.float32), (r1 - r0, n))
    state = {}
    for mo in moments:
        state[f"{name}.W/{mo}"] = cat[f"opt/{mo}/W"]
        state[f"{name}.b/{mo}"] = cat[f"opt/{mo}/b"]
    return W, cat["b"], state


def check_config(saved: dict, cfg, path):
    """A checkpoint's config against this run's: structure must match, results may differ
    (with a warning)."""
    for key in STRUCTURE_KEYS:
        if saved.get(key, KEY_DEFAULTS.get(key)) != getattr(cfg, key):
            raise ValueError(
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
            stacklevel=3,
        )


def read(path, trainer) -> dict:
    """Restore the trainer's model and optimizer from ``path`` (this rank's rows of a sharded
    layer); returns the checkpoint's meta (step, epoch, history)."""
    device = trainer.device
    moments = trainer.opt.state_names
    members = _Members(path)
    try:
        with np.load(path, allow_pickle=False) as d:
            meta = json.loads(str(d["meta"]))
            check_config(meta["config"], trainer.cfg, path)
            weighted = trainer.model.weighted()
            missing = [
                l
                for l in range(len(weighted))
                if f"L{l}/b" not in d.files and f"L{l}/parts" not in d.files
            ]
            if missing:
                raise ValueError(f"checkpoint {path} lacks weighted layer(s) {missing}")
            state = {"t": d["opt/t"]}
            for l, layer in enumerate(weighted):
                if isinstance(layer, SparseLinear):
                    shape = tuple(int(s) for s in d[f"L{l}/shape"])
                    if shape != tuple(layer.full_shape):
                        raise ValueError(
                            f"checkpoint layer {l} has shape {shape}, expected {layer.full_shape}"
                        )
                    r0, r1 = (0, shape[0]) if layer.shard is None else (layer.r0, layer.r1)
                    W, b, st = read_rows(members, l, layer.name, moments, r0, r1)
                    layer.set_weight(device.csr(W))
                    layer.b[...] = device.asarray(b)
                    state.update(st)
                else:
                    if d[f"L{l}/W"].shape != layer.W.shape:
                        raise ValueError(
                            f"checkpoint layer {l} has shape {d[f'L{l}/W'].shape}, "
                            f"expected {layer.W.shape}"
                        )
                    layer.W[...] = device.asarray(d[f"L{l}/W"])
                    layer.b[...] = device.asarray(d[f"L{l}/b"])
                    for name in (f"{layer.name}.W", f"{layer.name}.b"):
                        for key in moments:
                            state[f"{name}/{key}"] = d[f"opt/{name}/{key}"]
            trainer.opt.rebind(trainer.model.params())
            trainer.opt.load_state_dict(state)
    finally:
        members.close()
    return meta
