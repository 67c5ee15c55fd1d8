"""The training loop: mini-batches, RigL/SET/static/dense, metrics, checkpoints, cost report.

A run's settings are a TrainConfig (sparsecore/config.py). The loop itself is small
(``Trainer.run``: epochs of steps, one metrics row per epoch); progress, the metrics file,
checkpoints, the learning curve and, with several MPI ranks, the watchdog are callbacks
(sparsecore/callbacks.py), and the trainer asks one parallelism object about other processes
(sparsecore/parallel.py; sparsecore/mpi for several ranks).

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
import math
import time
from pathlib import Path

import numpy as np

from kernels import config as kernels_config
from kernels._threads import check_fork_safe
from kernels.cpu import fpmode
from kernels.validation import memory_limit
from sparsecore import checkpoint, fallback
from sparsecore import data as data_mod
from sparsecore.callbacks import Checkpoints, LearningCurve, MetricsFile, Progress, plot_history
from sparsecore.config import METHODS, TrainConfig
from sparsecore.cost import model_cost
from sparsecore.device import get_device, to_host
from sparsecore.layers import Sequential, SoftmaxCrossEntropy, mlp
from sparsecore.optim import SGD, Adam, lr_at
from sparsecore.parallel import SINGLE
from sparsecore.plan import DENSE_FALLBACK_PIECE, describe_plan, fit_grow_tile, memory_plan
from sparsecore.rigl.schedule import UpdateSchedule
from sparsecore.rigl.selection import TrainingDiverged
from sparsecore.rigl.updater import UPDATERS

EPOCH_TAG = 0xE90C  # an epoch's order is seeded by (seed, EPOCH_TAG, epoch)
# A training set up to this many bytes is put on the device once; a larger one is uploaded
# batch by batch.
DEVICE_DATA_BYTES = 4 << 30


class MemoryBudgetExceeded(ValueError):
    """The run's memory plan does not fit in --max-memory; nothing was allocated."""


def check_memory(cfg: TrainConfig, ranks: int = 1, sharded=()) -> dict:
    """The run's memory plan (of one rank, with the layers ``sharded`` split over ``ranks``);
    raises MemoryBudgetExceeded if it exceeds cfg.max_memory, or, without one, this machine's
    physical memory (a CPU run that could not fit at all is refused before it allocates).

    With a budget, RigL's exact grow gets a smaller tile than its default when that makes the
    plan fit (plan["grow_tile_bytes"], passed to the grow kernel), unless a tile was given.
    """
    plan = memory_plan(cfg, ranks=ranks, sharded=sharded)
    budget = cfg.max_memory
    if budget is None and cfg.device == "cpu":  # no budget: only refuse what cannot fit at all
        budget = memory_limit()[0]
    fits = budget is None or plan["total_bytes"] <= budget
    tile_free = cfg.method == "rigl" and cfg.grow == "exact" and cfg.grow_tile_bytes is None
    if not fits and tile_free and cfg.max_memory is not None:  # a smaller grow tile may fit it
        plan = fit_grow_tile(budget, cfg, ranks=ranks, sharded=sharded) or plan
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


