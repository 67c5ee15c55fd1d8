"""Sparse weight storage: a canonical CSR container with a COO view and a transpose structure.

A ``CSR`` holds an m × n float32 matrix as scipy does (``indptr``, ``indices``, ``data``), always
canonical (columns sorted and unique within each row), with int32 indices unless the sizes need
int64. It is validated once when built and trusted by every kernel afterwards, so its pattern
arrays are read-only; its values (``data``) may be changed in place.

Derived structures are built on first use and cached until the pattern changes:
- the transpose structure (CSC indices + a permutation into ``data``), which makes dX = Wᵀ·dY a
  race-free forward-style product, rebuilt in O(nnz + n) after a topology change;
- the thread blocks (row ranges of about equal nonzeros) of both orientations.

``DeviceCSR`` is its twin on the GPU: the same canonical arrays as CuPy arrays, validated when
built and trusted afterwards, with its transpose structure built on the device on first use.
Build one with ``CSR.to_device()``, ``DeviceCSR.from_host``, ``DeviceCSR.from_cupy_scipy`` or
``DeviceCSR.from_arrays``; go back with ``to_host()``. Importing this module never imports CuPy
(the CUDA side's array module is chosen from the arrays, so the tests run it over NumPy).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import scipy.sparse as sp

from kernels import config
from kernels import validation as V
from kernels.cpu._common import row_blocks
from kernels.cpu.sampled import sample_absent
from kernels.cpu.structure import transpose
from kernels.cuda import structure as _cuda_structure
from kernels.cuda._module import array_module, to_host


def random_positions(m: int, n: int, nnz: int, rng: np.random.Generator) -> np.ndarray:
    """nnz distinct flat positions i·n + j of an m × n matrix, uniform without replacement,
    ascending int64, in O(nnz) memory. Up to config.RANDOM_POSITIONS_CHOICE_MAX (2**24)
    entries, or at density <= 1/50, NumPy's choice (its stream fixes the patterns of
    CSR.random); above that NumPy would shuffle an int64 array of all m·n positions, so the
    rejection sampler of kernels/cpu/sampled.py draws them instead."""
    if m * n > config.RANDOM_POSITIONS_CHOICE_MAX and 50 * nnz > m * n:
        empty = np.zeros(m + 1, dtype=np.int64)
        return sample_absent(empty, empty[:0], None, n, nnz, rng)
    flat = rng.choice(m * n, size=nnz, replace=False, shuffle=False)
    flat.sort()
    return flat


def split_count(sizes, total: int, rng: np.random.Generator) -> np.ndarray:
    """How many of ``total`` positions, drawn uniformly without replacement from parts of
    ``sizes`` positions, fall in each part (int64, summing to total). A multivariate
    hypergeometric draw; NumPy's samplers take populations below 10**9 only, so above that each
    part's count is drawn in turn as a binomial of the remaining positions, clipped to what the
    part and the rest can hold (the hypergeometric's mean, its variance larger by at most the
    fraction drawn: negligible for sparse patterns)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    left = int(sizes.sum())
    if left < 10**9:
        return rng.multivariate_hypergeometric(sizes, total, method="marginals").astype(np.int64)
    out = np.zeros(sizes.shape[0], np.int64)
    k = int(total)
    for i, s in enumerate(sizes.tolist()):
        left -= s  # positions in the parts after this one
        if k == 0:
            break
        if left == 0:
            c = k
        elif s + left < 10**9:
            c = int(rng.hypergeometric(s, left, k))
        else:
            c = min(max(int(rng.binomial(k, s / (s + left))), k - left, 0), s, k)
        out[i] = c
        k -= c
    return out


class _Counts:
    """What CSR and DeviceCSR read the same way off their shape and indices."""

    __slots__ = ()

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    @property
    def density(self) -> float:
        m, n = self.shape
        return self.nnz / (m * n) if m * n else 0.0


