"""The sparse-training kernels, callable from plain NumPy code.

Every function takes the sparse weight W (m × n) as one of

- a ``sparsecore.CSR`` (validated in full once when built; afterwards every call re-checks
  only its O(1) invariants, dtypes and lengths, since its index arrays are read-only and its
  ``data`` setter is checked: see ``sparsecore.CSR``; it caches its transpose structure and
  thread blocks, so repeated calls pay nothing for them),
- a ``scipy.sparse`` matrix or array of any format and index dtype (prepared on the first call,
  then reused while its pattern is provably unchanged: compared element by element with
  private copies, values re-read each call; see formats.as_csr_for_call),
- a tuple ``(indptr, indices, data, shape)`` of NumPy arrays (fully validated on every call),

and dense operands as NumPy arrays. Activations are feature-major by default (``layout="feature"``:
X is n × B, Y is m × B, so each nonzero touches one contiguous row of length B); with
``layout="batch"`` they are batch-major (X is B × n, Y is B × m). On the CPU ``spmm`` and
``spmm_t`` read and write C-contiguous batch-major arrays of 8 or more rows where they are (the
batch-panel kernel, kernels/cpu/panels.py: its float32 sums run in another order than the
feature-major kernel's, so the last bits may differ from ``spmm(W, X.T).T``), and ``sddmm``
reads dY where it is and copies X (bitwise the feature-major result); ``topk_grow``, batches
of fewer than 8 rows and the GPU make a transposed copy of each dense operand, and an operand
that is the ``.T`` view of a feature-major array is read by the feature-major kernel with no
copy (the result is transposed into the answer). In batch layout an ``out=`` whose memory
range overlaps an operand's is refused. Dense operands are used as float32 C-contiguous arrays
(others are converted, a copy). ``out=`` must have exactly the result's shape, dtype float32
and be C-contiguous; it is overwritten entirely.

On the GPU the same functions take W as a ``DeviceCSR`` (``CSR.to_device()``), a
``cupyx.scipy.sparse`` matrix, or a tuple of CuPy arrays, with CuPy dense operands, and run the
CUDA kernels of kernels/cuda (results are CuPy arrays; calls are asynchronous except where a
result size must be known). One call runs on one side: mixing NumPy and CuPy operands is a
TypeError naming the argument. Importing this package never needs CuPy; a GPU call without
CuPy or a device raises ``GPUUnavailableError`` saying ``pip install "sparsecore-rigl[gpu]"``.

How it is built: each function below picks the side of its operands once
(``backend.side_of``) and runs the one body of kernels/backend.py, which checks the arguments
(kernels/validation.py) and calls that side's launcher (kernels/cpu/<op>.py, kernels/cuda/<op>.py).

Threads: see ``sparsecore.threading_info()`` for the setup that keeps Numba's and the BLAS's
threads from spinning against each other.
"""

from __future__ import annotations

# First, before NumPy loads OpenBLAS: the thread-pool settings (see kernels/_threads.py).
from kernels._threads import configure_threads  # noqa: I001

configure_threads()

from kernels import backend as _b  # noqa: E402
from kernels import config  # noqa: E402
from kernels.formats import CSR, DeviceCSR  # noqa: E402
from kernels.validation import GPUUnavailableError  # noqa: E402

__all__ = [
    "CSR",
    "DeviceCSR",
    "GPUUnavailableError",
    "spmm",
    "spmm_t",
    "sddmm",
    "topk_grow",
    "magnitude_drop",
    "merge",
    "remap",
    "config",
]


def spmm(W, X, *, out=None, layout: str = "feature"):
    """Forward product Y = W·X.

    Maths: ``Y[i, b] = Σ_j W[i, j] X[j, b]`` over the stored entries of W.
    Shapes: W (m, n); X (n, B) -> Y (m, B)  [layout="batch": X (B, n) -> Y (B, m)].
    Dtypes: float32 values, int32/int64 indices; Y float32.
    Cost: 2·nnz·B flops, O(m·B) memory for Y; threads split rows by nonzeros.
    """
    return _b.spmm_on(_b.side_of("kernels.spmm", W=W, X=X, out=out), W, X, out, layout)


