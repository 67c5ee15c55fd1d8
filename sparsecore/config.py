"""TrainConfig: the one source of a run's settings, their defaults, choices and meaning.

Every field is declared once here with ``setting(...)``, and what else needs the settings reads
them from these declarations:

- the command line (sparsecore/cli.py): one flag per field (``--delta-t`` for ``delta_t``, a
  ``--no-X`` flag for a setting that is on by default), its default, choices, parser and help;
  ``sparsecore plan`` takes the fields marked ``plan=True``;
- the memory plan (sparsecore/plan.py) reads a TrainConfig, and exactly the ``plan=True`` fields;
- a checkpoint's check on resume (sparsecore/checkpoint.py): ``resume="structure"`` fields must
  match the checkpoint (they decide the shapes of the state), ``resume="result"`` fields may
  differ with a warning (the run then differs from one that never stopped), ``resume="free"``
  fields may differ silently; ``absent`` is the value a checkpoint written before the field
  existed had.

``TrainConfig.validate()`` checks every field and says which flag was wrong, what it takes and
what came.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from dataclasses import dataclass

import numpy as np

from sparsecore.rigl.distributions import layer_densities

METHODS = ("rigl", "set", "static", "dense")
STRUCTURE, RESULT, FREE = "structure", "result", "free"  # what a resumed run must keep
_UNSET = object()

UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text) -> int:
    """'8GB', '512 MiB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?i?[bB])?\s*", str(text))
    try:
        value = float(m.group(1)) if m else None
    except ValueError:
        value = None
    if value is None:
        raise ValueError(f"a memory size must look like 8GB or 512MiB, got {text!r}")
    unit = (m.group(2) or "b").lower()
    size = value * UNITS[unit]
    if not (math.isfinite(size) and 1 <= size < 2**63):
        raise ValueError(f"a memory size must be between 1 byte and 8 EiB, got {text!r}")
    return int(size)