class CSR(_Counts):
    """Canonical CSR matrix (float32 values, int32|int64 indices).

    Build with ``CSR(indptr, indices, data, shape)`` (fully validated, O(nnz)), or with
    ``CSR.from_dense``, ``CSR.from_scipy``, ``CSR.random``.

    Validated once, then trusted. What is checked when it is built: the O(nnz) scans (indptr
    monotone from 0 to nnz, columns in range, sorted and unique within each row, values finite).
    What stays guarded afterwards, at O(1):

    - ``indptr``, ``indices`` and ``shape`` cannot be reassigned, and the two index arrays are
      read-only (their ``writeable`` flag is off; the CSR owns them, no caller holds a
      writeable view);
    - ``data`` may be changed in place (the optimizer writes it), and assigning a new array
      goes through a setter that checks it is a 1-D C-contiguous float32 NumPy array of
      length nnz, not sharing memory with the index arrays;
    - every kernel call checks those lengths and dtypes again (O(1)).

    What is trusted: the index arrays' and the cached thread blocks' contents, as long as nobody
    turns their writeable flags back on and edits them or replaces private attributes (that is
    deliberate, and then out-of-bounds reads are on the caller); the values' finiteness after
    in-place writes. The engine's layers call the launchers directly (no per-call check) and
    check their operands' shapes themselves.
    """

    __slots__ = ("_shape", "_indptr", "_indices", "_data", "_cache")

    def __init__(self, indptr, indices, data, shape, *, check: bool = True, index_dtype=None):
        if check:
            indptr, indices, data, shape = _owned_pattern(
                (indptr, indices),
                V.check_csr_arrays(indptr, indices, data, shape, "W", index_dtype=index_dtype),
            )
        else:  # still the O(1) invariants: the kernels read indptr and indices unchecked
            _check_trusted(indptr, indices, data, shape)
            check_values(data, indices.shape[0], "W.data", indptr, indices)
        self._set(indptr, indices, data, tuple(int(s) for s in shape))

    def _set(self, indptr, indices, data, shape):
        indptr.flags.writeable = False
        indices.flags.writeable = False
        self._indptr, self._indices, self._data, self._shape = indptr, indices, data, shape
        self._cache = {}

    @classmethod
    def _trusted(cls, indptr, indices, data, shape) -> CSR:
        """Internal: arrays already canonical and in kernel dtypes (O(1) checks only)."""
        _check_trusted(indptr, indices, data, shape)
        check_values(data, indices.shape[0], "W.data", indptr, indices)
        obj = cls.__new__(cls)
        obj._set(indptr, indices, data, tuple(int(s) for s in shape))
        return obj

    # ------------------------------------------------------------------ guarded attributes
    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def indptr(self) -> np.ndarray:
        """Row pointers (read-only; length n_rows + 1)."""
        return self._indptr

    @property
    def indices(self) -> np.ndarray:
        """Column of every stored entry, in CSR order (read-only)."""
        return self._indices

    @property
    def data(self) -> np.ndarray:
        """The stored values, float32, aligned with ``indices``; writeable in place."""
        return self._data

    @data.setter
    def data(self, value):
        self._data = check_values(value, self.nnz, "W.data", self._indptr, self._indices)

    def check(self, name: str = "W") -> CSR:
        """The O(1) invariants every kernel call relies on (lengths, dtypes, layout); raises
        ValueError/TypeError naming ``name`` if anything changed them. Returns self."""
        _check_trusted(self._indptr, self._indices, self._data, self._shape, name)
        return self

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, a, *, name: str = "a") -> CSR:
        """The nonzero entries of a 2-D array (explicit zeros are not stored)."""
        a = np.asarray(a)
        if a.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
        if a.dtype.kind not in "fiub":
            raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
        m, n = V.check_shape2(a.shape, f"{name}.shape")
        V.check_fits_memory(16 * (m + 1), f"CSR.from_dense of shape {(m, n)}: its row counts")
        rows, cols = np.nonzero(a)  # row-major order: canonical already
        idx = V.index_dtype_for(m, n, rows.shape[0])
        indptr = np.zeros(m + 1, dtype=idx)
        np.cumsum(np.bincount(rows, minlength=m), out=indptr[1:])
        with np.errstate(over="ignore"):  # overflow to inf is reported just below
            data = a[rows, cols].astype(np.float32)
        V.check_finite_values(data, name)
        return cls._trusted(indptr, cols.astype(idx), data, (m, n))

    @classmethod
    def from_scipy(cls, M, *, name: str = "W") -> CSR:
        """From any scipy.sparse matrix or array (csr, csc, coo, ...; any index dtype).

        Duplicates are summed and columns sorted (on a copy; M is not modified). Explicit zeros
        that M stores are kept as connections: in a sparse network a weight may be zero.
        """
        if not sp.issparse(M):
            raise TypeError(f"{name} must be a scipy.sparse matrix, got {type(M).__name__}")
        if M.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got {M.ndim}-D")
        if M.dtype.kind not in "fiub":
            raise TypeError(f"{name} must hold real numbers, got dtype {M.dtype}")
        V.check_shape2(M.shape, f"{name}.shape")
        if M.format != "csr":
            _check_before_conversion(M, name)  # scipy's tocsr trusts the arrays it converts
            M = _summable(M).tocsr()
        # scipy does not check these by default, and its canonicalisation crashes without them
        V.check_csr_arrays(M.indptr, M.indices, M.data, M.shape, name, full=False)
        V.check_indptr_monotone(M.indptr, name)
        if M.indices.dtype not in _INDEX_DTYPES or M.indptr.dtype != M.indices.dtype:
            # unsigned or narrow index arrays (set by the caller): scipy's compiled routines
            # take int32/int64 only (a value that wraps in the cast is refused by the range
            # check below; sorting and summing only compare indices, never index by them)
            idx = V.index_dtype_for(*M.shape, M.indices.shape[0])
            M = sp.csr_array(
                (M.data, M.indices.astype(idx), M.indptr.astype(idx)), shape=M.shape, copy=False
            )
        M = _summable(M)  # (after the checks above: scipy's astype trusts indptr too)
        # scipy's has_canonical_format is a flag anyone may set: checked by our own scan
        if not (M.has_canonical_format and V.is_canonical(M.indptr, M.indices)):
            M = M.copy()
            M.has_canonical_format = False  # a copy keeps the flag; it must not be believed
            M.sum_duplicates()  # sorts too
        indptr, indices, data, shape = V.check_csr_arrays(
            M.indptr, M.indices, M.data, M.shape, name, full=False
        )
        nnz = indices.shape[0]
        if nnz:
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= shape[1]:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"{name}.indices must lie in [0, n_cols = {shape[1]}), found column index {bad}"
                )
            V.check_finite_values(data, f"{name}.data")
        # copy what aliases M, so that later changes to M cannot break our invariants
        if np.shares_memory(indptr, M.indptr):
            indptr = indptr.copy()
        if np.shares_memory(indices, M.indices):
            indices = indices.copy()
        if np.shares_memory(data, M.data):
            data = data.copy()
        return cls._trusted(indptr, indices, data, shape)

    @classmethod
    def random(
        cls,
        shape,
        density: float,
        *,
        seed=None,
        per_row: bool = False,
        scale: float = 1.0,
        index_dtype=None,
    ) -> CSR:
        """A random pattern at the given density, values ~ Normal(0, scale²), float32.

        per_row=False: nnz = round(density·m·n) positions drawn uniformly without replacement
        over the whole matrix. per_row=True: every row gets the same count (round(density·n)),
        its columns drawn uniformly without replacement (constant fan-in). ``seed`` is anything
        numpy.random.default_rng accepts. Memory O(nnz): NumPy's set-based sampler at
        density <= 1/50, a rejection sampler above it on matrices of more than 2**24 entries
        (kernels/cpu/sampled.py), NumPy's shuffle of all m·n positions only below that size.
        """
        m, n = V.check_shape2(shape, "shape")
        if (
            not isinstance(density, numbers.Real)
            or isinstance(density, bool)
            or not 0.0 <= density <= 1.0
        ):
            raise ValueError(f"density must be a number in [0, 1], got {density!r}")
        if (
            not isinstance(scale, numbers.Real)
            or isinstance(scale, bool)
            or not (math.isfinite(scale) and scale >= 0)
        ):
            raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
        density, scale = float(density), float(scale)  # (NumPy float32 would round in float32)
        per = int(round(density * n))  # per_row: every row's count
        nnz = per * m if per_row else int(round(density * m * n))
        V.check_fits_memory(nnz * 12, f"CSR.random of shape {(m, n)} at density {density}")
        rng = np.random.default_rng(seed)
        if per_row:
            idx = V.choose_index_dtype(m, n, nnz, index_dtype, "random matrix")
            indices = np.empty(nnz, dtype=idx)
            for i in range(m):
                cols = rng.choice(n, size=per, replace=False, shuffle=False)
                cols.sort()
                indices[i * per : (i + 1) * per] = cols
            indptr = np.arange(0, nnz + 1, max(per, 1), dtype=idx)[: m + 1]
            if per == 0:
                indptr = np.zeros(m + 1, dtype=idx)
        else:
            idx = V.choose_index_dtype(m, n, nnz, index_dtype, "random matrix")
            flat = random_positions(m, n, nnz, rng)
            rows = flat // n if n else flat
            indices = (flat - rows * n).astype(idx)
            indptr = np.zeros(m + 1, dtype=idx)
            np.cumsum(np.bincount(rows, minlength=m), out=indptr[1:])
        with np.errstate(over="ignore"):
            data = (rng.standard_normal(nnz, dtype=np.float32) * np.float32(scale)).astype(
                np.float32
            )
        V.check_finite_values(data, f"CSR.random values (scale {scale})")
        return cls._trusted(indptr, indices, data, (m, n))

    # ------------------------------------------------------------------ views and exports
    def row_ids(self) -> np.ndarray:
        """Row index of every stored entry (the COO rows), in CSR order. Cached."""
        if "rows" not in self._cache:
            m = self.shape[0]
            rows = np.repeat(np.arange(m, dtype=self.indices.dtype), np.diff(self.indptr))
            rows.flags.writeable = False
            self._cache["rows"] = rows
        return self._cache["rows"]

    def coo(self):
        """COO view (rows, cols, data); cols and data share memory with the CSR arrays."""
        return self.row_ids(), self.indices, self.data

    def to_dense(self, dtype=np.float32) -> np.ndarray:
        out = np.zeros(self.shape, dtype=dtype)
        rows, cols, data = self.coo()
        out[rows, cols] = data
        return out

    def to_scipy(self, format: str = "csr"):
        """A scipy.sparse csr_array (or another format via .asformat), copying the arrays."""
        M = sp.csr_array(
            (self.data.copy(), self.indices.copy(), self.indptr.copy()), shape=self.shape
        )
        M.has_canonical_format = True
        return M if format == "csr" else M.asformat(format)

    def copy(self) -> CSR:
        return CSR._trusted(self.indptr.copy(), self.indices.copy(), self.data.copy(), self.shape)

    def to_device(self):
        """A copy on the current GPU: a ``kernels.DeviceCSR`` (needs CuPy and a device)."""
        V.require_gpu("W", lead="CSR.to_device() asks for the GPU")
        return DeviceCSR.from_host(self)

    def to_host(self) -> CSR:
        """This matrix (already in host memory): the twin of ``DeviceCSR.to_host``."""
        return self

    def with_pattern(self, indptr, indices, data) -> CSR:
        """A new CSR of the same shape on another pattern (validated in full, O(nnz))."""
        return CSR(indptr, indices, data, self.shape)

    def _with_pattern(self, indptr, indices, data) -> CSR:
        """Internal: the same on a pattern the caller built canonical (merge)."""
        return CSR._trusted(indptr, indices, data, self.shape)

    # ------------------------------------------------------------------ derived structures
    def transpose_structure(self):
        """(t_indptr, t_indices, t_perm): the CSC form of the pattern, cached. O(nnz + n)."""
        if "T" not in self._cache:
            it = self.indices.itemsize
            V.check_fits_memory(
                (self.shape[1] + 1) * it + 2 * self.nnz * it,
                f"the transpose structure of W (shape {self.shape}, used by spmm_t)",
            )
            ts = transpose(self.indptr, self.indices, self.shape[1])
            for a in ts:
                a.flags.writeable = False
            self._cache["T"] = ts
        return self._cache["T"]

    def row_blocks(self):
        if "rb" not in self._cache:
            rb = row_blocks(self.indptr, self.shape[0])
            rb.flags.writeable = False  # the kernels trust these row ranges
            self._cache["rb"] = rb
        return self._cache["rb"]

    def col_blocks(self):
        if "cb" not in self._cache:
            cb = row_blocks(self.transpose_structure()[0], self.shape[1])
            cb.flags.writeable = False
            self._cache["cb"] = cb
        return self._cache["cb"]

    def nbytes(self, *, transpose: bool | None = None) -> dict:
        """Bytes held, by array. transpose=None counts the transpose structure if it was built."""
        out = {
            "data": self.data.nbytes,
            "indices": self.indices.nbytes,
            "indptr": self.indptr.nbytes,
        }
        if transpose or (transpose is None and "T" in self._cache):
            it = self.indices.itemsize
            out["transpose"] = (self.shape[1] + 1) * it + 2 * self.nnz * it
        out["total"] = sum(out.values())
        return out

    def __repr__(self) -> str:
        m, n = self.shape
        return (
            f"CSR(shape=({m}, {n}), nnz={self.nnz}, density={self.density:.4g}, "
            f"index={self.indices.dtype.name}, bytes={self.nbytes()['total']})"
        )


