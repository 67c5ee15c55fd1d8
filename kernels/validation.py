"""Every check of the public boundary, and every error message it raises.

Checks come in two costs, as in scipy's check_format: O(1) ones (types, dtypes, shapes, lengths)
always, and O(nnz) scans (index range, monotone indptr, sorted unique columns, finiteness) on
input that has not been validated before. A sparsecore.CSR is validated in full once when it is
built; afterwards its pattern is read-only, its values' setter checks lengths and dtypes, and
every call re-checks those O(1) invariants (formats.CSR.check). The kernels themselves check
nothing. Input from files (datasets, checkpoints) is untrusted and checked in full.

Messages say which argument, what was expected and what arrived, e.g.
``W.indptr has length 5, expected n_rows + 1 = 4``.
"""

from __future__ import annotations

import functools
import numbers
import os
import struct
import tokenize
import zipfile
import zlib

import numpy as np

INDEX_MAX_32 = np.iinfo(np.int32).max
INDEX_MAX_64 = np.iinfo(np.int64).max
FLOAT32_MAX = float(np.finfo(np.float32).max)


def is_cupy_array(a) -> bool:
    """True for CuPy arrays and cupyx sparse matrices, without importing CuPy."""
    mod = type(a).__module__ or ""
    return mod == "cupy" or mod.startswith(("cupy.", "cupyx."))


def check_shape2(shape, name: str) -> tuple[int, int]:
    """(n_rows, n_cols) as Python ints. Refused: anything but two non-negative integers, and
    shapes whose flat index i·n + j (used by the grow, the merge and the samplers) would not fit
    int64, i.e. m·n > 2**63 - 1."""
    if not isinstance(shape, (tuple, list)) or len(shape) != 2:
        raise ValueError(f"{name} must be a pair (n_rows, n_cols), got {shape!r}")
    out = []
    for axis, v in zip(("n_rows", "n_cols"), shape, strict=True):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name}: {axis} must be a non-negative integer, got {v!r}")
        out.append(int(v))
    m, n = out
    if m * n > INDEX_MAX_64:
        raise ValueError(
            f"{name} = ({m}, {n}) has m·n = {m * n} entries, beyond 2**63 - 1: the flat index "
            "i·n + j of an entry would not fit int64"
        )
    check_fits_memory(
        np.dtype(index_dtype_for(m, 0, 0)).itemsize * (m + 1),
        f"{name} = ({m}, {n}): its row pointers (n_rows + 1)",
    )
    return m, n


# What a damaged, truncated or foreign file makes zipfile's and NumPy's readers raise (the
# readers of datasets and checkpoints turn these into one error naming the file)
FILE_READ_ERRORS = (
    ValueError,
    OSError,
    EOFError,
    KeyError,
    TypeError,
    IndexError,
    OverflowError,
    MemoryError,  # a member that declares more than fits (or a zip bomb)
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    struct.error,
    UnicodeDecodeError,
    NotImplementedError,
    SyntaxError,
    RecursionError,
    tokenize.TokenError,  # NumPy parses .npy headers with the tokenizer
)


