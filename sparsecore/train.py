"""The training loop: mini-batches, RigL/SET/static/dense, metrics, checkpoints, cost report.

``TrainConfig(device="cuda")`` moves the model to the GPU once, when the Trainer is built (one
``GPUUnavailableError`` there without CuPy or a device). Weights, activations, gradients,
optimizer state and topology updates then stay on the device; the training set is uploaded
once (batches are gathered there by an epoch's permutation, uploaded once per epoch) unless it
exceeds ``DEVICE_DATA_BYTES``, then each batch is uploaded. The host reads the loss and accuracy
once per epoch (and the loss at each topology update, to stop before growing from NaNs),
evaluation's two numbers, and the arrays of a checkpoint (written and read as on the CPU: a
checkpoint resumes on either side).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import numbers
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kernels._threads import check_fork_safe
from kernels.cpu import fpmode
from kernels.validation import memory_limit
from sparsecore import checkpoint, mpi
from sparsecore import data as data_mod
from sparsecore.cost import model_cost
from sparsecore.device import get_device, to_host
from sparsecore.layers import Sequential, SoftmaxCrossEntropy, mlp
from sparsecore.optim import SGD, Adam, lr_at
from sparsecore.plan import describe_plan, fit_grow_tile, memory_plan, sharded_layers
from sparsecore.rigl.distributions import layer_densities
from sparsecore.rigl.schedule import UpdateSchedule
from sparsecore.rigl.updater import UPDATERS

METHODS = ("rigl", "set", "static", "dense")
EPOCH_TAG = 0xE90C  # an epoch's order is seeded by (seed, EPOCH_TAG, epoch)
# A training set up to this many bytes is put on the device once; a larger one is uploaded
# batch by batch.
DEVICE_DATA_BYTES = 4 << 30


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    dataset: str = "mnist"
    arch: list = field(default_factory=lambda: [784, 300, 100, 10])
    sparsity: float = 0.9
    distribution: str = "erk"
    method: str = "rigl"
    grow: str = "exact"  # RigL's grow: "exact" top-k of |dY·Xᵀ|, or "sampled" (see rigl.RigL)
    grow_candidates: float = 10  # "sampled": candidates scored per grown connection
    grow_tile_bytes: int | None = None  # "exact": the grow tile (None: the kernel's default)
    delta_t: int = 100
    alpha: float = 0.3
    t_end: float = 0.75
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"
    lr_step_every: int = 0  # the "step" schedule: multiply by lr_gamma every this many steps
    lr_gamma: float = 0.1
    warmup_steps: int = 0
    epochs: int = 20
    batch_size: int = 128
    seed: int = 0
    val_fraction: float = 0.0
    activation: str = "relu"
    fan_in: str = "sparse"
    step_on_update: bool = False  # official RigL: no optimizer step on an update iteration
    max_steps: int | None = None  # stop early (tests, smoke runs)
    out: str | None = None
    progress: bool = True
    max_memory: int | None = None  # bytes: refuse (before allocating) a run whose plan exceeds it
    device: str = "cpu"  # "cuda": train on the GPU (CuPy), the model moved there once
    # x86: flush subnormal floats to zero (MXCSR FTZ/DAZ) in the threads that run the kernels;
    # arithmetic on subnormals is 10-100x slower, and training makes them (kernels/cpu/fpmode.py)
    flush_denormals: bool = True
    # MPI: split these sparse layers by rows over the ranks ("all": every sparse layer with at
    # least as many rows as ranks; a list: those weighted layers, 0-based) instead of
    # data-parallel training; ignored by a single process (sparsecore/mpi)
    shard_layers: str | list | None = None
    # MPI: stop every rank when one makes no progress (a step, an update, an evaluation batch)
    # for this many seconds: a hung rank, not only a dead one, ends the job (0: never)
    rank_timeout: float = 1800.0

    def validate(self):
        """Check every setting and normalise its type in place (NumPy scalars to Python
        numbers, a tuple arch to a list, a Path to a string), so that the config is JSON as
        written into checkpoints and compares equal to the one read back. Returns self.
        Errors name the field and its command-line flag, what was expected and what came."""
        _check_choice(self, "device", ("cpu", "cuda"))
        _check_choice(self, "method", METHODS)
        _check_choice(self, "grow", ("exact", "sampled"))
        _check_choice(self, "distribution", ("erk", "uniform"))
        _check_choice(self, "optimizer", ("sgd", "adam", "adamw"))
        _check_choice(self, "lr_schedule", ("cosine", "step", "constant"))
        _check_choice(self, "activation", ("relu", "leaky_relu", "tanh", "sigmoid"))
        _check_choice(self, "fan_in", ("sparse", "dense"))
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
            raise ValueError(f"{_flag('seed')} must be below 2**63, got {self.seed}")
        _real(self, "val_fraction", 0.0, 1.0, hi_open=True)
        _integer(self, "max_steps", 1, optional=True)
        _integer(self, "max_memory", 1, optional=True, what="bytes")
        _real(self, "rank_timeout", 0.0, what="seconds (0: never)")
        for key in ("nesterov", "step_on_update", "progress", "flush_denormals"):
            v = getattr(self, key)
            if not isinstance(v, (bool, np.bool_)):
                raise TypeError(f"{key} must be True or False, got {type(v).__name__} {v!r}")
            setattr(self, key, bool(v))
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

    def _check_layers_keep_connections(self):
        """Every sparse layer must keep at least one connection at this sparsity: a layer of
        nnz 0 passes nothing forward and has nothing to drop or grow from."""
        shapes = [(o, i) for i, o in zip(self.arch[:-1], self.arch[1:], strict=True)]
        dens = layer_densities(self.sparsity, shapes, self.distribution)
        for l, ((m, n), d) in enumerate(zip(shapes, dens, strict=True)):
            if int(round(d * m * n)) < 1:
                raise ValueError(
                    f"sparsity {self.sparsity} ({self.distribution}) leaves weighted layer {l} "
                    f"({m}×{n}, density {d:.3g}) with no connection; lower --sparsity"
                )


def _flag(key: str) -> str:
    return f"{key} (--{key.replace('_', '-')})"


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _check_choice(cfg, key, choices):
    v = getattr(cfg, key)
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"{_flag(key)} must be one of {', '.join(choices)}; got {v!r}")


def _integer(cfg, key, low, *, optional=False, what=""):
    v = getattr(cfg, key)
    if v is None and optional:
        return
    if not _is_int(v):
        raise ValueError(
            f"{_flag(key)} must be an integer >= {low}{f' ({what})' if what else ''}, got "
            f"{type(v).__name__} {v!r}"
        )
    if v < low:
        raise ValueError(f"{_flag(key)} must be >= {low}{f' ({what})' if what else ''}, got {v}")
    setattr(cfg, key, int(v))


def _real(cfg, key, lo, hi=math.inf, *, lo_open=False, hi_open=False, what=""):
    """A finite real number in the interval; stored as a Python float (ints stay ints)."""
    v = getattr(cfg, key)
    lb, rb = "(" if lo_open else "[", ")" if hi_open or hi == math.inf else "]"
    span = f"a finite number in {lb}{lo:g}, {'∞' if hi == math.inf else f'{hi:g}'}{rb}"
    extra = f" ({what})" if what else ""
    if not isinstance(v, numbers.Real) or isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{_flag(key)} must be {span}{extra}, got {type(v).__name__} {v!r}")
    f = float(v)
    ok = math.isfinite(f) and (f > lo if lo_open else f >= lo) and (f < hi if hi_open else f <= hi)
    if not ok:
        raise ValueError(f"{_flag(key)} must be {span}{extra}, got {v!r}")
    setattr(cfg, key, int(v) if _is_int(v) else f)


class MemoryBudgetExceeded(ValueError):
    """The run's memory plan does not fit in --max-memory; nothing was allocated."""


