"""RigL on an MLP whose dense twin does not fit in memory, with the plan checked against RSS.

    python bench/scale.py --arch 784-100000-100000-10 --sparsity 0.999 --steps 300 --delta-t 100
    python bench/scale.py --arch 784-1000000-1000000-10 --sparsity 0.99998 --steps 3 \
        --delta-t 2 --grow sampled --grow-candidates 10 --no-eval --lr 1e-4

Dense float32 weights of 784-100000-100000-10 need 40.3 GB; this trains it truly sparse on
MNIST for a few hundred steps, topology updates included, and reports peak RSS (measured, the
whole process) against the memory plan, time per step and per update, and the FLOPs the grow
costs (exact: 2·m·n·B per layer; sampled: 2·C·B for C candidates). The second line is the
width-10^6 case (dense weights 4 TB, nnz 10^7 in the big layer): two ordinary steps, then one
step with a topology update (forward + backward + update), with RigL's sampled grow; the exact
grow there would cost 2.6·10^14 FLOPs per update. (At this width the classifier has a fan-in of
5·10^5: lr 0.05 makes the first SGD step diverge, hence the small lr.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparsecore  # noqa: E402,F401,I001
import numpy as np  # noqa: E402

from sparsecore import data as D  # noqa: E402
from sparsecore.benchmarks.memory import peak_rss_mib as rss_mib  # noqa: E402
from sparsecore.plan import describe_plan  # noqa: E402
from sparsecore.train import TrainConfig, Trainer  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--arch", default="784-100000-100000-10")
    ap.add_argument("--sparsity", type=float, default=0.999)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--delta-t", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--grow", choices=["exact", "sampled"], default="exact")
    ap.add_argument("--grow-candidates", type=float, default=10)
    ap.add_argument("--no-eval", action="store_true", help="skip the test-set evaluation")
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
        lr=args.lr,
        grow=args.grow,
        grow_candidates=args.grow_candidates,
    )
    t0 = time.perf_counter()
    tr = Trainer(cfg, data)
    build_s = time.perf_counter() - t0
    print(describe_plan(tr.plan), flush=True)
    rss_built = rss_mib()
    losses = []
    times, upd, grow_layers, update_only = [], [], [], []
    batches = tr.batches(0)
    fp = tr.fp_mode()  # flush-to-zero as Trainer.run has it, for the steps timed here
    fp.__enter__()
    for _ in range(args.steps):
        idx = next(batches)
        xb = np.ascontiguousarray(data.x_train[idx].T)
        t = time.perf_counter()
        loss, _, report = tr.train_step(xb, data.y_train[idx])
        dt = time.perf_counter() - t
        (upd if report is not None else times).append(dt)
        losses.append(round(float(loss), 4))
        if report is not None:
            grow_layers.append([round(d["grow_seconds"], 3) for d in report.per_layer])
            update_only.append(sum(d["seconds"] for d in report.per_layer))
            print(
                f"step {tr.step - 1}: topology update {dt:.1f} s (grow per layer "
                f"{grow_layers[-1]} s), loss {loss:.3f}, grew {report.total_grown:,}",
                flush=True,
            )
        elif tr.step - 1 < 3 or (tr.step - 1) % 50 == 0:
            print(f"step {tr.step - 1}: {dt:.2f} s, loss {loss:.3f}", flush=True)
    fp.__exit__(None, None, None)
    t = time.perf_counter()
    acc = None if args.no_eval else tr.evaluate(data.x_test, data.y_test)["acc"]
    eval_s = time.perf_counter() - t
    shapes = [(o, i) for i, o in zip(arch[:-1], arch[1:], strict=True)]
    from kernels.cpu.sampled import n_candidates

    grow_flops = 0.0
    for (m, n), l in zip(shapes, tr.model.weighted(), strict=True):
        if not hasattr(l.W, "nnz"):
            continue
        if args.grow == "sampled":  # candidates at the first update's drop fraction (the most)
            k = int(tr.schedule.drop_fraction(args.delta_t) * l.W.nnz)
            c = n_candidates(m, n, l.W.nnz - k, k, args.grow_candidates)
            grow_flops += 2.0 * c * args.batch_size
        else:
            grow_flops += 2.0 * m * n * args.batch_size
    peak = rss_mib()
    res = {
        "arch": arch,
        "sparsity": args.sparsity,
        "dense_weight_gb": 4 * sum(m * n for m, n in shapes) / 1e9,
        "nnz": int(sum(l.W.nnz for l in tr.model.sparse_layers())),
        "plan_total_mib": tr.plan["total_bytes"] / 2**20,
        "plan_state_mib": tr.plan["state_bytes"] / 2**20,
        "grow": args.grow,
        "grow_candidates": args.grow_candidates if args.grow == "sampled" else None,
        "peak_rss_mib": peak,
        "peak_rss_over_plan": peak / (tr.plan["total_bytes"] / 2**20),
        "rss_after_build_mib": rss_built,
        "rss_before_import_mib": base_rss,
        "dataset_mib": data_mib,
        "build_s": build_s,
        "mean_step_s": float(np.mean(times)) if times else None,
        "median_step_s": float(np.median(times)) if times else None,
        "grow_s_per_layer": grow_layers,
        "topology_update_only_s": update_only,  # drop + grow + rebuild, all layers
        "n_updates": len(upd),
        "mean_update_s": float(np.mean(upd)) if upd else None,
        "grow_gflop_per_update": grow_flops / 1e9,
        "test_acc_after": acc,
        "eval_s": eval_s,
        "steps": args.steps,
        "lr": args.lr,
        "losses": losses,
    }
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