@functools.cache
def physical_memory() -> int | None:
    """Bytes of RAM of this machine (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def memory_limit() -> tuple[int | None, str]:
    """(bytes, what they are): the smaller of this machine's RAM and the process's address-space
    limit (RLIMIT_AS), where either is known."""
    limits = []
    ram = physical_memory()
    if ram is not None:
        limits.append((ram, "this machine's memory"))
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY and soft > 0:
            limits.append((int(soft), "this process's address-space limit (ulimit -v)"))
    except (ImportError, ValueError, OSError):
        pass
    return min(limits) if limits else (None, "")


def check_fits_memory(nbytes: int, what: str):
    """Refuse, before allocating, an array that could not fit this machine's memory (or the
    process's limit) at all: a clear error instead of NumPy's MemoryError or the OOM killer."""
    limit, where = memory_limit()
    if limit is not None and nbytes > limit:
        raise ValueError(
            f"{what} needs {nbytes / 2**30:.4g} GiB, more than {where} ({limit / 2**30:.4g} GiB)"
        )


def check_int(v, name: str, *, low: int = 0, high: int | None = None) -> int:
    if not isinstance(v, numbers.Integral) or isinstance(v, bool):
        raise TypeError(f"{name} must be an integer, got {type(v).__name__} {v!r}")
    v = int(v)
    if v < low or (high is not None and v > high):
        hi = "" if high is None else f", at most {high}"
        raise ValueError(f"{name} must be at least {low}{hi}, got {v}")
    return v


def index_dtype_for(n_rows: int, n_cols: int, nnz: int):
    """int32 while every index and offset fits, else int64: the one rule for a CSR's indices
    and indptr (coords_dtype and flat_dtype are its cases for coordinates and flat indices)."""
    return np.int32 if max(n_rows, n_cols, nnz) <= INDEX_MAX_32 else np.int64


def coords_dtype(m: int, n: int):
    """The dtype of (row, col) coordinates of an m × n matrix: int32 while both fit."""
    return index_dtype_for(m, n, 0)


def flat_dtype(m: int, n: int):
    """The dtype of flat indices i·n + j of an m × n matrix: int32 while m·n fits."""
    return np.int32 if m * n <= INDEX_MAX_32 else np.int64


def _check_index_array(a, name: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(a).__name__}")
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype, got {a.dtype}")
    if a.dtype == np.uint64 and a.size and int(a.max()) > INDEX_MAX_64:
        raise ValueError(f"{name} holds {int(a.max())}, beyond the int64 range of indices")
    return a


def check_csr_arrays(
    indptr, indices, data, shape, name: str = "W", *, full: bool = True, index_dtype=None
):
    """Validate raw CSR arrays; return (indptr, indices, data, (m, n)) in kernel dtypes.

    Kernel dtypes: float32 data, indices and indptr both int32 (int64 when sizes need it), all
    C-contiguous. Arrays already in those dtypes are passed through without a copy.
    index_dtype forces int32 or int64 indices (default: int32 unless the sizes need int64).
    full=True adds the O(nnz) scans: indptr monotone, indices in [0, n_cols), columns sorted and
    unique within each row (canonical form), data finite.
    """
    m, n = check_shape2(shape, f"{name}.shape")
    indptr = _check_index_array(indptr, f"{name}.indptr")
    indices = _check_index_array(indices, f"{name}.indices")
    if not isinstance(data, np.ndarray):
        raise TypeError(f"{name}.data must be a NumPy array, got {type(data).__name__}")
    if data.ndim != 1:
        raise ValueError(f"{name}.data must be 1-D, got shape {data.shape}")
    if data.dtype.kind not in "fiub":
        raise TypeError(f"{name}.data must be real numbers, got dtype {data.dtype}")
    if indptr.shape[0] != m + 1:
        raise ValueError(
            f"{name}.indptr has length {indptr.shape[0]}, expected n_rows + 1 = {m + 1}"
        )
    nnz = indices.shape[0]
    if data.shape[0] != nnz:
        raise ValueError(
            f"{name}.data has length {data.shape[0]}, expected len({name}.indices) = {nnz}"
        )
    if int(indptr[0]) != 0:
        raise ValueError(f"{name}.indptr[0] must be 0, got {int(indptr[0])}")
    if int(indptr[-1]) != nnz:
        raise ValueError(
            f"{name}.indptr[-1] = {int(indptr[-1])} must equal len({name}.indices) = {nnz}"
        )
    idx_dtype = choose_index_dtype(m, n, nnz, index_dtype, name)
    if full:
        check_indptr_monotone(indptr, name)
        if nnz:
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= n:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"{name}.indices must lie in [0, n_cols = {n}), found column index {bad}"
                )
            check_canonical(indptr, indices, name)
    indptr = np.ascontiguousarray(indptr, dtype=idx_dtype)
    indices = np.ascontiguousarray(indices, dtype=idx_dtype)
    with np.errstate(over="ignore"):  # overflow to inf is reported just below
        data = np.ascontiguousarray(data, dtype=np.float32)
    if full:
        check_finite_values(data, f"{name}.data")
    return indptr, indices, data, (m, n)


def check_finite_values(data, name: str):
    """After the cast to float32: 1e300 is finite in float64 but inf in float32."""
    if data.size and not np.isfinite(data).all():
        p = int(np.flatnonzero(~np.isfinite(data))[0])
        raise ValueError(
            f"{name} must be finite in float32, found {data[p]} at position {p} "
            "(NaN, inf, or a value beyond float32's range)"
        )


def choose_index_dtype(m: int, n: int, nnz: int, index_dtype=None, name: str = "W"):
    """int32 unless the sizes need int64; a requested dtype must be int32/int64 and wide enough."""
    needed = index_dtype_for(m, n, nnz)
    if index_dtype is None:
        return needed
    dt = np.dtype(index_dtype)
    if dt not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise TypeError(f"index_dtype must be int32 or int64, got {dt}")
    if dt.itemsize < np.dtype(needed).itemsize:
        raise ValueError(f"{name} needs int64 indices: its sizes exceed the int32 range")
    return dt.type


def check_indptr_monotone(indptr, name: str = "W"):
    """indptr[i] <= indptr[i + 1] for every row. Compared element by element, not by np.diff,
    which wraps around on unsigned dtypes (a falling uint32 indptr would pass)."""
    down = indptr[1:] < indptr[:-1]
    if down.size and down.any():
        row = int(np.flatnonzero(down)[0])
        raise ValueError(
            f"{name}.indptr must be nondecreasing, but indptr[{row + 1}] = "
            f"{int(indptr[row + 1])} < indptr[{row}] = {int(indptr[row])}"
        )


def _canonical_steps(indptr, indices):
    """Per entry after the first: True where its column rises above the previous one's or
    it starts a row. O(nnz)."""
    nnz = indices.shape[0]
    step_ok = np.diff(indices.astype(np.int64)) > 0
    starts = indptr[1:-1].astype(np.int64)  # a new row may start lower
    starts = starts[(starts > 0) & (starts < nnz)]
    step_ok[starts - 1] = True
    return step_ok


def is_canonical(indptr, indices) -> bool:
    """Columns strictly increasing within every row (indptr already checked monotone)."""
    return indices.shape[0] < 2 or bool(_canonical_steps(indptr, indices).all())


def check_canonical(indptr, indices, name: str = "W"):
    """Columns strictly increasing within every row (sorted, no duplicates). O(nnz)."""
    if indices.shape[0] < 2:
        return
    step_ok = _canonical_steps(indptr, indices)
    if not step_ok.all():
        p = int(np.flatnonzero(~step_ok)[0]) + 1
        row = int(np.searchsorted(indptr, p, side="right")) - 1
        raise ValueError(
            f"{name} is not canonical: in row {row}, column {int(indices[p])} follows column "
            f"{int(indices[p - 1])} (columns must be sorted and unique within each row; "
            "scipy's sum_duplicates() makes them so)"
        )


def on_side(a, name: str, xp, what: str, *, convert: bool = False):
    """``a`` as an array of the call's side (array module ``xp``), or the TypeError that says
    where it is instead: a CuPy array in a host call, a host object in a device call, or
    something that is no array at all. ``convert`` lets host calls take array-likes (lists,
    tuples, objects with ``__array__``); ``convert="any"`` whatever NumPy makes an array of (the
    caller then checks its dimensions and dtype)."""
    if xp is np:  # the host; also the CUDA side emulated over NumPy in the tests
        if is_cupy_array(a):
            raise_cupy(name)
        if isinstance(a, np.ndarray):
            return a
        if convert == "any" or (
            convert and (hasattr(a, "__array__") or isinstance(a, (list, tuple)))
        ):
            return np.asarray(a)
        raise TypeError(f"{name} must be {what}, got {type(a).__name__}")
    if not isinstance(a, xp.ndarray):
        raise backend_mismatch(name, True)
    return a


def _all_finite(a, xp) -> bool:
    return not a.size or bool(xp.isfinite(a).all())


def as_operand(a, name: str, n_rows: int | None = None, *, finite: bool = False, xp=np):
    """A 2-D dense operand as a C-contiguous float32 array of side ``xp`` (copied only when it
    is not one).

    n_rows, if given, is the required first dimension. Integer and other float dtypes are
    converted (a copy); complex, object and other kinds are refused.
    """
    a = on_side(a, name, xp, "a 2-D NumPy array", convert=True)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got {a.ndim}-D with shape {a.shape}")
    if a.dtype.kind not in "fiub":
        raise TypeError(f"{name} must hold real numbers (float32 preferred), got dtype {a.dtype}")
    if n_rows is not None and a.shape[0] != n_rows:
        raise ValueError(f"{name} has shape {a.shape}, expected {n_rows} rows")
    if a.dtype.kind == "f" and a.dtype.itemsize > 4 and a.size:
        check_fits_float32(a, name, xp)  # O(size), paid only with the conversion's copy
    a = xp.ascontiguousarray(a, dtype=np.float32)
    if finite and not _all_finite(a, xp):
        raise ValueError(f"{name} must be finite in float32, but it holds NaN or inf")
    return a


def check_fits_float32(a, name: str, xp=np):
    """A wider float array's finite values must stay finite as float32 (1e300 would become
    inf without a word). NaN and inf pass here: they are what they were."""
    bad = xp.isfinite(a) & (xp.abs(a) > FLOAT32_MAX)
    if bool(bad.any()):
        p = np.unravel_index(int(xp.flatnonzero(bad)[0]), a.shape)
        raise OverflowError(
            f"{name} holds {float(a[p])!r} at index {tuple(int(i) for i in p)}, beyond "
            f"float32's range (±{FLOAT32_MAX:.4g}); the kernels compute in float32: rescale it"
        )


def check_no_overlap(out, name: str, *inputs, xp=np):
    """``out`` must not share memory with an input: kernels read inputs while writing out."""
    for a in inputs:
        if a is not None and xp.may_share_memory(out, a):
            raise ValueError(f"{name} overlaps an input array; pass a separate output buffer")


def check_out(out, name: str, shape: tuple, dtype=np.float32, xp=np):
    """``out=`` must be exactly what the kernel writes: no silent copy, no broadcasting."""
    out = on_side(out, name, xp, "a NumPy array")
    if out.shape != tuple(shape):
        raise ValueError(f"{name} has shape {out.shape}, expected {tuple(shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{name} has dtype {out.dtype}, expected {np.dtype(dtype).name}")
    if not out.flags.c_contiguous or not getattr(out.flags, "writeable", True):
        raise ValueError(f"{name} must be a writeable C-contiguous array")
    return out


def check_layout(layout) -> str:
    if layout not in ("feature", "batch"):
        raise ValueError(
            f"layout must be 'feature' (arrays are features × batch) or 'batch' "
            f"(batch × features), got {layout!r}"
        )
    return layout


def check_mask(mask, name: str, length: int, xp=np):
    mask = on_side(mask, name, xp, f"a 1-D NumPy bool array of length {length}")
    if mask.ndim != 1:
        raise TypeError(
            f"{name} must be a 1-D bool array of length {length}, got shape {mask.shape}"
        )
    if mask.dtype != np.bool_:
        raise TypeError(f"{name} must have dtype bool, got {mask.dtype}")
    if mask.shape[0] != length:
        raise ValueError(f"{name} has length {mask.shape[0]}, expected nnz = {length}")
    return xp.ascontiguousarray(mask)


def check_coords(rows, cols, shape, name: str = "grown", xp=np):
    """Coordinates of new entries: equal-length integer arrays inside the matrix, no repeats.

    Returns int64 (rows, cols) sorted in row-major order. O(g log g).
    """
    m, n = shape
    rows = on_side(rows, f"{name} rows", xp, "a 1-D integer array", convert="any")
    cols = on_side(cols, f"{name} cols", xp, "a 1-D integer array", convert="any")
    for a, nm in ((rows, f"{name} rows"), (cols, f"{name} cols")):
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise TypeError(f"{nm} must be a 1-D integer array, got {a.dtype} shape {a.shape}")
    if rows.shape != cols.shape:
        raise ValueError(
            f"{name} rows and cols differ in length: {rows.shape[0]} vs {cols.shape[0]}"
        )
    rows = rows.astype(np.int64, copy=False)
    cols = cols.astype(np.int64, copy=False)
    if rows.size:
        for a, nm, hi in ((rows, "rows", m), (cols, "cols", n)):
            lo_v, hi_v = int(a.min()), int(a.max())
            if lo_v < 0 or hi_v >= hi:
                raise ValueError(f"{name} {nm} must lie in [0, {hi}), got [{lo_v}, {hi_v}]")
    flat = rows * n + cols
    order = xp.argsort(flat)  # (a repeat is refused below: the keys left are distinct)
    flat = flat[order]
    if flat.size > 1:
        dup = xp.flatnonzero(flat[1:] == flat[:-1])
        if dup.size:
            f = int(flat[int(dup[0])])
            raise ValueError(f"{name} lists entry ({f // n}, {f % n}) more than once")
    return rows[order], cols[order]


GPU_INSTALL = 'pip install "sparsecore-rigl[gpu]"'


class GPUUnavailableError(NotImplementedError):
    """The GPU path was asked for, but CuPy or a CUDA device is missing.

    A NotImplementedError (hence a RuntimeError) so that callers catching either see it.
    """


_gpu_state: dict = {}


def gpu_unavailable_reason() -> str | None:
    """None when CuPy imports and sees a CUDA device, else why not (memoized per process)."""
    if "reason" not in _gpu_state:
        try:
            import cupy
        except ImportError as e:
            reason = f"CuPy is not installed ({e})"
        else:
            try:
                count = cupy.cuda.runtime.getDeviceCount()
                reason = None if count > 0 else "no CUDA device is visible"
            except Exception as e:  # CUDARuntimeError: no driver, or one too old
                reason = f"no usable CUDA device ({type(e).__name__}: {e})"
        _gpu_state["reason"] = reason
    return _gpu_state["reason"]


def require_gpu(name: str, lead: str | None = None):
    """Return the cupy module, or raise the one clear error saying how to get the GPU path.

    The message starts with ``lead`` (default: "<name> is a CuPy array")."""
    reason = gpu_unavailable_reason()
    if reason is not None:
        lead = f"{name} is a CuPy array" if lead is None else lead
        raise GPUUnavailableError(
            f"{lead}: the CUDA kernels need CuPy and a CUDA device, and "
            f"{reason}. Install them with {GPU_INSTALL} on a machine with an NVIDIA GPU, "
            "or pass NumPy arrays (cupy.asnumpy) to run on the CPU."
        )
    import cupy

    return cupy


def raise_cupy(name: str):
    """A CuPy array reached a CPU-only function: the install message if the GPU path is not
    available at all, else a TypeError saying to keep the operands on one side."""
    require_gpu(name)
    raise TypeError(
        f"{name} is a CuPy array, but this call runs on the CPU (its other operands are "
        "host arrays); pass NumPy arrays (cupy.asnumpy), or put every operand on the GPU"
    )


def backend_mismatch(name: str, on_gpu: bool):
    """TypeError for an operand on the wrong side of a call whose other operands decided."""
    if on_gpu:
        return TypeError(
            f"{name} is a host (NumPy/scipy) object, but the other operands are on the GPU "
            f"(CuPy); move it with cupy.asarray({name}) (or W.to_device() for a CSR)"
        )
    return TypeError(
        f"{name} is a CuPy array, but the other operands are host (NumPy) arrays; "
        "put every operand on one device"
    )