def check_memory(cfg: TrainConfig, ranks: int = 1, sharded=()) -> dict:
    """The run's memory plan (of one rank, with the layers ``sharded`` split over ``ranks``);
    raises MemoryBudgetExceeded if it exceeds cfg.max_memory, or, without one, this machine's
    physical memory (a CPU run that could not fit at all is refused before it allocates).

    With a budget, RigL's exact grow gets a smaller tile than its default when that makes the
    plan fit (plan["grow_tile_bytes"], passed to the grow kernel), unless a tile was given.
    """
    kw = dict(
        distribution=cfg.distribution,
        batch_size=cfg.batch_size,
        optimizer=cfg.optimizer,
        momentum=cfg.momentum,
        alpha=cfg.alpha,
        method=cfg.method,
        grow=cfg.grow,
        grow_candidates=cfg.grow_candidates,
        device=cfg.device,  # cuda: the GPU's memory (--max-memory then bounds that)
        ranks=ranks,
        sharded=list(sharded),
    )
    plan = memory_plan(cfg.arch, cfg.sparsity, grow_tile_bytes=cfg.grow_tile_bytes, **kw)
    budget = cfg.max_memory
    if budget is None and cfg.device == "cpu":  # no budget: only refuse what cannot fit at all
        budget = memory_limit()[0]
    fits = budget is None or plan["total_bytes"] <= budget
    tile_free = cfg.method == "rigl" and cfg.grow == "exact" and cfg.grow_tile_bytes is None
    if not fits and tile_free and cfg.max_memory is not None:  # a smaller grow tile may fit it
        plan = fit_grow_tile(budget, cfg.arch, cfg.sparsity, **kw) or plan
    if budget is not None and plan["total_bytes"] > budget:
        where = f" on each of {ranks} MPI ranks" if sharded else ""
        hint = (
            "; --shard-layers splits the sparse layers over MPI ranks: start several "
            "(--nprocs N) to divide their state"
            if cfg.shard_layers is not None and not sharded
            else ""
        )
        limit = (
            f"--max-memory ({budget / 2**20:.1f} MiB)"
            if cfg.max_memory is not None
            else f"{memory_limit()[1]} ({budget / 2**20:.1f} MiB; --max-memory sets a budget)"
        )
        raise MemoryBudgetExceeded(
            f"this run needs about {plan['total_bytes'] / 2**20:.1f} MiB at its peak{where}, more "
            f"than {limit}; nothing was allocated{hint}.\n" + describe_plan(plan)
        )
    return plan


