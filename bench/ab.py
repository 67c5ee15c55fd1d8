"""Same-run A/B of two source trees: the kernel and training-step timings of each, interleaved.

    python bench/ab.py --base 1bfb355                 # this tree (B) against a commit (A)
    python bench/ab.py --base 1bfb355 --rounds 5 --json bench/out/ab.json

A refactor must not move the kernels or the step. One long-lived process per tree
(``PYTHONPATH=<tree>``, the same interpreter and packages) sets every case up once; then, round
after round, case after case, the two processes take turns timing the same case (``--repeat``
timings, their median, by this tree's sparsecore/benchmarks/timing.py loaded into both), with
the order A-B / B-A alternating, so that the drifts of a noisy machine (turbo, neighbours on a
VM) fall on both sides within seconds. Only one process runs at a time, after a short rest
(``--pause``: the other's Numba/BLAS worker threads spin-wait for a while after their last
parallel region, and a side that goes second in a turn was measured up to 25% slower without
it). The report gives each case's median over rounds per side and B/A: the median of the rounds'
paired ratios where A went first and of those where B did, combined by their geometric mean (so
a cost of the order cancels), flagged where it leaves ±``--tolerance``. The base commit is checked out once
into a git worktree beside the system's temporary files (reused by later runs).

The script uses only the public API that both trees share (kernels.spmm, spmm_t, sddmm,
topk_grow, magnitude_drop, merge, CSR.random, Trainer.train_step, the updater's update), and
checks one result per kernel against SciPy, so a broken tree cannot look fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMER = ROOT / "sparsecore" / "benchmarks" / "timing.py"  # the one timer, for both sides

# Run in each tree's process: prints one JSON object {case: median seconds}.
CHILD = r"""
import json, re, sys
import numpy as np
import kernels
from kernels import CSR

repeat = int(sys.argv[1])
only = re.compile(sys.argv[2])
# the timer: this (B) tree's sparsecore/benchmarks/timing.py, loaded from its file into both
# sides (the base tree may have none), so that both are timed by the same code
import importlib.util
spec = importlib.util.spec_from_file_location("_ab_timing", sys.argv[3])
timing = importlib.util.module_from_spec(spec)
spec.loader.exec_module(timing)
rng = np.random.default_rng(0)

class Cases(dict):
    def __setitem__(self, case, fn):
        if only.search(case):
            fn()  # warm-up (compilation, caches)
            super().__setitem__(case, fn)

def timed(repeat):
    def mark(fn):
        fn.repeat = (repeat,)
        return fn
    return mark

def median_time(fn, repeat=repeat):  # (warmed up by the caller)
    return timing.median_s(fn, warmup=0, reps=repeat)

def fresh():
    # Every turn times the kernels on newly allocated copies of their operands: where an array
    # lands (transparent huge pages or not, cache-set aliasing) is luck that lasts as long as
    # the array and moved one long-lived process's spmm by 25% against the other's identical
    # code; fresh buffers make it fall on both sides alike over the rounds.
    global W, X, dY, y, dx, dw, Wg, dYg, Xg
    W, Wg = W.copy(), Wg.copy()
    X, dY, dYg, Xg = (np.array(a) for a in (X, dY, dYg, Xg))
    y, dx, dw = np.empty_like(y), np.empty_like(dx), np.empty_like(dw)