def parse_arch(text: str) -> list[int]:
    """'784-300-100-10' -> [784, 300, 100, 10]."""
    try:
        sizes = [int(x) for x in str(text).split("-")]
    except ValueError:
        raise ValueError(f"layer sizes must look like 784-300-100-10, got {text!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"layer sizes need at least two positive sizes, got {text!r}")
    return sizes


def parse_layers(text: str):
    """'all' -> 'all'; '0,2' -> [0, 2] (weighted-layer indices)."""
    if text == "all":
        return "all"
    try:
        out = [int(v) for v in str(text).split(",")]
    except ValueError:
        out = None
    if not out or min(out) < 0:
        raise ValueError(f"takes 'all' or weighted-layer indices like 1 or 0,1; got {text!r}")
    return out


def setting(
    default,
    help: str,
    *,
    resume: str = FREE,
    plan: bool = False,
    choices: tuple | None = None,
    parse=None,
    absent=_UNSET,
    cli: dict | None = None,
):
    """A TrainConfig field with what the CLI, the plan and the checkpoint check need to know.

    help: the flag's help (for a setting on by default: the help of its ``--no-`` flag).
    resume: STRUCTURE, RESULT or FREE (see the module docstring). plan: the memory plan reads it.
    choices: the allowed values. parse: text -> value for the command line (else the field's
    type). absent: the value of a checkpoint written before this field existed (else the
    default). cli: further argparse keywords (nargs, const, metavar, default, required).
    """
    meta = {"help": help, "resume": resume, "plan": plan, "choices": choices, "parse": parse}
    meta["cli"] = dict(cli or {})
    if absent is not _UNSET:
        meta["absent"] = absent
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """The settings of one training run (the defaults are RigL's MNIST MLP setup)."""

    dataset: str = setting(
        "mnist",
        "'mnist' (bundled), an .npz with x_train, y_train, x_test, y_test, or a folder of those "
        "four .npy files",
    )
    arch: list = setting(
        [784, 300, 100, 10],
        "layer sizes, e.g. 784-300-100-10",
        resume=STRUCTURE,
        plan=True,
        parse=parse_arch,
        cli={"metavar": "N-N-..."},
    )
    sparsity: float = setting(
        0.9,
        "the fraction of weights that are zero, over the sparse layers",
        resume=STRUCTURE,
        plan=True,
    )
    distribution: str = setting(
        "erk",
        "per-layer densities: erk (Erdős–Rényi-kernel) or uniform",
        resume=STRUCTURE,
        plan=True,
        choices=("erk", "uniform"),
    )
    method: str = setting(
        "rigl",
        "rigl (drop |w|, grow |grad|), set (grow at random), static, or dense",
        resume=STRUCTURE,
        plan=True,
        choices=METHODS,
    )
    grow: str = setting(
        "exact",
        "RigL's grow: exact top-k of |dY·Xᵀ| (m·n·batch per update), or the top-k of "
        "uniformly sampled absent candidates (cost ∝ nnz)",
        resume=STRUCTURE,
        plan=True,
        choices=("exact", "sampled"),
        absent="exact",
    )
    grow_candidates: float = setting(
        10,
        "with --grow sampled: candidates scored per grown connection",
        resume=RESULT,
        plan=True,
        absent=10,
    )
    grow_tile_bytes: int | None = setting(
        None,
        "the exact grow's tile, e.g. 16MiB (default: the kernel's rule, or fitted to "
        "--max-memory); changes memory and speed, never the result",
        plan=True,
        parse=parse_bytes,
    )
    delta_t: int = setting(100, "steps between topology updates (ΔT)", resume=RESULT)
    alpha: float = setting(0.3, "initial drop fraction", resume=RESULT, plan=True)
    t_end: float = setting(
        0.75, "fraction of training after which the topology is frozen", resume=RESULT
    )
    optimizer: str = setting(
        "sgd", "the optimizer", resume=STRUCTURE, plan=True, choices=("sgd", "adam", "adamw")
    )
    lr: float = setting(0.1, "learning rate", resume=RESULT)
    momentum: float = setting(
        0.9, "SGD momentum (0: plain SGD, which keeps no state)", resume=RESULT, plan=True
    )
    nesterov: bool = setting(False, "Nesterov momentum", resume=RESULT)
    weight_decay: float = setting(1e-4, "L2 weight decay (AdamW: decoupled)", resume=RESULT)
    lr_schedule: str = setting(
        "cosine", "learning-rate schedule", resume=RESULT, choices=("cosine", "step", "constant")
    )
    lr_step_every: int = setting(
        0, "with --lr-schedule step: multiply by --lr-gamma every this many steps", resume=RESULT
    )
    lr_gamma: float = setting(0.1, "with --lr-schedule step: the factor", resume=RESULT)
    warmup_steps: int = setting(0, "steps of linear learning-rate warm-up", resume=RESULT)
    epochs: int = setting(20, "epochs to train", resume=RESULT)
    batch_size: int = setting(128, "mini-batch size", resume=RESULT, plan=True)
    seed: int = setting(0, "seed of the initial topology, weights and batch order", resume=RESULT)
    val_fraction: float = setting(0.0, "fraction of the training set held out for validation")
    activation: str = setting(
        "relu",
        "hidden-layer activation",
        resume=STRUCTURE,
        choices=("relu", "leaky_relu", "tanh", "sigmoid"),
    )
    fan_in: str = setting(
        "sparse",
        "initial weight scale from each unit's sparse fan-in, or the dense layer's",
        resume=STRUCTURE,
        choices=("sparse", "dense"),
    )
    step_on_update: bool = setting(
        False,
        "take an optimizer step on topology-update iterations too (official RigL does not)",
        resume=RESULT,
    )
    max_steps: int | None = setting(None, "stop after this many steps", resume=RESULT)
    out: str | None = setting(
        None,
        "folder for metrics, plot and checkpoint",
        cli={"default": "runs/default"},
    )
    progress: bool = setting(True, "no progress bar and no per-epoch line")
    max_memory: int | None = setting(
        None,
        "refuse, before allocating, a run whose memory plan exceeds this (e.g. 8GB; per MPI rank)",
        parse=parse_bytes,
    )
    device: str = setting(
        "cpu",
        "cuda: train on the GPU (needs the [gpu] extra); the model moves there once and weights, "
        "activations, optimizer state and topology updates stay there",
        plan=True,
        choices=("cpu", "cuda"),
    )
    dense_fallback: str = setting(
        "off",
        "auto: a sparse layer whose products run faster on dense BLAS at its density, shape and "
        "batch (timed on this machine when the run starts) computes them through a dense copy "
        "of its weights (2·m·n·4 bytes more, counted in the memory plan; weights, optimizer "
        "state, checkpoints and RigL's topology stay sparse); on: every sparse layer does; "
        "off: none (training state stays nnz-sized)",
        resume=RESULT,
        plan=True,
        choices=("off", "auto", "on"),
        absent="off",
    )
    # x86: flush subnormal floats to zero (MXCSR FTZ/DAZ) in the threads that run the kernels;
    # arithmetic on subnormals is 10-100x slower, and training makes them (kernels/cpu/fpmode.py)
    flush_denormals: bool = setting(
        True,
        "keep subnormal floats (by default the kernel threads flush them to zero: x86 computes "
        "on them 10-100x slower; the GPU kernels always flush, as CuPy compiles them)",
        resume=RESULT,
        absent=False,
    )
    shard_layers: str | list | None = setting(
        None,
        "with several MPI ranks: split these sparse layers by rows over the ranks (no value: "
        "every sparse layer), each rank holding 1/N of their weights, indices and optimizer "
        "state, instead of data-parallel training (same result as one process)",
        plan=True,
        parse=parse_layers,
        cli={"nargs": "?", "const": "all", "metavar": "all|L,L"},
    )
    rank_timeout: float = setting(
        1800.0,
        "with several MPI ranks: seconds without progress (a step, an update, an evaluation) "
        "after which every rank stops: a hung rank ends the job (0: never)",
    )

    def validate(self):
        """Check every setting and normalise its type in place (NumPy scalars to Python
        numbers, a tuple arch to a list, a Path to a string), so that the config is JSON as
        written into checkpoints and compares equal to the one read back. Returns self.
        Errors name the field and its command-line flag, what was expected and what came."""
        for f in dataclasses.fields(self):
            if f.metadata["choices"] is not None:
                _check_choice(self, f.name, f.metadata["choices"])
        if self.grow != "exact" and self.method != "rigl":
            raise ValueError(f"grow={self.grow!r} applies to method rigl, not {self.method!r}")
        arch = self.arch
        if (
            not isinstance(arch, (list, tuple))
            or len(arch) < 2
            or not all(_is_int(a) and a >= 1 for a in arch)
        ):
            raise ValueError(f"arch must be layer sizes like 784-300-100-10, got {arch!r}")
        self.arch = [int(a) for a in arch]
        if self.method == "dense":
            _real(self, "sparsity", 0.0, 1.0, hi_open=True)
        else:
            _real(self, "sparsity", 0.0, 1.0, lo_open=True, hi_open=True)
        _real(self, "grow_candidates", 1.0)
        _integer(self, "grow_tile_bytes", 4, optional=True)
        _integer(self, "delta_t", 1, what="ΔT, steps between topology updates")
        _real(self, "alpha", 0.0, 1.0, what="the initial drop fraction")
        _real(self, "t_end", 0.0, 1.0, what="a fraction of training")
        _real(self, "lr", 0.0, lo_open=True)
        _real(self, "momentum", 0.0, 1.0, hi_open=True)
        _real(self, "weight_decay", 0.0)
        _integer(self, "lr_step_every", 0)
        _real(self, "lr_gamma", 0.0, lo_open=True, what="the step schedule's factor")
        _integer(self, "warmup_steps", 0)
        _integer(self, "epochs", 1)
        _integer(self, "batch_size", 1)
        _integer(self, "seed", 0)
        if self.seed >= 2**63:
            raise ValueError(f"{flag_of('seed')} must be below 2**63, got {self.seed}")
        _real(self, "val_fraction", 0.0, 1.0, hi_open=True)
        _integer(self, "max_steps", 1, optional=True)
        _integer(self, "max_memory", 1, optional=True, what="bytes")
        _real(self, "rank_timeout", 0.0, what="seconds (0: never)")
        for f in dataclasses.fields(self):
            if isinstance(f.default, bool):
                v = getattr(self, f.name)
                if not isinstance(v, (bool, np.bool_)):
                    raise TypeError(f"{f.name} must be True or False, got {type(v).__name__} {v!r}")
                setattr(self, f.name, bool(v))
        if isinstance(self.dataset, os.PathLike):
            self.dataset = os.fspath(self.dataset)
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"dataset (--dataset) must be 'mnist' or a path, got {self.dataset!r}")
        if isinstance(self.out, os.PathLike):
            self.out = os.fspath(self.out)
        if self.out is not None and not (isinstance(self.out, str) and self.out):
            raise ValueError(f"out must be a folder path, or None for no files; got {self.out!r}")
        s = self.shard_layers
        if isinstance(s, (list, tuple)) and all(_is_int(i) for i in s):
            s = self.shard_layers = [int(i) for i in s]
        if not (
            s is None
            or s == "all"
            or (
                isinstance(s, list)
                and len(s) > 0
                and all(isinstance(i, int) and 0 <= i < len(self.arch) - 1 for i in s)
            )
        ):
            raise ValueError(
                f"shard_layers (--shard-layers) must be 'all' or a non-empty list of "
                f"weighted-layer indices in [0, {len(self.arch) - 2}], got {s!r}"
            )
        if self.lr_schedule == "step" and self.lr_step_every <= 0:
            raise ValueError("the step lr schedule needs lr_step_every > 0 (--lr-step-every)")
        if self.method != "dense":
            self._check_layers_keep_connections()
        return self

    def shapes(self) -> list[tuple[int, int]]:
        """(out, in) of every weighted layer."""
        return layer_shapes(self.arch)

    def densities(self) -> list:
        """Every weighted layer's density (1.0 for each layer of a dense run)."""
        shapes = self.shapes()
        if self.method == "dense":
            return [1.0] * len(shapes)
        return layer_densities(self.sparsity, shapes, self.distribution)

    def sharded_layers(self, ranks: int) -> list[int]:
        """The weighted layers that ``shard_layers`` ("all", a list of indices, or None) splits
        over ``ranks`` MPI ranks: "all" is every sparse layer with at least ``ranks`` rows; a listed
        layer must be sparse and have that many rows. [] for one rank or None."""
        shard_layers, sparsity, distribution = self.shard_layers, self.sparsity, self.distribution
        method = self.method
        if shard_layers is None or ranks <= 1:
            return []
        if method == "dense":
            raise ValueError("shard_layers splits sparse layers; method 'dense' has none")
        shapes, dens = self.shapes(), self.densities()
        if shard_layers == "all":
            chosen = [
                l
                for l, ((m, _), d) in enumerate(zip(shapes, dens, strict=True))
                if d < 1.0 and m >= ranks
            ]
            if not chosen:
                raise ValueError(f"shard_layers='all': no sparse layer has at least {ranks} rows")
            return chosen
        for l in shard_layers:
            if not 0 <= l < len(shapes):
                raise ValueError(
                    f"shard_layers: layer {l} does not exist (weighted layers 0..{len(shapes) - 1})"
                )
            m, n = shapes[l]
            if dens[l] >= 1.0:
                raise ValueError(
                    f"shard_layers: layer {l} ({m} x {n}) is dense at sparsity {sparsity} "
                    f"({distribution}); only sparse layers can be sharded"
                )
            if m < ranks:
                raise ValueError(
                    f"shard_layers: layer {l} has {m} rows, fewer than the {ranks} ranks"
                )
        return sorted(set(shard_layers))

    def _check_layers_keep_connections(self):
        """Every sparse layer must keep at least one connection at this sparsity: a layer of
        nnz 0 passes nothing forward and has nothing to drop or grow from."""
        shapes = self.shapes()
        for l, ((m, n), d) in enumerate(zip(shapes, self.densities(), strict=True)):
            if int(round(d * m * n)) < 1:
                raise ValueError(
                    f"sparsity {self.sparsity} ({self.distribution}) leaves weighted layer {l} "
                    f"({m}×{n}, density {d:.3g}) with no connection; lower --sparsity"
                )