def sharding(cfg: TrainConfig) -> tuple:
    """(communicator, indices of the weighted layers to split by rows) for a config with
    ``shard_layers`` run on several MPI ranks; (None, []) otherwise (one process, or
    data-parallel training)."""
    if cfg.shard_layers is None:
        return None, []
    comm = mpi.world()
    if comm is None:
        return None, []
    chosen = sharded_layers(
        cfg.arch, cfg.sparsity, cfg.distribution, cfg.method, cfg.shard_layers, comm.Get_size()
    )
    return comm, chosen


def build_model(cfg: TrainConfig, comm=None, sharded=()) -> Sequential:
    """The MLP of the config; with an MPI communicator, the layers ``sharded`` are built as this
    rank's rows only (the same values as those rows of the whole layer)."""
    shapes = [(o, i) for i, o in zip(cfg.arch[:-1], cfg.arch[1:], strict=True)]
    dens = (
        [None] * len(shapes)
        if cfg.method == "dense"
        else layer_densities(cfg.sparsity, shapes, cfg.distribution)
    )
    sparse_layer = None
    if comm is not None and sharded:
        sparse_layer = mpi.shard_builder(comm, sharded, cfg.seed, cfg.fan_in)
    return mlp(
        cfg.arch,
        dens,
        activation=cfg.activation,
        seed=cfg.seed,
        fan_in=cfg.fan_in,
        sparse_layer=sparse_layer,
    )


def make_optimizer(cfg: TrainConfig, params, device=None):
    if cfg.optimizer == "sgd":
        return SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
            device=device,
        )
    return Adam(
        params,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        decoupled=cfg.optimizer == "adamw",
        device=device,
    )


