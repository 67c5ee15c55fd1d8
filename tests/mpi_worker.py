"""One process of the MPI tests (tests/test_mpi.py): trains a small RigL MLP on synthetic data,
on however many ranks it was started with (``mpiexec -n N python tests/mpi_worker.py ...``, or
plain ``python`` for one process), and writes what it saw to OUT/rank<r>.json: the global loss
of every step, a hash of every layer's topology after every update, the grown counts, the bytes
communicated, and (rank 0) the final weights to OUT/final.npz.

Fault injection for the tests: ``--die RANK:STEP:exit`` ends that rank with os._exit at that
step (a crash), ``--die RANK:STEP:raise`` raises there (an error), ``--perturb RANK:STEP`` nudges
one weight of that rank (a silent divergence the guard must catch), ``--hang RANK:STEP``
makes that rank sleep forever there (alive but stuck: the watchdog must end the job).
``--shard-layers all`` (or 0,1) splits the sparse layers by rows over the ranks; a sharded
layer is gathered whole for the hashes and final.npz (a test's convenience).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparsecore  # noqa: E402,F401  (the thread setup, before NumPy's BLAS starts)
from sparsecore import data as D  # noqa: E402
from sparsecore import mpi  # noqa: E402
from sparsecore.cost import held_bytes  # noqa: E402
from sparsecore.layers import SparseLinear  # noqa: E402
from sparsecore.train import TrainConfig, Trainer  # noqa: E402


def synthetic(n_features: int, n_train=1024, n_test=256, classes=10, seed=0) -> D.Dataset:
    """Gaussian inputs labelled by a random linear teacher (learnable, no constant features)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_train + n_test, n_features)).astype(np.float32)
    teacher = rng.standard_normal((n_features, classes))
    y = np.argmax(x @ teacher + 0.5 * rng.standard_normal((x.shape[0], classes)), axis=1)
    return D.from_arrays(x[:n_train], y[:n_train], x[n_train:], y[n_train:], name="synthetic")


def whole(layer):
    """(CSR, bias) of the whole layer: a sharded layer's rows gathered from every rank."""
    return layer.gather() if layer.shard is not None else (layer.W, layer.b)


def topology_hash(model) -> list[int]:
    out = []
    for l in model.sparse_layers():
        W, _ = whole(l)
        out.append(zlib.crc32(np.ascontiguousarray(W.indices).view(np.uint8), zlib.crc32(W.indptr)))
    return out


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
    ap.add_argument("--hang", default=None)
    ap.add_argument("--shard-layers", default=None)
    ap.add_argument("--rank-timeout", type=float, default=60.0)
    ap.add_argument("--no-out", action="store_true", help="TrainConfig(out=None): no files")
    ap.add_argument("--slow-write", type=float, default=0.0, help="seconds per .npz member")
    args = ap.parse_args(argv)
    shard = args.shard_layers
    if shard not in (None, "all"):
        shard = [int(v) for v in shard.split(",")]
    out = Path(args.out)
    arch = [int(a) for a in args.arch.split("-")]
    if args.slow_write:  # a slow filesystem: every checkpoint member takes this long
        from sparsecore import checkpoint

        add = checkpoint._NpzWriter.add

        def slow_add(self, name, array):
            time.sleep(args.slow_write)
            add(self, name, array)

        checkpoint._NpzWriter.add = slow_add
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
        out=None if args.no_out else str(out / "run"),
        shard_layers=shard,
        rank_timeout=args.rank_timeout,
    )
    tr = Trainer(cfg, synthetic(arch[0]), parallel=mpi.parallel())
    rank = tr.par.rank
    if args.stop_epoch is not None:
        tr.cfg.epochs = args.stop_epoch  # stop early; the schedule stays that of --epochs
    if args.resume:
        tr.load_checkpoint(args.resume)
    die = args.die.split(":") if args.die else None
    perturb = [int(v) for v in args.perturb.split(":")] if args.perturb else None
    hang = [int(v) for v in args.hang.split(":")] if args.hang else None
    losses, topology, grown = {}, {}, {}
    step_once = tr.train_step

    def traced(xb, yb):
        if die and int(die[0]) == rank and int(die[1]) == tr.step:
            if die[2] == "exit":
                os._exit(3)
            raise RuntimeError(f"injected failure in rank {rank} at step {tr.step}")
        if hang and hang[0] == rank and hang[1] == tr.step:
            while True:
                time.sleep(1)
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
    wholes = [whole(l) if isinstance(l, SparseLinear) else (l.W, l.b) for l in layers]
    result = {
        "ranks": tr.par.size,
        "losses": losses,
        "topology": topology,
        "grown": grown,
        "steps": tr.step,
        "history": tr.history,
        "nnz": sum(int(l.total_nnz()) for l in tr.model.sparse_layers()),
        "local_nnz": [int(l.W.nnz) for l in tr.model.sparse_layers()],
        "sharded": [l.name for l in tr.model.sparse_layers() if l.shard is not None],
        "biases": sum(int(b.shape[0]) for _, b in wholes),
        "params": sum(int(p.value.size) for p in tr.model.params()),
        "dense": sum(int(W.shape[0]) * int(W.shape[1]) for W, _ in wholes),
        "shapes": [list(W.shape) for W, _ in wholes],
        "comm": tr.par.stats(),
        "held": held_bytes(tr.model, tr.opt),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if rank == 0:
        arrays = {}
        for i, (l, (W, b)) in enumerate(zip(layers, wholes, strict=True)):
            if isinstance(l, SparseLinear):
                arrays.update({f"{i}/indptr": W.indptr, f"{i}/indices": W.indices})
                arrays[f"{i}/data"] = W.data
            else:
                arrays[f"{i}/W"] = W
            arrays[f"{i}/b"] = b
        np.savez(out / "final.npz", **arrays)


if __name__ == "__main__":
    main()
