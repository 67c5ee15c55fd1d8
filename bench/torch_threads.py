"""torch's OpenMP pool beside Numba's (TBB) and OpenBLAS's: which set-up trains fastest.

    python bench/torch_threads.py                          # 3 rounds, all set-ups (~5 min on 2 cores)
    python bench/torch_threads.py --rounds 1 --workloads bridge --arch 784,1024,1024,10
    python bench/torch_threads.py --json bench/out/torch_threads.json

Every measurement runs in a fresh subprocess, because what matters is fixed when a library
loads: torch's bundled libgomp reads ``GOMP_SPINCOUNT`` (and ``OMP_WAIT_POLICY``) once, when
``import torch`` loads it, so ``import sparsecore`` (which sets ``GOMP_SPINCOUNT=10000`` with
``os.environ.setdefault``, kernels/_threads.py) reaches torch's pool only if it runs first. The
spin set-ups:

- ``sc-first``      ``import sparsecore`` then ``import torch``: torch's pool spins 10000;
- ``torch-first``   ``import torch`` then ``import sparsecore``: torch's pool at libgomp's default;
- ``torch-first+env``  as torch-first with ``GOMP_SPINCOUNT=10000`` exported (same as sc-first?);
- ``no-setup``      sc-first with ``SPARSECORE_THREAD_SETUP=0``: every library at its default;
- ``passive``       (not in the default set) sc-first with ``OMP_WAIT_POLICY=PASSIVE``.

Each is run with torch's intra-op threads 1 and 2 (``torch.set_num_threads``) and Numba's
threads ``--numba-threads`` (2), on two workloads of 784-4096-4096-10 at 99% (uniform), batch
128, SGD with momentum, built by sparsecore/benchmarks/torch_step.py:

- ``bridge``  the bridge's step (SparseLinear/ReLU, cross-entropy, torch SGD, RigL scheduler;
              normal steps, no topology update among the timed ones);
- ``dense``   the same model with dense nn.Linear layers in torch (MKL in torch's pool).

The set-ups of one round run back to back in an order that rotates from round to round; the
table gives, per set-up, the median over rounds of each process's median step, and the median
over rounds of its ratio to ``sc-first`` with 2 torch threads (the out-of-the-box set-up) in the
same round. "spin" is the CPU time the process burns during a 50 ms sleep right after a torch
parallel op (torch's workers busy-waiting; a thread that spins the whole time gives 50 ms), a
check that the spin set-up took effect. This parent imports neither sparsecore nor torch, so
the children inherit its environment untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETUPS = {
    # name: (import torch first?, environment changes)
    "sc-first": (False, {}),
    "torch-first": (True, {}),
    "torch-first+env": (True, {"GOMP_SPINCOUNT": "10000"}),
    "no-setup": (False, {"SPARSECORE_THREAD_SETUP": "0"}),
    "passive": (False, {"OMP_WAIT_POLICY": "PASSIVE"}),
}
DEFAULT_SETUPS = ("sc-first", "torch-first", "torch-first+env", "no-setup")
WORKLOADS = ("bridge", "dense")
REFERENCE = ("sc-first", 2)

CHILD = r"""
import json, sys, time
cfg = json.loads(sys.argv[1])
if cfg["torch_first"]:
    import torch
import sparsecore
import numba
import torch
torch.set_num_threads(cfg["torch_threads"])
numba.set_num_threads(min(cfg["numba_threads"], numba.config.NUMBA_NUM_THREADS))
torch.set_flush_denormal(True)
import numpy as np
from sparsecore.benchmarks import torch_step as T
from sparsecore.torch import threads as TT

c = dict(T.DEFAULTS, arch=cfg["arch"], sparsity=cfg["sparsity"], batch=cfg["batch"],
         every=10**6, seed=0)
impl = (T.Bridge if cfg["workload"] == "bridge" else T.Dense)(c)
g = torch.Generator().manual_seed(0)
batches = [dict(x=torch.randn(c["batch"], c["arch"][0], generator=g),
                y=torch.randint(0, c["arch"][-1], (c["batch"],), generator=g)) for _ in range(4)]
for i in range(cfg["warmup"]):
    impl.step(batches[i % 4])
times = []
for i in range(cfg["steps"]):
    t0 = time.perf_counter()
    impl.step(batches[i % 4])
    times.append(time.perf_counter() - t0)

def spin():
    a = torch.randn(4096, 512)
    torch.relu(a)  # a parallel op of torch's pool
    c0 = time.process_time()
    time.sleep(0.05)
    return time.process_time() - c0

