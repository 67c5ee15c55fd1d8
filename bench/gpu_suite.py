"""The GPU suite: one command that checks and measures sparsecore's CUDA path on this machine.

    python bench/gpu_suite.py --out bench/results/gpu          (about 3-6 minutes on an H100)

1. Runs the CUDA cases of the test suite (pytest -k cuda over the backend-parametrised kernel
   tests, plus the build tests) and records the outcome.
2. Benchmarks spmm, spmm_t, sddmm and topk_grow against cuSPARSE (cupyx.scipy.sparse) and
   dense cuBLAS (cupy.matmul) on the same operands: m = k = 16384, batch 256, densities 0.1%,
   1%, 10%, after smaller quick shapes. Every result is checked against the library's before
   it is timed (a fast wrong kernel gets no time). Times are medians of calls after warm-up,
   each timed by the wall clock until a stream sync after it (sparsecore/benchmarks/timing.py;
   before house step 5, CUDA events: the sync's wake-up adds a few µs per call, which shows at
   the quick shapes, so compare only with files whose "timer" says the same); ratios are taken
   within the run. The products are timed through their
   launchers on a DeviceCSR (what the training engine calls: validation happens once, at the
   public boundary); topk_grow through the public function.
3. The fused grow's peak extra device memory (CuPy memory-pool hook) against the bytes of the
   dense gradient it never forms.
4. A training step of a 99%-sparse MLP on the CUDA kernels against dense cuBLAS training of the
   same MLP, and masked-dense PyTorch training when torch with CUDA is importable; then the
   engine's own device step (Trainer with device="cuda": layers, loss, fused optimizer kernel)
   on the same widths, and one RigL topology update of it (exact grow) on the device.
Prints a table and writes <out>/gpu_suite.json. Without CuPy or a CUDA device it exits with
status 2 and says why.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# bench/ holds a kernels.py: put the repository first so that `import kernels` is the package
sys.path.insert(0, ROOT)

# (importing these needs no GPU: CuPy loads only inside the sections that run on one)
import kernels  # noqa: E402
from kernels.backend import get_backend  # noqa: E402
from sparsecore.benchmarks import ops  # noqa: E402
from sparsecore.benchmarks.memory import device_pool_peak  # noqa: E402
from sparsecore.benchmarks.report import print_gpu_tables  # noqa: E402
from sparsecore.benchmarks.timing import median_s  # noqa: E402
from sparsecore.layers import SoftmaxCrossEntropy, mlp  # noqa: E402
from sparsecore.optim import SGD  # noqa: E402

FULL_SHAPES = [(16384, 16384, 256, d) for d in (0.001, 0.01, 0.1)]
QUICK_SHAPES = [(4096, 4096, 128, 0.01), (2048, 8192, 64, 0.05)]
GROW_FRACTION = 0.3  # k = 0.3·nnz: RigL's default drop fraction α at the first update
TIMING = dict(warmup=2, min_reps=3, max_reps=50, budget_s=0.4)  # per timed call, see gpu_ms
CHECK_RTOL = 1e-4  # of the sum of |terms|: a product's bound against cuSPARSE / cuBLAS
TORCH_REPS = 20  # timed steps of the torch baseline (after 3 warm-up steps)
MLP = dict(width=8192, quick_width=4096, hidden=3, n_classes=10, batch=256, density=0.01, lr=0.01)
TEST_FILES = [
    "tests/test_products.py",
    "tests/test_grow.py",
    "tests/test_topology.py",
    "tests/test_cuda_device.py",
    "tests/test_bench_ops.py",  # the launcher calls this suite times, checked on the device
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python bench/gpu_suite.py",
        description=(
            "CUDA tests, then spmm/spmm_t/sddmm/topk_grow against cuSPARSE and cuBLAS, the "
            "grow's peak memory, and a 99%-sparse MLP training step against dense training. "
            "Needs CuPy and a CUDA device (exit status 2 without them)."
        ),
    )
    p.add_argument("--out", default="bench/results/gpu", help="output folder for gpu_suite.json")
    p.add_argument("--quick", action="store_true", help="small shapes only (under a minute)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the CUDA tests first")
    p.add_argument(
        "--time-limit",
        type=float,
        default=540.0,
        help="seconds after which remaining sections are skipped (default 540)",
    )
    p.add_argument("--seed", type=int, default=20261125)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- helpers
def gpu_ms(b, fn, **kw) -> float:
    """Median milliseconds of fn() on backend b: the benchmarks' one timer with b's stream
    sync inside the timed region (sparsecore/benchmarks/timing.py), TIMING unless overridden."""
    return 1e3 * median_s(fn, sync=b.sync, **{**TIMING, **kw})


def random_device_csr(m, n, density, seed):
    """A uniformly random pattern built on the device (canonical, int32), values ~ N(0, 1)."""
    import cupy

    from kernels import DeviceCSR

    rs = cupy.random.RandomState(seed)
    nnz = int(round(density * m * n))
    flat = cupy.empty(0, dtype=np.int64)
    while flat.size < nnz:
        extra = int((nnz - flat.size) * 1.2) + 64
        flat = cupy.unique(
            cupy.concatenate((flat, rs.randint(0, m * n, size=extra, dtype=np.int64)))
        )
    if flat.size > nnz:
        flat = cupy.sort(flat[rs.permutation(flat.size)[:nnz]])
    rows = flat // n
    indices = (flat - rows * n).astype(np.int32)
    indptr = cupy.searchsorted(rows, cupy.arange(m + 1, dtype=np.int64)).astype(np.int32)
    data = rs.standard_normal(nnz, dtype=np.float32)
    return DeviceCSR(indptr, indices, data, (m, n))


def abs_csr(Wc):
    import cupyx.scipy.sparse as csp

    return csp.csr_matrix((abs(Wc.data), Wc.indices, Wc.indptr), shape=Wc.shape)


def close(got, ref, bound):
    """Max error and whether every element is within its bound (all CuPy)."""
    import cupy

    err = cupy.abs(got - ref)
    ok = bool((err <= bound).all())
    return ok, float(err.max()) if err.size else 0.0


def run_tests(deadline):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda"]
    cmd += TEST_FILES
    build = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    build += ["tests/test_cuda_build.py", "tests/test_cuda_emulated.py"]
    out = {}
    for name, c in (("cuda_cases", cmd), ("build_and_emulated", build)):
        t0 = time.perf_counter()
        try:
            res = subprocess.run(
                c, cwd=ROOT, capture_output=True, text=True, timeout=max(30, deadline() / 2)
            )
            tail = res.stdout.strip().splitlines()[-1:] or [""]
            out[name] = {"returncode": res.returncode, "summary": tail[0]}
            if res.returncode != 0:
                out[name]["output_tail"] = res.stdout[-4000:]
        except subprocess.TimeoutExpired:
            out[name] = {"returncode": None, "summary": "timed out"}
        out[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"tests {name}: {out[name]['summary']} ({out[name]['seconds']} s)", flush=True)
    return out


# ---------------------------------------------------------------------------- kernels


def bench_shape(m, n, batch, density, seed, rows_out, grow_out):
    """spmm, spmm_t, sddmm (through the CUDA launchers: ops.product_calls(via="launcher")) and
    topk_grow (public) at one shape, each checked in full against cuSPARSE / cuBLAS first,
    beside cuSPARSE and dense cuBLAS (ops.dense_calls) on the same operands."""
    import cupy

    b = get_backend("cuda")
    W = random_device_csr(m, n, density, seed)
    nnz = W.nnz
    rs = cupy.random.RandomState(seed + 1)
    X = rs.standard_normal((n, batch), dtype=np.float32)
    dY = rs.standard_normal((m, batch), dtype=np.float32)
    Wc = W.to_cupy_scipy()
    Wa = abs_csr(Wc)
    Wd = W.to_dense()
    Xf, dYf = cupy.asfortranarray(X), cupy.asfortranarray(dY)
    flops = 2.0 * nnz * batch
    label = f"m={m} n={n} B={batch} d={density:g}"
    rows = W.row_ids()
    ours = ops.product_calls(b, W, X, dY, via="launcher")  # builds the transpose structure
    dense = ops.dense_calls(cupy, Wd, X, dY, out=True, gather=(rows, W.indices))

    def record(op, ok, err, t_ours, t_cusparse, t_dense):
        row = {
            "op": op,
            "shape": label,
            "m": m,
            "n": n,
            "batch": batch,
            "density": density,
            "nnz": nnz,
            "correct": ok,
            "max_abs_err": err,
            "ms": t_ours if ok else None,
            "cusparse_ms": t_cusparse,
            "dense_ms": t_dense,
            "gflops": flops / (t_ours * 1e6) if ok and t_ours else None,
        }
        row["vs_cusparse"] = t_cusparse / t_ours if ok and t_cusparse else None
        row["vs_dense"] = t_dense / t_ours if ok and t_dense else None
        rows_out.append(row)

    # spmm: Y = W·X
    ref = Wc.dot(Xf)
    got = kernels.spmm(W, X, out=cupy.empty((m, batch), np.float32))
    ok, err = close(got, ref, CHECK_RTOL * Wa.dot(cupy.abs(Xf)) + 1e-6)
    t = gpu_ms(b, ours["spmm"]) if ok else None
    record("spmm", ok, err, t, gpu_ms(b, lambda: Wc.dot(Xf)), gpu_ms(b, dense["spmm"]))

    # spmm_t: dX = Wᵀ·dY (transpose structure built once per pattern, outside the timing)
    WcT = Wc.T
    ref = WcT.dot(dYf)
    got = kernels.spmm_t(W, dY, out=cupy.empty((n, batch), np.float32))
    ok, err = close(got, ref, CHECK_RTOL * Wa.T.dot(cupy.abs(dYf)) + 1e-6)
    t = gpu_ms(b, ours["spmm_t"]) if ok else None
    record("spmm_t", ok, err, t, gpu_ms(b, lambda: WcT.dot(dYf)), gpu_ms(b, dense["spmm_t"]))

    # sddmm: dW = (dY·Xᵀ) at the nonzeros; baseline: the dense gradient, then a gather
    G = cupy.empty((m, n), np.float32)
    cupy.matmul(cupy.abs(dY), cupy.abs(X).T, out=G)
    bound = CHECK_RTOL * G[rows, W.indices] + 1e-6
    ref = dense["sddmm"]()
    ok, err = close(kernels.sddmm(W, dY, X, out=cupy.empty(nnz, np.float32)), ref, bound)
    t = gpu_ms(b, ours["sddmm"]) if ok else None
    record("sddmm", ok, err, t, None, gpu_ms(b, dense["sddmm"]))

    # topk_grow: k = 0.3·nnz absent connections with the largest |dY·Xᵀ|
    k = int(GROW_FRACTION * nnz)
    dense_bytes = 4 * m * n
    with device_pool_peak() as pm:
        r, c, s = kernels.topk_grow(W, dY, X, k)
        b.sync()
    peak = pm.peak
    # check against the dense gradient: chosen cells absent, unique, scores right, and no
    # unchosen absent score above the smallest chosen one beyond float32 rounding
    cupy.matmul(dY, X.T, out=G)
    S = cupy.abs(G)
    S[rows, W.indices] = -1.0
    flat = r.astype(np.int64) * n + c
    tol = 1e-5 * float(cupy.abs(dY).sum(axis=1).max() * cupy.abs(X).max())
    ok = bool(r.size == k) and bool((flat[1:] > flat[:-1]).all()) if k > 1 else r.size == k
    chosen_scores = S.ravel()[flat]
    ok = ok and bool((chosen_scores >= 0).all())
    ok = ok and bool((cupy.abs(chosen_scores - s) <= tol).all())
    if ok and k:
        S.ravel()[flat] = -1.0
        ok = float(S.max()) <= float(s.min()) + tol
    del S

    def dense_grow():  # the one naive grow (ops.naive_grow), its product into G
        return ops.naive_grow(cupy, rows, W.indices, dY, X, k, product_out=G)

    grow = lambda: kernels.topk_grow(W, dY, X, k)  # noqa: E731
    t = gpu_ms(b, grow, budget_s=1.0) if ok else None
    t_dense = gpu_ms(b, dense_grow, budget_s=1.0, min_reps=2)
    record("topk_grow", ok, None, t, None, t_dense)
    rows_out[-1]["gflops"] = 2.0 * m * n * batch / (t * 1e6) if t else None
    grow_out.append(
        {
            "shape": label,
            "k": k,
            "peak_extra_bytes": int(peak),
            "dense_gradient_bytes": dense_bytes,
            "fraction_of_dense": peak / dense_bytes,
            "tile_bytes": kernels.config.CUDA_TOPK_TILE_BYTES,
        }
    )
    cupy.get_default_memory_pool().free_all_blocks()


# ---------------------------------------------------------------------------- training step


def mlp_steps(quick, seed):
    """ms per SGD step (no momentum) of a 99%-sparse MLP built by sparsecore.layers.mlp on the
    device (sparse hidden layers, dense classifier) vs the same MLP with every layer dense
    (cuBLAS), vs masked-dense torch; then the engine's Trainer (engine_steps)."""
    import cupy

    b = get_backend("cuda")
    width = MLP["quick_width"] if quick else MLP["width"]
    dims = [width] * (MLP["hidden"] + 1)  # three sparse hidden layers, then a dense classifier
    n_classes, batch, density, lr = MLP["n_classes"], MLP["batch"], MLP["density"], MLP["lr"]
    rs = cupy.random.RandomState(seed)
    x = rs.standard_normal((dims[0], batch), dtype=np.float32)
    labels = rs.randint(0, n_classes, size=batch)
    out = {"dims": dims + [n_classes], "batch": batch, "density": density}
    for key, dens in (
        ("sparse_ms", [density] * MLP["hidden"] + [None]),
        ("dense_cublas_ms", [None] * (MLP["hidden"] + 1)),
    ):
        step = sgd_step(mlp([*dims, n_classes], dens, seed=seed), x, labels, lr)
        out[key] = gpu_ms(b, step, budget_s=1.0)
        del step  # free this MLP's device memory before the next
        cupy.get_default_memory_pool().free_all_blocks()
    out["speedup_vs_dense"] = out["dense_cublas_ms"] / out["sparse_ms"]
    try:
        out.update(engine_steps(dims, n_classes, batch, density, lr, seed))
        out["engine_speedup_vs_dense"] = out["dense_cublas_ms"] / out["engine_ms"]
    except Exception as e:  # reported, and the rest of the suite still runs
        out["engine_error"] = f"{type(e).__name__}: {e}"
    cupy.get_default_memory_pool().free_all_blocks()
    out["torch_masked_dense_ms"] = torch_step(dims, n_classes, batch, density, lr, seed)
    if out["torch_masked_dense_ms"]:
        out["speedup_vs_torch"] = out["torch_masked_dense_ms"] / out["sparse_ms"]
    return out


