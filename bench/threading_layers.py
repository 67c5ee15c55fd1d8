"""Numba's threading layers (omp, tbb, workqueue) compared: fork safety, thread safety, speed.

    python bench/threading_layers.py                      # everything, 3 rounds (~10-15 min on 2 cores)
    python bench/threading_layers.py --rounds 1 --only fork,threads
    python bench/threading_layers.py --layers omp,tbb --only kernels,step --rounds 5

Every measurement runs in a fresh subprocess with ``NUMBA_THREADING_LAYER`` set (Numba fixes the
layer at the first parallel call, once per process). The layers of one round run back to back
in a rotating order, so the tbb/omp ratios are taken within a round (this machine is shared and
drifts); the tables give the median over rounds of each process's median, and the median of
the per-round ratios.

- fork: a kernel runs in the parent, then a ``fork`` Pool(2) maps 4 tasks that (a) call no kernel
  (a NumPy sum and a BLAS product), (b) call ``kernels.spmm``, (c) as (b) while another thread
  of the parent keeps calling kernels during the fork; ``get(timeout=...)``, then the pool is
  terminated. "b+guard" is (b) with the fail-fast guard of ``_fork_guard`` below.
- threads: 4 Python threads x 50 ``spmm`` calls on separate outputs, checked against SciPy.
- spin: how long the pool threads stay runnable (busy-wait) after a kernel or a BLAS product
  returns, sampled from /proc/self/task/*/stat.
- kernels: each kernel alone (back-to-back calls), then alternating with a NumPy sgemm.
- step: ``Trainer.train_step`` for 784-4096-4096-10 at 99% sparsity on the bundled MNIST.

The ``tbb`` wheel from PyPI puts ``libtbb.so.12`` in ``<prefix>/lib``, which the dynamic loader
does not search in a venv, so Numba does not find it ("TBB Threading Layer Available: False").
``import kernels`` loads it by absolute path first (kernels/_threads.py; the same fix as
LD_LIBRARY_PATH=<prefix>/lib).

``import kernels`` sets GOMP_SPINCOUNT=10000 and OPENBLAS_THREAD_TIMEOUT=4 (kernels/_threads.py)
in every layer; "omp-defaults" (only in the spin probe) runs with SPARSECORE_THREAD_SETUP=0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/ holds a kernels.py: put the repository first so that `import kernels` is the package
sys.path.insert(0, str(ROOT))


def _timer():
    """sparsecore/benchmarks/timing.py loaded from its file: it needs only NumPy, and importing
    the package would run sparsecore's thread setup in this parent, whose environment
    (GOMP_SPINCOUNT, OPENBLAS_THREAD_TIMEOUT) every child inherits, the "defaults" rows too."""
    import importlib.util

    path = ROOT / "sparsecore" / "benchmarks" / "timing.py"
    spec = importlib.util.spec_from_file_location("_threading_layers_timing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.median_time


median_time = _timer()

LAYERS = ("omp", "tbb", "workqueue")
TASKS = ("fork", "threads", "spin", "kernels", "step")
TIMEOUTS = {"fork": 120, "threads": 180, "spin": 240, "kernels": 900, "step": 900}


# ----------------------------------------------------------------------------- child side
def _median_ms(xs):
    return 1e3 * statistics.median(xs)


def _time_calls(fn, *, min_reps=5, max_reps=60, budget_s=1.0, warmup=2):
    """Median ms of fn() by the benchmarks' one timer (sparsecore/benchmarks/timing.py)."""
    t = median_time(fn, warmup=warmup, min_reps=min_reps, max_reps=max_reps, budget_s=budget_s)
    return 1e3 * t["median_s"]


def _setup_problem(m, density, batch=128, seed=0):
    import numpy as np

    import sparsecore

    rng = np.random.default_rng(seed)
    W = sparsecore.CSR.random((m, m), density, seed=seed)
    X = rng.standard_normal((m, batch), dtype=np.float32)
    dY = rng.standard_normal((m, batch), dtype=np.float32)
    return W, X, dY