out = Cases()
dict.__setitem__(out, "_file", kernels.__file__)
m = n = 4096
B = 128
W = CSR.random((m, n), 0.1, seed=1)
X = rng.standard_normal((n, B)).astype(np.float32)
dY = rng.standard_normal((m, B)).astype(np.float32)
S = W.to_scipy()
assert np.allclose(kernels.spmm(W, X), S @ X, rtol=1e-3, atol=1e-3)
assert np.allclose(kernels.spmm_t(W, dY), S.T @ dY, rtol=1e-3, atol=1e-3)
y, dx, dw = np.empty((m, B), np.float32), np.empty((n, B), np.float32), np.empty(W.nnz, np.float32)
out["spmm 4096² 90% B=128"] = lambda: kernels.spmm(W, X, out=y)
out["spmm_t 4096² 90% B=128"] = lambda: kernels.spmm_t(W, dY, out=dx)
out["sddmm 4096² 90% B=128"] = lambda: kernels.sddmm(W, dY, X, out=dw)
Wg = CSR.random((1024, 1024), 0.1, seed=2)
dYg = rng.standard_normal((1024, B)).astype(np.float32)
Xg = rng.standard_normal((1024, B)).astype(np.float32)
k = Wg.nnz // 10
out["topk_grow 1024² 90% B=128 k=nnz/10"] = lambda: kernels.topk_grow(Wg, dYg, Xg, k)
out["magnitude_drop 4096² 90% k=nnz/10"] = lambda: kernels.magnitude_drop(W, W.nnz // 10)
drop = kernels.magnitude_drop(W, W.nnz // 10)
keep = np.ones(W.nnz, bool)
keep[drop] = False
r, c, _ = kernels.topk_grow(W, dY[:, :8], X[:, :8], drop.shape[0], keep=keep)
out["merge 4096² 90% 10% regrown"] = lambda: kernels.merge(W, keep, r, c)
Ws = CSR.random((64, 64), 0.1, seed=3)
Xs = rng.standard_normal((64, 8)).astype(np.float32)
ys = np.empty((64, 8), np.float32)
out["spmm 64² B=8 (call overhead)"] = timed(max(repeat, 200))(lambda: kernels.spmm(Ws, Xs, out=ys))

from sparsecore import data as D
from sparsecore.train import TrainConfig, Trainer
xtr = rng.standard_normal((2048, 784)).astype(np.float32)
ytr = rng.integers(0, 10, 2048)
e = np.zeros((0, 784), np.float32)
data = D.Dataset("ab", xtr, ytr, e, np.zeros(0, np.int64), xtr[:256], ytr[:256], 10)
cfg = TrainConfig(arch=[784, 300, 100, 10], sparsity=0.9, method="rigl", delta_t=10**6,
                  batch_size=128, epochs=10**6, max_steps=10**7, progress=False, seed=0)
tr = Trainer(cfg, data)
xb = np.ascontiguousarray(xtr[:128].T)
yb = ytr[:128]
with tr.fp_mode():
    out["train step 784-300-100-10 90% B=128"] = timed(max(repeat, 50))(
        lambda: tr.train_step(xb, yb))
    tr.train_step(xb, yb)  # the layers now hold this batch's inputs and output gradients
    out["RigL update (exact grow) 784-300-100-10 90%"] = timed(max(repeat, 20))(
        lambda: tr.updater.update(1, tr.model, tr.opt))
    # serve, inside fp_mode as training runs (the same for both trees): the parent names a
    # case, this process times it and answers (one at a time: the two never run at once)
    file = out.pop("_file")
    print(json.dumps({"file": file, "cases": list(out)}), flush=True)
    for line in sys.stdin:
        case = line.strip()
        fn = out[case]
        fresh()  # new buffers every turn, then one untimed call
        fn()
        print(json.dumps(median_time(fn, *getattr(fn, "repeat", ()))), flush=True)
"""


def worktree(ref: str) -> Path:
    sha = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()  # fmt: skip
    path = Path(tempfile.gettempdir()) / f"sparsecore-ab-{sha[:12]}"
    if not (path / "kernels").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", "--force", str(path), sha],
                       cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    return path


class Side:
    """One tree's long-lived measuring process: set up once, then times the case it is sent."""

    def __init__(self, tree: Path, repeat: int, only: str):
        env = dict(os.environ, PYTHONPATH=str(tree))
        self.tree = tree
        cmd = [sys.executable, "-c", CHILD, str(repeat), only, str(TIMER)]
        self.proc = subprocess.Popen(cmd, cwd=tree, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
        hello = self._read()
        where = Path(hello["file"]).resolve()
        if tree.resolve() not in where.parents:
            raise SystemExit(f"bench/ab.py: {tree} imported kernels from {where}, not its own tree")
        self.cases = hello["cases"]

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"bench/ab.py: the measuring process of {self.tree} failed")
        return json.loads(line)

    def time(self, case: str) -> float:
        self.proc.stdin.write(case + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git ref of side A (B is this tree)")
    ap.add_argument("--rounds", type=int, default=5, help="processes per side (median of)")
    ap.add_argument("--repeat", type=int, default=20, help="timings per case in a process")
    ap.add_argument("--tolerance", type=float, default=0.05, help="flag ratios beyond 1 ± this")
    ap.add_argument("--only", default="", help="time only the cases matching this regex")
    ap.add_argument(
        "--pause",
        type=float,
        default=0.3,
        help="seconds of rest before each turn (the other side's worker threads spin-wait "
        "for a while after their last parallel region)",
    )
    ap.add_argument("--json", type=Path, help="write the raw timings and the report here")
    args = ap.parse_args(argv)
    base = worktree(args.base)
    sides = {"A": Side(base, args.repeat, args.only), "B": Side(ROOT, args.repeat, args.only)}
    if sides["A"].cases != sides["B"].cases:
        raise SystemExit("bench/ab.py: the two trees measure different cases")
    runs = {"A": [], "B": []}
    first = {case: [] for case in sides["A"].cases}  # per round: the side that went first
    for i in range(args.rounds):
        row = {"A": {}, "B": {}}
        for j, case in enumerate(sides["A"].cases):
            order = ("A", "B") if (i + j) % 2 == 0 else ("B", "A")  # who goes first alternates
            first[case].append(order[0])
            for side in order:
                time.sleep(args.pause)  # the other process's spinning worker threads settle
                row[side][case] = sides[side].time(case)
        for side in runs:
            runs[side].append(row[side])
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr)
    for side in sides.values():
        side.close()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"A = {args.base} ({base}), B = this tree; {args.rounds} rounds, median of medians; "
          f"{cpu}, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'case':42s} {'A ms':>10s} {'B ms':>10s} {'B/A':>7s}  (A-first and B-first medians, "
          "geometric mean)")  # fmt: skip
    report, outside = {}, []
    for case in runs["A"][0]:
        a = statistics.median(r[case] for r in runs["A"])
        b = statistics.median(r[case] for r in runs["B"])
        ratios = [rb[case] / ra[case] for ra, rb in zip(runs["A"], runs["B"], strict=True)]
        # the median of the rounds where A went first and of those where B did, combined by
        # their geometric mean: a cost of going first (or second) in a turn cancels out
        by_order = [
            statistics.median(r for r, f in zip(ratios, first[case], strict=True) if f == who)
            for who in "AB"
            if who in first[case]
        ]
        ratio = math.prod(by_order) ** (1 / len(by_order))
        flag = "" if abs(ratio - 1) <= args.tolerance else f"  <- beyond ±{args.tolerance:.0%}"
        if flag:
            outside.append(case)
        report[case] = {"A_s": a, "B_s": b, "ratio": ratio, "ratio_by_first_side": by_order}
        print(f"{case:42s} {a * 1e3:10.4f} {b * 1e3:10.4f} {ratio:7.3f}{flag}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"base": args.base, "cpu": cpu, "runs": runs,
                                         "report": report}, indent=1))  # fmt: skip
    print(f"{len(report) - len(outside)} of {len(report)} cases within ±{args.tolerance:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
