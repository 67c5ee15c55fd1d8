"""Sparse weight storage: a canonical CSR container with a COO view and a transpose structure.

A ``CSR`` holds an m × n float32 matrix as scipy does (``indptr``, ``indices``, ``data``), always
canonical (columns sorted and unique within each row), with int32 indices unless the sizes need
int64. It is validated once when built and trusted by every kernel afterwards, so its pattern
arrays are read-only; its values (``data``) may be changed in place.

Derived structures are built on first use and cached until the pattern changes:
- the transpose structure (CSC indices + a permutation into ``data``), which makes dX = Wᵀ·dY a
  race-free forward-style product, rebuilt in O(nnz + n) after a topology change;
- the thread blocks (row ranges of about equal nonzeros) of both orientations.

A scipy matrix passed to a kernel call is converted by ``as_csr_for_call``, which keeps its
canonical CSR between calls while the caller's pattern arrays provably equal private copies of
them ("scipy input of calls" below): the values are re-read each call, the pattern and its
derived structures are not rebuilt.

``DeviceCSR`` is its twin on the GPU: the same canonical arrays as CuPy arrays, validated when
built and trusted afterwards, with its transpose structure built on the device on first use.
Build one with ``CSR.to_device()``, ``DeviceCSR.from_host``, ``DeviceCSR.from_cupy_scipy`` or
``DeviceCSR.from_arrays``; go back with ``to_host()``. Importing this module never imports CuPy
(the CUDA side's array module is chosen from the arrays, so the tests run it over NumPy).
"""

from __future__ import annotations

import functools
import math
import numbers
import threading
import weakref

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
    ``CSR.from_dense``, ``CSR.from_scipy``, ``CSR.random``. ``check=False`` is for the engine's
    own patterns only: it checks lengths and dtypes, not the contents, and the kernels read
    indices unsigned and unchecked, so a negative or too-large index there reads outside the
    arrays.

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
        given = tuple(getattr(M, a, None) for a in ("indptr", "indices", "data"))
        if M.format != "csr":
            _check_before_conversion(M, name)  # scipy's tocsr trusts the arrays it converts
            M = _summable(M).tocsr()
        # scipy does not check these by default, and its canonicalisation crashes without them
        V.check_csr_arrays(M.indptr, M.indices, M.data, M.shape, name, full=False)
        if M.indices.dtype not in _INDEX_DTYPES or M.indptr.dtype != M.indices.dtype:
            # unsigned or narrow index arrays (set by the caller): scipy's compiled routines
            # take int32/int64 only (a value that wraps in the cast is refused by the range
            # check below; sorting and summing only compare indices, never index by them)
            idx = V.index_dtype_for(*M.shape, M.indices.shape[0])
            M = sp.csr_array(
                (M.data, M.indices.astype(idx), M.indptr.astype(idx)), shape=M.shape, copy=False
            )
        elif M.indices is given[1]:
            # the caller's own index arrays: copied before they are scanned, so that what is
            # checked below is what the kernels read, whatever the caller writes meanwhile
            M = sp.csr_array((M.data, M.indices.copy(), M.indptr.copy()), shape=M.shape, copy=False)
        V.check_indptr_monotone(M.indptr, name)
        M = _summable(M)  # (after the checks above: scipy's astype trusts indptr too)
        # scipy's has_canonical_format is a flag anyone may set: our own scan decides
        if not V.is_canonical(M.indptr, M.indices):
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
        # copy what aliases the caller's arrays, so that later changes cannot break our invariants
        mine = [indptr, indices, data]
        for i, a in enumerate(mine):
            if any(isinstance(g, np.ndarray) and np.shares_memory(a, g) for g in given):
                mine[i] = a.copy()
        return cls._trusted(*mine, shape)

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

    def _with_values(self, data) -> CSR:
        """Internal: a CSR on this one's pattern arrays and its cache of derived structures
        (shared: they depend on the pattern only), holding other values (O(1) checks)."""
        obj = CSR.__new__(CSR)
        obj._data = check_values(data, self.nnz, "W.data", self._indptr, self._indices)
        obj._indptr, obj._indices, obj._shape = self._indptr, self._indices, self._shape
        obj._cache = self._cache
        return obj

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


