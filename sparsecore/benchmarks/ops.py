"""The operations a benchmark times, written once and parametrised by the backend.

A ``Backend`` (kernels/backend.py: ``get_backend("cpu")``, ``cuda_backend(cupy)``, or the CUDA
launchers over NumPy in the emulated tests) decides the array module and the launchers; the
functions here give each operation as a zero-argument call on that side, the dense baselines
of the same shapes, the naive dense grow (the one copy), and the float64 check that every
product passes before it is timed. The CPU sweep (sparsecore/benchmarks/kernels.py), the
pytest-benchmark files (bench/test_*_bench.py) and the GPU suite (bench/gpu_suite.py) call
them; time the calls with ``timing.median_time(fn, sync=backend.sync)``.

Two ways in (``via``):

- ``"public"``: ``kernels.spmm(W, X)`` etc., a new output per call: what a user's call costs,
  checks included (the CPU suite's figures);
- ``"launcher"``: the backend's launcher on preallocated outputs, as the training engine calls
  it on state it already trusts (the GPU suite's figures).
"""

from __future__ import annotations

import numpy as np

import kernels

KERNELS = ("spmm", "spmm_t", "sddmm")
VIA = ("public", "launcher")
REF_SHAPE = dict(m=4096, batch=128, density=0.01)  # the reference shape of the reports
CHECK_ROWS = 48  # rows / columns of each product checked against float64
CHECK_ENTRIES = 4000  # sddmm entries checked against float64
CHECK_RTOL = 1e-5  # of the sum of |terms|


def product_calls(b, W, X, dY, *, via: str = "public") -> dict:
    """{"spmm", "spmm_t", "sddmm"} -> a zero-argument call on backend ``b``: Y = W·X,
    dX = Wᵀ·dY, dW = (dY·Xᵀ) at W's nonzeros. W (a CSR on the CPU, a DeviceCSR on a device),
    X (n, B) and dY (m, B) float32 C-contiguous must live on b's side; W's transpose structure
    is built here, once (as in training: once per topology)."""
    if via not in VIA:
        raise ValueError(f"via must be one of {VIA}, got {via!r}")
    tstruct = W.transpose_structure()
    if via == "public":
        return {
            "spmm": lambda: kernels.spmm(W, X),
            "spmm_t": lambda: kernels.spmm_t(W, dY),
            "sddmm": lambda: kernels.sddmm(W, dY, X),
        }
    xp = b.xp
    m, n = W.shape
    batch = X.shape[1]
    y = xp.empty((m, batch), np.float32)
    dx = xp.empty((n, batch), np.float32)
    dw = xp.empty(W.nnz, np.float32)
    rb, cb = W.row_blocks(), W.col_blocks()
    t_data = None if b.on_device else np.empty(W.nnz, np.float32)  # the CPU spmm_t's scratch
    return {
        "spmm": lambda: b.spmm(W.indptr, W.indices, W.data, X, y, rb),
        "spmm_t": lambda: b.spmm_t(*tstruct, W.data, dY, dx, cb, t_data),
        "sddmm": lambda: b.sddmm(W.indptr, W.indices, dY, X, dw, rb),
    }


def dense_calls(xp, Wd, X, dY, *, out: bool = False, gather=None) -> dict:
    """The dense products of the same shapes (BLAS / cuBLAS): Wd·X, Wdᵀ·dY and the full
    dY·Xᵀ for sddmm. ``out``: into preallocated outputs; ``gather`` (rows, cols): sddmm's
    baseline then also picks the entries at those coordinates, as a dense implementation of
    sddmm would."""
    if not out:
        calls = {"spmm": lambda: Wd @ X, "spmm_t": lambda: Wd.T @ dY, "sddmm": lambda: dY @ X.T}
    else:
        y = xp.empty((Wd.shape[0], X.shape[1]), np.float32)
        dx = xp.empty((Wd.shape[1], X.shape[1]), np.float32)
        G = xp.empty((dY.shape[0], X.shape[0]), np.float32)
        calls = {
            "spmm": lambda: xp.matmul(Wd, X, out=y),
            "spmm_t": lambda: xp.matmul(Wd.T, dY, out=dx),
            "sddmm": lambda: xp.matmul(dY, X.T, out=G),
        }
    if gather is not None:
        product, (rows, cols) = calls["sddmm"], gather
        calls["sddmm"] = lambda: product()[rows, cols]
    return calls


def naive_grow(xp, rows, cols, dY, X, k, product_out=None):
    """RigL's grow the way dense implementations do it: the dense |dY·Xᵀ| (m × n), present
    entries (rows, cols) set to -1 (scores are >= 0), then the flat indices of the k largest
    by argpartition (unordered). ``product_out`` receives dY·Xᵀ when given (no new m × n
    product buffer; the |·| is still a second one)."""
    G = xp.abs(dY @ X.T if product_out is None else xp.matmul(dY, X.T, out=product_out))
    G[rows, cols] = -1.0
    return xp.argpartition(G.ravel(), G.size - k)[G.size - k :]


# ---------------------------------------------------------------------------------- checks
def check_products(W, Wsp, X, dY, rng):
    """Each public product against float64 on sampled rows / columns / entries (host operands:
    W a CSR, Wsp its scipy matrix); raises AssertionError on a mismatch."""
    m, n = W.shape
    W64 = Wsp.astype(np.float64)
    rows = rng.choice(m, size=min(m, CHECK_ROWS), replace=False)
    cols = rng.choice(n, size=min(n, CHECK_ROWS), replace=False)
    Y = kernels.spmm(W, X)
    ref = W64[rows] @ X.astype(np.float64)
    scale = abs(W64[rows]) @ np.abs(X.astype(np.float64))
    _close("spmm", Y[rows], ref, scale)
    dX = kernels.spmm_t(W, dY)
    WT = W64.T.tocsr()
    ref = WT[cols] @ dY.astype(np.float64)
    scale = abs(WT[cols]) @ np.abs(dY.astype(np.float64))
    _close("spmm_t", dX[cols], ref, scale)
    dW = kernels.sddmm(W, dY, X)
    if W.nnz:
        pos = rng.choice(W.nnz, size=min(W.nnz, CHECK_ENTRIES), replace=False)
    else:
        pos = np.zeros(0, int)
    r, c = W.row_ids()[pos], W.indices[pos]
    ref = np.einsum("ij,ij->i", dY[r].astype(np.float64), X[c].astype(np.float64))
    scale = np.einsum("ij,ij->i", np.abs(dY[r]).astype(np.float64), np.abs(X[c]).astype(np.float64))
    _close("sddmm", dW[pos], ref, scale)


def _close(name, got, ref, scale):
    bad = np.abs(got - ref) > CHECK_RTOL * scale + 1e-30
    if np.any(bad):
        raise AssertionError(f"{name}: {int(bad.sum())} entries differ from the float64 reference")


def check_grow_host(W, dY, X, k, result):
    """The fused grow's (rows, cols, scores) on the host must be k distinct absent entries
    whose scores are a top-k of the naive |dY·Xᵀ| up to float32 rounding."""
    r, c, _ = result
    n = W.shape[1]
    G = np.abs(dY @ X.T)
    G[W.row_ids(), W.indices] = -1.0
    kth = np.partition(G.ravel(), G.size - k)[G.size - k]
    chosen = G[r, c]
    if chosen.min() < kth * (1 - CHECK_RTOL) or len(np.unique(r.astype(np.int64) * n + c)) != k:
        raise AssertionError("topk_grow disagrees with the dense reference")