def _summable(M):
    """M with values scipy can sum exactly enough: integers, bools and float16 as float64
    (scipy sums duplicates, in tocsr of COO and in sum_duplicates, in the data's own dtype,
    where uint8 255 + 1 wraps to 0, and it cannot convert float16 at all)."""
    if M.dtype.kind != "f" or M.dtype.itemsize < 4:
        return M.astype(np.float64)
    return M


def _check_before_conversion(M, name: str):
    """The arrays of a CSC, COO or BSR matrix, checked before scipy's compiled conversion reads
    them (it does not check, and out-of-range indices crash it). O(nnz)."""
    m, n = V.check_shape2(M.shape, f"{name}.shape")
    if M.format == "csc":  # the CSR arrays of the transpose
        V.check_csr_arrays(M.indptr, M.indices, M.data, (n, m), f"{name} (CSC)", full=False)
        V.check_indptr_monotone(M.indptr, f"{name} (CSC)")
        if M.indices.size and (M.indices.min() < 0 or M.indices.max() >= m):
            raise ValueError(f"{name} (CSC): row indices must lie in [0, {m})")
    elif M.format == "coo":
        coords = getattr(M, "coords", None) or (M.row, M.col)
        for a, axis, size in ((coords[0], "row", m), (coords[1], "col", n)):
            a = np.asarray(a)
            if a.ndim != 1 or a.shape[0] != np.asarray(M.data).shape[0]:
                raise ValueError(f"{name} (COO): {axis} must be 1-D of length nnz")
            if a.size and (a.min() < 0 or a.max() >= size):
                raise ValueError(f"{name} (COO): {axis} indices must lie in [0, {size})")
    elif M.format == "bsr":
        try:
            M.check_format(full_check=True)
        except (ValueError, TypeError, IndexError) as e:
            raise ValueError(f"{name} (BSR) is malformed: {e}") from None


