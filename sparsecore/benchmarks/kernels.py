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
import tracemalloc
from pathlib import Path

import numpy as np
from tqdm import tqdm

import kernels
import sparsecore  # noqa: I001  (before NumPy: sets up the thread pools)
from sparsecore import CSR
from sparsecore.benchmarks.common import environment, log_crossing, median_time, torch_csr

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
KERNELS = ("spmm", "spmm_t", "sddmm")
COLORS = {"sparsecore": "C3", "scipy": "C0", "torch": "C2"}  # the same in every panel
REF_SHAPE = dict(m=4096, batch=128, density=0.01)


# ---------------------------------------------------------------------------------- checks
def check_products(W: CSR, Wsp, X, dY, rng):
    """Each kernel against float64 on sampled rows / columns / entries; raises on mismatch."""
    m, n = W.shape
    W64 = Wsp.astype(np.float64)
    rows = rng.choice(m, size=min(m, 48), replace=False)
    cols = rng.choice(n, size=min(n, 48), replace=False)
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
    pos = rng.choice(W.nnz, size=min(W.nnz, 4000), replace=False) if W.nnz else np.zeros(0, int)
    r, c = W.row_ids()[pos], W.indices[pos]
    ref = np.einsum("ij,ij->i", dY[r].astype(np.float64), X[c].astype(np.float64))
    scale = np.einsum("ij,ij->i", np.abs(dY[r]).astype(np.float64), np.abs(X[c]).astype(np.float64))
    _close("sddmm", dW[pos], ref, scale)


def _close(name, got, ref, scale):
    bad = np.abs(got - ref) > 1e-5 * scale + 1e-30
    if np.any(bad):
        raise AssertionError(f"{name}: {int(bad.sum())} entries differ from the float64 reference")


