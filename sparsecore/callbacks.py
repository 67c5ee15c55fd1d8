"""What hangs on the training loop: progress, the metrics file, checkpoints, the learning curve.

The loop (``Trainer.run``, sparsecore/train.py) trains epochs of steps and makes one row of
metrics per epoch; everything else is a ``Callback`` that it calls at six points:

    on_run_start(trainer)                 before the first step (a resumed run: its next step)
    on_epoch_start(trainer, steps)        an epoch of ``steps`` steps begins
    on_step_end(trainer, loss, report)    after each step (report: the topology update or None;
                                          on a device, loss is a 0-d device array: no sync)
    on_epoch_end(trainer, row)            the epoch's metrics, checked finite, in the history
    on_run_end(trainer, summary)          training ended normally
    on_run_exit(trainer, error)           always, last (error: the exception, or None)

They run in list order: the parallelism's own (sparsecore/parallel.py: with several MPI ranks,
the watchdog, which pauses around the writes of the others), then ``Progress``, ``MetricsFile``,
``Checkpoints``, ``LearningCurve``, then the caller's (``Trainer(cfg, callbacks=[...])``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

from tqdm import tqdm


class Callback:
    """A hook of the training loop; override the points you need (see the module docstring)."""

    def on_run_start(self, trainer):
        pass

    def on_epoch_start(self, trainer, steps: int):
        pass

    def on_step_end(self, trainer, loss, report):
        pass

    def on_epoch_end(self, trainer, row: dict):
        pass

    def on_run_end(self, trainer, summary: dict):
        pass

    def on_run_exit(self, trainer, error: BaseException | None):
        pass


class Progress(Callback):
    """A progress bar over each epoch's steps and one line per epoch (cfg.progress)."""

    def __init__(self):
        self.bar = None

    def on_epoch_start(self, trainer, steps):
        cfg = trainer.cfg
        self.bar = tqdm(
            total=steps,
            desc=f"epoch {trainer.epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress,
            leave=False,
        )

    def on_step_end(self, trainer, loss, report):
        self.bar.update()

    def on_epoch_end(self, trainer, row):
        self._close()
        if trainer.cfg.progress:
            print(
                f"epoch {row['epoch']:3d}  loss {row['train_loss']:.4f}  "
                f"train {row['train_acc']:.4f}  test {row['test_acc']:.4f}  "
                f"{1e3 * row['time_per_step_s']:.2f} ms/step"
            )

    def on_run_exit(self, trainer, error):
        self._close()

    def _close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsFile(Callback):
    """``out/config.json`` at the start and one JSON line per epoch in ``out/metrics.jsonl``.

    At the start metrics.jsonl is rewritten from the history (a resumed run: the checkpoint's
    epochs), so that rows of a run killed after its last checkpoint, or of an earlier run,
    never stay."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def on_run_start(self, trainer):
        self.folder.mkdir(parents=True, exist_ok=True)
        config = json.dumps(dataclasses.asdict(trainer.cfg), indent=1)
        (self.folder / "config.json").write_text(config)
        _replace(
            self.folder / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in trainer.history)
        )

    def on_epoch_end(self, trainer, row):
        with open(self.folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


class Checkpoints(Callback):
    """The checkpoint after every epoch (sparsecore/checkpoint.py), replacing the last one.

    ``path`` None: this process writes no file but takes part in the write (an MPI rank whose
    rows of sharded layers go into rank 0's file)."""

    def __init__(self, path: Path | None):
        self.path = path

    def on_epoch_end(self, trainer, row):
        trainer.save_checkpoint(self.path)


class LearningCurve(Callback):
    """Loss and accuracy per epoch, train and test, plotted to ``path`` when the run ends."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_run_end(self, trainer, summary):
        plot_history(trainer.history, trainer.cfg, self.path)


def plot_history(history: list, cfg, path: Path):
    """The learning curve of a run's history (its metrics rows) as a PNG; nothing without rows."""
    if not history:
        return
    import matplotlib  # (slow to import: only when a run writes its plot)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, what in ((a, "loss"), (b, "acc")):
        ax.plot(ep, [r[f"train_{what}"] for r in history], label="train")
        ax.plot(ep, [r[f"test_{what}"] for r in history], label="test")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss" if what == "loss" else "accuracy")
        ax.legend()
    fig.suptitle(
        f"{cfg.method} at sparsity {cfg.sparsity} ({cfg.distribution}), "
        f"{'-'.join(map(str, cfg.arch))}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _replace(path: Path, text: str):
    """Write ``text`` to ``path`` atomically: a new temporary file created exclusively (as
    checkpoints are: no planted link is followed), then renamed over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = [
    "Callback",
    "Checkpoints",
    "LearningCurve",
    "MetricsFile",
    "Progress",
    "plot_history",
]