def check_values(value, nnz: int, name: str = "W.data", *pattern) -> np.ndarray:
    """A new values array for a CSR of ``nnz`` entries: O(1) checks, no conversion (a silent
    copy would detach the optimizer's view of the values)."""
    if V.is_cupy_array(value):
        V.raise_cupy(name)
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a NumPy float32 array, got {type(value).__name__}")
    if value.dtype != np.float32:
        raise TypeError(
            f"{name} must have dtype float32, got {value.dtype} (convert with .astype(np.float32))"
        )
    if value.ndim != 1 or value.shape[0] != nnz:
        raise ValueError(f"{name} must be 1-D of length nnz = {nnz}, got shape {value.shape}")
    if not value.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (np.ascontiguousarray)")
    if pattern and any(np.may_share_memory(value, p) for p in pattern):
        raise ValueError(f"{name} shares memory with the matrix's index arrays")
    return value


_INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


def _check_trusted(indptr, indices, data, shape, name: str = "W"):
    """O(1): the arrays a kernel reads unchecked have the kernel dtypes and agreeing lengths."""
    if not (isinstance(shape, tuple | list) and len(shape) == 2):
        raise ValueError(f"{name}.shape must be a pair (n_rows, n_cols), got {shape!r}")
    m = shape[0]
    for a, part in ((indptr, "indptr"), (indices, "indices")):
        if not isinstance(a, np.ndarray) or a.ndim != 1:
            raise TypeError(f"{name}.{part} must be a 1-D NumPy array")
        if a.dtype not in _INDEX_DTYPES:
            raise TypeError(f"{name}.{part} must be int32 or int64, got {a.dtype}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{name}.{part} must be C-contiguous")
    if indptr.dtype != indices.dtype:
        raise TypeError(
            f"{name}.indptr ({indptr.dtype}) and {name}.indices ({indices.dtype}) must "
            "share a dtype"
        )
    if indptr.shape[0] != m + 1:
        raise ValueError(
            f"{name}.indptr has length {indptr.shape[0]}, expected n_rows + 1 = {m + 1}"
        )
    nnz = indices.shape[0]
    if indptr[0] != 0 or indptr[m] != nnz:
        raise ValueError(
            f"{name}.indptr must run from 0 to nnz = {nnz}, got {int(indptr[0])} .. "
            f"{int(indptr[-1])}"
        )
    check_values(data, nnz, f"{name}.data")


