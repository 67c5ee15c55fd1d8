"""One process of the MPI tests (tests/test_mpi.py): trains a small RigL MLP on synthetic data,
on however many ranks it was started with (``mpiexec -n N python tests/mpi_worker.py ...``, or
plain ``python`` for one process), and writes what it saw to OUT/rank<r>.json: the global loss
of every step, a hash of every layer's topology after every update, the grown counts, the bytes
communicated, and (rank 0) the final weights to OUT/final.npz.

Fault injection for the tests: ``--die RANK:STEP:exit`` ends that rank with os._exit at that
step (a crash), ``--die RANK:STEP:raise`` raises there (an error), ``--perturb RANK:STEP`` nudges
one weight of that rank (a silent divergence the guard must catch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparsecore  # noqa: E402,F401  (the thread setup, before NumPy's BLAS starts)
from sparsecore import data as D  # noqa: E402
from sparsecore.layers import SparseLinear  # noqa: E402
from sparsecore.train import TrainConfig, Trainer  # noqa: E402


def synthetic(n_features: int, n_train=1024, n_test=256, classes=10, seed=0) -> D.Dataset:
    """Gaussian inputs labelled by a random linear teacher (learnable, no constant features)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_train + n_test, n_features)).astype(np.float32)
    teacher = rng.standard_normal((n_features, classes))
    y = np.argmax(x @ teacher + 0.5 * rng.standard_normal((x.shape[0], classes)), axis=1)
    return D.from_arrays(x[:n_train], y[:n_train], x[n_train:], y[n_train:], name="synthetic")


def topology_hash(model) -> list[int]:
    return [
        zlib.crc32(np.ascontiguousarray(l.W.indices).view(np.uint8), zlib.crc32(l.W.indptr))
        for l in model.sparse_layers()
    ]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", default="784-32-10")
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--grow", default="exact")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--stop-epoch", type=int, default=None)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--die", default=None)
    ap.add_argument("--perturb", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out)
    arch = [int(a) for a in args.arch.split("-")]
    cfg = TrainConfig(
        arch=arch,
        sparsity=args.sparsity,
        method="rigl",
        grow=args.grow,
        grow_candidates=3,
        delta_t=4,
        alpha=0.3,
        epochs=args.epochs,
        batch_size=128,
        lr=0.05,
        lr_schedule="constant",
        progress=False,
        out=str(out / "run"),
    )
    tr = Trainer(cfg, synthetic(arch[0]))
    rank = tr.dist.rank if tr.dist is not None else 0
    if args.stop_epoch is not None:
        tr.cfg.epochs = args.stop_epoch  # stop early; the schedule stays that of --epochs
    if args.resume:
        tr.load_checkpoint(args.resume)
    die = args.die.split(":") if args.die else None
    perturb = [int(v) for v in args.perturb.split(":")] if args.perturb else None
    losses, topology, grown = {}, {}, {}
    step_once = tr.train_step

    def traced(xb, yb):
        if die and int(die[0]) == rank and int(die[1]) == tr.step:
            if die[2] == "exit":
                os._exit(3)
            raise RuntimeError(f"injected failure in rank {rank} at step {tr.step}")
        if perturb and perturb[0] == rank and perturb[1] == tr.step:
            tr.model.sparse_layers()[0].W.data[0] += np.float32(1e-3)
        step = tr.step
        loss, correct, report = step_once(xb, yb)
        losses[step] = float(loss)
        if report is not None:
            topology[step] = topology_hash(tr.model)
            grown[step] = [d["grown"] for d in report.per_layer]
        return loss, correct, report

    tr.train_step = traced
    tr.run()
    layers = tr.model.weighted()
    result = {
        "ranks": tr.dist.size if tr.dist is not None else 1,
        "losses": losses,
        "topology": topology,
        "grown": grown,
        "steps": tr.step,
        "history": tr.history,
        "nnz": sum(int(l.W.nnz) for l in tr.model.sparse_layers()),
        "biases": sum(int(l.b.shape[0]) for l in layers),
        "params": sum(int(p.value.size) for p in tr.model.params()),
        "dense": sum(int(l.W.shape[0]) * int(l.W.shape[1]) for l in layers),
        "shapes": [list(l.W.shape) for l in layers],
        "comm": tr.dist.stats() if tr.dist is not None else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if rank == 0:
        arrays = {}
        for i, l in enumerate(layers):
            if isinstance(l, SparseLinear):
                arrays.update({f"{i}/indptr": l.W.indptr, f"{i}/indices": l.W.indices})
                arrays[f"{i}/data"] = l.W.data
            else:
                arrays[f"{i}/W"] = l.W
            arrays[f"{i}/b"] = l.b
        np.savez(out / "final.npz", **arrays)


if __name__ == "__main__":
    main()
