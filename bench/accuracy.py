"""Accuracy of RigL, SET, static sparsity and dense training on MNIST (LeNet-300-100), by seed.

    python bench/accuracy.py --epochs 20 --seeds 0 1 2 --out bench/results/accuracy.jsonl
    python bench/accuracy.py --methods rigl --sparsities 0.98 --seeds 0 1 \
        --grow exact sampled --grow-candidates 10 20      # RigL's sampled grow against exact

RigL runs once per --grow mode (and per --grow-candidates for "sampled"); rows record the mean
time of RigL's grow per topology update (all layers). Each configuration is one `sparsecore train` run with the same defaults (SGD momentum 0.9,
lr 0.1 cosine, weight decay 1e-4, batch 128, ERK, ΔT 100, α 0.3, T_end 75%). Results are
appended as JSON lines (a rerun skips what is done) and summarised as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparsecore  # noqa: E402,F401,I001
import numpy as np  # noqa: E402

from sparsecore import data as D  # noqa: E402
from sparsecore.train import TrainConfig, Trainer  # noqa: E402


def label(r) -> str:
    """rigl (exact grow), rigl-sampled-10 (sampled grow, 10 candidates per grown), set, ..."""
    if r["method"] == "rigl" and r.get("grow", "exact") == "sampled":
        return f"rigl-sampled-{r['grow_candidates']:g}"
    return r["method"]


def table(rows):
    by, grow_s = {}, {}
    for r in rows:
        by.setdefault((label(r), r["sparsity"]), []).append(r["test_acc"])
        if r.get("grow_s_per_update") is not None:
            grow_s.setdefault((label(r), r["sparsity"]), []).append(r["grow_s_per_update"])
    sparsities = sorted({s for m, s in by if m != "dense"})
    lines = [
        "| method | " + " | ".join(f"sparsity {s:.0%}" for s in sparsities) + " |",
        "|---|" + "---|" * len(sparsities),
    ]
    sampled = sorted({m for m, _ in by if m.startswith("rigl-")}, key=lambda m: float(m[13:]))
    for m in ("rigl", *sampled, "set", "static"):
        if not any(m == mm for mm, _ in by):
            continue
        cells = []
        for s in sparsities:
            a = by.get((m, s))
            g = grow_s.get((m, s))
            cells.append(
                (f"{100 * np.mean(a):.2f} ± {100 * np.std(a):.2f} (n={len(a)})" if a else "–")
                + (f", grow {1e3 * np.median(g):.2f} ms/update (median of runs)" if g else "")
            )
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    d = [v for (m, _), a in by.items() if m == "dense" for v in a]
    if d:
        lines.append(
            f"| dense | {100 * np.mean(d):.2f} ± {100 * np.std(d):.2f} (n={len(d)}) (all weights) |"
            + " |" * (len(sparsities) - 1)
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    ap.add_argument("--methods", nargs="+", default=["rigl", "set", "static", "dense"])
    ap.add_argument("--grow", nargs="+", default=["exact"], choices=["exact", "sampled"])
    ap.add_argument("--grow-candidates", type=float, nargs="+", default=[10])
    ap.add_argument("--out", default="bench/results/accuracy.jsonl")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(l) for l in out.read_text().splitlines()] if out.exists() else []
    key = {(label(r), r["sparsity"], r["seed"], r["epochs"]) for r in done}
    data = D.load("mnist")
    grows = [("exact", 10)] if "exact" in args.grow else []
    grows += [("sampled", c) for c in args.grow_candidates] if "sampled" in args.grow else []
    for seed in args.seeds:
        for method in args.methods:
            for s in [0.0] if method == "dense" else args.sparsities:
                for grow, cand in grows if method == "rigl" else [("exact", 10)]:
                    spec = {"method": method, "grow": grow, "grow_candidates": cand}
                    if (label(spec), s, seed, args.epochs) in key:
                        continue
                    row = run_one(data, spec, s, seed, args.epochs)
                    print(json.dumps(row), flush=True)
                    with open(out, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    done.append(row)
    print(table([r for r in done if r["epochs"] == args.epochs]))
    return 0


def run_one(data, spec, s, seed, epochs) -> dict:
    cfg = TrainConfig(
        method=spec["method"],
        sparsity=s if s else 0.5,
        seed=seed,
        epochs=epochs,
        progress=False,
        grow=spec["grow"],
        grow_candidates=spec["grow_candidates"],
    )
    tr = Trainer(cfg, data)
    summary = tr.run()
    grow_s = [sum(d["grow_seconds"] for d in u["layers"]) for u in tr.updates]
    row = {
        "method": spec["method"],
        "sparsity": s,
        "seed": seed,
        "epochs": epochs,
        "test_acc": summary["test_acc"],
        "time_per_step_s": summary["time_per_step_s"],
        "params": summary["cost"]["params"],
        "grow_s_per_update": float(np.mean(grow_s)) if grow_s else None,
        "n_updates": len(grow_s),
    }
    if spec["method"] == "rigl":
        row.update(grow=spec["grow"], grow_candidates=spec["grow_candidates"])
    return row


if __name__ == "__main__":
    sys.exit(main())
