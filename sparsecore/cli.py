"""Command line: ``sparsecore train | plan | bench | info`` (also ``python -m sparsecore``)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from kernels.validation import GPUUnavailableError
from sparsecore.train import TrainingDiverged

# What a user's input can cause, reported as one "sparsecore CMD: error: ..." line and exit 2
# (SPARSECORE_DEBUG=1 shows the traceback instead); anything else is a bug and propagates.
USER_ERRORS = (
    ValueError,
    TypeError,
    OverflowError,
    OSError,
    MemoryError,
    TrainingDiverged,
    GPUUnavailableError,
)


def _arch(s: str) -> list[int]:
    try:
        sizes = [int(x) for x in s.split("-")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--arch must look like 784-300-100-10, got {s!r}"
        ) from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--arch needs at least two positive sizes, got {s!r}")
    return sizes


def _shards(s: str):
    if s == "all":
        return "all"
    try:
        out = [int(v) for v in s.split(",")]
    except ValueError:
        out = None
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(
            f"--shard-layers takes 'all' or weighted-layer indices like 1 or 0,1; got {s!r}"
        )
    return out


def _add_shards(p):
    p.add_argument(
        "--shard-layers",
        type=_shards,
        nargs="?",
        const="all",
        default=None,
        metavar="all|L,L",
        help="with several MPI ranks: split these sparse layers by rows over the ranks (no "
        "value: every sparse layer), each rank holding 1/N of their weights, indices and "
        "optimizer state, instead of data-parallel training (same result as one process)",
    )


def _add_grow(p):
    p.add_argument(
        "--grow",
        choices=["exact", "sampled"],
        default="exact",
        help="RigL's grow: exact top-k of |dY·Xᵀ| (m·n·batch per update), or the top-k of "
        "uniformly sampled absent candidates (cost ∝ nnz)",
    )
    p.add_argument(
        "--grow-candidates",
        type=float,
        default=10,
        help="with --grow sampled: candidates scored per grown connection",
    )


def _add_train(sub):
    p = sub.add_parser("train", help="train an MLP with RigL / SET / static sparsity / dense")
    p.add_argument(
        "--dataset",
        default="mnist",
        help="'mnist' (bundled), an .npz with x_train, y_train, x_test, y_test, or a folder of "
        "those four .npy files",
    )
    p.add_argument(
        "--arch", type=_arch, default=[784, 300, 100, 10], help="layer sizes, e.g. 784-300-100-10"
    )
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--distribution", choices=["erk", "uniform"], default="erk")
    p.add_argument("--method", choices=["rigl", "set", "static", "dense"], default="rigl")
    p.add_argument("--delta-t", type=int, default=100, help="steps between topology updates (ΔT)")
    _add_grow(p)
    p.add_argument(
        "--no-flush-denormals",
        action="store_true",
        help="keep subnormal floats (by default the kernel threads flush them to zero: x86 "
        "computes on them 10-100x slower)",
    )
    p.add_argument("--alpha", type=float, default=0.3, help="initial drop fraction")
    p.add_argument(
        "--t-end",
        type=float,
        default=0.75,
        help="fraction of training after which the topology is frozen",
    )
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="sgd")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--lr-schedule", choices=["cosine", "step", "constant"], default="cosine")
    p.add_argument("--lr-step-every", type=int, default=0, help="with --lr-schedule step")
    p.add_argument("--lr-gamma", type=float, default=0.1, help="with --lr-schedule step")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--out", default="runs/default", help="folder for metrics, plot and checkpoint")
    p.add_argument("--resume", default=None, help="checkpoint to resume from")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--nprocs",
        type=int,
        default=None,
        help="train on N MPI processes (needs the [mpi] extra): starts mpiexec -n N python -m "
        "sparsecore train ...; data-parallel, or with --shard-layers layers split by rows "
        "(the same result as one process either way)",
    )
    _add_shards(p)
    p.add_argument(
        "--rank-timeout",
        type=float,
        default=1800.0,
        help="with several MPI ranks: seconds without progress (a step, an update, an "
        "evaluation) after which every rank stops: a hung rank ends the job (0: never)",
    )
    p.add_argument(
        "--max-memory",
        default=None,
        help="refuse, before allocating, a run whose memory plan exceeds this (e.g. 8GB; per "
        "MPI rank)",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: train on the GPU (needs the [gpu] extra); the model moves there once and "
        "weights, activations, optimizer state and topology updates stay there",
    )


def _add_plan(sub):
    p = sub.add_parser("plan", help="bytes of every piece of training state, before training")
    p.add_argument(
        "--arch", type=_arch, required=True, help="layer sizes, e.g. 784-100000-100000-10"
    )
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--distribution", choices=["erk", "uniform"], default="erk")
    p.add_argument("--method", choices=["rigl", "set", "static", "dense"], default="rigl")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="sgd")
    _add_grow(p)
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: plan the GPU's memory"
    )
    p.add_argument(
        "--ranks", type=int, default=1, help="with --shard-layers: the plan of one of N ranks"
    )
    _add_shards(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="sparsecore", description="True-sparse training engine.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_train(sub)
    _add_plan(sub)
    sub.add_parser("info", help="versions and the threading setup in force")
    bench = sub.add_parser(
        "bench",
        help="benchmark sparse vs dense (kernels, step, width scaling): tables, JSON, plots",
        description="What sparsity buys on your shapes: kernels, training steps and width "
        "scaling against dense BLAS, scipy.sparse, torch.sparse and masked-dense PyTorch RigL.",
    )
    from sparsecore.benchmarks.suite import add_arguments

    add_arguments(bench)
    args = ap.parse_args(argv)
    try:
        return _dispatch(args, argv)
    except USER_ERRORS as e:
        if os.environ.get("SPARSECORE_DEBUG"):
            raise
        text = str(e).strip() or type(e).__name__
        if isinstance(e, MemoryError):
            text = f"out of memory ({text}); `sparsecore plan` shows what a run needs"
        # details (a memory plan that did not fit) first, the error itself as the last line
        first, *details = text.splitlines()
        if details:
            print("\n".join(details), file=sys.stderr)
        print(f"sparsecore {args.cmd}: error: {first}", file=sys.stderr)
        if args.cmd == "train":
            from sparsecore import mpi

            mpi.abort(2)  # several ranks: stop the others too (else they would wait)
        return 2


def _dispatch(args, argv) -> int:
    if args.cmd == "bench":
        from sparsecore.benchmarks.suite import run

        return run(args)
    if args.cmd == "info":
        import numba
        import numpy
        import scipy

        import sparsecore

        print(
            json.dumps(
                {
                    "sparsecore": sparsecore.__version__,
                    "numpy": numpy.__version__,
                    "scipy": scipy.__version__,
                    "numba": numba.__version__,
                    "threads": sparsecore.threading_info(),
                },
                indent=2,
            )
        )
        return 0
    if args.cmd == "plan":
        from sparsecore.plan import describe_plan, memory_plan, sharded_layers
        from sparsecore.train import TrainConfig

        TrainConfig(  # the same checks and messages as a training run's
            arch=args.arch,
            sparsity=args.sparsity,
            distribution=args.distribution,
            method=args.method,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
            grow=args.grow,
            grow_candidates=args.grow_candidates,
            device=args.device,
        ).validate()
        if args.ranks < 1:
            raise ValueError(f"--ranks must be >= 1, got {args.ranks}")
        if args.ranks > 1 and args.shard_layers is None:
            raise ValueError(
                "--ranks plans one rank of sharded layers: add --shard-layers (data-parallel "
                "ranks each hold the whole model: their plan is the 1-rank plan)"
            )
        sharded = sharded_layers(
            args.arch,
            args.sparsity,
            args.distribution,
            args.method,
            args.shard_layers,
            args.ranks,
        )
        plan = memory_plan(
            args.arch,
            args.sparsity,
            distribution=args.distribution,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
            method=args.method,
            grow=args.grow,
            grow_candidates=args.grow_candidates,
            device=args.device,
            ranks=args.ranks,
            sharded=sharded,
        )
        print(json.dumps(plan, indent=1) if args.json else describe_plan(plan))
        return 0
    if args.cmd == "train":
        from sparsecore import mpi

        if args.nprocs is not None and args.nprocs < 1:
            raise ValueError(f"--nprocs must be >= 1 (processes to start), got {args.nprocs}")
        from sparsecore.cost import describe
        from sparsecore.plan import parse_bytes

        try:
            max_memory = None if args.max_memory is None else parse_bytes(args.max_memory)
        except ValueError as e:
            raise ValueError(f"--max-memory: {e}") from None
        from sparsecore.train import TrainConfig, train

        cfg = TrainConfig(
            dataset=args.dataset,
            arch=args.arch,
            sparsity=args.sparsity,
            distribution=args.distribution,
            method=args.method,
            grow=args.grow,
            grow_candidates=args.grow_candidates,
            flush_denormals=not args.no_flush_denormals,
            delta_t=args.delta_t,
            alpha=args.alpha,
            t_end=args.t_end,
            optimizer=args.optimizer,
            lr=args.lr,
            momentum=args.momentum,
            nesterov=args.nesterov,
            weight_decay=args.weight_decay,
            lr_schedule=args.lr_schedule,
            lr_step_every=args.lr_step_every,
            lr_gamma=args.lr_gamma,
            warmup_steps=args.warmup_steps,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            val_fraction=args.val_fraction,
            max_steps=args.max_steps,
            max_memory=max_memory,
            device=args.device,
            shard_layers=args.shard_layers,
            rank_timeout=args.rank_timeout,
            out=args.out,
            progress=not args.no_progress,
        ).validate()  # before starting any rank: bad settings are one error, not N
        if args.nprocs is not None and args.nprocs > 1 and mpi.world() is None:
            try:  # re-launch this command on N ranks
                rc = mpi.launch(args.nprocs, sys.argv[1:] if argv is None else argv)
            except mpi.MPIUnavailableError as e:
                raise ValueError(str(e)) from None
            if rc != 0:  # the failing rank said why above (MPI's own abort notice may follow)
                print(
                    f"sparsecore train: error: the {args.nprocs} MPI ranks stopped with exit "
                    f"status {rc}; see the ranks' output above",
                    file=sys.stderr,
                )
            return rc
        tr, summary = train(cfg, resume=args.resume)
        if tr.dist is not None and tr.dist.rank != 0:
            return 0  # rank 0 reports
        print(f"cost: {describe(summary['cost'])}")
        if tr.dist is not None:
            print(f"communication: {tr.dist.describe()}")
        else:
            from sparsecore.cost import held_bytes

            print(
                f"training state held: {held_bytes(tr.model, tr.opt) / 2**20:.1f} MiB "
                "(measured from the arrays)"
            )
        if summary["time_per_step_s"]:
            print(
                f"measured time per step: {1e3 * summary['time_per_step_s']:.2f} ms "
                f"(batch {cfg.batch_size}, topology updates included)"
            )
        print(f"outputs: {args.out}/metrics.jsonl, learning_curve.png, checkpoint.npz")
        if summary["test_acc"] is None:  # a resumed run that had nothing left to train
            print("test accuracy: no epoch ran (the checkpoint's run was complete)")
        else:
            print(f"test accuracy: {100 * summary['test_acc']:.2f}%")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