def _owned_pattern(given, checked):
    """Copy the pattern arrays that still alias the caller's: a CSR's pattern is trusted by
    kernels that skip bounds checks, so nobody else may hold a writeable view of it."""
    indptr, indices, data, shape = checked
    if any(np.may_share_memory(indptr, g) for g in given):
        indptr = indptr.copy()
    if any(np.may_share_memory(indices, g) for g in given):
        indices = indices.copy()
    return indptr, indices, data, shape


def as_csr(W, name: str = "W") -> CSR:
    """Accept a CSR (trusted as is), a scipy.sparse matrix, or (indptr, indices, data, shape)."""
    if isinstance(W, CSR):
        return W.check(name)
    if V.is_cupy_array(W):
        V.raise_cupy(name)
    if sp.issparse(W):
        return CSR.from_scipy(W, name=name)
    if isinstance(W, tuple) and len(W) == 4:
        indptr, indices, data, shape = W
        for a, part in ((indptr, "indptr"), (indices, "indices"), (data, "data")):
            if V.is_cupy_array(a):
                V.raise_cupy(f"{name}.{part}")
        checked = V.check_csr_arrays(indptr, indices, data, shape, name)
        return CSR._trusted(*_owned_pattern((indptr, indices), checked))
    raise TypeError(
        f"{name} must be a sparsecore.CSR, a scipy.sparse matrix, or a tuple "
        f"(indptr, indices, data, shape); got {type(W).__name__}"
    )