def spmm_t(W, dY, *, out=None, layout: str = "feature"):
    """Backward product to the inputs dX = Wᵀ·dY, race-free (no atomics).

    Maths: ``dX[j, b] = Σ_i W[i, j] dY[i, b]``.
    Shapes: W (m, n); dY (m, B) -> dX (n, B)  [layout="batch": dY (B, m) -> dX (B, n)].
    Cost: 2·nnz·B flops; uses W's transpose structure (built once per pattern, O(nnz + n),
    cached on a CSR and for an unchanged scipy matrix, rebuilt on every call for a tuple).
    """
    return _b.spmm_t_on(_b.side_of("kernels.spmm_t", W=W, dY=dY, out=out), W, dY, out, layout)


def sddmm(W, dY, X, *, out=None, layout: str = "feature"):
    """Weight gradient at the stored entries only: dW[p] = (dY·Xᵀ)[i, j] for entry p = (i, j).

    Maths: ``dW[p] = Σ_b dY[i, b] X[j, b]``.
    Shapes: W (m, n); dY (m, B); X (n, B) -> dW (nnz,) in W's CSR order (aligned with W.data)
    [layout="batch": dY (B, m), X (B, n)].
    Cost: 2·nnz·B flops, nnz floats of output: never the dense m × n gradient.
    """
    side = _b.side_of("kernels.sddmm", W=W, dY=dY, X=X, out=out)
    return _b.sddmm_on(side, W, dY, X, out, layout)


def topk_grow(W, dY, X, k, *, keep=None, layout: str = "feature", tile_bytes=None):
    """The k absent connections with the largest |dY·Xᵀ|: RigL's grow step, fused and tiled.

    Maths: scores S = |dY·Xᵀ| (m × n, never formed whole); among (i, j) not stored in W (or
    stored with ``keep[p] = False``), return the k largest, ties to the lower flat index i·n + j.
    Shapes: W (m, n); dY (m, B); X (n, B) [layout="batch": (B, m), (B, n)]; keep (nnz,) bool.
    Returns (rows, cols, scores): int32 (int64 when m or n needs it) and float32 arrays of length k,
    listed in ascending (row, col) order, ready for ``merge``.
    Cost: m·n·B multiply-adds (float32 BLAS, one tile at a time) + O(m·n) scans; extra memory
    O(tile + k): ``config.TOPK_TILE_BYTES`` (or ``tile_bytes``) plus about 12·k bytes.
    Scores are float32: pairs whose float64 scores differ by less than float32 rounding may be
    ordered differently from a float64 computation.
    On the GPU: the same result as CuPy arrays; extra device memory O(tile + k)
    (``config.CUDA_TOPK_TILE_BYTES`` or ``tile_bytes``, see kernels/cuda/grow.py).
    """
    side = _b.side_of("kernels.topk_grow", W=W, dY=dY, X=X, keep=keep)
    return _b.topk_grow_on(side, W, dY, X, k, keep, layout, tile_bytes)


def magnitude_drop(W, k):
    """Positions (into W.data, ascending, int64) of the k stored entries with the smallest |w|.

    Ties go to the lower position, so the result is deterministic. W may be any accepted sparse
    form, or a 1-D array of values. Cost O(nnz). On the GPU (a DeviceCSR, CuPy sparse matrix or
    1-D CuPy array) the result is a CuPy array.
    """
    return _b.magnitude_drop_on(_b.side_of("kernels.magnitude_drop", W=W), W, k)


def merge(W, keep, grow_rows, grow_cols):
    """A topology update: keep some stored entries, add grown ones; returns (new W, src).

    ``keep`` (nnz,) bool marks the entries that stay; (grow_rows, grow_cols) are the new
    connections, each absent from the kept set, in any order and without repeats. A grown entry
    that was stored before (dropped and regrown in the same update) keeps its old value; the
    others start at 0. The new W is canonical CSR; ``src`` (new nnz,) int64 gives for each new
    entry its position in the old arrays, or -1: carry per-nonzero state (optimizer moments) with
    ``remap(src, old_array)``. Cost O(nnz + g) plus O(g log g) to order the grown entries.
    On the GPU (DeviceCSR and CuPy arrays) it returns a DeviceCSR and a CuPy ``src``.
    """
    side = _b.side_of("kernels.merge", W=W, keep=keep, grow_rows=grow_rows, grow_cols=grow_cols)
    return _b.merge_on(side, W, keep, grow_rows, grow_cols)


def remap(src, values, fill=0.0):
    """Carry a per-nonzero array across ``merge``: out[w] = values[src[w]], or ``fill`` if src<0."""
    return _b.remap_on(_b.side_of("kernels.remap", src=src, values=values), src, values, fill)
