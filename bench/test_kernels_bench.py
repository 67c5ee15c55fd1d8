"""pytest-benchmark view of the kernels: python -m pytest bench/test_kernels_bench.py

Each kernel beside the dense BLAS product of the same shape, scipy.sparse and torch.sparse (when
installed), with readable ids; results are checked against a float64 reference first. Compare
the groups' medians (same run) rather than absolute figures.
"""

import numpy as np
import pytest

import kernels
from kernels.backend import get_backend
from sparsecore import CSR
from sparsecore.benchmarks.common import torch_csr, try_torch
from sparsecore.benchmarks.ops import check_products, dense_calls, naive_grow, product_calls

M, BATCH = 4096, 128
torch = try_torch(2)
CPU = get_backend("cpu")


@pytest.fixture(scope="module", params=[0.01, 0.1], ids=lambda d: f"density={d}")
def case(request):
    rng = np.random.default_rng(0)
    W = CSR.random((M, M), request.param, seed=1)
    W.transpose_structure()
    X = rng.standard_normal((M, BATCH), dtype=np.float32)
    dY = rng.standard_normal((M, BATCH), dtype=np.float32)
    check_products(W, W.to_scipy(), X, dY, rng)
    return W, X, dY


def _impls(kernel, W, X, dY):
    """The calls of sparsecore/benchmarks/ops.py (the suite's), and scipy's and torch's."""
    Wsp = W.to_scipy()
    Wd = W.to_dense() if kernel != "sddmm" else None  # (sddmm's dense baseline is dY·Xᵀ)
    out = {
        "sparsecore": product_calls(CPU, W, X, dY)[kernel],
        "dense": dense_calls(np, Wd, X, dY)[kernel],
    }
    if kernel == "spmm":
        out["scipy"] = lambda: Wsp @ X
    elif kernel == "spmm_t":
        WT = Wsp.T.tocsr()
        out["scipy"] = lambda: WT @ dY
    if torch is not None:
        Wt = torch_csr(torch, W)
        Xt, dYt = torch.from_numpy(X), torch.from_numpy(dY)
        out["torch"] = {
            "spmm": lambda: torch.sparse.mm(Wt, Xt),
            "spmm_t": lambda: torch.sparse.mm(Wt.t(), dYt),
            "sddmm": lambda: torch.sparse.sampled_addmm(Wt, dYt, Xt.t(), beta=0.0),
        }[kernel]
    return out


@pytest.mark.parametrize("impl", ["sparsecore", "scipy", "torch", "dense"])
@pytest.mark.parametrize("kernel", ["spmm", "spmm_t", "sddmm"])
def test_products(benchmark, case, kernel, impl):
    W, X, dY = case
    fns = _impls(kernel, W, X, dY)
    if impl not in fns:
        pytest.skip(f"{impl} has no {kernel} here")
    benchmark.group = f"{kernel} m={M} batch={BATCH} density={W.density:.2f}"
    fns[impl]()  # warm-up
    benchmark(fns[impl])


@pytest.mark.parametrize("layout", ["feature", "batch", "batch-copies"])
@pytest.mark.parametrize("kernel", ["spmm", "spmm_t", "sddmm"])
def test_layouts(benchmark, case, kernel, layout, monkeypatch):
    """The public call with feature-major operands, with batch-major ones (B × features: the
    native batch-major kernels, kernels/cpu/panels.py), and batch-major through transposed
    copies (the native kernels switched off: the path before them, and the GPU's)."""
    W, X, dY = case
    Xb, dYb = np.ascontiguousarray(X.T), np.ascontiguousarray(dY.T)
    if layout == "batch-copies":
        for name in ("spmm_batch", "spmm_t_batch", "sddmm_batch"):
            monkeypatch.setattr(CPU, name, None)
    batch = layout != "feature"
    x, dy, lay = (Xb, dYb, "batch") if batch else (X, dY, "feature")
    y = np.empty((BATCH, M) if batch else (M, BATCH), np.float32)
    g = np.empty(W.nnz, np.float32)
    fn = {
        "spmm": lambda: kernels.spmm(W, x, out=y, layout=lay),
        "spmm_t": lambda: kernels.spmm_t(W, dy, out=y, layout=lay),
        "sddmm": lambda: kernels.sddmm(W, dy, x, out=g, layout=lay),
    }[kernel]
    benchmark.group = f"{kernel} layouts m={M} batch={BATCH} density={W.density:.2f}"
    fn()
    benchmark(fn)


@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_grow(benchmark, impl):
    rng = np.random.default_rng(0)
    W = CSR.random((M, M), 0.01, seed=1)
    X = rng.standard_normal((M, BATCH), dtype=np.float32)
    dY = rng.standard_normal((M, BATCH), dtype=np.float32)
    k = M * M // 100
    rows, cols = W.row_ids(), W.indices

    def naive():
        return naive_grow(np, rows, cols, dY, X, k)

    fn = {"fused": lambda: kernels.topk_grow(W, dY, X, k), "naive": naive}[impl]
    benchmark.group = f"grow m={M} batch={BATCH} k=1%"
    fn()
    benchmark.pedantic(fn, rounds=5, iterations=1)