# ---------------------------------------------------------------------------- scipy input of calls
# A kernel call given a scipy matrix (kernels.spmm(M, X), ...) must treat it as untrusted: the
# caller may have changed it since the last call. Converting and validating it on every call,
# and rebuilding the transpose structure and thread blocks, made spmm_t 2.2x slower than on a
# prepared CSR. So the calls keep, per matrix, the canonical CSR built from it (its pattern
# arrays and derived structures) with private copies of the caller's pattern arrays as they were
# then (indptr and indices of a CSR or CSC matrix, row and col of a COO one), and reuse that CSR
# only while the caller's arrays are provably unchanged:
#
# - the matrix is the same live object (a weak reference: not a reused id), of the same type and
#   shape, and its current pattern arrays have the dtypes and lengths of the copies and equal
#   them element by element (exact O(nnz) comparisons; no hash, no flag of scipy's is believed).
#   Arrays replaced by new ones of the same content pass, as they should;
# - the copies were taken before they were compared with the CSR built by CSR.from_scipy, so what
#   a later call compares against is exactly what is proven to give that CSR's pattern;
# - the kernels read only the cached, validated, read-only pattern arrays, never the caller's
#   (which are only compared), so an index the caller writes later, or while a call runs, cannot
#   reach a kernel unchecked;
# - the values are re-read on every call (they change every step): moved into canonical order
#   where the caller's order differs (a CSC or COO matrix, unsorted columns: a permutation cached
#   with the pattern), cast to float32 as from_scipy does, and checked finite. Float32
#   C-contiguous values of a canonical CSR matrix reach the kernels as they are, without a copy.
#
# Anything else (a changed or replaced pattern, duplicates, narrow or unsigned index arrays, BSR
# and the other formats) takes the full path of CSR.from_scipy; when the canonical pattern it
# returns equals the cached one, element by element, the derived structures are still reused.
# At most SCIPY_CACHE_SIZE matrices are kept (the most recently used); an entry goes with its
# matrix. An entry holds the CSR's pattern arrays (for a canonical int32 CSR matrix these are the
# copies of the caller's arrays), its derived structures, and where the caller's order or dtype
# differs, the copies of the caller's arrays and the permutation.

SCIPY_CACHE_SIZE = 16

_prepared: dict = {}  # id(M) -> _Prepared, least recently used first
_prepared_lock = threading.RLock()  # (reentrant: a weakref callback may run inside a locked block)

# the pattern arrays compared on the fast path, by format
_PATTERN = {"csr": ("indptr", "indices"), "csc": ("indptr", "indices"), "coo": ("row", "col")}


class _Prepared:
    """What the calls keep of one scipy matrix (see above)."""

    __slots__ = ("ref", "kind", "shape", "csr", "pattern", "perm")

    def values_if_unchanged(self, M, name: str):
        """The float32 values in canonical order for this call, or None if the pattern (or
        anything else the cached CSR depends on) is not provably what it was. O(nnz)."""
        if self.pattern is None or type(M) is not self.kind or M.shape != self.shape:
            return None
        current = []
        for attr, saved in self.pattern:
            a = getattr(M, attr, None)
            if not (
                isinstance(a, np.ndarray) and a.dtype == saved.dtype and a.shape == saved.shape
            ):
                return None  # (the full path names what is wrong, if anything is)
            current.append(a)
        d = getattr(M, "data", None)
        if not (
            isinstance(d, np.ndarray) and d.shape == current[1].shape and d.dtype.kind in "fiub"
        ):
            return None
        for a, (_, saved) in zip(current, self.pattern, strict=True):
            if not np.array_equal(a, saved):
                return None
        if self.perm is not None:
            d = d[self.perm]
        d = _float32_values(d)
        V.check_finite_values(d, f"{name}.data")
        return d


def _float32_values(d: np.ndarray) -> np.ndarray:
    """A scipy matrix's values as from_scipy converts them (integers, bools and float16 by way
    of float64, see _summable), C-contiguous; float32 ones as they are."""
    if d.dtype == np.float32:
        return np.ascontiguousarray(d)
    if d.dtype.kind != "f" or d.dtype.itemsize < 4:
        d = d.astype(np.float64)
    with np.errstate(over="ignore"):  # overflow to inf is reported by the finiteness check
        return d.astype(np.float32)


def _same_pattern(a: CSR, b: CSR) -> bool:
    return (
        a.shape == b.shape
        and a.indptr.dtype == b.indptr.dtype
        and np.array_equal(a.indptr, b.indptr)
        and np.array_equal(a.indices, b.indices)
    )


def _forget(key: int, ref):
    """Weak-reference callback: the matrix is gone, and its entry with it."""
    with _prepared_lock:
        e = _prepared.get(key)
        if e is not None and e.ref is ref:
            del _prepared[key]


