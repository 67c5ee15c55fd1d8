"""MPI training on one machine: 1 process × T threads against N ranks × T/N threads, data-parallel
and with sharded layers, on the same job; time per step, bytes per step and per topology update,
and the training state each rank holds (measured from its arrays).

    python bench/mpi.py --arch 784-2048-2048-10 --sparsity 0.95 --steps 300 --repeats 2

Each configuration runs ``sparsecore train`` (``--nprocs N`` for MPI) on the bundled MNIST for
``--steps`` steps with RigL (ΔT = --delta-t, so the updates are amortised in the time per step)
and is repeated ``--repeats`` times, in alternation; the table gives the median over repeats
of the mean time per step that the run measured, and the rest from the last repeat. Writes
bench/results/mpi.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(arch, sparsity, steps, delta_t, nprocs, shard, threads, out):
    cmd = [sys.executable, "-m", "sparsecore", "train", "--arch", arch, "--sparsity", str(sparsity)]
    cmd += ["--epochs", "1", "--max-steps", str(steps), "--delta-t", str(delta_t)]
    cmd += ["--no-progress", "--out", str(out)]
    if nprocs > 1:
        cmd += ["--nprocs", str(nprocs)]
    if shard:
        cmd += ["--shard-layers"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for v in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[v] = str(threads)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}")
    step = float(re.search(r"measured time per step: ([0-9.]+) ms", p.stdout).group(1))
    acc = float(re.search(r"test accuracy: ([0-9.]+)%", p.stdout).group(1))
    comm = re.search(r"communication: (.*)", p.stdout)
    return {"ms_per_step": step, "test_acc": acc, "communication": comm.group(1) if comm else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="784-2048-2048-10")
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--delta-t", type=int, default=100)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="threads in all, on every config")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "mpi.json"))
    args = ap.parse_args(argv)
    n, t = args.ranks, args.threads
    configs = {
        f"1 process x {t} threads": (1, False, t),
        f"{n} ranks x {max(1, t // n)} thread, data-parallel": (n, False, max(1, t // n)),
        f"{n} ranks x {max(1, t // n)} thread, sharded layers": (n, True, max(1, t // n)),
    }
    times = {name: [] for name in configs}
    last = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for i, (name, (nprocs, shard, threads)) in enumerate(configs.items()):
                res = run_one(
                    args.arch,
                    args.sparsity,
                    args.steps,
                    args.delta_t,
                    nprocs,
                    shard,
                    threads,
                    Path(tmp) / f"{r}-{i}",
                )
                times[name].append(res["ms_per_step"])
                last[name] = res
                print(f"{name}: {res['ms_per_step']:.2f} ms/step", file=sys.stderr)
    rows = []
    for name in configs:
        ts = sorted(times[name])
        med = ts[len(ts) // 2] if len(ts) % 2 else 0.5 * (ts[len(ts) // 2 - 1] + ts[len(ts) // 2])
        rows.append({"config": name, "ms_per_step_median": med, "ms_per_step": ts, **last[name]})
    result = {
        "arch": args.arch,
        "sparsity": args.sparsity,
        "steps": args.steps,
        "delta_t": args.delta_t,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "command": "python bench/mpi.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    base = rows[0]["ms_per_step_median"]
    print(f"| {args.arch} at {args.sparsity} | ms/step (median) | vs 1 process | test acc | comm |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['config']} | {row['ms_per_step_median']:.2f} | "
            f"{base / row['ms_per_step_median']:.2f}x | {row['test_acc']:.2f}% | "
            f"{row['communication'] or '-'} |"
        )


if __name__ == "__main__":
    main()