# ---------------------------------------------------------------------------------- sweeps
def sweep_products(cfg, torch, rng, progress=True, scipy=True):
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
            "spmm": median_time(lambda: Wd @ X, budget_s=cfg["budget_s"])["median_s"],
            "spmm_t": median_time(lambda: Wd.T @ dY, budget_s=cfg["budget_s"])["median_s"],
            "sddmm": median_time(lambda: dY @ X.T, budget_s=cfg["budget_s"])["median_s"],
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
            W.transpose_structure()  # cached, as in training: built once per topology
            impls = {
                "spmm": {"sparsecore": lambda: kernels.spmm(W, X), "scipy": lambda: Wsp @ X},
                "spmm_t": {
                    "sparsecore": lambda: kernels.spmm_t(W, dY),
                    "scipy": lambda: WspT @ dY,
                },
                "sddmm": {"sparsecore": lambda: kernels.sddmm(W, dY, X)},
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
        G = np.abs(dY @ X.T)
        G[rows_, cols_] = -1.0
        return np.argpartition(G.ravel(), G.size - k)[G.size - k :]

    def fused():
        return kernels.topk_grow(W, dY, X, k)

    # correctness: the fused set must be a top-k of the naive scores up to float32 rounding
    r, c, s = fused()
    G = np.abs(dY @ X.T)
    G[rows_, cols_] = -1.0
    kth = np.partition(G.ravel(), G.size - k)[G.size - k]
    chosen = G[r, c]
    if chosen.min() < kth * (1 - 1e-5) or len(np.unique(r.astype(np.int64) * m + c)) != k:
        raise AssertionError("topk_grow disagrees with the dense reference")
    del G
    out = {"m": m, "batch": batch, "density": density, "k": k}
    for name, fn in (("fused", fused), ("naive", naive), ("dense_product", lambda: dY @ X.T)):
        out[f"{name}_s"] = median_time(fn, min_reps=3, max_reps=15, budget_s=budget_s)["median_s"]
        tracemalloc.start()
        res = fn()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        res_bytes = sum(a.nbytes for a in (res if isinstance(res, tuple) else (res,)))
        out[f"{name}_peak_extra_bytes"] = int(peak - res_bytes)
    out["dense_gradient_bytes"] = 4 * m * m
    return out


def interleaved(budget_s=0.4):
    """Each kernel alone, and alternating with a small dense BLAS product (512 × 512 × 512, about
    as long as the kernel: the dense pieces of a training step are of that size)."""
    rng = np.random.default_rng(0)
    m, b, d = REF_SHAPE["m"], REF_SHAPE["batch"], REF_SHAPE["density"]
    W = CSR.random((m, m), d, seed=1)
    W.transpose_structure()
    X = rng.standard_normal((m, b), dtype=np.float32)
    dY = rng.standard_normal((m, b), dtype=np.float32)
    A = rng.standard_normal((512, 512), dtype=np.float32)
    fns = {
        "spmm": lambda: kernels.spmm(W, X),
        "spmm_t": lambda: kernels.spmm_t(W, dY),
        "sddmm": lambda: kernels.sddmm(W, dY, X),
    }
    import time

    res = {}
    # alone first: before the process makes any BLAS call, no BLAS thread exists to interfere
    for name, fn in fns.items():
        res[f"{name}_alone_s"] = median_time(fn, budget_s=budget_s)["median_s"]
    res["blas_alone_s"] = median_time(lambda: A @ A, budget_s=budget_s)["median_s"]
    for name, fn in fns.items():
        tk, tb = [], []
        for _ in range(30):
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


# ---------------------------------------------------------------------------------- report
def break_even(rows, kernel, impl, m, batch):
    """Highest density at which the implementation still beats dense BLAS (log-interpolated)."""
    return log_crossing(
        (r["density"], r["speedup_vs_dense"])
        for r in rows
        if r["kernel"] == kernel and r["impl"] == impl and r["m"] == m and r["batch"] == batch
    )


def markdown(env, rows, grows, inter, preset):
    L = []
    L.append(f"Preset `{preset}`, {env['date']}. Command: `{env['command']}`\n")
    L.append(f"- Machine: {env['cpu']}, {env['cores']} cores; flags: {env['cpu_flags']}")
    L.append(
        f"- Python {env['python']}, NumPy {env['numpy']}, SciPy {env['scipy']}, "
        f"Numba {env['numba']}, torch {env['torch']}, sparsecore {env['sparsecore']}"
    )
    th = env["threads"]
    blas = ", ".join(
        f"{b['internal_api']} {b['version']} ({b['num_threads']} threads)" for b in th["blas"]
    )
    L.append(
        f"- Threads: Numba `{th['numba_threading_layer']}` × {th['numba_threads']}; BLAS: {blas}; "
        f"env {th['env']}"
    )
    L.append("")
    ref = [
        r
        for r in rows
        if r["m"] == REF_SHAPE["m"]
        and r["batch"] == REF_SHAPE["batch"]
        and abs(r["density"] - REF_SHAPE["density"]) < 1e-12
    ]
    if ref:
        L.append(
            f"### Reference shape: m = k = {REF_SHAPE['m']}, batch {REF_SHAPE['batch']}, "
            f"density {REF_SHAPE['density']:.0%} (nnz = {ref[0]['nnz']:,})\n"
        )
        L.append(
            "| kernel | sparsecore ms | GFLOP/s | dense BLAS ms | × dense | scipy ms | × scipy | torch ms | × torch |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|")
        for k in KERNELS:
            by = {r["impl"]: r for r in ref if r["kernel"] == k}
            o = by.get("sparsecore")
            if not o:
                continue
            cells = [
                k,
                f"{o['seconds'] * 1e3:.3f}",
                f"{o['gflops']:.1f}",
                f"{o['dense_seconds'] * 1e3:.2f}",
                f"{o['speedup_vs_dense']:.1f}",
            ]
            for impl in ("scipy", "torch"):
                b = by.get(impl)
                cells += (
                    [f"{b['seconds'] * 1e3:.3f}", f"{b['seconds'] / o['seconds']:.1f}"]
                    if b
                    else ["–", "–"]
                )
            L.append("| " + " | ".join(cells) + " |")
        L.append(
            "\n(× X = how many times faster sparsecore is than X at the same shape; dense BLAS "
            "for sddmm is the full dY·Xᵀ product.)\n"
        )
    L.append("### Break-even density against dense BLAS\n")
    L.append(
        "Highest density at which each implementation is still faster than the dense product "
        "of the same shape (log-interpolated between measured densities; `>max` = faster at all).\n"
    )
    impls = sorted({r["impl"] for r in rows})
    L.append("| kernel | m | batch | " + " | ".join(impls) + " |")
    L.append("|---|---|---|" + "---|" * len(impls))
    for k in KERNELS:
        for m in sorted({r["m"] for r in rows}):
            for b in sorted({r["batch"] for r in rows}):
                cells = []
                for impl in impls:
                    be = break_even(rows, k, impl, m, b)
                    cells.append(
                        "–" if be is None else (">max" if be == float("inf") else f"{be:.1%}")
                    )
                L.append(f"| {k} | {m} | {b} | " + " | ".join(cells) + " |")
    L.append("")
    if grows:
        L.append("### Fused top-k grow (k = 1% of m·k) vs the naive dense way\n")
        L.append(
            "| m = k | batch | fused ms | naive ms | dense product alone ms | fused / product | "
            "naive / fused | fused peak extra MiB | % of dense gradient | naive peak extra MiB |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for g in grows:
            L.append(
                f"| {g['m']} | {g['batch']} | {g['fused_s'] * 1e3:.1f} | {g['naive_s'] * 1e3:.1f} | "
                f"{g['dense_product_s'] * 1e3:.1f} | {g['fused_s'] / g['dense_product_s']:.2f} | "
                f"{g['naive_s'] / g['fused_s']:.2f} | {g['fused_peak_extra_bytes'] / 2**20:.2f} | "
                f"{100 * g['fused_peak_extra_bytes'] / g['dense_gradient_bytes']:.1f}% | "
                f"{g['naive_peak_extra_bytes'] / 2**20:.1f} |"
            )
        L.append(
            "\n(peak extra = NumPy allocations traced by tracemalloc during one call, minus the "
            "returned arrays; BLAS-internal buffers are not counted for either.)\n"
        )
    if inter:
        L.append("### Kernels interleaved with BLAS (threading setup)\n")
        L.append(
            f"m = k = {REF_SHAPE['m']}, batch {REF_SHAPE['batch']}, density 1%: each kernel alone (before "
            "any BLAS call in the process), and alternating with a 512³ BLAS product (as kernels and "
            "small dense products alternate in a training step); medians of 30 alternations.\n"
        )
        L.append(
            "| setup | kernel | alone ms | after BLAS ms | BLAS alone ms | BLAS after kernel ms |"
        )
        L.append("|---|---|---|---|---|---|")
        for label, res in inter.items():
            for k in KERNELS:
                L.append(
                    f"| {label} | {k} | {res[k + '_alone_s'] * 1e3:.3f} | {res[k + '_interleaved_s'] * 1e3:.3f} | "
                    f"{res['blas_alone_s'] * 1e3:.2f} | {res['blas_after_' + k + '_s'] * 1e3:.2f} |"
                )
        L.append("")
    L.append("<details><summary>All measurements</summary>\n")
    L.append("| kernel | impl | m | batch | density | nnz | ms | GFLOP/s | × dense |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        L.append(
            f"| {r['kernel']} | {r['impl']} | {r['m']} | {r['batch']} | {r['density']:.3g} | {r['nnz']:,} | "
            f"{r['seconds'] * 1e3:.3f} | {r['gflops']:.1f} | {r['speedup_vs_dense']:.2f} |"
        )
    L.append("\n</details>\n")
    return "\n".join(L)


def plots(rows, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for m in sorted({r["m"] for r in rows}):
        batches = sorted({r["batch"] for r in rows if r["m"] == m})
        fig, axes = plt.subplots(len(batches), 3, figsize=(15, 4 * len(batches)), squeeze=False)
        for i, b in enumerate(batches):
            for j, k in enumerate(KERNELS):
                ax = axes[i][j]
                for impl in sorted({r["impl"] for r in rows}):
                    pts = sorted(
                        (r["density"], r["speedup_vs_dense"])
                        for r in rows
                        if r["m"] == m
                        and r["batch"] == b
                        and r["kernel"] == k
                        and r["impl"] == impl
                    )
                    if pts:
                        color = COLORS.get(impl, "C7")
                        ax.plot(*zip(*pts, strict=True), marker="o", label=impl, color=color)
                        be = break_even(rows, k, impl, m, b)
                        if be and be != float("inf"):
                            ax.axvline(be, ls=":", lw=1, color=color)
                ax.axhline(1.0, color="k", lw=1)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_title(f"{k}: m = k = {m}, batch {b}")
                ax.set_xlabel("density")
                ax.set_ylabel("speed-up over dense BLAS")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend()
        fig.tight_layout()
        path = out / f"speedup_m{m}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path)
    return files


def write_results(md: str, path: Path):
    start, end = "<!-- generated:start -->", "<!-- generated:end -->"
    text = path.read_text() if path.exists() else f"# Benchmark results\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{start}\n{md}\n{end}{tail}")


def run(cfg: dict, torch, rng, progress=True, interleave=True, scipy=True) -> dict:
    """The kernel level: the product sweep, the grow comparison, the threading experiment."""
    env = environment(torch)
    rows = sweep_products(cfg, torch, rng, progress, scipy)
    grows = [
        bench_grow(m, 128, 0.01, 0.01, torch, rng, cfg["budget_s"] * 3)
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
