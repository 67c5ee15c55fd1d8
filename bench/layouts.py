"""What batch-major operands cost: each public product with feature-major operands, with
batch-major ones (B × features, the NumPy / PyTorch ``x @ W.T`` convention), and batch-major
through transposed copies (the native batch-major kernels switched off: the path before them,
and the GPU's). Same run, paired: every repetition times the three calls back to back, and the
ratios are medians of the per-repetition ratios, so a drifting machine moves all three alike.

    python -m bench.layouts                                # m = k = 4096, 1% and 10%; 16384², 1%
    python -m bench.layouts --shape 4096:0.01 --batch 32 --reps 61

(run as a module from the repository root: bench/kernels.py would shadow the kernels package)
"""

import argparse
import platform
import time

import numba
import numpy as np

import kernels
from kernels.backend import get_backend
from kernels.machine import cache_sizes

NATIVE = ("spmm_batch", "spmm_t_batch", "sddmm_batch")


def measure(m: int, density: float, batch: int, reps: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    W = kernels.CSR.random((m, m), density, seed=seed + 1)
    W.transpose_structure()
    xb = rng.standard_normal((batch, m), dtype=np.float32)
    dyb = rng.standard_normal((batch, m), dtype=np.float32)
    xf, dyf = np.ascontiguousarray(xb.T), np.ascontiguousarray(dyb.T)
    yf, yb = np.empty((m, batch), np.float32), np.empty((batch, m), np.float32)
    g = np.empty(W.nnz, np.float32)
    cpu = get_backend("cpu")
    native = {name: getattr(cpu, name) for name in NATIVE}

    def switch(on: bool):
        for name, fn in native.items():
            setattr(cpu, name, fn if on else None)

    calls = {
        "spmm": (lambda: kernels.spmm(W, xf, out=yf),
                 lambda: kernels.spmm(W, xb, out=yb, layout="batch")),
        "spmm_t": (lambda: kernels.spmm_t(W, dyf, out=yf),
                   lambda: kernels.spmm_t(W, dyb, out=yb, layout="batch")),
        "sddmm": (lambda: kernels.sddmm(W, dyf, xf, out=g),
                  lambda: kernels.sddmm(W, dyb, xb, out=g, layout="batch")),
    }  # fmt: skip
    rows = []
    try:
        for name, (feature, batch_major) in calls.items():
            # the answers first: batch-major within float32 rounding of feature-major
            want = np.array(feature(), copy=True)
            got = batch_major()
            np.testing.assert_allclose(
                got if name == "sddmm" else got.T, want, rtol=1e-4, atol=1e-4
            )
            switch(False)
            batch_major()
            switch(True)
            t = {"feature": [], "native": [], "copies": []}
            for _ in range(reps):
                for key, fn, on in (("feature", feature, True), ("native", batch_major, True),
                                    ("copies", batch_major, False)):  # fmt: skip
                    switch(on)
                    t0 = time.perf_counter()
                    fn()
                    t[key].append(time.perf_counter() - t0)
            switch(True)
            f = np.array(t["feature"])
            rows.append(dict(
                kernel=name, m=m, density=density, batch=batch,
                feature_ms=1e3 * float(np.median(f)),
                native_ms=1e3 * float(np.median(t["native"])),
                copies_ms=1e3 * float(np.median(t["copies"])),
                native_x=float(np.median(np.array(t["native"]) / f)),
                copies_x=float(np.median(np.array(t["copies"]) / f)),
            ))  # fmt: skip
    finally:
        switch(True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", action="append", help="m:density (square W), repeatable")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=41)
    args = ap.parse_args(argv)
    shapes = args.shape or ["4096:0.01", "4096:0.1", "16384:0.01"]
    c = cache_sizes()
    print(f"# {platform.processor() or platform.machine()}, {numba.get_num_threads()} threads, "
          f"L1d {c.l1d >> 10} KiB, L2 {c.l2 >> 10} KiB, L3 {c.l3 >> 20} MiB, line {c.line} B; "
          f"NumPy {np.__version__}, Numba {numba.__version__}")  # fmt: skip
    print(
        "| kernel | m = k | density | B | feature ms | batch native ms (× feature) "
        "| batch via copies ms (× feature) |"
    )
    print("|---|---|---|---|---|---|---|")
    for spec in shapes:
        m, d = spec.split(":")
        reps = args.reps if int(m) <= 4096 else max(7, args.reps // 4)
        for r in measure(int(m), float(d), args.batch, reps):
            print(f"| {r['kernel']} | {r['m']} | {r['density']:.0%} | {r['batch']} | "
                  f"{r['feature_ms']:.3f} | {r['native_ms']:.3f} ({r['native_x']:.2f}×) | "
                  f"{r['copies_ms']:.3f} ({r['copies_x']:.2f}×) |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