def sgd_step(model, x, labels, lr, device="cuda"):
    """One training step of ``model`` (a sparsecore.layers Sequential, moved to ``device``
    here) as a zero-argument call: forward, softmax cross-entropy, backward, plain SGD. x and
    labels must live on the device already."""
    model.to(device)
    loss_fn = SoftmaxCrossEntropy().to(device)
    opt = SGD(model.params(), lr=lr, momentum=0.0)

    def step():
        _, dlogits, _ = loss_fn(model.forward(x), labels)
        model.backward(dlogits)
        opt.step()

    return step


def torch_step(dims, n_classes, batch, density, lr, seed):
    """Masked-dense training in PyTorch on the GPU (the usual way to train sparse nets)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    torch.manual_seed(seed)
    dev = torch.device("cuda")
    layers, masks = [], []
    for fan_in, fan_out in zip(dims[:-1], dims[1:], strict=True):
        lin = torch.nn.Linear(fan_in, fan_out, device=dev)
        masks.append((torch.rand(fan_out, fan_in, device=dev) < density).float())
        with torch.no_grad():
            lin.weight.mul_(masks[-1])
        layers.append(lin)
    head = torch.nn.Linear(dims[-1], n_classes, device=dev)
    params = [p for m in [*layers, head] for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=lr)
    x = torch.randn(batch, dims[0], device=dev)
    y = torch.randint(0, n_classes, (batch,), device=dev)

    def step():
        h = x
        for lin, mk in zip(layers, masks, strict=True):
            h = torch.relu(torch.nn.functional.linear(h, lin.weight * mk, lin.bias))
        loss = torch.nn.functional.cross_entropy(head(h), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for lin, mk in zip(layers, masks, strict=True):
                lin.weight.mul_(mk)

    return 1e3 * median_s(step, warmup=3, reps=TORCH_REPS, sync=torch.cuda.synchronize)


def engine_steps(dims, n_classes, batch, density, lr, seed):
    """ms per step of sparsecore's own trainer on the device (TrainConfig(device="cuda")): the
    MLP dims + [n_classes] at uniform density (the head sparse too, unlike mlp_steps' compact
    step), SGD with momentum; and ms of one RigL topology update (exact grow, α = 0.3)."""
    import cupy

    from sparsecore import data as D
    from sparsecore.train import TrainConfig, Trainer

    r = np.random.default_rng(seed)
    n = 4 * batch
    x = r.standard_normal((n, dims[0]), dtype=np.float32)
    y = r.integers(0, n_classes, n)
    e = np.zeros((0, dims[0]), np.float32)
    data = D.Dataset("synthetic", x, y, e, np.zeros(0, np.int64), x[:batch], y[:batch], n_classes)
    cfg = TrainConfig(
        arch=[*dims, n_classes],
        sparsity=1 - density,
        distribution="uniform",
        method="rigl",
        delta_t=10**9,  # no topology update inside the timed steps
        batch_size=batch,
        lr=lr,
        epochs=1,
        progress=False,
        device="cuda",
    )
    tr = Trainer(cfg, data)
    xb = cupy.asarray(np.ascontiguousarray(x[:batch].T))
    yb = cupy.asarray(y[:batch])
    b = get_backend("cuda")
    out = {"engine_ms": gpu_ms(b, lambda: tr.train_step(xb, yb), budget_s=1.0)}

    def update():
        logits = tr.model.forward(xb)
        tr.model.backward(tr.loss_fn(logits, yb)[1])
        tr.updater.update(tr.updater.schedule.delta_t, tr.model, tr.opt)

    tr.updater.schedule = dataclasses.replace(tr.updater.schedule, delta_t=1, t_end=10**9)
    out["engine_update_ms"] = gpu_ms(b, update, budget_s=1.0, warmup=1, min_reps=2, max_reps=5)
    return out


# ---------------------------------------------------------------------------- report
# (the table: sparsecore/benchmarks/report.py, print_gpu_tables)


def main(argv=None):
    args = parse_args(argv)
    from kernels.validation import GPU_INSTALL, gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason is not None:
        print(
            f"gpu_suite: nothing to run here: {reason}.\n"
            f"It needs CuPy and a CUDA device: {GPU_INSTALL} on a machine with an NVIDIA GPU.",
            file=sys.stderr,
        )
        return 2
    import cupy

    t_start = time.perf_counter()

    def left():
        return args.time_limit - (time.perf_counter() - t_start)

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    res = {
        "device": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        "cupy": cupy.__version__,
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "python": platform.python_version(),
        "seed": args.seed,
        "timer": "wall clock to a stream sync after each call (sparsecore/benchmarks/timing.py)",
        "kernels": [],
        "grow_memory": [],
        "skipped": [],
    }
    print(f"gpu_suite on {res['device']} (CuPy {res['cupy']})", flush=True)
    if not args.skip_tests:
        res["tests"] = run_tests(left)
    shapes = QUICK_SHAPES + ([] if args.quick else FULL_SHAPES)
    for i, (m, n, b, d) in enumerate(shapes):
        if left() < 60:
            res["skipped"].append(f"kernels m={m} n={n} B={b} d={d}: time limit")
            continue
        t0 = time.perf_counter()
        bench_shape(m, n, b, d, args.seed + i, res["kernels"], res["grow_memory"])
        cupy.get_default_memory_pool().free_all_blocks()
        print(f"benchmarked m={m} n={n} B={b} d={d} ({time.perf_counter() - t0:.1f} s)", flush=True)
    if left() > 45:
        res["train_step"] = mlp_steps(args.quick, args.seed)
    else:
        res["skipped"].append("train step: time limit")
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    print_gpu_tables(res)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_suite.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nwrote {path} ({res['seconds']} s)")
    bad = [r["op"] + " " + r["shape"] for r in res["kernels"] if not r["correct"]]
    tests_failed = any(t.get("returncode") not in (0,) for t in res.get("tests", {}).values())
    if bad:
        print("WRONG RESULTS (not timed): " + "; ".join(bad))
    return 1 if bad or tests_failed else 0


if __name__ == "__main__":
    sys.exit(main())