class Trainer:
    def __init__(self, cfg: TrainConfig, dataset: data_mod.Dataset | None = None):
        self.cfg = cfg.validate()
        self.device = get_device(cfg.device)  # the one clear error without CuPy or a GPU
        # MPI with --shard-layers: the layers split by rows over the ranks (else none)
        comm, self.sharded = sharding(cfg)
        self.plan = check_memory(cfg, 1 if comm is None else comm.Get_size(), self.sharded)
        self.data = dataset or data_mod.load(
            cfg.dataset, val_fraction=cfg.val_fraction, seed=cfg.seed
        )
        if self.data.n_features != cfg.arch[0]:
            raise ValueError(
                f"arch starts with {cfg.arch[0]} inputs but the dataset has "
                f"{self.data.n_features} features"
            )
        if self.data.n_classes > cfg.arch[-1]:
            raise ValueError(
                f"arch ends with {cfg.arch[-1]} outputs but the labels go up to "
                f"{self.data.n_classes - 1}"
            )
        self.model = build_model(cfg, comm, self.sharded).to(self.device)  # built on the host
        self.loss_fn = SoftmaxCrossEntropy().to(self.device)
        self.opt = make_optimizer(cfg, self.model.params(), self.device)
        self.steps_per_epoch = self.data.x_train.shape[0] // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"batch_size {cfg.batch_size} exceeds the {self.data.x_train.shape[0]} "
                "training examples"
            )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.schedule = UpdateSchedule.for_training(
            self.total_steps, end_fraction=cfg.t_end, delta_t=cfg.delta_t, alpha=cfg.alpha
        )
        self.step = 0
        self.epoch = 0
        self.history: list[dict] = []
        self.updates: list[dict] = []
        self._good_ckpt: Path | None = None  # the checkpoint this run wrote or resumed from
        self.out = Path(cfg.out) if cfg.out else None
        # None unless started by mpiexec with several ranks (sparsecore/mpi): data-parallel,
        # or the sharded layers' side; the one object this trainer talks to about the ranks
        self.dist = mpi.parallel(self)
        grow_kw = (
            dict(
                grow=cfg.grow,
                candidates=cfg.grow_candidates,
                tile_bytes=self.plan.get("grow_tile_bytes"),
            )
            if cfg.method == "rigl"
            else {}
        )
        selection = None if self.dist is None else self.dist.selection  # where updates choose
        self.updater = (
            None
            if cfg.method == "dense"
            else UPDATERS[cfg.method](self.schedule, cfg.seed, selection=selection, **grow_kw)
        )

    # ------------------------------------------------------------------ one step
    def lr(self) -> float:
        return lr_at(
            self.step,
            base=self.cfg.lr,
            total=self.total_steps,
            schedule=self.cfg.lr_schedule,
            warmup=self.cfg.warmup_steps,
            step_every=self.cfg.lr_step_every,
            gamma=self.cfg.lr_gamma,
        )

    def train_step(self, xb: np.ndarray, yb: np.ndarray):
        """xb feature-major (features, B). Returns (loss, n_correct, topology report or None).

        On a device xb and yb are device arrays, and loss and n_correct 0-d device arrays (read
        when logging: no sync per step); the loss is checked at topology updates and by run()."""
        logits = self.model.forward(xb)
        loss, dlogits, correct = self.loss_fn(logits, yb)
        on_device = self.device.on_device
        update = self.updater is not None and self.updater.is_update_step(self.step)
        if (not on_device or update) and not math.isfinite(loss):
            raise TrainingDiverged(
                f"the loss became {loss} at step {self.step} (epoch {self.epoch}); lower the "
                "learning rate" + self._last_good()
            )
        self.model.backward(dlogits)
        if self.dist is not None:  # data-parallel: the global batch's gradient, loss, correct
            loss, correct = self.dist.allreduce(self.model, loss, correct)
            self.dist.beat()
        report = None
        if update:
            if self.dist is None:
                report = self.updater.update(self.step, self.model, self.opt)
            else:  # the same update on every rank, then the guard
                report = self.dist.update(self.updater, self.step, self.model, self.opt)
            if self.cfg.step_on_update:
                self.opt.step(self.lr())
        else:
            self.opt.step(self.lr())
        self.step += 1
        return loss, correct, report

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.cfg.seed, EPOCH_TAG, epoch])  # (tagged: own stream)
        return rng.permutation(self.data.x_train.shape[0])

    def batches(self, epoch: int):
        """Indices of each mini-batch of an epoch: a permutation seeded by (seed, EPOCH_TAG,
        epoch)."""
        perm = self.epoch_permutation(epoch)
        bs = self.cfg.batch_size
        for s in range(self.steps_per_epoch):
            yield perm[s * bs : (s + 1) * bs]

    # ------------------------------------------------------------------ the loop
    def fp_mode(self):
        """The floating-point mode of the run, scoped: FTZ/DAZ in this thread and the kernel
        threads while the block runs (cfg.flush_denormals, CPU only), every thread's own mode
        restored when it ends (kernels/cpu/fpmode.py)."""
        if self.device.on_device:
            return contextlib.nullcontext(False)
        return fpmode.flush_denormals(self.cfg.flush_denormals)

    def run(self) -> dict:
        if not self.device.on_device:
            check_fork_safe("Trainer.run")
        with self.fp_mode():
            if self.dist is None:
                return self._run()
            self.dist.start_watchdog()  # several MPI ranks: a rank that hangs stops them all
            try:
                summary = self._run()
                self.dist.gather_memory(self.model, self.opt)
                return summary
            finally:
                self.dist.stop_watchdog()

    def _run(self) -> dict:
        cfg = self.cfg
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
            # the metrics of this run so far (a resumed run: the checkpoint's epochs), so that
            # rows of a run killed after its last checkpoint, or of an earlier run, never stay
            self._write_metrics()
        x, y = self.data.x_train, self.data.y_train
        dev = self.device
        on_device = dev.on_device
        resident = on_device and self._device_data()  # (x, y) on the device, or None
        step_times, update_times = [], []
        while self.epoch < cfg.epochs and self.step < self.total_steps:
            t_epoch = time.perf_counter()
            losses, correct, seen = [], 0, 0
            first_step = self.step
            bar = tqdm(
                total=min(self.steps_per_epoch, self.total_steps - self.step),
                desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                disable=not cfg.progress,
                leave=False,
            )
            perm_d = dev.asarray(self.epoch_permutation(self.epoch)) if resident else None
            t_loop = time.perf_counter()
            for s, idx in enumerate(self.batches(self.epoch)):
                if self.step >= self.total_steps:
                    break
                if on_device:
                    xb, yb = self._device_batch(resident, perm_d, s, idx)
                else:
                    rows = idx if self.dist is None else self.dist.local_rows(idx)
                    xb, yb = np.ascontiguousarray(x[rows].T), y[rows]
                t0 = time.perf_counter()
                loss, c, report = self.train_step(xb, yb)
                dt = time.perf_counter() - t0
                step_times.append(dt)
                if report is not None:
                    update_times.append(sum(d["seconds"] for d in report.per_layer))
                    self.updates.append(
                        {
                            "step": report.step,
                            "drop_fraction": report.drop_fraction,
                            "layers": report.per_layer,
                        }
                    )
                losses.append(loss)
                correct += c
                seen += idx.shape[0]
                bar.update()
            bar.close()
            if on_device and losses:  # the epoch's metrics, read once; steps timed as a whole
                dev.sync()
                n = len(losses)
                step_times[-n:] = [(time.perf_counter() - t_loop) / n] * n
                losses = to_host(dev.xp.stack(losses)).tolist()
                correct = int(correct)
                self._check_losses(losses, first_step)
            self.model.clear()
            self.epoch += 1
            row = {
                "epoch": self.epoch,
                "step": self.step,
                "train_loss": float(np.mean(losses)) if losses else float("nan"),
                "train_acc": correct / max(seen, 1),
                **{
                    f"test_{k}": v
                    for k, v in self.evaluate(self.data.x_test, self.data.y_test).items()
                },
                "nnz": int(sum(l.total_nnz() for l in self.model.sparse_layers())),
                "time_per_step_s": float(np.mean(step_times[-len(losses) :])) if losses else 0.0,
                "topology_update_s": float(sum(update_times)),
                "epoch_s": time.perf_counter() - t_epoch,
                "lr": self.lr(),
            }
            if self.data.x_val.shape[0]:
                row.update(
                    {
                        f"val_{k}": v
                        for k, v in self.evaluate(self.data.x_val, self.data.y_val).items()
                    }
                )
            update_times.clear()
            self._check_finite(row)
            self.history.append(row)
            if cfg.progress:
                print(
                    f"epoch {self.epoch:3d}  loss {row['train_loss']:.4f}  "
                    f"train {row['train_acc']:.4f}  test {row['test_acc']:.4f}  "
                    f"{1e3 * row['time_per_step_s']:.2f} ms/step"
                )
            if self.dist is not None:  # several ranks: no hang clock during the write
                self.dist.pause_watchdog()
            if self.out:
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                self.save_checkpoint(self.ckpt_path())
            elif cfg.out and getattr(self.dist, "sharded", False):
                self.save_checkpoint(None)  # another rank's shard goes into rank 0's file
            if self.dist is not None:
                self.dist.resume_watchdog()
        if self.out:
            self.plot(self.out / "learning_curve.png")
        return self.summary(step_times)

    def _device_data(self):
        """The training set on the device, once (None when above DEVICE_DATA_BYTES)."""
        x, y = self.data.x_train, self.data.y_train
        if not isinstance(x, np.ndarray) or x.nbytes + y.nbytes > DEVICE_DATA_BYTES:
            return None  # (also a streamed set: its batches are read, then uploaded)
        return self.device.asarray(x), self.device.asarray(y)

    def _device_batch(self, resident, perm_d, s, idx):
        """Batch s of the epoch on the device (xb feature-major, yb): gathered there by the
        epoch's permutation (uploaded once per epoch: no host sync per step), or uploaded."""
        dev = self.device
        if resident:
            xd, yd = resident
            bs = self.cfg.batch_size
            i = perm_d[s * bs : (s + 1) * bs]
            return dev.xp.ascontiguousarray(xd[i].T), yd[i]
        x, y = self.data.x_train, self.data.y_train
        return dev.asarray(np.ascontiguousarray(x[idx].T)), dev.asarray(y[idx])

    def _check_losses(self, losses, first_step):
        """A device run's losses of an epoch, read at its end: the first non-finite one stops."""
        for i, loss in enumerate(losses):
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"the loss became {loss} at step {first_step + i} (epoch {self.epoch}); "
                    "lower the learning rate" + self._last_good()
                )

    def evaluate(self, x, y) -> dict:
        """Accuracy and mean loss over (x, y). With several MPI ranks this is a collective
        that every rank calls with the same (x, y): data-parallel ranks each evaluate their
        part of the rows and two sums are reduced; with sharded layers every rank runs every
        row (the sharded forward pass gathers)."""
        if x.shape[0] == 0:
            return {"acc": float("nan"), "loss": float("nan")}
        correct, loss_sum = (
            self.eval_sums(x, y) if self.dist is None else self.dist.eval_sums(self, x, y)
        )
        return {"acc": correct / x.shape[0], "loss": loss_sum / x.shape[0]}

    def eval_sums(self, x, y) -> tuple[float, float]:
        """(number correct, summed loss) over the rows of (x, y)."""
        if x.shape[0] == 0:
            return 0.0, 0.0
        xp = self.device.xp  # on a device: logits stay there, two numbers come back
        logits = self.model.predict(x, batch_size=self.cfg.batch_size, to_host=False)
        y = self.device.asarray(y)
        with np.errstate(invalid="ignore", over="ignore"):  # a diverged model: reported by caller
            z = logits - logits.max(axis=1, keepdims=True)
            logp = z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))
        return (
            float(xp.count_nonzero(xp.argmax(logits, axis=1) == y)),
            float(-logp[xp.arange(y.shape[0]), y].astype(xp.float64).sum()),
        )

    # ------------------------------------------------------------------ reporting
    def summary(self, step_times) -> dict:
        cost = model_cost(
            self.model,
            self.cfg.batch_size,
            self.opt,
            self.schedule,
            self.total_steps,
            self.cfg.method,
            grow=self.cfg.grow,
            grow_candidates=self.cfg.grow_candidates,
        )
        last = self.history[-1] if self.history else {}
        return {
            "test_acc": last.get("test_acc"),
            "epochs": self.epoch,
            "steps": self.step,
            "time_per_step_s": float(np.mean(step_times)) if step_times else None,
            "cost": cost,
        }

    def plot(self, path: Path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.history:
            return
        ep = [r["epoch"] for r in self.history]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.plot(ep, [r["train_loss"] for r in self.history], label="train")
        a.plot(ep, [r["test_loss"] for r in self.history], label="test")
        a.set_xlabel("epoch")
        a.set_ylabel("loss")
        a.legend()
        b.plot(ep, [r["train_acc"] for r in self.history], label="train")
        b.plot(ep, [r["test_acc"] for r in self.history], label="test")
        b.set_xlabel("epoch")
        b.set_ylabel("accuracy")
        b.legend()
        fig.suptitle(
            f"{self.cfg.method} at sparsity {self.cfg.sparsity} ({self.cfg.distribution}), "
            f"{'-'.join(map(str, self.cfg.arch))}"
        )
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)

    def _write_metrics(self):
        """metrics.jsonl as the history holds it, replaced atomically (a new temporary file
        created exclusively, as checkpoints are: no planted link is followed)."""
        path = self.out / "metrics.jsonl"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.out)
        try:
            with os.fdopen(fd, "w") as f:
                f.write("".join(json.dumps(row) + "\n" for row in self.history))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _last_good(self) -> str:
        if self._good_ckpt is not None:
            return f"; the last good checkpoint is {self._good_ckpt}"
        return "; this run wrote no checkpoint yet"

    def _check_finite(self, row):
        """Before a checkpoint replaces the last one: weights and the epoch's losses finite."""
        xp = self.device.xp
        bad = [p.name for p in self.model.params() if not bool(xp.isfinite(p.value).all())]
        if bad or not (math.isfinite(row["train_loss"]) and math.isfinite(row["test_loss"])):
            what = ", ".join(bad) if bad else "loss"
            raise TrainingDiverged(
                f"training diverged in epoch {self.epoch} (non-finite {what}); lower the "
                "learning rate" + self._last_good()
            )

    # ------------------------------------------------------------------ checkpoints
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.npz"

    def save_checkpoint(self, path):
        """Everything needed to resume, in one .npz (sparsecore/checkpoint.py), written to a
        temporary file and renamed (from a device: copied to the host first; it resumes on
        either side). With sharded layers every rank calls this; rank 0 passes the path."""
        meta = {
            "config": dataclasses.asdict(self.cfg),
            "step": self.step,
            "epoch": self.epoch,
            "history": self.history,
        }
        checkpoint.write(path, self, meta)
        if path is not None:
            self._good_ckpt = Path(path)

    def load_checkpoint(self, path):
        """Restore model, optimizer, step and epoch; the architecture must match. A checkpoint
        written by any number of MPI ranks, sharded or not, resumes on any other."""
        meta = checkpoint.read(path, self)
        self.step, self.epoch = int(meta["step"]), int(meta["epoch"])
        self.history = meta["history"]
        self._good_ckpt = Path(path)
        if self.dist is not None:  # every rank must now hold the same replicated state
            self.dist.check_same(self.model, f"loading checkpoint {path}")


def train(cfg: TrainConfig, dataset=None, resume: str | None = None) -> tuple[Trainer, dict]:
    tr = Trainer(cfg, dataset)
    if resume:
        tr.load_checkpoint(resume)
    return tr, tr.run()


__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "train", "build_model"]
