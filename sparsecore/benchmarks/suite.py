"""``sparsecore bench``: what sparsity buys on your shapes, measured, in one command.

Five levels, each optional (``--levels``):

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
- ``torch`` (not in the default levels; needs torch): the PyTorch bridge's step (SparseLinear,
  torch's SGD, sparsecore.torch.RigL) beside the engine's, dense torch, masked-dense RigL and a
  torch.sparse stand-in for a truly sparse peer, in one process (benchmarks/torch_step.py; the
  quick preset shrinks the model, ``--preset full`` is 784-4096-4096-10).
- ``roofline`` (not in the default levels): each product beside the ceiling that applies to it,
  measured in the same run: the same launcher on an operand narrow enough for L1 (the loop's own
  ceiling), a STREAM bandwidth bound from the machine's cache sizes, and spmm at batches 1-8
  beside dense BLAS and scipy (benchmarks/roofline.py; ``--widths`` sets the square products'
  sizes, ``--batch-sizes`` and ``--densities`` their batch and density: the first values).

Outputs in ``--out``: ``bench.json`` (everything, with the machine), ``bench.md`` (tables),
PNG plots; ``--results bench/RESULTS.md`` regenerates the part of that file between its markers.
This module runs the levels and the CLI; the tables and plots are report.py's.
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
from sparsecore.benchmarks import roofline as R
from sparsecore.benchmarks.common import environment, try_torch

# the tables and plots moved to report.py; their old names here still resolve
from sparsecore.benchmarks.report import STEP_COLORS as COLORS  # noqa: F401
from sparsecore.benchmarks.report import (  # noqa: F401
    TARGET,
    fmt_density,
    markdown,
    mib,
    plots,
    scaling_markdown,
    step_break_even,
    step_markdown,
    step_table,
    write_results,
)

BASELINES = ("scipy", "torch", "torch-masked", "torch-sparse")
AUTO_MAX_SPARSITY = 0.95  # the step level runs --dense-fallback auto up to this sparsity

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
            if "sparsecore-auto" in impls and s <= AUTO_MAX_SPARSITY:
                # the dense-fallback curve (above, every layer is below the density at which
                # sparsecore/fallback.py would time it: the same run as "sparsecore")
                jobs.append(dict(common, impl="sparsecore-auto", sparsity=s))
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
        help="comma-separated subset of kernels,step,scaling,torch,roofline (torch: the PyTorch "
        "bridge; roofline: each product against its L1 and bandwidth ceilings; neither runs by "
        "default)",
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
    _check_list("--levels", levels, ("kernels", "step", "scaling", "torch", "roofline"))
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
    if "roofline" in levels:
        res["roofline"] = roofline_level(args, progress)
    if "step" in levels or "scaling" in levels:
        from sparsecore.benchmarks.step import prepare_data

        data = prepare_data(out / "data", preset["samples"])
        impls = ["sparsecore", "sparsecore-auto", "dense"] + (
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
    if "torch" in levels and (level := torch_level(args, out, preset, progress)) is not None:
        res["torch"] = level
    (out / "bench.json").write_text(json.dumps(res, indent=1))
    return _report(res, out, args.results)


def torch_level(args, out: Path, preset: dict, progress: bool) -> dict | None:
    """The torch level at the preset's size (``--widths``, ``--sparsities``, ``--batch-sizes``:
    their first value), or None with a message when torch is not installed."""
    import sparsecore.benchmarks.torch_step as T

    if not T.available():
        print(
            "torch is not installed: the torch level is skipped (pip install 'sparsecore-rigl[torch]')"
        )
        return None
    cfg = dict(
        T.PRESETS[args.preset], seed=args.seed, delta_t=args.delta_t, torch_threads=args.threads
    )
    from sparsecore.benchmarks.step import prepare_data

    cfg["data"] = prepare_data(out / "data", preset["samples"])
    if args.widths:
        cfg["arch"] = [784, args.widths[0], args.widths[0], 10]
    if args.sparsities:
        cfg["sparsity"] = args.sparsities[0]
    if args.batch_sizes:
        cfg["batch"] = args.batch_sizes[0]
    return T.run(cfg, progress=print if progress else None)


def roofline_level(args, progress: bool) -> dict:
    """The roofline level at the preset's shapes; ``--widths`` replaces the square products'
    sizes, ``--batch-sizes`` / ``--densities`` (their first value) their batch and density."""
    cfg = dict(R.PRESETS[args.preset])
    if args.widths:
        cfg["sizes"] = args.widths
    if args.batch_sizes:
        cfg["batch"] = args.batch_sizes[0]
    if args.densities:
        cfg["density"] = args.densities[0]
    return R.run(cfg, np.random.default_rng(args.seed), progress)


def _report(res, out: Path, results_path) -> int:
    md = markdown(res)
    if res.get("torch"):
        import sparsecore.benchmarks.torch_step as torch_step

        md += "\n" + torch_step.markdown(res["torch"])
    (out / "bench.md").write_text(md)
    files = plots(res, out)
    if results_path:
        write_results(md, Path(results_path))
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