def layer_shapes(arch) -> list[tuple[int, int]]:
    """(out, in) of every weighted layer of an MLP with these layer sizes."""
    return [(o, i) for i, o in zip(arch[:-1], arch[1:], strict=True)]


def fields(*, resume: str | None = None, plan: bool | None = None) -> list:
    """TrainConfig's fields (dataclasses.Field), optionally those of one resume role or those
    the memory plan reads."""
    return [
        f
        for f in dataclasses.fields(TrainConfig)
        if (resume is None or f.metadata["resume"] == resume)
        and (plan is None or f.metadata["plan"] == plan)
    ]


def names(**kw) -> tuple[str, ...]:
    """The names of ``fields(**kw)``."""
    return tuple(f.name for f in fields(**kw))


def absent_values() -> dict:
    """{field: the value a checkpoint written before the field existed had}, for the fields
    that declare one (``absent=``; every checkpoint holds the others)."""
    return {f.name: f.metadata["absent"] for f in fields() if "absent" in f.metadata}


def flag_of(key: str) -> str:
    """'delta_t' -> 'delta_t (--delta-t)': a field named as in Python and on the command line."""
    return f"{key} (--{key.replace('_', '-')})"


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _check_choice(cfg, key, choices):
    v = getattr(cfg, key)
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"{flag_of(key)} must be one of {', '.join(choices)}; got {v!r}")


