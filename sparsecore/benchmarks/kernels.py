"""Kernel level of the benchmark suite: each kernel beside dense BLAS, scipy.sparse, torch.sparse.

Run through ``sparsecore bench --levels kernels`` (or ``python bench/kernels.py``, the same).

Every figure is a median of repeated calls in this one run, and every sparse result is checked
against a float64 reference (on sampled rows/entries) before it is timed, so a fast wrong kernel
cannot score. Speed is reported as GFLOP/s of useful work (2·nnz·B) and as ratios against the
baselines of the same run. The threading experiment runs in subprocesses, because thread-pool
settings are read when the libraries load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tracemalloc

import numpy as np
from tqdm import tqdm

import kernels
import sparsecore  # noqa: I001  (before NumPy: sets up the thread pools)
from kernels.backend import get_backend
from sparsecore import CSR
from sparsecore.benchmarks.common import environment, torch_csr
from sparsecore.benchmarks.ops import (  # noqa: F401  (KERNELS, check_products: old paths)
    KERNELS,
    REF_SHAPE,
    check_grow_host,
    check_products,
    dense_calls,
    naive_grow,
    product_calls,
)

# the reports moved to report.py; their old names here still resolve
from sparsecore.benchmarks.report import KERNEL_COLORS as COLORS  # noqa: F401
from sparsecore.benchmarks.report import break_even, write_results  # noqa: F401
from sparsecore.benchmarks.report import kernel_markdown as markdown  # noqa: F401
from sparsecore.benchmarks.report import kernel_plots as plots  # noqa: F401
from sparsecore.benchmarks.timing import median_time

PRESETS = {
    "quick": dict(
        sizes=[1024, 4096],
        batches=[128],
        densities=[0.01, 0.05, 0.2],
        grow_sizes=[1024],
        max_call_s=0.5,
        budget_s=0.3,
    ),
    "full": dict(
        sizes=[1024, 4096, 16384],
        batches=[32, 128, 512],
        densities=[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5],
        grow_sizes=[4096, 16384],
        max_density={16384: 0.2},  # beyond it, building the matrices alone takes minutes
        max_batch={16384: 128},
        max_call_s=3.0,
        budget_s=0.6,
    ),
}
GROW = dict(batch=128, density=0.01, fraction=0.01)  # the grow comparison: k = 1% of m·m
GROW_BUDGET_SCALE = 3  # its budget, in units of the preset's budget_s
GROW_MAX_REPS = 15
INTERLEAVE_BLAS = 512  # the n of the n × n × n BLAS product alternating with each kernel
INTERLEAVE_ROUNDS = 30  # alternations timed


# ---------------------------------------------------------------------------------- sweeps
def sweep_products(cfg, torch, rng, progress=True, scipy=True):
    """Each product at every size × batch × density of ``cfg``, beside dense BLAS of the same
    shape, scipy.sparse and torch.sparse; one row per (kernel, impl, shape)."""
    cpu = get_backend("cpu")
    rows = []
    last = {}  # (kernel, impl) -> (seconds, nnz) of the previous density, to skip slow ones
    jobs = [
        (m, b)
        for m in cfg["sizes"]
        for b in cfg["batches"]
        if b <= cfg.get("max_batch", {}).get(m, b)
    ]
    bar = tqdm(total=len(jobs) * len(cfg["densities"]), desc="products", disable=not progress)
    for m, batch in jobs:
        X = rng.standard_normal((m, batch), dtype=np.float32)
        dY = rng.standard_normal((m, batch), dtype=np.float32)
        Wd = rng.standard_normal((m, m), dtype=np.float32)
        dense = {
            name: median_time(fn, budget_s=cfg["budget_s"])["median_s"]
            for name, fn in dense_calls(np, Wd, X, dY).items()
        }
        Wd = None  # free the dense matrix before the sparse sweep
        for density in cfg["densities"]:
            if density > cfg.get("max_density", {}).get(m, 1.0):
                bar.update()
                continue
            W = CSR.random((m, m), density, seed=int(rng.integers(1 << 31)))
            Wsp = W.to_scipy()
            WspT = Wsp.T.tocsr()  # scipy's dX: a CSR of the transpose, built outside the timing
            check_products(W, Wsp, X, dY, rng)
            ours = product_calls(cpu, W, X, dY)  # (builds W's transpose structure, once)
            impls = {
                "spmm": {"sparsecore": ours["spmm"], "scipy": lambda: Wsp @ X},
                "spmm_t": {"sparsecore": ours["spmm_t"], "scipy": lambda: WspT @ dY},
                "sddmm": {"sparsecore": ours["sddmm"]},
            }
            if not scipy:
                for by_impl in impls.values():
                    by_impl.pop("scipy", None)
            if torch is not None:
                Wt = torch_csr(torch, W)
                Xt, dYt = torch.from_numpy(X), torch.from_numpy(dY)
                Wtt = Wt.t()  # what autograd does for dX: the transposed CSR (a CSC view)
                impls["spmm"]["torch"] = lambda: torch.sparse.mm(Wt, Xt)
                impls["spmm_t"]["torch"] = lambda: torch.sparse.mm(Wtt, dYt)
                impls["sddmm"]["torch"] = lambda: torch.sparse.sampled_addmm(
                    Wt, dYt, Xt.t(), beta=0.0
                )
            for kname, by_impl in impls.items():
                flops = 2.0 * W.nnz * batch
                for impl, fn in by_impl.items():
                    prev = last.get((kname, impl, m, batch))
                    if prev and prev[1] and prev[0] * W.nnz / prev[1] > cfg["max_call_s"]:
                        continue  # predicted too slow for this preset
                    t = median_time(fn, budget_s=cfg["budget_s"])["median_s"]
                    last[(kname, impl, m, batch)] = (t, W.nnz)
                    rows.append(
                        dict(
                            kernel=kname,
                            impl=impl,
                            m=m,
                            batch=batch,
                            density=density,
                            nnz=W.nnz,
                            seconds=t,
                            gflops=flops / t / 1e9 if t else 0.0,
                            dense_seconds=dense[kname],
                            speedup_vs_dense=dense[kname] / t,
                        )
                    )
            bar.update()
    bar.close()
    return rows


def bench_grow(m, batch, density, frac, torch, rng, budget_s):
    """Fused grow vs the naive dense way, with peak extra memory of each (tracemalloc)."""
    W = CSR.random((m, m), density, seed=int(rng.integers(1 << 31)))
    X = rng.standard_normal((m, batch), dtype=np.float32)
    dY = rng.standard_normal((m, batch), dtype=np.float32)
    k = int(frac * m * m)
    rows_, cols_ = W.row_ids(), W.indices

    def naive():
        return naive_grow(np, rows_, cols_, dY, X, k)

    def fused():
        return kernels.topk_grow(W, dY, X, k)

    # correctness: the fused set must be a top-k of the naive scores up to float32 rounding
    check_grow_host(W, dY, X, k, fused())
    out = {"m": m, "batch": batch, "density": density, "k": k}
    for name, fn in (("fused", fused), ("naive", naive), ("dense_product", lambda: dY @ X.T)):
        out[f"{name}_s"] = median_time(fn, max_reps=GROW_MAX_REPS, budget_s=budget_s)["median_s"]
        tracemalloc.start()
        res = fn()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        res_bytes = sum(a.nbytes for a in (res if isinstance(res, tuple) else (res,)))
        out[f"{name}_peak_extra_bytes"] = int(peak - res_bytes)
    out["dense_gradient_bytes"] = 4 * m * m
    return out


def interleaved(budget_s=0.4):
    """Each kernel alone, and alternating with a small dense BLAS product (INTERLEAVE_BLAS³ =
    512³, about as long as the kernel: the dense pieces of a training step are of that size)."""
    rng = np.random.default_rng(0)
    m, b, d = REF_SHAPE["m"], REF_SHAPE["batch"], REF_SHAPE["density"]
    W = CSR.random((m, m), d, seed=1)
    X = rng.standard_normal((m, b), dtype=np.float32)
    dY = rng.standard_normal((m, b), dtype=np.float32)
    A = rng.standard_normal((INTERLEAVE_BLAS, INTERLEAVE_BLAS), dtype=np.float32)
    fns = product_calls(get_backend("cpu"), W, X, dY)

    res = {}
    # alone first: before the process makes any BLAS call, no BLAS thread exists to interfere
    for name, fn in fns.items():
        res[f"{name}_alone_s"] = median_time(fn, budget_s=budget_s)["median_s"]
    res["blas_alone_s"] = median_time(lambda: A @ A, budget_s=budget_s)["median_s"]
    for name, fn in fns.items():
        tk, tb = [], []
        for _ in range(INTERLEAVE_ROUNDS):
            t0 = time.perf_counter()
            A @ A
            t1 = time.perf_counter()
            fn()
            t2 = time.perf_counter()
            tb.append(t1 - t0)
            tk.append(t2 - t1)
        res[f"{name}_interleaved_s"] = float(np.median(tk))
        res[f"blas_after_{name}_s"] = float(np.median(tb))
    res["threads"] = sparsecore.threading_info()
    return res


def interleaved_in_subprocesses():
    out = {}
    setups = (
        ("sparsecore setup", {}),
        ("OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}),
        ("library defaults", {"SPARSECORE_THREAD_SETUP": "0"}),
    )
    ours = (
        "GOMP_SPINCOUNT",
        "OMP_WAIT_POLICY",
        "OPENBLAS_THREAD_TIMEOUT",
        "SPARSECORE_THREAD_SETUP",
    )
    for label, extra in setups:
        env = {k: v for k, v in os.environ.items() if k not in ours}
        env.update(extra)
        proc = subprocess.run(
            [sys.executable, "-m", "sparsecore.benchmarks.kernels", "--interleave-only"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        out[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def run(cfg: dict, torch, rng, progress=True, interleave=True, scipy=True) -> dict:
    """The kernel level: the product sweep, the grow comparison, the threading experiment."""
    env = environment(torch)
    rows = sweep_products(cfg, torch, rng, progress, scipy)
    grows = [
        bench_grow(
            m,
            GROW["batch"],
            GROW["density"],
            GROW["fraction"],
            torch,
            rng,
            cfg["budget_s"] * GROW_BUDGET_SCALE,
        )  # fmt: skip
        for m in tqdm(cfg["grow_sizes"], desc="grow", disable=not progress)
    ]
    inter = interleaved_in_subprocesses() if interleave else {}
    return {"environment": env, "products": rows, "grow": grows, "interleaved": inter}


def main(argv=None):
    """Entry of the threading-experiment subprocesses; the suite itself is ``sparsecore bench``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["--interleave-only"]:
        print("run the benchmark suite with `sparsecore bench --help`", file=sys.stderr)
        return 2
    print(json.dumps(interleaved()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
