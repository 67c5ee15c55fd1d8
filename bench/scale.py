"""RigL on an MLP whose dense twin does not fit in memory, with the plan checked against RSS.

    python bench/scale.py --arch 784-100000-100000-10 --sparsity 0.999 --steps 300 --delta-t 100

Dense float32 weights of 784-100000-100000-10 need 40.3 GB; this trains it truly sparse on
MNIST for a few hundred steps, topology updates included, and reports peak RSS (measured, the
whole process) against the memory plan, time per step and per update, and the FLOPs the exact
grow costs.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparsecore  # noqa: E402,F401,I001
import numpy as np  # noqa: E402

from sparsecore import data as D  # noqa: E402
from sparsecore.plan import describe_plan  # noqa: E402
from sparsecore.train import TrainConfig, Trainer  # noqa: E402


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--arch", default="784-100000-100000-10")
    ap.add_argument("--sparsity", type=float, default=0.999)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--delta-t", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    arch = [int(a) for a in args.arch.split("-")]
    base_rss = rss_mib()
    data = D.load("mnist")
    data_mib = sum(a.nbytes for a in (data.x_train, data.y_train, data.x_test, data.y_test)) / 2**20
    cfg = TrainConfig(
        arch=arch,
        sparsity=args.sparsity,
        method="rigl",
        delta_t=args.delta_t,
        batch_size=args.batch_size,
        epochs=1,
        max_steps=int(args.steps / 0.75) + 1,
        progress=False,
        lr=0.05,
    )
    t0 = time.perf_counter()
    tr = Trainer(cfg, data)
    build_s = time.perf_counter() - t0
    print(describe_plan(tr.plan), flush=True)
    times, upd = [], []
    batches = tr.batches(0)
    for _ in range(args.steps):
        idx = next(batches)
        xb = np.ascontiguousarray(data.x_train[idx].T)
        t = time.perf_counter()
        loss, _, report = tr.train_step(xb, data.y_train[idx])
        dt = time.perf_counter() - t
        (upd if report is not None else times).append(dt)
        if report is not None:
            print(
                f"step {tr.step - 1}: topology update {dt:.1f} s, loss {loss:.3f}, "
                f"grew {report.total_grown:,}",
                flush=True,
            )
    t = time.perf_counter()
    acc = tr.evaluate(data.x_test, data.y_test)["acc"]
    eval_s = time.perf_counter() - t
    shapes = [(o, i) for i, o in zip(arch[:-1], arch[1:], strict=True)]
    grow_flops = sum(
        2.0 * m * n * args.batch_size
        for (m, n), l in zip(shapes, tr.model.weighted(), strict=True)
        if hasattr(l.W, "nnz")
    )
    peak = rss_mib()
    res = {
        "arch": arch,
        "sparsity": args.sparsity,
        "dense_weight_gb": 4 * sum(m * n for m, n in shapes) / 1e9,
        "nnz": int(sum(l.W.nnz for l in tr.model.sparse_layers())),
        "plan_total_mib": tr.plan["total_bytes"] / 2**20,
        "plan_state_mib": tr.plan["state_bytes"] / 2**20,
        "peak_rss_mib": peak,
        "rss_before_import_mib": base_rss,
        "dataset_mib": data_mib,
        "build_s": build_s,
        "mean_step_s": float(np.mean(times)),
        "median_step_s": float(np.median(times)),
        "n_updates": len(upd),
        "mean_update_s": float(np.mean(upd)) if upd else None,
        "grow_gflop_per_update": grow_flops / 1e9,
        "test_acc_after": acc,
        "eval_s": eval_s,
        "steps": args.steps,
    }
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