def build_model(cfg: TrainConfig, sparse_layer=None) -> Sequential:
    """The MLP of the config; ``sparse_layer`` builds its sparse layers (sparsecore.layers.mlp;
    with MPI, the parallelism's layer_builder: some layers as this rank's rows only, the same
    values as those rows of the whole layer)."""
    if sparse_layer is not None and not callable(sparse_layer):
        raise TypeError(
            "build_model(cfg, sparse_layer) takes a layer builder, got "
            f"{type(sparse_layer).__name__}; for this rank's rows of sharded layers (formerly "
            "build_model(cfg, comm, sharded)) pass sparsecore.mpi.shard_builder(comm, sharded, "
            "cfg.seed, cfg.fan_in)"
        )
    dens = [None] * len(cfg.shapes()) if cfg.method == "dense" else cfg.densities()
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
    """One training run of ``cfg``: the model, optimizer, updater and data, built at once (a
    run that cannot fit its memory plan is refused before anything is allocated).

    ``run()`` trains to the end of the config's epochs (or max_steps) and returns the summary;
    progress, the metrics file, checkpoints and the learning curve are callbacks
    (sparsecore/callbacks.py), and ``callbacks`` adds the caller's own after them.
    ``parallel`` is the one object asked about other processes (sparsecore/parallel.py):
    None for one process, ``sparsecore.mpi.parallel()`` for a run on the ranks of an MPI
    launcher (data-parallel, or with cfg.shard_layers layers split by rows)."""

    def __init__(
        self,
        cfg: TrainConfig,
        dataset: data_mod.Dataset | None = None,
        *,
        parallel=None,
        callbacks=(),
    ):
        self.cfg = cfg.validate()
        self.device = get_device(cfg.device)  # the one clear error without CuPy or a GPU
        world = SINGLE if parallel is None else parallel
        # MPI with --shard-layers: the layers split by rows over the ranks (else none)
        self.sharded = world.sharded_layers(cfg)
        self.plan = check_memory(cfg, world.size, self.sharded)
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
        builder = world.layer_builder(cfg, self.sharded)
        self.model = build_model(cfg, builder).to(self.device)  # built on the host
        # the dense fallback: which layers compute on BLAS (timed here under "auto"), within the
        # memory the plan leaves under the budget (or this machine's memory)
        budget = cfg.max_memory
        if budget is None:
            budget = memory_limit()[0] if cfg.device == "cpu" else self.device.free_bytes()
        spare = None if budget is None else max(0, budget - self.plan["total_bytes"])
        if spare is not None:  # under "on" the plan counted the copies already
            spare += self.plan["pieces"].get(DENSE_FALLBACK_PIECE, 0)
        self.fallback = fallback.choose(self.model, cfg.dense_fallback, cfg.batch_size, spare)
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
        # the one object this trainer asks about other processes: a single process unless
        # given MPI's (then data-parallel, or the sharded layers' side)
        self.par = world.bind(self)
        tile = self.plan.get("grow_tile_bytes")
        if tile is None and cfg.device == "cuda" and cfg.max_memory is not None:
            tile = kernels_config.CUDA_TOPK_TILE_BYTES  # the plan's tile (else: from device memory)
        grow_kw = (
            dict(grow=cfg.grow, candidates=cfg.grow_candidates, tile_bytes=tile)
            if cfg.method == "rigl"
            else {}
        )
        self.updater = (
            None
            if cfg.method == "dense"
            else UPDATERS[cfg.method](
                self.schedule, cfg.seed, selection=self.par.selection, **grow_kw
            )
        )
        self.callbacks = [*self.par.callbacks(), Progress()]
        if self.out:  # (None on MPI ranks other than 0: rank 0 writes)
            self.callbacks.append(MetricsFile(self.out))
        if self.out or (cfg.out and self.par.sharded):  # sharded: every rank's rows go in
            self.callbacks.append(Checkpoints(self.ckpt_path() if self.out else None))
        if self.out:
            self.callbacks.append(LearningCurve(self.out / "learning_curve.png"))
        self.callbacks += list(callbacks)
        self._step_times: list[float] = []  # every step's seconds in this run
        self._update_times: list[float] = []  # this epoch's topology updates' seconds
        self._resident = False  # the training set on the device (not yet looked at)

    @property
    def dist(self):
        """The MPI side of the run, or None for a single process (``par`` is always set)."""
        return None if self.par.size == 1 else self.par

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
        # several ranks: the global batch's gradient, loss and correct count
        loss, correct = self.par.allreduce(self.model, loss, correct)
        self.par.beat()
        report = None
        if update:  # (several ranks: the same update on every rank, then the guard)
            try:
                report = self.par.update(self.updater, self.step, self.model, self.opt)
            except TrainingDiverged as e:  # (from the grow: a non-finite or huge gradient)
                raise TrainingDiverged(
                    f"at step {self.step} (epoch {self.epoch}), {e}{self._last_good()}"
                ) from e
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
        """Train to the end (cfg.epochs, or max_steps) from where the trainer stands; returns
        the summary (final test accuracy, steps, time per step, the cost model)."""
        if not self.device.on_device:
            check_fork_safe("Trainer.run")
        error = None
        self._step_times = []  # (this run's steps: the summary's time per step)
        with self.fp_mode():
            try:
                self._emit("on_run_start")
                while self.epoch < self.cfg.epochs and self.step < self.total_steps:
                    self.run_epoch()
                summary = self.summary(self._step_times)
                self._emit("on_run_end", summary)
                return summary
            except BaseException as e:
                error = e
                raise
            finally:
                self._resident = False  # (the device copy of the training set is let go)
                self._emit("on_run_exit", error)

    def _emit(self, point: str, *args):
        for cb in self.callbacks:
            getattr(cb, point)(self, *args)

    def run_epoch(self) -> dict:
        """One epoch (or what is left of it before max_steps): its steps, then its metrics row,
        checked finite and appended to the history. Returns the row."""
        t_epoch = time.perf_counter()
        steps = min(self.steps_per_epoch, self.total_steps - self.step)
        self._emit("on_epoch_start", steps)
        losses, correct, seen = [], 0, 0
        first_step, n_before = self.step, len(self._step_times)
        batches = self._epoch_batches(steps)  # (a device's uploads happen here, untimed)
        t_loop = time.perf_counter()
        for xb, yb, rows in batches:
            t0 = time.perf_counter()
            loss, c, report = self.train_step(xb, yb)
            self._step_times.append(time.perf_counter() - t0)
            if report is not None:
                self._update_times.append(sum(d["seconds"] for d in report.per_layer))
                self.updates.append(
                    {
                        "step": report.step,
                        "drop_fraction": report.drop_fraction,
                        "layers": report.per_layer,
                    }
                )
            losses.append(loss)
            correct += c
            seen += rows
            self._emit("on_step_end", loss, report)
        times = self._step_times[n_before:]
        if self.device.on_device and losses:  # the epoch's metrics, read once; timed as a whole
            self.device.sync()
            times[:] = [(time.perf_counter() - t_loop) / len(losses)] * len(losses)
            self._step_times[n_before:] = times
            losses = to_host(self.device.xp.stack(losses)).tolist()
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
                f"test_{k}": v for k, v in self.evaluate(self.data.x_test, self.data.y_test).items()
            },
            "nnz": int(sum(l.total_nnz() for l in self.model.sparse_layers())),
            "time_per_step_s": float(np.mean(times)) if times else 0.0,
            "topology_update_s": float(sum(self._update_times)),
            "epoch_s": time.perf_counter() - t_epoch,
            "lr": self.lr(),
        }
        if self.data.x_val.shape[0]:
            row.update(
                {f"val_{k}": v for k, v in self.evaluate(self.data.x_val, self.data.y_val).items()}
            )
        self._update_times.clear()
        self._check_finite(row)
        self.history.append(row)
        self._emit("on_epoch_end", row)
        return row

    def _epoch_batches(self, steps: int):
        """An iterator over the epoch's first ``steps`` batches as (xb feature-major, yb, rows
        of the global batch): this process's rows of each (several data-parallel ranks: its
        slice); on a device gathered there (the training set uploaded once, at the first call,
        and the epoch's permutation here, before the iterator is returned: outside the steps'
        clock) or uploaded batch by batch."""
        x, y = self.data.x_train, self.data.y_train
        resident = self._device_data()  # (x, y) on the device, or None
        perm_d = self.device.asarray(self.epoch_permutation(self.epoch)) if resident else None

        def batches():
            for s, idx in enumerate(self.batches(self.epoch)):
                if s >= steps:
                    return
                if self.device.on_device:
                    xb, yb = self._device_batch(resident, perm_d, s, idx)
                else:
                    rows = self.par.local_rows(idx)
                    xb, yb = np.ascontiguousarray(x[rows].T), y[rows]
                yield xb, yb, idx.shape[0]

        return batches()

    def _device_data(self):
        """The training set on the device, uploaded at the first call (None on the host, and
        when above DEVICE_DATA_BYTES)."""
        if self._resident is False:
            x, y = self.data.x_train, self.data.y_train
            big = not isinstance(x, np.ndarray) or x.nbytes + y.nbytes > DEVICE_DATA_BYTES
            # (a streamed set too: its batches are read, then uploaded)
            on = self.device.on_device and not big
            self._resident = (self.device.asarray(x), self.device.asarray(y)) if on else None
        return self._resident

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
        correct, loss_sum = self.par.eval_sums(self, x, y)
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
            "dense_fallback": self.fallback,
        }

    def plot(self, path: Path):
        """The learning curve of the history so far, as a PNG (sparsecore/callbacks.py)."""
        plot_history(self.history, self.cfg, path)

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
        # several ranks: every rank must now hold the same replicated state
        self.par.check_same(self.model, f"loading checkpoint {path}")


def train(
    cfg: TrainConfig, dataset=None, resume: str | None = None, *, parallel=None, callbacks=()
) -> tuple[Trainer, dict]:
    """Build the trainer of ``cfg`` (resumed from the checkpoint ``resume``; ``parallel`` and
    ``callbacks`` as Trainer takes them), run it, and return (trainer, summary)."""
    tr = Trainer(cfg, dataset, parallel=parallel, callbacks=callbacks)
    if resume:
        tr.load_checkpoint(resume)
    return tr, tr.run()


__all__ = [
    "METHODS",
    "MemoryBudgetExceeded",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "build_model",
    "check_memory",
    "train",
]