def _expand(indptr: np.ndarray, n_lines: int, nnz: int):
    """The line (row of a CSR, column of a CSC) of every entry of a compressed pattern whose
    pointers are a copy not validated yet, or None where they are not valid pointers."""
    if indptr.shape != (n_lines + 1,) or indptr[0] != 0 or indptr[-1] != nnz:
        return None
    if n_lines and bool((indptr[1:] < indptr[:-1]).any()):
        return None
    return np.repeat(np.arange(n_lines, dtype=indptr.dtype), np.diff(indptr))


def _fast_pattern(M, W: CSR):
    """(pattern, perm) for the fast path of matrix M whose canonical CSR is W, or None.

    pattern: ((attribute, copy of M's array), ...), copied before anything is compared;
    perm: None where M's values are in W's order already, else the positions in M.data of W's
    entries. Proven here: the copies give exactly W's pattern (and no entry twice)."""
    names = _PATTERN.get(M.format)
    if names is None:
        return None
    arrays = [getattr(M, a, None) for a in names]
    if not all(isinstance(a, np.ndarray) and a.dtype in _INDEX_DTYPES for a in arrays):
        return None
    first, second = (a.copy() for a in arrays)
    nnz = W.nnz
    if second.shape != (nnz,):
        return None  # duplicates were summed (or M changed meanwhile)
    m, n = W.shape
    if M.format == "csr" and np.array_equal(first, W.indptr) and np.array_equal(second, W.indices):
        # canonical already, the usual case: W's own arrays where they have the same dtype
        first = W.indptr if first.dtype == W.indptr.dtype else first
        second = W.indices if second.dtype == W.indices.dtype else second
        perm = None
    else:
        if M.format == "coo":
            if first.shape != (nnz,):
                return None
            rows, cols = first, second
        else:
            lines = _expand(first, m if M.format == "csr" else n, nnz)
            if lines is None:
                return None
            rows, cols = (lines, second) if M.format == "csr" else (second, lines)
        perm = np.lexsort((cols, rows))  # row-major order; W has no entry twice, nor has M
        w_rows = np.repeat(np.arange(m, dtype=W.indptr.dtype), np.diff(W.indptr))
        if not (np.array_equal(rows[perm], w_rows) and np.array_equal(cols[perm], W.indices)):
            return None
    for a in (first, second):
        a.flags.writeable = False
    return ((names[0], first), (names[1], second)), perm


def _prepare(M, W: CSR):
    """The entry for matrix M whose canonical CSR is W (validated), or None if M cannot be
    referred to weakly."""
    key = id(M)
    try:
        ref = weakref.ref(M, functools.partial(_forget, key))
    except TypeError:
        return None
    e = _Prepared()
    e.ref, e.kind, e.shape, e.csr = ref, type(M), W.shape, W
    fast = _fast_pattern(M, W)
    e.pattern, e.perm = fast if fast is not None else (None, None)
    return e


def _remember(key: int, e):
    with _prepared_lock:
        _prepared.pop(key, None)
        if e is not None and SCIPY_CACHE_SIZE > 0:
            _prepared[key] = e
            while len(_prepared) > SCIPY_CACHE_SIZE:
                del _prepared[next(iter(_prepared))]


def clear_scipy_cache():
    """Drop what the kernel calls keep of scipy matrices (see SCIPY_CACHE_SIZE)."""
    with _prepared_lock:
        _prepared.clear()


def _from_scipy_for_call(M, name: str) -> CSR:
    key = id(M)
    with _prepared_lock:
        e = _prepared.pop(key, None)
        if e is not None and e.ref() is M:
            _prepared[key] = e  # now the most recently used
        else:
            e = None
    if e is not None:
        values = e.values_if_unchanged(M, name)
        if values is not None:
            return e.csr._with_values(values)
    W = CSR.from_scipy(M, name=name)  # validated in full, canonical, arrays of its own
    if e is not None and _same_pattern(W, e.csr):
        W = e.csr._with_values(W.data)  # same pattern: keep its derived structures
    _remember(key, _prepare(M, W))
    return W


def as_csr_for_call(W, name: str = "W") -> CSR:
    """as_csr for one kernel call: a scipy matrix goes through the cache above, so repeated
    calls on an unchanged matrix reuse its validated pattern and derived structures. The CSR
    returned may hold the caller's values array itself: it serves the call, not to be kept or
    written to (keep a ``CSR.from_scipy`` for that)."""
    if sp.issparse(W) and not V.is_cupy_array(W):
        return _from_scipy_for_call(W, name)
    return as_csr(W, name)


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