def _integer(cfg, key, low, *, optional=False, what=""):
    v = getattr(cfg, key)
    if v is None and optional:
        return
    if not _is_int(v):
        raise ValueError(
            f"{flag_of(key)} must be an integer >= {low}{f' ({what})' if what else ''}, got "
            f"{type(v).__name__} {v!r}"
        )
    if v < low:
        raise ValueError(f"{flag_of(key)} must be >= {low}{f' ({what})' if what else ''}, got {v}")
    setattr(cfg, key, int(v))


def _real(cfg, key, lo, hi=math.inf, *, lo_open=False, hi_open=False, what=""):
    """A finite real number in the interval; stored as a Python float (ints stay ints)."""
    v = getattr(cfg, key)
    lb, rb = "(" if lo_open else "[", ")" if hi_open or hi == math.inf else "]"
    span = f"a finite number in {lb}{lo:g}, {'∞' if hi == math.inf else f'{hi:g}'}{rb}"
    extra = f" ({what})" if what else ""
    if not isinstance(v, numbers.Real) or isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{flag_of(key)} must be {span}{extra}, got {type(v).__name__} {v!r}")
    f = float(v)
    ok = math.isfinite(f) and (f > lo if lo_open else f >= lo) and (f < hi if hi_open else f <= hi)
    if not ok:
        raise ValueError(f"{flag_of(key)} must be {span}{extra}, got {v!r}")
    setattr(cfg, key, int(v) if _is_int(v) else f)


__all__ = [
    "FREE",
    "METHODS",
    "RESULT",
    "STRUCTURE",
    "TrainConfig",
    "absent_values",
    "fields",
    "flag_of",
    "layer_shapes",
    "names",
    "parse_arch",
    "parse_bytes",
    "parse_layers",
    "setting",
]
