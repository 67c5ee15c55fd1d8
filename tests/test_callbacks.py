"""sparsecore/callbacks.py and the loop they hang on (Trainer.run), and sparsecore/parallel.py:
the events and their order, what the built-in callbacks write, and one process's parallelism."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparsecore import data as D
from sparsecore.callbacks import Callback, Checkpoints, LearningCurve, MetricsFile, Progress
from sparsecore.parallel import SINGLE, Single, launched_size, split
from sparsecore.train import TrainConfig, Trainer


def _data(n=240, features=12, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype(np.float32)
    y = (x[:, :classes].argmax(axis=1)).astype(np.int64)
    return D.from_arrays(x[:200], y[:200], x[200:], y[200:])


def _cfg(**kw):
    base = dict(arch=[12, 16, 3], sparsity=0.5, epochs=2, batch_size=40, delta_t=2, progress=False)
    return TrainConfig(**{**base, **kw})


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_run_start(self, trainer):
        self.events.append(("run_start", trainer.step))

    def on_epoch_start(self, trainer, steps):
        self.events.append(("epoch_start", trainer.epoch, steps))

    def on_step_end(self, trainer, loss, report):
        self.events.append(("step", trainer.step, report is not None))

    def on_epoch_end(self, trainer, row):
        assert trainer.history[-1] is row  # in the history before the callbacks see it
        self.events.append(("epoch_end", row["epoch"], row["step"]))

    def on_run_end(self, trainer, summary):
        self.events.append(("run_end", summary["steps"]))

    def on_run_exit(self, trainer, error):
        self.events.append(("run_exit", type(error).__name__ if error else None))


def test_the_loop_calls_every_point_in_order():
    rec = Recorder()
    tr = Trainer(_cfg(max_steps=7), _data(), callbacks=[rec])
    tr.run()
    # 5 steps per epoch; max_steps 7: the second epoch has 2; updates at steps 2, 4, ... < t_end
    steps = [e for e in rec.events if e[0] == "step"]
    assert [s[1] for s in steps] == list(range(1, 8))  # the step counter after each step
    assert [s[2] for s in steps] == [tr.updater.is_update_step(s[1] - 1) for s in steps]
    assert any(s[2] for s in steps)
    assert rec.events[0] == ("run_start", 0)
    assert rec.events[1] == ("epoch_start", 0, 5)
    assert rec.events[7] == ("epoch_end", 1, 5)
    assert rec.events[8] == ("epoch_start", 1, 2)
    assert rec.events[-3:] == [("epoch_end", 2, 7), ("run_end", 7), ("run_exit", None)]
    # the built-in callbacks come first, the caller's last; no output folder: no file writers
    kinds = [type(cb) for cb in tr.callbacks]
    assert kinds == [Progress, Recorder]


def test_an_error_reaches_on_run_exit_and_propagates():
    class Boom(Callback):
        def on_epoch_end(self, trainer, row):
            raise RuntimeError("stop here")

    rec = Recorder()
    tr = Trainer(_cfg(), _data(), callbacks=[Boom(), rec])
    with pytest.raises(RuntimeError, match="stop here"):
        tr.run()
    assert rec.events[-1] == ("run_exit", "RuntimeError")
    assert ("run_end", 10) not in rec.events


def test_the_file_callbacks_write_metrics_checkpoint_and_plot(tmp_path):
    out = tmp_path / "run"
    tr = Trainer(_cfg(out=str(out)), _data())
    assert [type(cb) for cb in tr.callbacks] == [Progress, MetricsFile, Checkpoints, LearningCurve]
    tr.run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows == tr.history
    assert json.loads((out / "config.json").read_text())["arch"] == [12, 16, 3]
    assert (out / "checkpoint.npz").is_file() and (out / "learning_curve.png").stat().st_size > 0
    # a resumed run rewrites metrics.jsonl from the checkpoint's history (no stale rows)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 99}\n')
    again = Trainer(_cfg(out=str(out), epochs=3), _data())
    with pytest.warns(UserWarning, match="different epochs"):
        again.load_checkpoint(out / "checkpoint.npz")
    again.run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]


def test_progress_prints_one_line_per_epoch(capsys):
    Trainer(_cfg(progress=True), _data()).run()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2 and "ms/step" in lines[0]
    Trainer(_cfg(progress=False), _data()).run()
    assert "epoch" not in capsys.readouterr().out


def test_one_process_parallelism():
    tr = Trainer(_cfg(), _data())
    assert tr.par is SINGLE and tr.dist is None and tr.par.callbacks() == []
    idx = np.arange(5)
    assert tr.par.local_rows(idx) is idx
    assert tr.par.allreduce(tr.model, 1.5, 3) == (1.5, 3)
    assert Single().sharded_layers(_cfg(shard_layers="all")) == []
    assert [split(10, 3, r) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]


def test_a_trainer_under_an_mpi_launcher_without_mpi_refuses(monkeypatch):
    """Started by mpiexec with several ranks but given no MPI parallelism: every rank would
    train alone into the same files, so the trainer refuses before training."""
    monkeypatch.setenv("PMI_SIZE", "3")
    assert launched_size() == 3
    with pytest.raises(ValueError, match="one of 3 MPI ranks.*parallel=sparsecore.mpi.parallel"):
        Trainer(_cfg(), _data())