spins = sorted(spin() for _ in range(5))
info = TT.threading_info()
print(json.dumps(dict(median_s=float(np.median(times)), mean_s=float(np.mean(times)),
                      spin_s=spins[2], torch_gomp_spincount=info["torch_gomp_spincount"],
                      torch_omp_wait_policy=info["torch_omp_wait_policy"],
                      torch_imported_first=info["torch_imported_first"],
                      torch_threads=info["torch_threads"], numba_threads=info["numba_threads"],
                      layer=info["engine"]["numba_threading_layer"])))
"""


def run_child(setup: str, torch_threads: int, workload: str, args) -> dict:
    torch_first, changes = SETUPS[setup]
    env = dict(os.environ)
    for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "SPARSECORE_THREAD_SETUP"):
        env.pop(k, None)  # (only the set-up's own changes)
    env.update(changes)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    dense = workload == "dense"
    cfg = dict(
        torch_first=torch_first,
        torch_threads=torch_threads,
        numba_threads=args.numba_threads,
        workload=workload,
        arch=args.arch,
        sparsity=args.sparsity,
        batch=args.batch,
        warmup=2 if dense else 5,
        steps=args.dense_steps if dense else args.steps,
    )
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cfg)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise RuntimeError(f"{setup}, {torch_threads} torch threads, {workload}: failed\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spin(res: dict) -> str:
    """How torch's pool waits: OMP_WAIT_POLICY where set (it overrides), else the spin count."""
    policy = res.get("torch_omp_wait_policy", "default")
    return f"wait policy {policy}" if policy != "default" else res["torch_gomp_spincount"]


def _ints(s):
    return [int(x) for x in s.split(",") if x]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--setups", default=",".join(DEFAULT_SETUPS), help="subset of " + ",".join(SETUPS)
    )
    ap.add_argument("--torch-threads", type=_ints, default=[1, 2])
    ap.add_argument("--numba-threads", type=int, default=2)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--arch", type=_ints, default=[784, 4096, 4096, 10])
    ap.add_argument("--sparsity", type=float, default=0.99)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40, help="timed bridge steps per process")
    ap.add_argument("--dense-steps", type=int, default=8, help="timed dense steps per process")
    ap.add_argument("--json", default=None, help="write every process's result here")
    args = ap.parse_args(argv)
    setups = [s for s in args.setups.split(",") if s]
    workloads = [w for w in args.workloads.split(",") if w]
    bad = [s for s in setups if s not in SETUPS] + [w for w in workloads if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown set-up(s) or workload(s): {bad}")
    combos = [(s, t) for s in setups for t in args.torch_threads]
    runs: dict = {}  # (workload, setup, threads) -> [result per round]
    for w in workloads:
        for r in range(args.rounds):
            turn = combos[r % len(combos) :] + combos[: r % len(combos)]
            for s, t in turn:
                res = run_child(s, t, w, args)
                runs.setdefault((w, s, t), []).append(res)
                print(f"[round {r + 1}] {w:6} {s:16} torch threads {t}: "
                      f"{res['median_s'] * 1e3:8.2f} ms (spin {res['spin_s'] * 1e3:.1f} ms, "
                      f"torch pool {_spin(res)})",
                      file=sys.stderr, flush=True)  # fmt: skip
    arch = "-".join(map(str, args.arch))
    print(f"\n{arch} at {args.sparsity:.0%}, batch {args.batch}; Numba threads "
          f"{args.numba_threads}; {args.rounds} rounds (median over rounds; × = ratio to "
          f"{REFERENCE[0]} with {REFERENCE[1]} torch threads in the same round)\n")  # fmt: skip
    print(
        "| workload | set-up | torch threads | torch pool spins | median ms | × ref | mean ms | spin ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for w in workloads:
        ref = runs.get((w, *REFERENCE))
        for s, t in combos:
            rs = runs[(w, s, t)]
            med = statistics.median(x["median_s"] for x in rs)
            ratio = (
                f"{statistics.median(x['median_s'] / y['median_s'] for x, y in zip(rs, ref, strict=True)):.2f}"
                if ref
                else "–"
            )
            print(
                f"| {w} | {s} | {t} | {_spin(rs[0])} | {med * 1e3:.2f} | {ratio} | "
                f"{statistics.median(x['mean_s'] for x in rs) * 1e3:.2f} | "
                f"{statistics.median(x['spin_s'] for x in rs) * 1e3:.1f} |"
            )
    if args.json:
        out = [
            dict(workload=w, setup=s, torch_threads=t, rounds=v) for (w, s, t), v in runs.items()
        ]
        Path(args.json).write_text(json.dumps(dict(args=vars(args), runs=out), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