def _kernel_calls(W, X, dY):
    import numpy as np

    import kernels

    m, n = W.shape
    B = X.shape[1]
    y = np.empty((m, B), np.float32)
    dx = np.empty((n, B), np.float32)
    g = np.empty(W.nnz, np.float32)
    k = max(1, W.nnz // 10)
    return {
        "spmm": lambda: kernels.spmm(W, X, out=y),
        "spmm_t": lambda: kernels.spmm_t(W, dY, out=dx),
        "sddmm": lambda: kernels.sddmm(W, dY, X, out=g),
        "topk_grow": lambda: kernels.topk_grow(W, dY, X, k),
    }


_FORK_STATE = {"forked": False}


def _fork_guard():
    """The fail-fast alternative for omp: mark a forked child; a kernel called there raises."""
    os.register_at_fork(after_in_child=lambda: _FORK_STATE.__setitem__("forked", True))


def _guarded_spmm(W, X):
    import numba

    import kernels

    if _FORK_STATE["forked"] and numba.threading_layer() == "omp":
        raise RuntimeError(
            "sparsecore kernel called in a fork()ed child of a process that already ran a "
            "kernel under Numba's 'omp' (GNU OpenMP) threading layer, which is not fork-safe; "
            "use the 'tbb' layer, or multiprocessing start method 'spawn'/'forkserver'"
        )
    return kernels.spmm(W, X)


_G = {}


def _task_no_kernel(i):
    import numpy as np

    a = np.ones((256, 256), np.float32)
    return os.getpid(), float(np.ones(10).sum() + (a @ a)[0, 0])


def _task_kernel(i):
    import kernels

    return os.getpid(), float(kernels.spmm(_G["W"], _G["X"]).sum())


def _task_kernel_guarded(i):
    return os.getpid(), float(_guarded_spmm(_G["W"], _G["X"]).sum())


def child_fork(case, timeout):
    import multiprocessing as mp

    import numba
    import numpy as np

    import kernels
    import sparsecore

    if case == "b+guard":
        _fork_guard()
    W = sparsecore.CSR.random((512, 512), 0.1, seed=0)
    X = np.ones((512, 64), np.float32)
    _G.update(W=W, X=X)
    ref = float(kernels.spmm(W, X).sum())
    fn = {
        "a": _task_no_kernel,
        "b": _task_kernel,
        "b+guard": _task_kernel_guarded,
        "c": _task_kernel,
    }[case]
    stop = None
    if case == "c":  # fork while another parent thread keeps calling kernels
        import threading

        stop = threading.Event()

        def busy():
            y = np.empty((512, 64), np.float32)
            while not stop.is_set():
                kernels.spmm(W, X, out=y)

        threading.Thread(target=busy, daemon=True).start()
        time.sleep(0.2)
    pool = mp.get_context("fork").Pool(2)
    pids_before = sorted(p.pid for p in pool._pool)
    t0 = time.perf_counter()
    res = pool.map_async(fn, range(4))
    try:
        out = res.get(timeout=timeout)
        ok = all(abs(v - ref) < 1e-3 * abs(ref) for _, v in out) if case != "a" else True
        outcome = "ok" if ok else "WRONG RESULT"
    except mp.TimeoutError:
        outcome = f"HANG (no result in {timeout:g} s)"
    except Exception as e:  # noqa: BLE001  (the guard's error arrives here)
        outcome = f"raised {type(e).__name__}: {str(e)[:60]}..."
    dt = time.perf_counter() - t0
    pids_after = sorted(p.pid for p in pool._pool)
    if stop is not None:
        stop.set()
    pool.terminate()
    pool.join()
    return {
        "layer": numba.threading_layer(),
        "outcome": outcome,
        "seconds": round(dt, 3),
        "workers_replaced": len(set(pids_before) - set(pids_after)),
    }


def child_threads(n_threads=4, n_calls=50):
    import threading

    import numba
    import numpy as np

    import kernels

    W, X, _ = _setup_problem(2048, 0.02)
    ref = W.to_scipy() @ X
    kernels.spmm(W, X)  # start the pool in the main thread first
    outs = [np.empty((W.shape[0], X.shape[1]), np.float32) for _ in range(n_threads)]
    errors = [0] * n_threads
    barrier = threading.Barrier(n_threads)

    def work(t):
        barrier.wait()
        for _ in range(n_calls):
            outs[t].fill(np.nan)
            kernels.spmm(W, X, out=outs[t])
            if not np.allclose(outs[t], ref, rtol=1e-4, atol=1e-4):
                errors[t] += 1

    th = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    t0 = time.perf_counter()
    for t in th:
        t.start()
    for t in th:
        t.join()
    return {
        "layer": numba.threading_layer(),
        "outcome": "ok" if not any(errors) else f"WRONG in {sum(errors)} of {n_threads * n_calls}",
        "seconds": round(time.perf_counter() - t0, 3),
    }


def child_spin(trials=20, horizon_s=0.05):
    """How long other threads of the process stay runnable (state R in /proc/self/task/*/stat:
    busy-waiting) after a kernel, or a BLAS product, returns; the caller polls every ~0.2 ms
    and sleeps in between. CPU-time counters are not used: for a thread running on another core
    they lag by up to a scheduler tick."""
    import threading

    import numba
    import numpy as np

    W, X, dY = _setup_problem(4096, 0.01)
    calls = _kernel_calls(W, X, dY)
    A = np.ones((4096, 128), np.float32)
    B = np.ones((128, 1024), np.float32)
    me = threading.get_native_id()

    def others_running():
        n = 0
        for t in os.listdir("/proc/self/task"):
            if int(t) == me:
                continue
            try:
                with open(f"/proc/self/task/{t}/stat") as f:
                    st = f.read()
            except OSError:
                continue
            n += st[st.rindex(")") + 2] == "R"
        return n

    def last_running_ms(fn):
        fn()
        t0 = time.perf_counter()
        last = 0.0
        while (t := time.perf_counter() - t0) < horizon_s:
            if others_running():
                last = t
            time.sleep(0.0002)
        return 1e3 * last

    out = {}
    for what, fn in (("kernel", calls["spmm"]), ("blas", lambda: A @ B)):
        for _ in range(3):
            fn()
        r = [last_running_ms(fn) for _ in range(trials)]
        out[f"after {what}: median ms"] = round(statistics.median(r), 2)
        out[f"after {what}: max ms"] = round(max(r), 2)
        out[f"after {what}: trials > 0.3 ms"] = f"{sum(x > 0.3 for x in r)}/{trials}"
    out["layer"] = numba.threading_layer()
    return out


def child_kernels(reps_scale=1.0):
    import numba
    import numpy as np

    out = {"alone": {}, "interleaved": {}}
    budget = 1.0 * reps_scale
    # (i) each kernel alone, back to back (the BLAS inside topk_grow aside)
    for density in (0.01, 0.1):
        W, X, dY = _setup_problem(4096, density)
        for name, fn in _kernel_calls(W, X, dY).items():
            out["alone"][f"{name} d={density}"] = _time_calls(fn, budget_s=budget)
    # (ii) alternating with a NumPy sgemm, as in a training step
    W, X, dY = _setup_problem(4096, 0.01)
    calls = _kernel_calls(W, X, dY)
    rng = np.random.default_rng(1)
    gemms = {
        "128x4096@4096x10": (
            rng.standard_normal((128, 4096), dtype=np.float32),
            rng.standard_normal((4096, 10), dtype=np.float32),
        ),
        "4096x128@128x1024": (
            rng.standard_normal((4096, 128), dtype=np.float32),
            rng.standard_normal((128, 1024), dtype=np.float32),
        ),
    }
    for gname, (A, B) in gemms.items():
        C = np.empty((A.shape[0], B.shape[1]), np.float32)
        out["interleaved"][f"blas alone {gname}"] = _time_calls(
            lambda: np.matmul(A, B, out=C), budget_s=budget
        )
        for name in ("spmm", "spmm_t", "sddmm"):
            fn = calls[name]
            tk, tb = [], []
            for i in range(int(60 * reps_scale) + 3):
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                np.matmul(A, B, out=C)
                t2 = time.perf_counter()
                if i >= 3:
                    tk.append(t1 - t0)
                    tb.append(t2 - t1)
            out["interleaved"][f"{name} after {gname}"] = _median_ms(tk)
            out["interleaved"][f"{gname} after {name}"] = _median_ms(tb)
    out["layer"] = numba.threading_layer()
    return out


def child_step(steps=200, warmup=10, delta_t=25):
    import warnings

    import numba
    import numpy as np

    from sparsecore.train import TrainConfig, Trainer

    cfg = TrainConfig(
        arch=[784, 4096, 4096, 10],
        sparsity=0.99,
        method="rigl",
        delta_t=delta_t,
        epochs=10**6,
        max_steps=10**7,
        progress=False,
        seed=0,
    )
    tr = Trainer(cfg)
    x, y = tr.data.x_train, tr.data.y_train
    batches = (i for e in range(10**6) for i in tr.batches(e))
    plain, update = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fpmode's "reached 1 of 2" under tbb
        with tr.fp_mode():
            for s in range(warmup + steps):
                idx = next(batches)
                xb, yb = np.ascontiguousarray(x[idx].T), y[idx]
                t0 = time.perf_counter()
                _, _, report = tr.train_step(xb, yb)
                dt = time.perf_counter() - t0
                if s >= warmup:
                    (update if report is not None else plain).append(dt)
    return {
        "layer": numba.threading_layer(),
        "step_median_ms": _median_ms(plain),
        "step_mean_ms": 1e3 * statistics.fmean(plain),
        "update_step_median_ms": _median_ms(update) if update else float("nan"),
        "n_steps": len(plain),
        "n_updates": len(update),
    }


def child_main(args):
    import kernels  # noqa: F401  (thread settings before NumPy loads OpenBLAS; loads tbb)
    from kernels._threads import _state

    tbb_path = _state.get("tbb")  # the tbb wheel's library, loaded by absolute path

    t0 = time.perf_counter()
    if args.child == "fork":
        res = child_fork(args.case, args.fork_timeout)
    elif args.child == "threads":
        res = child_threads()
    elif args.child == "spin":
        res = child_spin()
    elif args.child == "kernels":
        res = child_kernels(args.reps_scale)
    elif args.child == "step":
        res = child_step()
    else:
        raise SystemExit(f"unknown task {args.child}")
    res["tbb_preloaded"] = tbb_path
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- parent side
def run_child(task, layer, *, extra=(), env_extra=None, timeout=None):
    env = dict(os.environ)
    env.pop("SPARSECORE_THREAD_SETUP", None)
    env["NUMBA_THREADING_LAYER"] = layer
    env.update(env_extra or {})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", task, *extra]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            cmd,
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout or TIMEOUTS[task],
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as e:
        # start_new_session: kill the child's whole group (its Pool workers too)
        return {"outcome": f"TIMEOUT after {e.timeout} s (killed)", "rc": None, "stderr": ""}
    res = {}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
    res["rc"] = p.returncode
    msgs = sorted(
        {
            ln.strip()
            for ln in p.stderr.splitlines()
            if "terminating" in ln.lower() or "error" in ln.lower()
        }
    )
    res["stderr"] = " | ".join(msgs)[:300]
    if "outcome" not in res and p.returncode != 0:
        res["outcome"] = f"process died rc={p.returncode}"
    res["parent_wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def _versions():
    out = {"python": sys.version.split()[0]}
    from importlib import metadata

    for d in ("numba", "llvmlite", "numpy", "scipy", "tbb"):
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = "absent"
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for ln in cpu.splitlines():
            if ln.startswith(("Model name", "CPU(s):")):
                k, v = ln.split(":", 1)
                out[k.strip()] = v.strip()
    except OSError:
        pass
    out["loadavg"] = os.getloadavg()
    return out


def _fmt(x):
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def parent_main(args):
    layers = args.layers.split(",")
    only = args.only.split(",")
    print("# Numba threading layers\n")
    print("versions/machine:", json.dumps(_versions()), "\n", flush=True)

    if "fork" in only:
        print("## fork: Pool(2) after a kernel ran in the parent\n")
        print("| layer | case | outcome | workers replaced | Numba's message (stderr) |")
        print("|---|---|---|---|---|")
        for layer in layers:
            for case in ("a", "b", "c") + (("b+guard",) if layer == "omp" else ()):
                r = run_child("fork", layer, extra=["--case", case])
                print(
                    f"| {r.get('layer', layer)} | {case} | {r.get('outcome')} | "
                    f"{r.get('workers_replaced', '?')} | {r.get('stderr') or '-'} |",
                    flush=True,
                )
        print()

    if "threads" in only:
        print("## threads: 4 Python threads x 50 spmm calls, separate outputs\n")
        print("| layer | outcome | seconds | rc | stderr |")
        print("|---|---|---|---|---|")
        for layer in layers:
            r = run_child("threads", layer)
            print(
                f"| {r.get('layer', layer)} | {r.get('outcome')} | {r.get('seconds', '-')} | "
                f"{r.get('rc')} | {r.get('stderr') or '-'} |",
                flush=True,
            )
        print()

    if "spin" in only:
        print(
            "## spin: how long another thread stays runnable (busy-waits) after a call returns "
            "(spmm d=0.01 / 4096x128@128x1024 sgemm; 20 trials, horizon 50 ms)\n"
        )
        cols = [
            f"after {w}: {s}"
            for w in ("kernel", "blas")
            for s in ("median ms", "max ms", "trials > 0.3 ms")
        ]
        print("| setup | " + " | ".join(cols) + " |")
        print("|---" * (len(cols) + 1) + "|")
        setups = [(layer, layer, {}) for layer in layers]
        if "omp" in layers:
            setups.append(
                (
                    "omp-defaults (SPARSECORE_THREAD_SETUP=0)",
                    "omp",
                    {"SPARSECORE_THREAD_SETUP": "0"},
                )
            )
        for label, layer, env in setups:
            r = run_child("spin", layer, env_extra=env)
            print(
                f"| {label} | " + " | ".join(_fmt(r.get(c, "-")) for c in cols) + " |", flush=True
            )
        print()

    perf_tasks = [t for t in ("kernels", "step") if t in only]
    runs = {t: {layer: [] for layer in layers} for t in perf_tasks}
    for rnd in range(args.rounds):
        order = layers[rnd % len(layers) :] + layers[: rnd % len(layers)]
        for task in perf_tasks:
            for layer in order:
                r = run_child(task, layer, extra=["--reps-scale", str(args.reps_scale)])
                if r.get("rc") != 0:
                    print(
                        f"round {rnd} {task} {layer}: {r.get('outcome')} {r.get('stderr')}",
                        flush=True,
                    )
                    continue
                r["round"] = rnd
                runs[task][layer].append(r)
                print(
                    f"[round {rnd + 1}/{args.rounds}] {task} {layer}: done in "
                    f"{r.get('parent_wall_s')} s, load {os.getloadavg()[0]:.2f}",
                    file=sys.stderr,
                    flush=True,
                )

    def table(task, extract, title):
        keys = None
        for layer in layers:
            for r in runs[task][layer]:
                keys = keys or list(extract(r))
        if not keys:
            return
        print(f"## {title}\n")
        print(
            "medians over rounds of each process's median, ms; ratio = median over rounds of "
            "(layer / omp) within a round\n"
        )
        others = [la for la in layers if la != "omp"]
        head = "| measurement | " + " | ".join(f"{la} ms" for la in layers)
        head += "".join(f" | {la}/omp" for la in others if "omp" in layers) + " |"
        print(head)
        print("|---" * (head.count("|") - 1) + "|")
        for k in keys:
            vals = {la: [extract(r)[k] for r in runs[task][la]] for la in layers}
            row = f"| {k} | " + " | ".join(
                f"{statistics.median(vals[la]):.3f}" if vals[la] else "-" for la in layers
            )
            if "omp" in layers:
                for la in others:
                    base = {r["round"]: extract(r)[k] for r in runs[task]["omp"]}
                    ratios = [
                        extract(r)[k] / base[r["round"]]
                        for r in runs[task][la]
                        if base.get(r["round"])
                    ]
                    row += f" | {statistics.median(ratios):.2f}" if ratios else " | -"
            print(row + " |")
        print(flush=True)

    if args.raw and perf_tasks:
        Path(args.raw).write_text(json.dumps(runs, indent=1))
        print(f"(per-process results: {args.raw})\n")
    if "kernels" in perf_tasks:
        table(
            "kernels",
            lambda r: r["alone"],
            "(i) kernels alone: W 4096x4096, batch 128, feature-major",
        )
        table(
            "kernels",
            lambda r: r["interleaved"],
            "(ii) kernels alternating with a NumPy sgemm (W 4096x4096 d=0.01, batch 128)",
        )
    if "step" in perf_tasks:
        table(
            "step",
            lambda r: {
                k: r[k] for k in ("step_median_ms", "step_mean_ms", "update_step_median_ms")
            },
            "(iii) train_step, 784-4096-4096-10 at 99% sparsity, RigL every 25 steps, batch 128",
        )


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", default=",".join(LAYERS))
    ap.add_argument("--only", default=",".join(TASKS), help=f"comma-separated subset of {TASKS}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps-scale", type=float, default=1.0, help="scale the repetitions")
    ap.add_argument("--raw", help="write every process's results (JSON) to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--case", default="a", help=argparse.SUPPRESS)
    ap.add_argument("--fork-timeout", type=float, default=20.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