# ---------------------------------------------------------------------------- DeviceCSR


class DeviceCSR(_Counts):
    __slots__ = ("shape", "indptr", "indices", "data", "_cache")

    def __init__(self, indptr, indices, data, shape):
        """Trusted constructor: CuPy arrays already canonical and in kernel dtypes."""
        self.indptr, self.indices, self.data = indptr, indices, data
        self.shape = (int(shape[0]), int(shape[1]))
        self._cache = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_host(cls, W) -> DeviceCSR:
        """Copy a ``sparsecore.CSR`` to the current device."""
        import cupy

        return cls(cupy.asarray(W.indptr), cupy.asarray(W.indices), cupy.asarray(W.data), W.shape)

    @classmethod
    def from_arrays(cls, indptr, indices, data, shape, name: str = "W") -> DeviceCSR:
        """From raw CuPy arrays, fully validated (through a host copy: O(nnz) transfer)."""
        xp = array_module(indptr)  # numpy in the emulated tests
        host = V.check_csr_arrays(*(to_host(a) for a in (indptr, indices, data)), shape, name)
        return cls(*(xp.asarray(a) for a in host[:3]), host[3])

    @classmethod
    def from_cupy_scipy(cls, M, name: str = "W") -> DeviceCSR:
        """From any cupyx.scipy.sparse matrix: duplicates summed, columns sorted (on a copy)."""
        import cupy

        if M.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got {M.ndim}-D")
        if M.dtype.kind not in "fiub":
            raise TypeError(f"{name} must hold real numbers, got dtype {M.dtype}")
        M = M.tocsr()
        if not M.has_canonical_format:
            M = M.copy()
            M.sum_duplicates()
        m, n = M.shape
        nnz = int(M.nnz)
        idx = V.index_dtype_for(m, n, nnz)
        data = M.data.astype(np.float32)  # a copy: later changes to M cannot reach us
        if nnz and not bool(cupy.isfinite(data).all()):
            raise ValueError(f"{name}.data must be finite in float32, but it holds NaN or inf")
        return cls(M.indptr.astype(idx), M.indices.astype(idx), data, (m, n))

    # ------------------------------------------------------------------ views and exports
    def to_host(self):
        """A ``sparsecore.CSR`` with copies of the arrays in host memory."""
        return CSR._trusted(
            *(np.array(to_host(a)) for a in (self.indptr, self.indices, self.data)), self.shape
        )

    def to_cupy_scipy(self):
        """A cupyx.scipy.sparse.csr_matrix (copies of the arrays)."""
        import cupyx.scipy.sparse as csp

        M = csp.csr_matrix(
            (self.data.copy(), self.indices.copy(), self.indptr.copy()), shape=self.shape
        )
        return M

    def to_dense(self):
        out = array_module(self.data).zeros(self.shape, dtype=np.float32)
        out[self.row_ids(), self.indices] = self.data
        return out

    def copy(self) -> DeviceCSR:
        return DeviceCSR(self.indptr.copy(), self.indices.copy(), self.data.copy(), self.shape)

    def with_pattern(self, indptr, indices, data) -> DeviceCSR:
        """A DeviceCSR of the same shape on another pattern (trusted: canonical device arrays
        in kernel dtypes, as merge builds them)."""
        return DeviceCSR(indptr, indices, data, self.shape)

    _with_pattern = with_pattern  # the name the shared merge path calls

    # ------------------------------------------------------------------ derived structures
    def row_blocks(self):
        """None: the GPU launchers take the CPU's thread partition for the shared signature
        and ignore it (one thread per output element)."""
        return None

    col_blocks = row_blocks

    def row_ids(self):
        """Row index of every stored entry, in CSR order (cached)."""
        if "rows" not in self._cache:
            xp = array_module(self.indptr)
            rows = xp.searchsorted(
                self.indptr[1:], xp.arange(self.nnz, dtype=self.indptr.dtype), side="right"
            )
            self._cache["rows"] = rows.astype(self.indices.dtype)
        return self._cache["rows"]

    def transpose_structure(self):
        """(t_indptr, t_indices, t_perm) on the device, cached. O(nnz log nnz) once."""
        if "T" not in self._cache:
            self._cache["T"] = _cuda_structure.transpose(self.indptr, self.indices, self.shape[1])
        return self._cache["T"]

    def __repr__(self) -> str:
        m, n = self.shape
        return (
            f"DeviceCSR(shape=({m}, {n}), nnz={self.nnz}, density={self.density:.4g}, "
            f"index={np.dtype(self.indices.dtype).name})"
        )
