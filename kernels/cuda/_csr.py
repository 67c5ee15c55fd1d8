"""DeviceCSR: a canonical CSR matrix whose arrays live on the GPU (CuPy).

The device twin of ``sparsecore.CSR``: float32 ``data``, int32 (or int64) ``indptr`` and
``indices``, canonical (columns sorted and unique per row), validated when built and trusted by
the kernels afterwards. Its transpose structure (for dX = Wᵀ·dY) is built on the device on first
use and cached until the pattern changes. Build one with ``CSR.to_device()``,
``DeviceCSR.from_host``, ``DeviceCSR.from_cupy_scipy`` or ``DeviceCSR.from_arrays``; go back
with ``to_host()``. Importing this module does not import CuPy.
"""

from __future__ import annotations

import numpy as np


class DeviceCSR:
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
        import cupy

        from kernels import validation as V

        host = V.check_csr_arrays(
            cupy.asnumpy(indptr), cupy.asnumpy(indices), cupy.asnumpy(data), shape, name
        )
        return cls(*(cupy.asarray(a) for a in host[:3]), host[3])

    @classmethod
    def from_cupy_scipy(cls, M, name: str = "W") -> DeviceCSR:
        """From any cupyx.scipy.sparse matrix: duplicates summed, columns sorted (on a copy)."""
        import cupy

        from kernels import validation as V

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
    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    @property
    def density(self) -> float:
        m, n = self.shape
        return self.nnz / (m * n) if m * n else 0.0

    def to_host(self):
        """A ``sparsecore.CSR`` with copies of the arrays in host memory."""
        from kernels.cuda._module import to_host
        from kernels.formats import CSR

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
        import cupy

        out = cupy.zeros(self.shape, dtype=np.float32)
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
            import cupy

            n = self.nnz
            rows = cupy.searchsorted(
                self.indptr[1:], cupy.arange(n, dtype=self.indptr.dtype), side="right"
            )
            self._cache["rows"] = rows.astype(self.indices.dtype)
        return self._cache["rows"]

    def transpose_structure(self):
        """(t_indptr, t_indices, t_perm) on the device, cached. O(nnz log nnz) once."""
        if "T" not in self._cache:
            from kernels.cuda.structure import transpose

            self._cache["T"] = transpose(self.indptr, self.indices, self.shape[1])
        return self._cache["T"]

    def __repr__(self) -> str:
        m, n = self.shape
        return (
            f"DeviceCSR(shape=({m}, {n}), nnz={self.nnz}, density={self.density:.4g}, "
            f"index={np.dtype(self.indices.dtype).name})"
        )
