"""Command line: ``sparsecore train | plan | bench | info`` (also ``python -m sparsecore``).

The flags of ``train`` and ``plan`` are derived from TrainConfig (sparsecore/config.py): one
per setting, with its default, choices and help from the field's declaration; only what is
not a setting of the run (``--resume``, ``--nprocs``, ``--ranks``, ``--json``) is written here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

import numba
import numpy
import scipy

import sparsecore
from kernels.validation import GPUUnavailableError
from sparsecore import config, cost, fallback, mpi
from sparsecore.config import TrainConfig
from sparsecore.plan import describe_plan, memory_plan, sharded_layers
from sparsecore.train import TrainingDiverged, train

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


def add_settings(parser, fields, **overrides):
    """One flag per TrainConfig field in ``fields`` (sparsecore/config.py declares its default,
    choices, parser and help): ``--delta-t`` for delta_t; for a setting off by default a
    ``--X`` switch, for one on by default a ``--no-X`` switch. ``overrides``: argparse keywords
    by field name (e.g. ``arch={"required": True}``)."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields:
        meta = f.metadata
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        name = "--" + f.name.replace("_", "-")
        kw = {"dest": f.name, "help": meta["help"]}
        if isinstance(default, bool):
            kw["action"] = "store_false" if default else "store_true"
            name = f"--no-{name[2:]}" if default else name
        else:  # (a field's own parser runs in settings_from: its errors name the flag there)
            kw["type"] = str if meta["parse"] else _value_type(hints[f.name])
            if meta["choices"]:
                kw["choices"] = meta["choices"]
        kw["default"] = default
        kw.update(meta["cli"], **overrides.get(f.name, {}))
        if kw["default"] is not None and not isinstance(default, bool) and not kw.get("required"):
            kw["help"] += " (default: %(default)s)"
        parser.add_argument(name, **kw)


def settings_from(args, fields) -> TrainConfig:
    """The TrainConfig of the parsed ``args`` (the fields added by add_settings), validated; a
    value given as text is read by its field's parser (ValueError naming the flag)."""
    values = {}
    for f in fields:
        v = getattr(args, f.name)
        if isinstance(v, str) and f.metadata["parse"] is not None:
            try:
                v = f.metadata["parse"](v)
            except ValueError as e:
                raise ValueError(f"--{f.name.replace('_', '-')}: {e}") from None
        values[f.name] = v
    return TrainConfig(**values).validate()


def _value_type(hint):
    """int, float or str of a field's annotation (``int | None`` -> int)."""
    kinds = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    if len(kinds) != 1 or kinds[0] not in (int, float, str):
        raise TypeError(f"a setting of type {hint} needs a parse= in its declaration")
    return kinds[0]


def _add_train(sub):
    p = sub.add_parser("train", help="train an MLP with RigL / SET / static sparsity / dense")
    add_settings(p, config.fields())
    p.add_argument("--resume", default=None, help="checkpoint to resume from")
    p.add_argument(
        "--nprocs",
        type=int,
        default=None,
        help="train on N MPI processes (needs the [mpi] extra): starts mpiexec -n N python -m "
        "sparsecore train ...; data-parallel, or with --shard-layers layers split by rows "
        "(the same result as one process either way)",
    )


def _add_plan(sub):
    p = sub.add_parser("plan", help="bytes of every piece of training state, before training")
    add_settings(
        p,
        config.fields(plan=True),
        arch={"required": True},
        device={"help": "cuda: plan the GPU's memory (where a device run keeps its state)"},
    )
    p.add_argument(
        "--ranks", type=int, default=1, help="with --shard-layers: the plan of one of N ranks"
    )
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
            mpi.abort(2)  # several ranks: stop the others too (else they would wait)
        return 2


def _dispatch(args, argv) -> int:
    if args.cmd == "bench":
        from sparsecore.benchmarks.suite import run

        return run(args)
    return COMMANDS[args.cmd](args, argv)


def _info(args, argv) -> int:
    versions = {m.__name__: m.__version__ for m in (sparsecore, numpy, scipy, numba)}
    print(json.dumps({**versions, "threads": sparsecore.threading_info()}, indent=2))
    return 0


def _plan(args, argv) -> int:
    cfg = settings_from(args, config.fields(plan=True))  # a training run's checks
    if args.ranks < 1:
        raise ValueError(f"--ranks must be >= 1, got {args.ranks}")
    if args.ranks > 1 and cfg.shard_layers is None:
        raise ValueError(
            "--ranks plans one rank of sharded layers: add --shard-layers (data-parallel "
            "ranks each hold the whole model: their plan is the 1-rank plan)"
        )
    plan = memory_plan(cfg, ranks=args.ranks, sharded=sharded_layers(cfg, args.ranks))
    print(json.dumps(plan, indent=1) if args.json else describe_plan(plan))
    return 0


def _train(args, argv) -> int:
    if args.nprocs is not None and args.nprocs < 1:
        raise ValueError(f"--nprocs must be >= 1 (processes to start), got {args.nprocs}")
    # before starting any rank: bad settings are one error, not N
    cfg = settings_from(args, config.fields())
    if args.nprocs is not None and args.nprocs > 1 and mpi.world() is None:
        return _launch(args, argv)
    tr, summary = train(cfg, resume=args.resume, parallel=mpi.parallel())
    if tr.par.rank == 0:  # rank 0 reports
        _report(tr, summary, args)
    return 0


def _launch(args, argv) -> int:
    """Re-launch this command on --nprocs MPI ranks; their exit status."""
    try:
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


def _report(tr, summary, args):
    print(f"cost: {cost.describe(summary['cost'])}")
    if tr.cfg.dense_fallback != "off":
        print(fallback.describe(summary["dense_fallback"]))
    if tr.par.size > 1:
        print(f"communication: {tr.par.describe()}")
    else:
        print(
            f"training state held: {cost.held_bytes(tr.model, tr.opt) / 2**20:.1f} MiB "
            "(measured from the arrays)"
        )
    if summary["time_per_step_s"]:
        print(
            f"measured time per step: {1e3 * summary['time_per_step_s']:.2f} ms "
            f"(batch {tr.cfg.batch_size}, topology updates included)"
        )
    print(f"outputs: {args.out}/metrics.jsonl, learning_curve.png, checkpoint.npz")
    if summary["test_acc"] is None:  # a resumed run that had nothing left to train
        print("test accuracy: no epoch ran (the checkpoint's run was complete)")
    else:
        print(f"test accuracy: {100 * summary['test_acc']:.2f}%")


COMMANDS = {"info": _info, "plan": _plan, "train": _train}


if __name__ == "__main__":
    sys.exit(main())
