"""``sparsecore bench``: what sparsity buys on your shapes, measured, in one command.

Three levels, each optional (``--levels``):

- ``kernels``: forward (spmm), dX (spmm_t), dW (sddmm) and the fused grow at each density beside
  dense BLAS of the same shape, scipy.sparse CSR and torch.sparse CSR (when torch is installed);
  every result checked against a float64 reference before it is timed.
- ``step``: one full training step of the MLP 784-W-W-10 (forward, backward, optimizer, the RigL
  topology update amortised over ΔT) at each sparsity, against the same MLP trained densely with
  NumPy, masked-dense RigL in PyTorch and static torch.sparse training; one subprocess per
  configuration, whose peak RSS is that configuration's alone; analytical FLOPs and bytes of
  training state beside the measured time and memory.
- ``scaling``: the step at growing widths with a fixed fan-in (nnz ∝ W, dense size ∝ W²): the
  steps between updates should grow like nnz; the exact grow (∝ W²) is reported apart.

Outputs in ``--out``: ``bench.json`` (everything, with the machine), ``bench.md`` (tables),
PNG plots; ``--results bench/RESULTS.md`` regenerates the part of that file between its markers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

import sparsecore  # noqa: F401  (thread setup before the libraries below load)
from sparsecore.benchmarks import kernels as K
from sparsecore.benchmarks.common import environment, log_crossing, try_torch

STEP_IMPLS = ("sparsecore", "dense", "torch-masked", "torch-sparse")
BASELINES = ("scipy", "torch", "torch-masked", "torch-sparse")
COLORS = {"sparsecore": "C3", "torch-masked": "C2", "torch-sparse": "C4", "dense": "k"}
TARGET = dict(width=4096, sparsity=0.99, speedup_dense=20.0, speedup_masked=30.0, memory=20.0)

PRESETS = {
    "quick": dict(
        kernels=K.PRESETS["quick"],
        step=dict(
            widths=[1024],
            sparsities=[0.9, 0.99],
            baseline_sparsities=[0.9, 0.99],
            steps={1024: 12},
            updates=2,
        ),
        scaling=dict(widths=[1024, 2048, 4096], fan_in=32, steps=10),
        interleave=False,
        samples=2048,
    ),
    "full": dict(
        kernels=K.PRESETS["full"],
        step=dict(
            widths=[1024, 4096, 16384],
            sparsities=[0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999],
            baseline_sparsities=[0.5, 0.9, 0.99, 0.999],  # torch: at these only
            min_sparsity={16384: 0.8},  # denser: minutes per configuration
            steps={1024: 40, 4096: 30, 16384: 10},
            updates=2,
        ),
        scaling=dict(widths=[2048, 4096, 8192, 16384, 32768], fan_in=64, steps=20),
        interleave=True,
        samples=8192,
    ),
}


# ----------------------------------------------------------------------------------- running
def worker_env(threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        for var in (
            "NUMBA_NUM_THREADS",
            "OMP_NUM_THREADS",
            "OPENBLAS_NUM_THREADS",
            "MKL_NUM_THREADS",
        ):
            env[var] = str(threads)
    return env


WORKER_TIMEOUT_S = 3600  # one configuration; a hung worker must not hang the suite


def run_worker(config: dict, threads: int | None) -> dict:
    """One configuration in a fresh process: its own time and its own peak memory."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "sparsecore.benchmarks.step", json.dumps(config)],
            capture_output=True,
            text=True,
            env=worker_env(threads),
            check=False,
            timeout=WORKER_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"benchmark worker for {config} ran past {WORKER_TIMEOUT_S} s and was stopped"
        ) from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise RuntimeError(f"benchmark worker failed for {config}:\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_jobs(cfg: dict, impls, batch: int, delta_t: int, data: str) -> list[dict]:
    jobs = []
    for w in cfg["widths"]:
        arch = [784, w, w, 10]
        common = dict(
            arch=arch,
            batch=batch,
            delta_t=delta_t,
            data=data,
            updates=cfg["updates"],
            steps=cfg["steps"].get(w, 20) if isinstance(cfg["steps"], dict) else cfg["steps"],
        )
        if "dense" in impls:
            jobs.append(dict(common, impl="dense", sparsity=0.0))
        for s in cfg["sparsities"]:
            if s < cfg.get("min_sparsity", {}).get(w, 0.0):
                continue
            if "sparsecore" in impls:
                jobs.append(dict(common, impl="sparsecore", sparsity=s))
            for impl in ("torch-masked", "torch-sparse"):  # baselines: at fewer sparsities
                if impl in impls and s in cfg["baseline_sparsities"]:
                    jobs.append(dict(common, impl=impl, sparsity=s))
    return jobs


def scaling_jobs(cfg: dict, batch: int, delta_t: int, data: str) -> list[dict]:
    """Fixed fan-in F: uniform sparsity 1 - F/W, so the W×W layer holds F·W nonzeros."""
    return [
        dict(
            impl="sparsecore",
            arch=[784, w, w, 10],
            sparsity=1.0 - cfg["fan_in"] / w,
            distribution="uniform",
            batch=batch,
            delta_t=delta_t,
            data=data,
            steps=cfg["steps"],
            updates=2,
        )
        for w in cfg["widths"]
    ]


def run_jobs(jobs, threads, desc, progress):
    out = []
    for job in tqdm(jobs, desc=desc, disable=not progress):
        res = run_worker(job, threads)
        out.append(res)
    return out


# ----------------------------------------------------------------------------------- analysis
def step_table(results: list[dict]) -> dict:
    """Per width: the dense reference and, per sparsity, each implementation's result."""
    by_w: dict = {}
    for r in results:
        c = r["config"]
        w = c["arch"][1]
        d = by_w.setdefault(w, {"dense": None, "rows": {}})
        if c["impl"] == "dense":
            d["dense"] = r
        else:
            d["rows"].setdefault(c["sparsity"], {})[c["impl"]] = r
    return by_w


def step_break_even(entry) -> float | None:
    dense = entry["dense"]
    if dense is None:
        return None
    pts = [
        (1.0 - s, dense["amortised_step_s"] / row["sparsecore"]["amortised_step_s"])
        for s, row in entry["rows"].items()
        if "sparsecore" in row
    ]
    return log_crossing(pts)


def fmt_density(be):
    if be is None:
        return "–"
    return ">max" if be == float("inf") else ("<min" if be == 0.0 else f"{be:.1%}")


def mib(b):
    return f"{b / 2**20:.1f}"


def markdown(res: dict) -> str:
    env = res["environment"]
    L = [
        f"Preset `{res['preset']}`, {env['date']}. Command: `{res['command']}`\n",
        f"- Machine: {env['cpu']}, {env['cores']} cores; flags: {env['cpu_flags']}",
        f"- Python {env['python']}, NumPy {env['numpy']}, SciPy {env['scipy']}, "
        f"Numba {env['numba']}, torch {env['torch']}, sparsecore {env['sparsecore']}",
    ]
    for level, how in res.get("runs", {}).items():  # results assembled from several runs
        L.append(f"- {level}: {how}")
    th = env["threads"]
    blas = ", ".join(
        f"{b['internal_api']} {b['version']} ({b['num_threads']} threads)" for b in th["blas"]
    )
    L.append(
        f"- Threads: Numba `{th['numba_threading_layer']}` × {th['numba_threads']}; BLAS: {blas}; "
        f"worker threads: {res['threads'] or 'all cores'}"
    )
    L.append("")
    if res.get("step"):
        L += step_markdown(res["step"], res["batch"], res["delta_t"])
    if res.get("scaling"):
        L += scaling_markdown(res["scaling"], res["delta_t"])
    if res.get("kernels"):
        k = res["kernels"]
        L.append("## Kernel level\n")
        md = K.markdown(k["environment"], k["products"], k["grow"], k["interleaved"], res["preset"])
        L += md.splitlines()[4:]  # the machine lines are above already
    return "\n".join(L) + "\n"


def step_markdown(results, batch, delta_t) -> list[str]:
    L = ["## Training step: sparse vs dense vs masked-dense\n"]
    L.append(
        f"MLP 784-W-W-10, batch {batch}, ERK densities, SGD with momentum; RigL's topology "
        f"update amortised over ΔT = {delta_t} (ms below are medians of the steps between "
        "updates plus the amortised update). × = how many times faster sparsecore is. State = "
        "analytical bytes of training state (weights, indices, transpose structure, gradients, "
        "moments); RSS = measured peak RSS of the configuration's own process above its baseline "
        "(interpreter, libraries, mapped data, compiled kernels), which also holds activations "
        "and allocator slack.\n"
    )
    table = step_table(results)
    for w, entry in sorted(table.items()):
        dense = entry["dense"]
        L.append(f"### W = {w}\n")
        L.append(
            "| sparsity | nnz | sparsecore ms | update ms | dense ms | × dense | masked ms | × masked "
            "| torch.sparse ms | × torch.sparse | GFLOP/step sparse / dense | state MiB sparse / dense / masked "
            "| RSS MiB sparse / dense / masked |"
        )
        L.append("|" + "---|" * 13)
        for s, row in sorted(entry["rows"].items()):
            o = row.get("sparsecore")
            m = row.get("torch-masked")
            t = row.get("torch-sparse")
            if o is None:
                continue
            ms = o["amortised_step_s"] * 1e3

            def cell(r):
                return (
                    [
                        f"{r['amortised_step_s'] * 1e3:.2f}",
                        f"{r['amortised_step_s'] * 1e3 / ms:.1f}",
                    ]
                    if r
                    else ["–", "–"]
                )

            L.append(
                "| "
                + " | ".join(
                    [
                        f"{s:.1%}",
                        f"{o['nnz']:,}",
                        f"{ms:.2f}",
                        f"{o['update_step_s'] * 1e3:.0f}" if o["update_step_s"] else "–",
                        *cell(dense),
                        *cell(m),
                        *cell(t),
                        f"{o['flops_per_step'] / 1e9:.3f} / {o['flops_per_step_dense'] / 1e9:.2f}",
                        f"{mib(o['state_bytes'])} / {mib(o['state_bytes_dense'])} / "
                        + (mib(m["state_bytes"]) if m else "–"),
                        f"{o['model_rss_mib']:.0f} / "
                        + (f"{dense['model_rss_mib']:.0f}" if dense else "–")
                        + " / "
                        + (f"{m['model_rss_mib']:.0f}" if m else "–"),
                    ]
                )
                + " |"
            )
        L.append(
            f"\nBreak-even density of the training step against dense NumPy at W = {w}: "
            f"{fmt_density(step_break_even(entry))}\n"
        )
    tw = table.get(TARGET["width"])
    row = tw["rows"].get(TARGET["sparsity"]) if tw else None
    if row and "sparsecore" in row and tw["dense"] is not None:
        o = row["sparsecore"]
        sd = tw["dense"]["amortised_step_s"] / o["amortised_step_s"]
        line = (
            f"**784-{TARGET['width']}-{TARGET['width']}-10 at {TARGET['sparsity']:.0%}**: step "
            f"{sd:.1f}× faster than dense NumPy (target ≥ {TARGET['speedup_dense']:.0f}×)"
        )
        m = row.get("torch-masked")
        if m:
            sm = m["amortised_step_s"] / o["amortised_step_s"]
            mem = m["state_bytes"] / o["state_bytes"]
            line += (
                f", {sm:.1f}× faster than masked-dense PyTorch RigL (target ≥ "
                f"{TARGET['speedup_masked']:.0f}×), training state 1/{mem:.0f} of masked-dense "
                f"(target ≤ 1/{TARGET['memory']:.0f})"
            )
        L.append(line + ".\n")
    return L


def scaling_markdown(results, delta_t) -> list[str]:
    L = ["## Does the step cost follow nnz or the dense size?\n"]
    fan = results[0]["config"]
    L.append(
        "MLP 784-W-W-10, uniform sparsity 1 − F/W (fixed fan-in F = "
        f"{round((1 - fan['sparsity']) * fan['arch'][1])}): doubling W doubles nnz and quadruples "
        "the dense size. Step = median of the steps between topology updates; the exact grow "
        f"(∝ dense size) is reported per update and amortised over ΔT = {delta_t}.\n"
    )
    L.append(
        "| W | nnz | dense weights | step ms | step ratio to W/2 | update ms | update ratio | "
        "amortised step ms | RSS MiB |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|")
    prev = None
    for r in sorted(results, key=lambda r: r["config"]["arch"][1]):
        w = r["config"]["arch"][1]
        dense_w = sum(
            a * b for a, b in zip(r["config"]["arch"][:-1], r["config"]["arch"][1:], strict=True)
        )
        ratio = f"{r['median_step_s'] / prev['median_step_s']:.2f}" if prev else "–"
        uratio = (
            f"{r['update_step_s'] / prev['update_step_s']:.2f}"
            if prev and r["update_step_s"] and prev["update_step_s"]
            else "–"
        )
        L.append(
            f"| {w} | {r['nnz']:,} | {dense_w:,} | {r['median_step_s'] * 1e3:.2f} | {ratio} | "
            f"{(r['update_step_s'] or 0) * 1e3:.0f} | {uratio} | {r['amortised_step_s'] * 1e3:.2f} | "
            f"{r['model_rss_mib']:.0f} |"
        )
        prev = r
    L.append("")
    return L


# ----------------------------------------------------------------------------------- plots
def plots(res: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if res.get("kernels"):
        files += K.plots(res["kernels"]["products"], out)
    if res.get("step"):
        table = step_table(res["step"])
        widths = sorted(table)
        for kind in ("speedup", "memory"):
            fig, axes = plt.subplots(1, len(widths), figsize=(6 * len(widths), 4.5), squeeze=False)
            for ax, w in zip(axes[0], widths, strict=True):
                entry = table[w]
                dense = entry["dense"]
                for impl in ("sparsecore", "torch-masked", "torch-sparse"):
                    pts = sorted(
                        (1 - s, row[impl]) for s, row in entry["rows"].items() if impl in row
                    )
                    if not pts:
                        continue
                    xs = [p[0] for p in pts]
                    if kind == "speedup" and dense is not None:
                        ys = [dense["amortised_step_s"] / p[1]["amortised_step_s"] for p in pts]
                    elif kind == "memory":
                        ys = [max(p[1]["model_rss_mib"], 0.1) for p in pts]
                        ax.plot(
                            xs,
                            [p[1]["state_bytes"] / 2**20 for p in pts],
                            ls="--",
                            color=COLORS[impl],
                            alpha=0.6,
                            label=f"{impl} state (analytical)",
                        )
                    else:
                        continue
                    ax.plot(xs, ys, marker="o", color=COLORS[impl], label=impl)
                if kind == "speedup":
                    ax.axhline(1.0, color="k", lw=1, label="dense NumPy")
                    be = step_break_even(entry)
                    if be and be != float("inf"):
                        ax.axvline(
                            be, ls=":", color=COLORS["sparsecore"], label=f"break-even {be:.0%}"
                        )
                    ax.set_ylabel("speed-up of a training step over dense NumPy")
                elif dense is not None:
                    ax.axhline(
                        dense["state_bytes"] / 2**20, color="k", ls="--", lw=1,
                        label="dense NumPy state (analytical)",
                    )  # fmt: skip
                    ax.axhline(
                        max(dense["model_rss_mib"], 0.1), color="k", lw=1, label="dense NumPy (RSS)"
                    )
                    ax.set_ylabel("MiB (peak RSS above baseline; dashed: state bytes)")
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("density")
                ax.set_title(f"784-{w}-{w}-10, batch {res['batch']}")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
            fig.tight_layout()
            path = out / f"step_{kind}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            files.append(path)
    if res.get("scaling"):
        rs = sorted(res["scaling"], key=lambda r: r["config"]["arch"][1])
        ws = np.array([r["config"]["arch"][1] for r in rs], float)
        step = np.array([r["median_step_s"] for r in rs]) * 1e3
        upd = np.array([r["update_step_s"] or np.nan for r in rs]) * 1e3
        fig, ax = plt.subplots(figsize=(7, 5))
        ax.plot(ws, step, marker="o", color="C3", label="step between updates (sparsecore)")
        ax.plot(ws, upd, marker="s", color="C1", label="topology update (exact grow)")
        ax.plot(ws, step[0] * ws / ws[0], ls=":", color="C3", label="∝ nnz (∝ W)")
        ax.plot(ws, step[0] * (ws / ws[0]) ** 2, ls="--", color="k", label="∝ dense size (∝ W²)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("hidden width W (fixed fan-in)")
        ax.set_ylabel("ms")
        ax.set_title("Time per step vs width at fixed fan-in")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / "step_scaling.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path)
    return files


# ----------------------------------------------------------------------------------- CLI
def _numbers(s, kind, what):
    try:
        vals = [kind(x) for x in s.split(",") if x.strip()]
    except ValueError:
        vals = None
    ok = (lambda v: 0 < v < 2**31) if kind is int else (lambda v: 0 < v < math.inf)
    if not vals or not all(ok(v) for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {s!r}")
    return vals


def _floats(s):
    return _numbers(s, float, "finite positive numbers like 0.01,0.1")


def _ints(s):
    return _numbers(s, int, "positive integers like 1024,4096")


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="quick",
        help="quick: about a minute (CI smoke run); full: the sweeps of bench/RESULTS.md",
    )
    p.add_argument("--out", default="bench/out", help="folder for bench.json, bench.md and PNGs")
    p.add_argument(
        "--levels",
        default="kernels,step,scaling",
        help="comma-separated subset of kernels,step,scaling",
    )
    p.add_argument(
        "--widths",
        type=_ints,
        default=None,
        help="layer widths W (kernels: m = k = W; step: 784-W-W-10), e.g. 1024,4096",
    )
    p.add_argument(
        "--batch-sizes",
        type=_ints,
        default=None,
        help="kernel batch sizes; the first is the step's batch (default 128)",
    )
    p.add_argument(
        "--densities", type=_floats, default=None, help="kernel densities, e.g. 0.01,0.1"
    )
    p.add_argument(
        "--sparsities", type=_floats, default=None, help="step sparsities, e.g. 0.9,0.99"
    )
    p.add_argument(
        "--delta-t", type=int, default=100, help="ΔT the topology update is amortised over"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for every implementation (default: all cores)",
    )
    p.add_argument(
        "--baselines",
        default=",".join(BASELINES),
        help="comma-separated subset of " + ",".join(BASELINES) + " (dense BLAS/NumPy always runs)",
    )
    p.add_argument(
        "--results", default=None, help="Markdown file to regenerate between its markers"
    )
    p.add_argument("--from-json", default=None, help="rebuild tables and plots from a bench.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def _check_list(name, values, allowed):
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"{name} must be a subset of {','.join(allowed)}, got {bad}")


def _read_json(path) -> dict:
    """A bench.json written by this suite (or the former kernel-level JSON), or a ValueError
    saying what is wrong with the file."""
    try:
        res = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"--from-json: cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--from-json: {path} is not JSON ({e})") from None
    if not isinstance(res, dict) or "environment" not in res:
        raise ValueError(
            f"--from-json: {path} is not a sparsecore bench.json (expected an object with "
            "'environment' and kernels/step/scaling results)"
        )
    return res


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        res = _read_json(args.from_json)
        if "products" in res:  # a kernel-level JSON of the former bench/kernels.py
            res = {
                "preset": "full",
                "command": res["environment"].get("command", ""),
                "threads": None,
                "batch": 128,
                "delta_t": args.delta_t,
                "environment": res["environment"],
                "kernels": res,
            }
        try:
            return _report(res, out, args.results)
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            raise ValueError(
                f"--from-json: {args.from_json} is not a complete sparsecore bench.json "
                f"({type(e).__name__}: {e})"
            ) from None
    levels = [x for x in args.levels.split(",") if x]
    _check_list("--levels", levels, ("kernels", "step", "scaling"))
    baselines = [x for x in args.baselines.split(",") if x]
    _check_list("--baselines", baselines, BASELINES)
    for name, vals, lo, hi in (
        ("--densities", args.densities, 0.0, 1.0),
        ("--sparsities", args.sparsities, 0.0, 1.0),
    ):
        if vals and not all(lo < v < hi for v in vals):
            raise ValueError(f"{name} must lie in (0, 1), got {vals}")
    if args.threads is not None and not 1 <= args.threads <= 4096:
        raise ValueError(f"--threads must be between 1 and 4096, got {args.threads}")
    if args.delta_t < 1:
        raise ValueError(f"--delta-t must be >= 1, got {args.delta_t}")
    preset = PRESETS[args.preset]
    progress = not args.no_progress
    if args.threads:
        import numba
        from threadpoolctl import threadpool_limits

        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        threadpool_limits(args.threads)
    import numba

    torch = (
        try_torch(numba.get_num_threads())
        if {"torch", "torch-masked", "torch-sparse"} & set(baselines)
        else None
    )
    batch = (args.batch_sizes or [128])[0]
    res = {
        "preset": args.preset,
        "command": "sparsecore bench "
        + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
        "threads": args.threads,
        "batch": batch,
        "delta_t": args.delta_t,
        "environment": environment(torch),
    }
    if torch is None and {"torch", "torch-masked", "torch-sparse"} & set(baselines):
        print(
            "torch is not installed: torch baselines left out (pip install 'sparsecore-rigl[bench]')"
        )
    if "kernels" in levels:
        kcfg = dict(preset["kernels"])
        if args.widths:
            kcfg["sizes"] = args.widths
            kcfg["grow_sizes"] = [w for w in args.widths if w <= 16384]
        if args.batch_sizes:
            kcfg["batches"] = args.batch_sizes
        if args.densities:
            kcfg["densities"] = args.densities
        ktorch = torch if "torch" in baselines else None
        res["kernels"] = K.run(
            kcfg,
            ktorch,
            np.random.default_rng(args.seed),
            progress,
            interleave=preset["interleave"],
            scipy="scipy" in baselines,
        )
    if "step" in levels or "scaling" in levels:
        from sparsecore.benchmarks.step import prepare_data

        data = prepare_data(out / "data", preset["samples"])
        impls = ["sparsecore", "dense"] + (
            [b for b in baselines if b.startswith("torch-")] if torch else []
        )
        if "step" in levels:
            scfg = dict(preset["step"])
            if args.widths:
                scfg["widths"] = args.widths
            if args.sparsities:
                scfg["sparsities"] = scfg["baseline_sparsities"] = args.sparsities
            res["step"] = run_jobs(
                step_jobs(scfg, impls, batch, args.delta_t, data), args.threads, "step", progress
            )
        if "scaling" in levels:
            res["scaling"] = run_jobs(
                scaling_jobs(preset["scaling"], batch, args.delta_t, data),
                args.threads,
                "scaling",
                progress,
            )
    (out / "bench.json").write_text(json.dumps(res, indent=1))
    return _report(res, out, args.results)


def _report(res, out: Path, results_path) -> int:
    md = markdown(res)
    (out / "bench.md").write_text(md)
    files = plots(res, out)
    if results_path:
        K.write_results(md, Path(results_path))
    print(md)
    print("wrote " + ", ".join(str(p) for p in [out / "bench.json", out / "bench.md", *files]))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="sparsecore bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        print(f"sparsecore bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
